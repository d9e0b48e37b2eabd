"""The grid physics metrics (caloexp/metrics/grid.py) against values computed by hand on tiny grids."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caloexp import metrics
from caloexp.data.sample import Sample
from caloexp.metrics.grid import event_features, measured_angle


def line(n_layers: int, slope: float, size: int = 9) -> np.ndarray:
    """One shower: 1 GeV per layer in the cell x = 4, y = 2 + slope * z."""
    x = np.zeros((size, size, n_layers))
    for z in range(n_layers):
        x[4, int(round(2 + slope * z)), z] = 1.0
    return x


def test_measured_angle_of_straight_tracks():
    ev = torch.tensor(np.stack([line(4, 0.0), line(4, 1.0)]))
    ang = measured_angle(ev).numpy()
    # slope 0: every layer at the barycentre's y -> 90 deg; slope 1 cell per layer -> 90 - atan(1) = 45 deg
    # (an odd layer count would put one layer at the barycentre, where the original counts 90 deg)
    np.testing.assert_allclose(np.degrees(ang), [90.0, 45.0], atol=1e-9)
    assert measured_angle(torch.zeros(1, 3, 3, 3)).item() == 100.0   # empty shower: the original's marker


def test_event_features_by_hand():
    x = np.zeros((2, 4, 4, 3))
    x[0, 1, 2, 0], x[0, 1, 2, 2] = 3.0, 1.0          # z = 0 and 2, weights 3:1
    x[1, 3, 0, 1] = 2.0
    x[1, 0, 0, 1] = 5e-5                               # below the hit threshold
    f = event_features(x, energy=np.array([8.0, 4.0]), theta=np.array([math.pi / 2, math.pi / 2]))
    np.testing.assert_allclose(f["sf"], [4 / 8, (2 + 5e-5) / 4])
    np.testing.assert_allclose(f["hits"], [2, 1])
    np.testing.assert_allclose(f["m1_z"], [0.5, 1.0])                  # (3*0 + 1*2) / 4
    np.testing.assert_allclose(f["m2_z"], [math.sqrt(1.0 - 0.25), 0.0], atol=1e-12)   # E[z^2] = 1
    np.testing.assert_allclose(f["m1_x"][0], 1.0) and np.testing.assert_allclose(f["m1_y"][0], 2.0)
    np.testing.assert_allclose(f["profile_z"][0], [0.75, 0.0, 0.25])


def showers(n: int, rng, scale: float = 1.0, shift: int = 0) -> Sample:
    """Showers on a 6 x 6 x 8 grid whose longitudinal peak is at layer 3 + shift."""
    e = rng.uniform(5, 450, n)
    prof = np.exp(-0.5 * (np.arange(8) - 3 - shift) ** 2)
    x = np.zeros((n, 6, 6, 8))
    x[:, 2:4, 2:4, :] = prof / prof.sum() / 4
    x = x * (e * rng.normal(1.0, 0.02, n))[:, None, None, None] * scale
    return Sample(x, {"energy": e, "theta": np.full(n, math.pi / 2)}, "grid")


def test_sampling_fraction_and_peak_layer_criteria():
    rng = np.random.default_rng(0)
    ref = showers(600, rng)
    same = metrics.evaluate(ref, showers(600, rng), groups=["grid"])
    assert same["grid/sf_within_5pct"] == 1.0 and same["grid/sf_max_dev"] < 0.02
    assert same["grid/peak_layer_ref"] == same["grid/peak_layer_gen"] == 3 and same["grid/peak_layer_within_1"] == 1
    off = metrics.evaluate(ref, showers(600, rng, scale=1.1, shift=2), groups=["grid"])
    for label in ("10-50", "100-200", "400-inf"):
        assert off[f"grid/sf_ratio_e{label}"] == pytest.approx(1.1, abs=0.01)
    assert off["grid/sf_within_5pct"] == 0.0 and off["grid/sf_max_dev"] == pytest.approx(0.1, abs=0.01)
    assert off["grid/peak_layer_gen"] == 5 and off["grid/peak_layer_dev"] == 2 and off["grid/peak_layer_within_1"] == 0
    assert off["grid/sep_m1_z"] > 0.9 and same["grid/sep_m1_z"] < 0.1
    assert off["grid/sep_profile_z"] > same["grid/sep_profile_z"]
    assert same["grid/sf_ratio_a90-100"] == pytest.approx(1.0, abs=0.01)
    # grid is chosen (model=gan3d sets trainer.metrics: [cells, grid]), not a default of every grid:
    # the kind's default keeps the cells monitor and needs no energy condition
    default = metrics.evaluate(ref, showers(600, rng, scale=1.1, shift=2), groups=None)
    assert "grid/sf_max_dev" not in default and np.isfinite(default["monitor/score"])
    from caloexp.cli import CONF_DIR
    assert "metrics: [cells, grid]" in (CONF_DIR / "model" / "gan3d.yaml").read_text()
