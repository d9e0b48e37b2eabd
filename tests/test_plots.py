"""Validation plots: the files the trainer logs, fast enough to make at every evaluation, and honest.

Real-shaped data: the embedded simulator's dataset-1 photons (15 discrete incident energies).
"""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from caloexp import plots
from caloexp.data.calochallenge import Showers
from caloexp.data.embedded import simulate
from caloexp.geometry import builtin
from caloexp.metrics import features as feat
from caloexp.metrics import separation as sep
from tests.conftest import random_showers

COMPACT = {"layers_average.png", "layers_average_per_energy.png", "hist_E_ratio.png", "hist_E_layer.png",
           "hist_voxel_energy.png", "response_vs_energy.png", "shower_shapes.png", "shower_3d.png"}
G1 = builtin("dataset_1_photons")


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def photons() -> tuple[Showers, Showers]:
    """Reference and a poor 'generated' sample: flat response 0.5-2, noisy voxels, 3x energy in layer 0."""
    ref, gen = simulate(3000, seed=1), simulate(3000, seed=2)
    rng = np.random.default_rng(0)
    x = gen.showers * rng.uniform(0.5, 2.0, (len(gen), 1)) * rng.lognormal(0, 0.3, gen.showers.shape)
    x[:, G1.layer_slice(0)] *= 3
    return ref, Showers(gen.energies, x.astype(np.float32))


def test_compact_set_for_training(tmp_path, photons):
    ref, gen = photons
    t0 = time.perf_counter()
    paths = plots.plot_all(ref, gen, G1, tmp_path / "p")
    elapsed = time.perf_counter() - t0
    assert {p.name for p in paths} == COMPACT
    assert all(p.exists() and p.stat().st_size > 5000 for p in paths)
    assert all(_png_size(p)[0] >= 600 for p in paths), {p.name: _png_size(p) for p in paths}
    assert elapsed < 40  # a few seconds on a quiet 2-core machine; generous for a busy CI box


def test_precomputed_features_are_used_not_recomputed(tmp_path, photons, monkeypatch):
    ref, gen = photons
    thr = feat.default_threshold(G1)
    pre = tuple(feat.compute(s.energies, s.showers, G1, threshold=thr) for s in (ref, gen))
    calls = []
    monkeypatch.setattr(plots.feat, "compute", lambda *a, **k: calls.append(1))
    paths = plots.plot_all(ref, gen, G1, tmp_path, max_3d=0, features=pre)
    assert not calls and len(paths) == len(COMPACT) - 1
    with pytest.raises(ValueError, match="features for"):
        plots.plot_all(ref.subset(slice(0, 10)), gen, G1, tmp_path, features=pre)


def test_flow_bins_hold_everything_outside_the_range():
    edges = np.linspace(0.5, 1.5, 11)
    v = np.array([-np.inf, 0.1, 0.5, 0.99, 1.5, 1.6, np.inf, np.nan])
    c = plots.flow_counts(v, edges)
    assert c[0] == 2 and c[-1] == 2 and c[1:-1].sum() == 3 and c.sum() == 7  # NaN alone is not counted
    assert c[-2] == 1  # the upper edge belongs to the last bin, as in numpy


def test_E_ratio_range_is_chosen_from_both_samples(photons):
    ref, gen = photons
    r, g = (feat.compute(s.energies, s.showers, G1) for s in (ref, gen))
    h = plots.histogram_pair(r.E_ratio, g.E_ratio, n_bins=50)
    # the protocol range 0.5-1.5 drops a large part of this generated sample ...
    outside = np.mean((g.E_ratio < 0.5) | (g.E_ratio > 1.5))
    assert outside > 0.2
    # ... the plot's range holds >= 99.5 % of each sample and the flow bins the rest: nothing is lost
    for f, n in ((r, h.n_ref), (g, h.n_gen)):
        assert n.sum() == len(f)
        assert n[1:-1].sum() >= 0.995 * len(f)
        assert n[-1] == np.sum(f.E_ratio > h.edges[-1])
    assert h.edges[0] <= min(np.quantile(r.E_ratio, 0.01), np.quantile(g.E_ratio, 0.01))
    assert h.edges[-1] >= max(np.quantile(r.E_ratio, 0.99), np.quantile(g.E_ratio, 0.99))
    # an outlier far away goes to the overflow bin instead of stretching the axis
    h2 = plots.histogram_pair(r.E_ratio, np.append(g.E_ratio, 50.0), n_bins=50)
    assert h2.edges[-1] < 5 and h2.n_gen[-1] == h.n_gen[-1] + 1


def _inner_empty_bins(counts: np.ndarray) -> int:
    filled = np.flatnonzero(counts)
    return int(np.sum(counts[filled[0]:filled[-1] + 1] == 0)) if filled.size else 0


