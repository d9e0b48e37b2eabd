"""Wasserstein, average-image MSE/SSIM, FPD and KPD."""
from __future__ import annotations

import numpy as np
import pytest

from caloexp.geometry import builtin
from caloexp.metrics import distances as D
from caloexp.metrics import features as F


def _sample(g, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.exponential(50.0, (n, g.n_voxels)) * (rng.random((n, g.n_voxels)) < 0.3)
    return rng.choice(2.0 ** np.arange(8, 23), n), x


def test_wasserstein_zero_for_identical_and_shift_for_shifted():
    g = builtin("dataset_1_photons")
    e, x = _sample(g, 400, 0)
    f = F.compute(e, x, g, 0)
    out = D.wasserstein(f, f, g)
    assert out["wd/mean"] == 0.0 and out["wd/E_ratio"] == 0.0
    f2 = F.compute(e, x * 1.1, g, 0)
    out2 = D.wasserstein(f, f2, g)
    assert out2["wd/E_ratio"] == pytest.approx(0.1 * f.E_ratio.mean(), rel=1e-9)  # W1 of a 10 % scale


def test_images_identical_and_scaled():
    g = builtin("dataset_1_photons")
    e, x = _sample(g, 600, 1)
    same = D.image_metrics(e, x, e, x, g)
    assert same["images/mse"] == 0 and same["images/rel_mse"] == 0
    assert same["images/ssim"] == pytest.approx(1.0) and same["images/ssim_per_energy"] == pytest.approx(1.0)
    scaled = D.image_metrics(e, x, e, 2 * x, g)
    assert scaled["images/rel_mse"] == pytest.approx(1.0)  # (2A - A)^2 / A^2
    a = D.average_fraction_image(e, x)
    assert scaled["images/mse"] == pytest.approx(np.mean(a**2))
    assert scaled["images/ssim"] < 0.95


def test_images_streaming_accumulator_equals_in_memory():
    g = builtin("dataset_2")
    e, x = _sample(g, 120, 2)
    e = np.geomspace(1e3, 1e6, 120)
    acc = D.AverageImages(g)
    for i in range(0, 120, 50):
        acc.add(e[i:i + 50], x[i:i + 50])
    np.testing.assert_allclose(acc.mean(), D.average_fraction_image(e, x))
    assert set(acc.bins) == {"1000-10000", "10000-100000", "100000-1000000"}
    assert sum(n for _, n in acc.bins.values()) == 120  # 1e6 falls in the last (closed) bin


def test_fpd_kpd_identical_is_zero_and_shift_is_measured():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6000, 5)) + 10
    y = rng.normal(size=(6000, 5)) + 10
    same = D.fpd_kpd(x, x.copy(), num_batches=5, num_points=5)
    assert same["fpd"] == pytest.approx(0, abs=1e-4)
    assert abs(same["kpd"]) < 3 * same["kpd_err"] + 1e-9  # unbiased: zero within its error
    r = D.fpd_kpd(x, y, num_batches=5, num_points=5)
    assert r["fpd"] < 1e-3 and r["fpd_err"] >= 0 and r["kpd_err"] >= 0
    shifted = D.fpd(x, y + 1.0, num_batches=5, num_points=5)[0]
    # after normalisation by max|x| (~14.5) the mean shift is 1/max per feature
    m = np.abs(x).max(axis=0)
    assert shifted == pytest.approx(np.sum(1 / m**2), rel=0.1)


def test_mmd_matches_dense_formula():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(200, 4)) + 0.3

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 4

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    dense = (kxx.sum() - np.trace(kxx)) / (300 * 299) + (kyy.sum() - np.trace(kyy)) / (200 * 199) - 2 * kxy.mean()
    assert D.mmd_poly_unbiased(x, y) == pytest.approx(dense, rel=1e-10)


def test_frechet_distance_of_gaussians_by_hand():
    mu1, mu2 = np.zeros(2), np.array([3.0, 4.0])
    s1, s2 = np.eye(2), 4 * np.eye(2)
    # |mu|^2 = 25; Tr(S1 + S2 - 2 sqrt(S1 S2)) = 2 + 8 - 2*4 = 2
    assert D.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(27.0)
