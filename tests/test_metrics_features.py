"""High-level features against hand-computed values and a literal transcription of the official definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caloexp.geometry import Geometry, Layer, builtin
from caloexp.metrics import features as F

# layer 0: 2 radial bins, no alpha binning (r centres 0.5, 2.0)
# layer 1: 4 alpha bins (centres -3pi/4, -pi/4, pi/4, 3pi/4) x 2 radial bins (centres 1, 3)
TINY = Geometry("tiny", "photon", (Layer(0, (0.0, 1.0, 3.0), 1), Layer(1, (0.0, 2.0, 4.0), 4)))


def voxel(layer: int, a: int, r: int) -> int:
    return int(TINY.layer_offsets[layer]) + a * TINY.layers[layer].n_r + r


def test_single_voxel_has_its_centre_and_zero_width():
    x = np.zeros((1, TINY.n_voxels))
    x[0, voxel(1, 2, 1)] = 5.0  # alpha = pi/4, r = 3
    f = F.compute(np.array([10.0]), x, TINY, threshold=0)
    c = 3 / math.sqrt(2)
    assert f.ECeta[0, 0] == pytest.approx(c) and f.ECphi[0, 0] == pytest.approx(c)
    assert f.width_eta[0, 0] == pytest.approx(0, abs=1e-6) and f.width_phi[0, 0] == pytest.approx(0, abs=1e-6)
    assert f.ECr[0, 1] == pytest.approx(3.0) and f.width_r[0, 1] == pytest.approx(0, abs=1e-6)
    assert f.E_tot[0] == 5.0 and f.E_ratio[0] == 0.5
    np.testing.assert_allclose(f.E_layer[0], [0, 5])
    np.testing.assert_allclose(f.sparsity[0], [1.0, 7 / 8])
    # the empty layer: centre and width 0, as with the official 1e-16 guard
    assert f.ECr[0, 0] == 0 and f.width_r[0, 0] == 0


def test_two_voxel_shower_by_hand_and_threshold():
    x = np.zeros((1, TINY.n_voxels))
    x[0, voxel(1, 2, 1)] = 3.0  # (eta, phi) = (3/sqrt2, 3/sqrt2), r = 3
    x[0, voxel(1, 0, 0)] = 1.0  # (eta, phi) = (-1/sqrt2, -1/sqrt2), r = 1; exactly at the 1 MeV threshold: kept
    x[0, voxel(0, 0, 1)] = 0.5  # below the 1 MeV dataset-1 threshold: removed
    f = F.compute(np.array([8.0]), x, TINY)  # default threshold (1 MeV for a dataset-1-like geometry)
    assert f.E_tot[0] == 4.0 and f.E_ratio[0] == 0.5
    assert f.ECeta[0, 0] == pytest.approx(math.sqrt(2)) and f.ECphi[0, 0] == pytest.approx(math.sqrt(2))
    assert f.width_eta[0, 0] == pytest.approx(math.sqrt(1.5)) and f.width_phi[0, 0] == pytest.approx(math.sqrt(1.5))
    assert f.ECr[0, 1] == pytest.approx(2.5) and f.width_r[0, 1] == pytest.approx(math.sqrt(0.75))
    np.testing.assert_allclose(f.sparsity[0], [1.0, 0.75])
    cols = f.columns(TINY)
    assert set(cols) == {"E_ratio", "E_layer_0", "E_layer_1", "ECeta_layer_1", "ECphi_layer_1", "width_eta_layer_1",
                         "width_phi_layer_1", "ECr_layer_0", "ECr_layer_1", "width_r_layer_0", "width_r_layer_1",
                         "sparsity_layer_0", "sparsity_layer_1"}  # no eta/phi features for the n_alpha = 1 layer


def test_thresholds_follow_the_official_values():
    assert F.default_threshold(builtin("dataset_1_photons")) == 1.0
    assert F.default_threshold(builtin("dataset_1_pions")) == 1.0
    assert F.default_threshold(builtin("dataset_3")) == pytest.approx(0.5e-3 / 0.033)  # 15.15 keV
    assert F.histogram_min_energy(builtin("dataset_1_pions")) == 1.0  # official min_energy since 2024-01-25
    assert F.histogram_min_energy(builtin("dataset_2")) == pytest.approx(0.01515, rel=1e-3)
    x = np.array([[0.5, 1.0, 2.0]])
    np.testing.assert_array_equal(F.apply_threshold(x, 1.0), [[0.0, 1.0, 2.0]])


def official_features(x: np.ndarray, g: Geometry) -> dict:
    """A literal, loop-based transcription of HighLevelFeatures.CalculateFeatures (with EC r / width r)."""
    out = {"E_tot": x.sum(-1)}
    for i, layer in enumerate(g.layers):
        d = x[:, g.layer_slice(i)]
        e = d.sum(-1)
        r = g.voxel_r[g.layer_slice(i)]
        out[f"E_layer_{layer.id}"] = e
        out[f"sparsity_layer_{layer.id}"] = 1.0 - (d > 0).mean(-1)
        ecr = (r * d).sum(-1) / (e + 1e-16)
        out[f"ECr_layer_{layer.id}"] = ecr
        out[f"width_r_layer_{layer.id}"] = np.sqrt(((r * r * d).sum(-1) / (e + 1e-16) - ecr**2).clip(min=0))
        if layer.n_alpha > 1:
            for name, c in (("eta", g.voxel_eta[g.layer_slice(i)]), ("phi", g.voxel_phi[g.layer_slice(i)])):
                ec = (c * d).sum(-1) / (e + 1e-16)
                out[f"EC{name}_layer_{layer.id}"] = ec
                out[f"width_{name}_layer_{layer.id}"] = np.sqrt(((c * c * d).sum(-1) / (e + 1e-16) - ec**2).clip(min=0))
    return out


@pytest.mark.parametrize("name", ["dataset_1_photons", "dataset_1_pions", "dataset_2"])
def test_vectorised_features_match_the_official_definitions(name):
    g = builtin(name)
    rng = np.random.default_rng(1)
    x = rng.exponential(50.0, (300, g.n_voxels)) * (rng.random((300, g.n_voxels)) < 0.2)
    x[0] = 0.0  # an empty shower
    e = rng.choice(2.0 ** np.arange(8, 23), 300)
    f = F.compute(e, x, g, threshold=0, chunk_size=64)  # several chunks
    cols = f.columns(g)
    ref = official_features(x, g)
    np.testing.assert_allclose(f.E_tot, ref.pop("E_tot"), rtol=1e-12)
    for k, v in ref.items():
        np.testing.assert_allclose(cols[k], v, rtol=1e-7, atol=1e-7, err_msg=k)
    assert np.isfinite(F.classifier_features(f)).all()
    n_alpha = len(F.alpha_layers(g))
    assert F.classifier_features(f).shape == (300, 2 + 4 * g.n_layers + 4 * n_alpha) == (300, F.high_level_dim(g))


def test_geometry_mismatch_is_rejected():
    with pytest.raises(ValueError, match="368 voxels"):
        F.compute(np.ones(2), np.ones((2, 10)), builtin("dataset_1_photons"))
