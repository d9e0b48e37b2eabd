"""The public API the trainer uses: caloexp.metrics.evaluate, FAST/ALL, names, degenerate input."""
from __future__ import annotations

import re

import numpy as np
import pytest

from caloexp import metrics
from caloexp.data.calochallenge import Showers
from caloexp.errors import ConfigError, InputError
from caloexp.geometry import builtin
from tests.conftest import random_showers

G = builtin("dataset_1_photons")
SMALL_CLS = {"n_layer": 1, "n_hidden": 32, "epochs": 2, "batch_size": 256}


@pytest.fixture(scope="module")
def samples():
    e1, s1 = random_showers(800, seed=1)
    e2, s2 = random_showers(800, seed=2)
    return Showers(e1, s1), Showers(e2, s2)


def test_groups_and_defaults():
    assert metrics.FAST == ("separation", "images", "wasserstein")
    assert set(metrics.FAST) < set(metrics.ALL)
    assert {"classifier", "fpd_kpd", "shapes3d"} <= set(metrics.ALL)


def test_fast_metrics_names_and_types(samples):
    ref, gen = samples
    out = metrics.evaluate(ref, gen, G)
    assert all(type(v) is float for v in out.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_\-./]+", k) for k in out)
    for key in ("sep/mean", "sep/E_ratio", "sep/E_layer_0", "sep/E_layer_12", "sep/ECeta_layer_1",
                "sep/width_r_layer_2", "sep/sparsity_layer_3", "sep/voxel", "images/mse", "images/ssim",
                "images/mse_per_energy", "images/ssim_per_energy", "wd/E_ratio", "wd/mean"):
        assert key in out, key
    assert 0 <= out["sep/mean"] <= 1


def test_identical_samples(samples):
    ref, _ = samples
    out = metrics.evaluate(ref, ref, G, groups=metrics.ALL, classifier=SMALL_CLS)
    assert out["sep/mean"] == 0.0 and out["sep/voxel"] == 0.0
    assert out["images/mse"] == 0.0 and out["images/ssim"] == pytest.approx(1.0)
    assert out["wd/mean"] == 0.0 and abs(out["fpd"]) < 1e-3 and abs(out["kpd"]) < 3 * out["kpd_err"] + 1e-9
    assert abs(out["cls/auc_low"] - 0.5) < 0.1 and abs(out["cls/auc_high"] - 0.5) < 0.1


def test_all_zero_generated_showers_give_finite_bad_values(samples):
    ref, gen = samples
    zero = Showers(gen.energies, np.zeros_like(gen.showers))
    out = metrics.evaluate(ref, zero, G, groups=metrics.ALL, classifier=SMALL_CLS)
    assert np.isfinite(list(out.values())).all()
    assert out["sep/E_ratio"] == 1.0 and out["sep/voxel"] == 1.0
    assert out["images/rel_mse"] == pytest.approx(1.0)
    assert out["cls/auc_high"] > 0.95 and out["fpd"] > 0.1


def test_threshold_is_applied_to_both_samples(samples):
    ref, _ = samples
    noisy = Showers(ref.energies, ref.showers + 0.5 * (ref.showers == 0))  # sub-threshold noise everywhere
    assert metrics.evaluate(ref, noisy, G)["sep/mean"] == 0.0
    assert metrics.evaluate(ref, noisy, G, threshold=0.0)["sep/mean_sparsity"] > 0.5


def test_bad_arguments(samples):
    ref, gen = samples
    with pytest.raises(ConfigError, match="unknown metric group"):
        metrics.evaluate(ref, gen, G, groups=["separation", "fid"])
    nan = Showers(gen.energies, gen.showers.copy())
    nan.showers[5, 3] = np.nan
    with pytest.raises(InputError, match="NaN/inf in 1 of 800 showers \\(first: row 5\\)"):
        metrics.evaluate(ref, nan, G)
    with pytest.raises(ConfigError, match="533"):
        metrics.evaluate(ref, gen, builtin("dataset_1_pions"))


def test_regular_geometry_runs():
    g = builtin("dataset_2")
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, (60, g.n_voxels)) * (rng.random((60, g.n_voxels)) < 0.2)
    e = np.geomspace(1e3, 1e6, 60)
    out = metrics.evaluate(Showers(e, x), Showers(e, x * 1.05), g, groups=["separation", "images", "shapes3d"])
    assert "sep/ECeta_layer_44" in out and "images/ssim" in out and "sep/E_ratio_Einc_256" not in out
