"""3DGAN-style shower shapes: hand-made grids and the real 3DGAN ECAL showers from ../shared."""
from __future__ import annotations

import numpy as np
import pytest

from caloexp.geometry import builtin
from caloexp.metrics import shapes3d as S


def test_single_cell_grid_by_hand():
    g = np.zeros((1, 5, 6, 7))
    g[0, 1, 2, 3] = 4.0
    assert S.longitudinal_profile(g)[0].tolist() == [0, 0, 0, 4, 0, 0, 0]
    px, py = S.transverse_profiles(g)
    assert px[0, 1] == 4 and py[0, 2] == 4
    m = S.moments(g, orders=3)
    np.testing.assert_allclose([m["x"][0, 0], m["y"][0, 0], m["z"][0, 0]], [1, 2, 3])
    np.testing.assert_allclose(m["z"][0, 1:], [0, 0])  # a single cell has no spread
    assert S.hit_multiplicity(g)[0] == 1
    two = np.zeros((1, 1, 1, 4))
    two[0, 0, 0, 0], two[0, 0, 0, 2] = 1.0, 1.0
    np.testing.assert_allclose(S.moments(two)["z"][0], [1.0, 1.0])  # mean 1, variance 1


def test_sampling_fraction_profile():
    e_inc = np.array([10.0, 10.0, 100.0, 100.0])
    e_tot = np.array([1.0, 3.0, 20.0, 20.0])
    p = S.sampling_fraction_profile(e_tot, e_inc, np.array([5.0, 50.0, 500.0]))
    np.testing.assert_allclose(p["mean"], [0.2, 0.2])
    np.testing.assert_allclose(p["std"], [0.1, 0.0])
    assert p["count"].tolist() == [2, 2]


@pytest.fixture(scope="module")
def gan_showers(shared_data):
    files = sorted((shared_data / "3dgan_angle_ecal_samples").glob("ecal_padded64x64x32_*.npy"))
    if not files:
        pytest.skip("3DGAN samples not present")
    return np.stack([np.load(f)[7:58, 7:58, 4:29] for f in files])  # un-pad to 51 x 51 x 25


def test_real_3dgan_showers_have_sane_shapes(gan_showers):
    assert gan_showers.shape == (10, 51, 51, 25)
    prof = S.longitudinal_profile(gan_showers)
    peak = prof.argmax(axis=1)
    assert ((peak >= 10) & (peak <= 13)).all()
    mean_prof = prof.mean(axis=0)
    assert 10 <= mean_prof.argmax() <= 13
    m = S.moments(gan_showers)
    # the shower core sits in the middle of the 51 x 51 crop, ~12 layers deep, a few layers long
    assert (np.abs(m["x"][:, 0] - 25) < 2).all() and (np.abs(m["y"][:, 0] - 25) < 2).all()
    assert (np.abs(m["z"][:, 0] - 12) < 2).all()
    assert ((np.sqrt(m["z"][:, 1]) > 2) & (np.sqrt(m["z"][:, 1]) < 8)).all()
    hits = S.hit_multiplicity(gan_showers, threshold=1e-4)
    assert ((hits > 1000) & (hits < 2000)).all()
    counts, edges = S.cell_energy_spectrum(gan_showers, 20, threshold=1e-4)
    assert counts.sum() == hits.sum() and edges[0] == pytest.approx(-4.0, abs=0.01)


def test_shape_metrics_on_a_geometry():
    g = builtin("dataset_1_photons")
    rng = np.random.default_rng(0)
    x = rng.exponential(50.0, (400, g.n_voxels)) * (rng.random((400, g.n_voxels)) < 0.3)
    e = rng.choice(2.0 ** np.arange(8, 23), 400)
    same = S.shape_metrics(e, x, e, x, g)
    assert all(v == 0 for v in same.values())
    assert {"shapes/long_profile_tv", "shapes/depth_mean_diff", "shapes/response_rel_diff"} <= set(same)
    deep = x.copy()
    deep[:, g.layer_slice(2)] += deep[:, g.layer_slice(1)].sum(axis=1, keepdims=True) / 190  # layer 1 -> layer 2
    deep[:, g.layer_slice(1)] = 0
    shifted = S.shape_metrics(e, x, e, deep, g)
    assert shifted["shapes/long_profile_tv"] > 0.1 and shifted["shapes/depth_mean_diff"] > 0.1
    zero = S.shape_metrics(e, x, e, np.zeros_like(x), g)
    assert zero["shapes/long_profile_tv"] == 1.0 and np.isfinite(list(zero.values())).all()
