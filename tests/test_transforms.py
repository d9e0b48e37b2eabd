import numpy as np
import pytest
import torch

from caloexp.data.transforms import ShowerTransform
from caloexp.errors import ConfigError

from conftest import random_showers


@pytest.mark.parametrize("kwargs", [
    dict(), dict(normalize="minmax"), dict(output_range=(-1.0, 1.0)), dict(log_eps=None, normalize="none"),
    dict(energy_scale=False),
])
def test_inverse_is_exact(kwargs):
    e, s = random_showers(2000)
    t = ShowerTransform(368, **kwargs).fit(s, e)
    x = t.to_network(s, e)
    assert np.isfinite(x).all()
    back = t.to_physical(x, e)
    np.testing.assert_allclose(back, s, rtol=1e-5, atol=1e-4 * s.max())
    assert (back[s == 0] <= 1e-3).all()


def test_standard_and_minmax_ranges():
    e, s = random_showers(2000)
    x = ShowerTransform(368).fit(s, e).to_network(s, e)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-2)
    x = ShowerTransform(368, output_range=(-1, 1)).fit(s, e).to_network(s, e)
    assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5
    np.testing.assert_allclose(x.min(0), -1, atol=1e-5)


def test_condition_and_nonnegative_inverse():
    e, s = random_showers(500)
    t = ShowerTransform(368).fit(s, e)
    c = t.condition(torch.tensor([256.0, 2.0**22]))
    np.testing.assert_allclose(c.numpy().ravel(), [0.0, 1.0], atol=1e-6)
    assert (t.inverse(torch.full((3, 368), -50.0), torch.ones(3) * 1e3) == 0).all()


def test_transform_state_travels_in_state_dict():
    e, s = random_showers(500)
    a = ShowerTransform(368).fit(s, e)
    b = ShowerTransform(368)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.to_network(s, e), b.to_network(s, e))


def test_bad_settings():
    with pytest.raises(ConfigError, match="normalize"):
        ShowerTransform(10, normalize="zscore")
    with pytest.raises(ConfigError, match="log_eps"):
        ShowerTransform(10, log_eps=0.0)