def _comb_teeth(counts: np.ndarray) -> int:
    """Bins holding less than a fifth of both neighbours (each >= 20 entries): the gaps of a comb."""
    c = np.asarray(counts, float)
    nb = np.minimum(c[:-2], c[2:])
    return int(np.sum((c[1:-1] < 0.2 * nb) & (nb >= 20)))


def test_layer_energy_histogram_is_no_comb(photons):
    """The protocol's log bins of E_layer_2 alternate between full and empty over the 15 discrete energies;
    the plotted E_layer / E_inc has no empty bin inside its range."""
    ref, _ = photons
    r = feat.compute(ref.energies, ref.showers, G1)
    j = G1.layer_ids.index(2)
    comb = np.histogram(r.E_layer[:, j], sep.feature_binnings(G1, r)["E_layer_2"])[0]
    assert _comb_teeth(comb) >= 2  # the cause: bins narrower than the factor-2 gaps between energies
    frac = np.log10(r.E_layer[:, j] / r.E_inc)
    h = plots.histogram_pair(frac, frac)
    assert _comb_teeth(h.n_ref[1:-1]) == 0


def test_quantised_values_get_aligned_bins():
    rng = np.random.default_rng(0)
    hits = rng.integers(100, 300, 5000).astype(float)
    h = plots.histogram_pair(hits, hits + 1, quantum=1.0)
    assert np.allclose(np.diff(h.edges), np.diff(h.edges)[0]) and np.diff(h.edges)[0] == round(np.diff(h.edges)[0])
    assert _inner_empty_bins(h.n_ref[1:-1]) == 0 and h.n_ref.sum() == 5000


def test_ratio_panel_range_and_arrows():
    r = np.array([1.0, 1.1, 0.9, 40.0, np.nan, np.inf])
    err = np.array([0.05, 0.05, 0.05, 1.0, np.nan, np.nan])
    lo, hi = plots.ratio_limits(r, err)
    assert (lo, hi) == (0.5, plots.RATIO_MAX)  # 40 is well measured: the range opens to its cap, 40 is an arrow
    lo, hi = plots.ratio_limits(np.array([0.2, 1.0]), np.array([0.01, 0.05]))
    assert lo == pytest.approx(0.18) and hi == 1.5
    lo, hi = plots.ratio_limits(r[:3], err[:3])
    assert (lo, hi) == plots.RATIO_MIN_SPAN


def test_average_shower_ratio_scale_is_not_saturated(photons):
    ref, gen = photons
    a_ref, a_gen = ref.showers.mean(axis=0), gen.showers.mean(axis=0)
    ratio = plots.ratio_image(a_ref, a_gen)
    big = plots.ratio_scale(ratio)
    ok = np.isfinite(ratio) & (ratio > 0)
    assert np.mean((ratio[ok] > big) | (ratio[ok] < 1 / big)) <= 0.01
    assert np.median(ratio[G1.layer_slice(0)]) < big  # layer 0 (3x) is inside the scale, not pinned at its end
    assert plots.ratio_scale(np.ones(10)) == 1.25


def test_3d_showers_compare_like_with_like(photons):
    ref, gen = photons
    pairs = plots.pick_like_with_like(ref.energies, gen.energies, 3, seed=0)
    assert len(pairs) == 3
    assert all(ref.energies[i] == gen.energies[j] for i, j in pairs)
    assert len({float(ref.energies[i]) for i, _ in pairs}) >= 2
    e = np.geomspace(1e3, 1e6, 100)
    pairs = plots.pick_like_with_like(e, e * 1.01, 2)
    assert all(abs(np.log(e[i] / (e[j] * 1.01))) < 0.05 for i, j in pairs)


def test_full_set_and_degenerate_input(tmp_path):
    g = builtin("dataset_1_pions")
    e, s = random_showers(300, n_voxels=g.n_voxels, seed=3)
    zero = Showers(e, np.zeros_like(s))
    paths = plots.plot_all(Showers(e, s), zero, g, tmp_path, full=True, max_3d=1)
    names = {p.name for p in paths}
    assert COMPACT <= names
    assert {"hist_E_ratio_per_energy.png", "hist_EC_eta.png", "hist_width_phi.png", "hist_EC_r.png",
            "hist_sparsity.png"} <= names
    assert all(_png_size(p)[0] >= 600 for p in paths)


@pytest.mark.parametrize("max_3d", [0, 2])
def test_regular_geometry(tmp_path, max_3d):
    g = builtin("dataset_2")
    rng = np.random.default_rng(0)
    x = (rng.exponential(1.0, (50, g.n_voxels)) * (rng.random((50, g.n_voxels)) < 0.1)).astype(np.float32)
    e = np.geomspace(1e3, 1e6, 50)
    paths = plots.plot_all(Showers(e, x), Showers(e, x * 1.1), g, tmp_path, max_3d=max_3d)
    assert ("shower_3d.png" in {p.name for p in paths}) == (max_3d > 0)
