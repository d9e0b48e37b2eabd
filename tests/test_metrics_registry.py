"""The metric-group registry (issue 7 item 7): kinds, errors, features returned, generic groups."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp, wasserstein_distance

from caloexp import metrics
from caloexp.data.calochallenge import Showers
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError
from caloexp.geometry import builtin
from caloexp.metrics import features as F
from caloexp.metrics import generic
from tests.conftest import random_showers

G = builtin("dataset_1_photons")


def test_groups_declare_their_kinds():
    assert metrics.groups_for("calo") == list(metrics.ALL)
    assert metrics.groups_for("tabular") == ["tabular"]
    assert metrics.groups_for("grid") == ["cells", "grid"] and metrics.groups_for("image") == ["cells", "zdc"]
    for kind, groups in metrics.DEFAULT_GROUPS.items():
        assert set(groups) <= set(metrics.groups_for(kind))


def test_unknown_or_wrong_kind_group_is_one_line_config_error():
    tab = Sample(np.zeros((5, 2)), {}, "tabular")
    with pytest.raises(ConfigError, match=r"do not apply to tabular data; for tabular data choose from \['tabular'\]"):
        metrics.evaluate(tab, tab, groups=["separation"])
    with pytest.raises(ConfigError, match=r"unknown metric group\(s\) \['fid'\]") as e:
        metrics.evaluate_stream(tab, tab, groups=["fid"])
    assert "\n" not in str(e.value)


def test_evaluation_returns_the_features_and_accepts_samples():
    e, s = random_showers(300, seed=7)
    sample = Sample(s, {"energy": e}, "calo")
    ev = metrics.evaluate(sample, Showers(e, s), G, groups=["separation"], return_features=True)
    want = F.compute(e, s, G)  # default threshold, as the evaluation
    np.testing.assert_allclose(ev.generated_features.E_layer, want.E_layer)
    np.testing.assert_allclose(ev.reference_features.ECr, want.ECr)
    assert ev.metrics["sep/mean"] == 0.0 and ev.n_reference == ev.n_generated == 300
    # streamed in chunks (an iterator factory) gives the same numbers as in memory
    chunks = lambda: (Sample(s[i:i + 70], {"energy": e[i:i + 70]}, "calo") for i in range(0, 300, 70))  # noqa: E731
    gen = Showers(e, s * 1.1)
    a = metrics.evaluate_stream(chunks, gen, G, groups=["separation"], kind="calo").metrics
    b = metrics.evaluate(Showers(e, s), gen, G, groups=["separation"])
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_tabular_group_by_hand():
    rng = np.random.default_rng(0)
    n = 2000
    z = rng.normal(size=(n, 3))
    x = np.stack([z[:, 0], z[:, 0] + 0.5 * z[:, 1], -3.0 + z[:, 2]], axis=1)  # negative values, correlated
    lab = rng.integers(0, 2, n)
    ref = Sample(x, {"label": lab}, "tabular")
    same = metrics.evaluate(ref, ref)
    assert same["tab/sep_mean"] == same["tab/corr_max"] == same["monitor/score"] == 0.0
    assert "tab/label_1/sep_mean" in same
    y = x.copy()
    y[:, 0] += 0.5
    y[:, 1] = rng.normal(size=n) * x[:, 1].std() + x[:, 1].mean()  # same marginal, correlation lost
    out = metrics.evaluate(ref, Sample(y, {"label": lab}, "tabular"))
    assert out["tab/wd_x0"] == pytest.approx(wasserstein_distance(x[:, 0], y[:, 0]) / x[:, 0].std(), rel=1e-9)
    assert out["tab/ks_x0"] == pytest.approx(ks_2samp(x[:, 0], y[:, 0]).statistic)
    rho = np.corrcoef(x, rowvar=False)[0, 1]
    assert out["tab/corr_max"] == pytest.approx(abs(rho - np.corrcoef(y, rowvar=False)[0, 1]), rel=1e-9)
    assert out["tab/sep_x2"] == 0.0 and out["tab/sep_x0"] > 0.05
    assert out["monitor/score"] > same["monitor/score"]


def test_common_bins_are_pooled_with_overflow():
    np.testing.assert_allclose(generic.common_bins(np.array([0.0, 1.0]), np.array([2.0])), [-0.5, 0.5, 1.5, 2.5])
    assert generic.separation_common(np.zeros(10), np.ones(10)) == 1.0


def test_cell_statistics_by_hand():
    x = np.zeros((1, 4, 5, 6))
    x[0, 1, 2, 3] = 2.0
    x[0, 3, 2, 3] = 2.0
    st = generic.cell_statistics(x)
    assert st["total"][0] == 4.0 and st["occupancy"][0] == pytest.approx(2 / 120)
    assert (st["centroid_ax0"][0], st["centroid_ax1"][0], st["centroid_ax2"][0]) == (2.0, 2.0, 3.0)
    assert (st["width_ax0"][0], st["width_ax1"][0]) == (1.0, 0.0)


@pytest.mark.parametrize("kind,shape", [("grid", (6, 5, 4)), ("image", (1, 8, 8))])
def test_cells_group_sees_scale_and_shape(kind, shape):
    rng = np.random.default_rng(1)
    e = rng.choice([10.0, 50.0, 100.0], 600)
    x = rng.exponential(1.0, (600, *shape)) * (rng.random((600, *shape)) < 0.4) * e.reshape(-1, *[1] * len(shape))
    ref = Sample(x, {"energy": e}, kind)
    same = metrics.evaluate(ref, ref)
    assert same["cells/mean"] == 0.0 and same["monitor/score"] == 0.0
    doubled = metrics.evaluate(ref, Sample(2 * x, {"energy": e}, kind))
    assert doubled["resp/mean_ratio_50"] == pytest.approx(2.0) and doubled["resp/width_ratio_100"] == pytest.approx(2.0)
    assert doubled["cells/sep_total"] > 0.3 and doubled["monitor/score"] > 1.3
    # without an energy condition the response is that of the cell sum itself
    plain = metrics.evaluate(Sample(x, {}, kind), Sample(2 * x, {}, kind))
    assert plain["resp/mean_ratio_all"] == pytest.approx(2.0)
