"""The transform chain: exact inverses, the CaloChallenge preset's numerics, conditions, specs."""
import numpy as np
import pytest
import torch

from caloexp.data.transforms import CALO_CONDITIONS, CALO_STEPS, Transform
from caloexp.errors import ConfigError

from conftest import random_showers


def calo(steps=CALO_STEPS, **kw):
    return Transform((368,), steps, CALO_CONDITIONS, **kw)


@pytest.mark.parametrize("steps, kw", [
    (CALO_STEPS, {}),
    ([{"step": "energy_fraction"}, {"step": "log", "eps": 1e-7}, {"step": "normalise", "mode": "minmax"}], {}),
    (CALO_STEPS, {"output_range": (-1.0, 1.0)}),
    ([{"step": "energy_fraction"}], {}),
    ([{"step": "log", "eps": 1e-7}, {"step": "normalise", "per": "global"}], {}),
    ([{"step": "energy_fraction"}, {"step": "power", "p": 0.85}, {"step": "scale", "factor": 10.0}], {}),
    ([{"step": "energy_fraction", "factor": 2.0}, {"step": "logit", "alpha": 1e-6}, "normalise"], {}),
])
def test_inverse_is_exact(steps, kw):
    e, s = random_showers(2000)
    cond = {"energy": e}
    t = calo(steps, **kw).fit_conditions(cond).fit(s, cond)
    x = t.to_network(s, cond)
    assert np.isfinite(x).all()
    back = t.to_physical(x, cond)
    np.testing.assert_allclose(back, s, rtol=1e-4, atol=1e-4 * s.max())
    assert (back[s == 0] <= 1e-3 * s.max()).all()


def test_calochallenge_preset_keeps_the_original_numerics():
    """voxel/E -> log(u + 1e-7) -> per-voxel standardisation, statistics from float64."""
    e, s = random_showers(1000)
    t = calo().fit_conditions({"energy": e}).fit(s, {"energy": e})
    v = np.log(s.astype(np.float64) / e[:, None].astype(np.float64) + 1e-7)
    expected = (v - v.mean(0)) / np.maximum(v.std(0, ddof=1), 1e-6)
    np.testing.assert_allclose(t.to_network(s, {"energy": e}), expected, rtol=1e-4, atol=1e-4)


def test_standard_and_minmax_ranges():
    e, s = random_showers(2000)
    c = {"energy": e}
    x = calo().fit_conditions(c).fit(s, c).to_network(s, c)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-2)
    x = calo(output_range=(-1, 1)).fit(s, c).to_network(s, c)
    assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5
    np.testing.assert_allclose(x.min(0), -1, atol=1e-5)


def test_conditions_energy_angle_and_label():
    n = 400
    rng = np.random.default_rng(0)
    cond = {"energy": rng.uniform(2, 500, n), "theta": rng.uniform(60, 120, n), "label": rng.integers(0, 3, n),
            "particle": rng.normal(size=(n, 4))}
    t = Transform((5,), [], {"energy": "log_scale", "theta": {"step": "linear"}, "label": "one_hot",
                             "particle": "standardise"}, cond_dims={"particle": 4}).fit_conditions(cond)
    assert t.cond_names == ["energy", "theta", "label", "particle"] and t.cond_dim == 1 + 1 + 3 + 4
    c = t.condition({k: torch.as_tensor(v) for k, v in cond.items()}).numpy()
    assert c.shape == (n, 9)
    assert c[:, 0].min() == pytest.approx(0, abs=1e-6) and c[:, 0].max() == pytest.approx(1, abs=1e-6)
    assert c[:, 1].min() == pytest.approx(0, abs=1e-6) and c[:, 1].max() == pytest.approx(1, abs=1e-6)
    np.testing.assert_array_equal(c[:, 2:5].argmax(1), cond["label"])
    np.testing.assert_allclose(c[:, 5:].mean(0), 0, atol=1e-5)


def test_signed_variables_round_trip_without_clamping():
    x = np.random.default_rng(1).normal(-3, 2, size=(500, 3)).astype(np.float32)
    t = Transform((3,), ["normalise"], {}, nonnegative=False).fit(x, {})
    np.testing.assert_allclose(t.to_physical(t.to_network(x, {}), {}), x, rtol=1e-5, atol=1e-5)
    assert (t.to_physical(t.to_network(x, {}), {}) < 0).any()


def test_spec_rebuilds_the_same_transform():
    e, s = random_showers(500)
    c = {"energy": e}
    a = calo().fit_conditions(c).fit(s, c)
    b = Transform.from_spec(a.spec())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.to_network(s, c), b.to_network(s, c))
    assert a.spec() == b.spec()


def test_nonnegative_inverse_and_bad_settings():
    e, s = random_showers(300)
    c = {"energy": e}
    t = calo().fit_conditions(c).fit(s, c)
    assert (t.inverse(torch.full((3, 368), -50.0), {"energy": torch.ones(3) * 1e3}) == 0).all()
    with pytest.raises(ConfigError, match="mode"):
        Transform((10,), [{"step": "normalise", "mode": "zscore"}])
    with pytest.raises(ConfigError, match="eps"):
        Transform((10,), [{"step": "log", "eps": 0.0}])
    with pytest.raises(ConfigError, match="unknown step 'pathlib.Path'"):
        Transform((10,), [{"step": "pathlib.Path"}])
    with pytest.raises(ConfigError, match="label"):
        Transform((3,), [], {"label": "one_hot"}).fit_conditions({"label": np.array([0.5, 1.0])})
