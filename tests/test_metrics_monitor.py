"""Issue 15: official binnings, the 30-feature vector, FPD/KPD settings, and a monitor that cannot be fooled."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import linalg

from caloexp import metrics
from caloexp.data.calochallenge import Showers
from caloexp.geometry import builtin
from caloexp.metrics import distances as D
from caloexp.metrics import features as F
from caloexp.metrics import separation as S
from tests.conftest import random_showers

G = builtin("dataset_1_photons")


@pytest.fixture(scope="module")
def ref():
    e, s = random_showers(1500, seed=3)
    return Showers(e, s)


def test_default_monitor_sees_a_scaled_generator(ref):
    """Reference x2 and 10 % of showers x1e3 score clearly worse than the reference itself."""
    assert metrics.MONITOR == "monitor/score"
    same = metrics.evaluate(ref, ref, G, threshold=0)
    assert same["monitor/score"] == 0.0
    doubled = metrics.evaluate(ref, Showers(ref.energies, 2 * ref.showers), G, threshold=0)
    # E_tot/E_inc doubles: mean and width ratios are exactly 2 in every energy bin
    assert doubled["resp/mean_ratio_256"] == pytest.approx(2.0) and doubled["resp/width_ratio_4194304"] == pytest.approx(2.0)
    assert doubled["resp/max_mean_dev"] == pytest.approx(1.0) and doubled["resp/max_width_ratio"] == pytest.approx(2.0)
    assert doubled["monitor/score"] == pytest.approx(doubled["sep/mean_with_overflow"] + 2 * np.log(2.0))
    assert doubled["monitor/score"] > 1.3
    x = ref.showers.copy()
    x[::10] *= 1e3
    tail = metrics.evaluate(ref, Showers(ref.energies, x), G, threshold=0)
    e = ref.energies.astype(np.float64)
    r_ref, r_gen = ref.showers.astype(np.float64).sum(1) / e, x.astype(np.float64).sum(1) / e
    m = e == 1024
    assert tail["resp/mean_ratio_1024"] == pytest.approx(r_gen[m].mean() / r_ref[m].mean(), rel=1e-9)
    assert tail["monitor/score"] > 5.0
    # the official in-range separation alone drops the overflowing entries; the monitored one counts them
    assert tail["sep/mean_with_overflow"] > tail["sep/mean"]
    assert tail["sep/outside_gen"] > same["sep/outside_gen"] + 0.02  # 10 % of 6 of the 14 features


def test_counts_with_overflow_by_hand():
    c = S.counts_with_overflow(np.array([-1.0, 0.5, 1.5, 2.0, 3.0, np.nan, np.inf, -np.inf]), np.array([0.0, 1.0, 2.0]))
    np.testing.assert_array_equal(c, [2, 1, 2, 3])  # under: -1, -inf; bins [0,1) [1,2]; over: 3, nan, inf


def test_e_ratio_uses_101_edges():
    """E_tot/E_inc of 1.000 and 1.012 share a bin of width 1/30 but not of width 1/100."""
    e = np.full(200, 4096.0)
    x_ref, x_gen = np.zeros((200, G.n_voxels)), np.zeros((200, G.n_voxels))
    x_ref[:, 0], x_gen[:, 0] = 1.003 * e, 1.012 * e
    d = S.separation_powers(F.compute(e, x_ref, G, 0), F.compute(e, x_gen, G, 0), G)
    assert d["sep/E_ratio"] == pytest.approx(1.0)
    old = np.linspace(0.5, 1.5, 31)
    assert np.digitize(1.003, old) == np.digitize(1.012, old)


def test_feature_families():
    assert [S.family(n) for n in ("E_ratio", "E_layer_12", "ECeta_layer_1", "width_phi_layer_2", "width_r_layer_0")] == \
        ["E_ratio", "E_layer", "ECeta", "width_phi", "width_r"]
    assert S.is_official("E_layer_3") and S.is_official("width_eta_layer_1") and not S.is_official("sparsity_layer_0")


def test_sep_mean_is_the_official_feature_set(ref):
    gen = Showers(*random_showers(1500, seed=4))
    out = metrics.evaluate(ref, gen, G)
    official = ["E_ratio"] + [f"E_layer_{i}" for i in (0, 1, 2, 3, 12)] + \
        [f"{f}_layer_{i}" for f in ("ECeta", "ECphi", "width_eta", "width_phi") for i in (1, 2)]
    extra = [f"{f}_layer_{i}" for f in ("ECr", "width_r", "sparsity") for i in (0, 1, 2, 3, 12)]
    assert out["sep/mean"] == pytest.approx(np.mean([out[f"sep/{k}"] for k in official]), rel=1e-12)
    assert out["sep/mean_extra"] == pytest.approx(np.mean([out[f"sep/{k}"] for k in extra]), rel=1e-12)


def test_high_level_vector_has_the_30_official_features():
    """One voxel hit per layer: every entry of the official cls-high / FPD vector is known by hand."""
    e = np.array([65536.0])
    x = np.zeros((1, G.n_voxels))
    hit = [G.layer_slice(i).start + 3 for i in range(G.n_layers)]
    x[0, hit] = [10.0, 200.0, 300.0, 40.0, 5.0]
    v = F.classifier_features(F.compute(e, x, G, 0))[0]
    assert v.shape == (30,) == (F.high_level_dim(G),)
    a = [1, 2]  # layers binned in alpha
    nvox = np.array([G.layers[i].n_alpha * G.layers[i].n_r for i in range(G.n_layers)])
    r, eta, phi = G.voxel_r[hit], G.voxel_eta[hit], G.voxel_phi[hit]
    expected = np.concatenate([[np.log10(65536.0)], np.log10(x[0, hit] + 1e-8), eta[a] / 100, phi[a] / 100,
                               [0, 0, 0, 0], [np.log10(555.0 + 1e-8)], 1 - 1 / nvox, r / 100, np.zeros(5)])
    np.testing.assert_allclose(v, expected, rtol=1e-12, atol=1e-12)


def test_fpd_kpd_use_the_official_settings_and_streams():
    assert inspect.signature(D.fpd).parameters["min_samples"].default == 10_000
    assert inspect.signature(D.fpd).parameters["max_samples"].default == 50_000
    assert inspect.signature(D.kpd).parameters["batch_size"].default == 10_000
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 4)), rng.normal(0.3, 1.2, size=(100, 4))
    # KPD by hand: batch i drawn with default_rng(42 + 1000 i), full kernel matrices
    m = np.abs(x).max(0)
    xs, ys = x / m, y / m
    vals = []
    for i in range(3):
        g = np.random.default_rng(42 + 1000 * i)
        a, b = xs[g.choice(100, size=50)], ys[g.choice(100, size=50)]
        k = lambda p, q: (p @ q.T / 4 + 1) ** 4  # noqa: E731
        kxx, kyy = k(a, a), k(b, b)
        vals.append((kxx.sum() - np.trace(kxx)) / (50 * 49) + (kyy.sum() - np.trace(kyy)) / (50 * 49) - 2 * k(a, b).mean())
    got, err = D.kpd(x, y, num_batches=3, batch_size=50)
    assert got == pytest.approx(np.median(vals), rel=1e-10)
    assert err == pytest.approx((np.percentile(vals, 83.725) - np.percentile(vals, 16.275)) / 2, rel=1e-8)
    # FPD by hand: one default_rng(42) stream, sizes regular in 1/N, straight-line fit to 1/N = 0
    sizes = (1 / np.linspace(1 / 40, 1 / 100, 3)).astype("int32")
    g = np.random.default_rng(42)
    means = []
    for n in sizes:
        pts = []
        for _ in range(4):
            a, b = xs[g.choice(100, size=n)], ys[g.choice(100, size=n)]
            s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
            d = a.mean(0) - b.mean(0)
            pts.append(d @ d + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2))))
        means.append(np.mean(pts))
    slope, intercept = np.polyfit(1.0 / sizes, means, 1)
    assert intercept > 0 and slope > 0  # inside the bounds of the official fit
    assert D.fpd(x, y, min_samples=40, max_samples=100, num_batches=4, num_points=3)[0] == pytest.approx(intercept, rel=1e-6)
