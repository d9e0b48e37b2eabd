"""Validation plots: the files the trainer logs, fast enough to make at every evaluation."""
from __future__ import annotations

import time

import numpy as np
import pytest

from caloexp import plots
from caloexp.data.calochallenge import Showers
from caloexp.geometry import builtin
from tests.conftest import random_showers

COMPACT = {"layers_average.png", "hist_E_ratio.png", "hist_E_layer.png", "hist_voxel_energy.png",
           "response_vs_energy.png", "shower_shapes.png", "shower_3d.png"}


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compact_set_for_training(tmp_path):
    g = builtin("dataset_1_photons")
    e1, s1 = random_showers(2000, seed=1)
    e2, s2 = random_showers(2000, seed=2)
    t0 = time.perf_counter()
    paths = plots.plot_all(Showers(e1, s1), Showers(e2, s2), g, tmp_path / "p")
    elapsed = time.perf_counter() - t0
    assert {p.name for p in paths} == COMPACT
    assert all(p.exists() and _is_png(p) and p.stat().st_size > 5000 for p in paths)
    assert elapsed < 30  # a few seconds on a quiet 2-core machine; generous for a busy CI box


def test_full_set_and_degenerate_input(tmp_path):
    g = builtin("dataset_1_pions")
    e, s = random_showers(300, n_voxels=g.n_voxels, seed=3)
    zero = Showers(e, np.zeros_like(s))
    paths = plots.plot_all(Showers(e, s), zero, g, tmp_path, full=True, max_3d=1)
    names = {p.name for p in paths}
    assert COMPACT <= names
    assert {"hist_E_ratio_per_energy.png", "hist_EC_eta.png", "hist_width_phi.png", "hist_EC_r.png",
            "hist_sparsity.png"} <= names
    assert all(_is_png(p) for p in paths)


@pytest.mark.parametrize("max_3d", [0, 2])
def test_regular_geometry(tmp_path, max_3d):
    g = builtin("dataset_2")
    rng = np.random.default_rng(0)
    x = (rng.exponential(1.0, (50, g.n_voxels)) * (rng.random((50, g.n_voxels)) < 0.1)).astype(np.float32)
    e = np.geomspace(1e3, 1e6, 50)
    paths = plots.plot_all(Showers(e, x), Showers(e, x * 1.1), g, tmp_path, max_3d=max_3d)
    assert ("shower_3d.png" in {p.name for p in paths}) == (max_3d > 0)
