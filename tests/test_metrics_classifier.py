"""The DNN classifier test: chance level for identical samples, AUC 1 for disjoint ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caloexp.errors import ConfigError
from caloexp.metrics import classifier as C

SMALL = {"n_layer": 1, "n_hidden": 32, "epochs": 4, "lr": 1e-3, "batch_size": 200}


def test_same_distribution_is_at_chance_level():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3000, 6)), rng.normal(size=(3000, 6))
    r = C.train_and_score(a, b, SMALL, seed=1)
    assert abs(r["auc"] - 0.5) < 0.06
    assert r["jsd"] < 0.05


def test_disjoint_samples_are_separated():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 6))
    b = rng.normal(size=(2000, 6)) + 5.0
    r = C.train_and_score(a, b, SMALL, seed=1)
    assert r["auc"] == pytest.approx(1.0, abs=1e-3)
    assert r["jsd"] > 0.95  # (ln2 - BCE)/ln2 with calibrated probabilities clipped at 1e-6


def test_settings_presets_and_errors():
    assert C.resolve_settings({"preset": "protocol"})["n_hidden"] == 2048
    assert C.resolve_settings({"preset": "protocol"})["n_layer"] == 2  # 3 hidden layers of 2048
    assert C.resolve_settings({"preset": "protocol"})["epochs"] == 50
    assert C.resolve_settings(None)["epochs"] == C.FAST["epochs"]
    with pytest.raises(ConfigError, match="unknown classifier setting"):
        C.resolve_settings({"hidden": 3})
    with pytest.raises(ConfigError, match="inputs"):
        C.resolve_settings({"inputs": ["pixels"]})


def test_bf16_matmuls_measure_what_fp32_measures():
    """A partly separable pair (shifted by 0.5 sigma in 4 of 6 features): the bf16 classifier's AUC agrees
    with the fp32 one's, chance stays at chance, and its probabilities are not bf16-coarse (AUC ties)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4000, 6)), rng.normal(size=(4000, 6))
    b[:, :4] += 0.5
    r32 = C.train_and_score(a, b, SMALL, seed=1)
    r16 = C.train_and_score(a, b, dict(SMALL, precision="bf16"), seed=1)
    assert 0.65 < r32["auc"] < 0.9 and abs(r16["auc"] - r32["auc"]) < 0.01, (r32, r16)
    same = C.train_and_score(a, rng.normal(size=(4000, 6)), dict(SMALL, precision="bf16"), seed=1)
    assert abs(same["auc"] - 0.5) < 0.06
    with pytest.raises(ConfigError, match="precision"):
        C.resolve_settings({"precision": "fp8"})


def test_reproducible_and_leaves_global_rng_alone():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 4)), rng.normal(size=(600, 4)) + 0.5
    torch.manual_seed(123)
    state = torch.get_rng_state()
    r1 = C.train_and_score(a, b, SMALL, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    r2 = C.train_and_score(a, b, SMALL, seed=7)
    assert r1 == r2


def test_low_level_inputs_follow_the_protocol():
    from caloexp.data.calochallenge import Showers
    from caloexp.geometry import builtin

    g = builtin("dataset_1_photons")
    x = np.zeros((2, g.n_voxels))
    x[0, 0], x[0, 8] = 30.0, 10.0
    s = Showers(np.array([100.0, 1000.0]), x)
    low = C.low_level(s, g)
    assert low.shape == (2, 1 + g.n_voxels)
    assert low[0, 0] == pytest.approx(2.0) and low[0, 1] == pytest.approx(0.3)
    normed = C.low_level(s, g, normed=True)
    assert normed.shape == (2, 1 + g.n_voxels + g.n_layers)
    assert normed[0, 1] == pytest.approx(1.0) and normed[0, 9] == pytest.approx(1.0)  # voxel / E_layer
    assert normed[0, -5] == pytest.approx(np.log10(30.0 + 1e-8))
