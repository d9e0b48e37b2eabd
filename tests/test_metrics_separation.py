"""Separation power and the protocol binnings."""
from __future__ import annotations

import numpy as np
import pytest

from caloexp.geometry import builtin
from caloexp.metrics import features as F
from caloexp.metrics import separation as S


def test_separation_power_by_hand():
    h1 = np.array([0.5, 0.5, 0.0])
    h2 = np.array([0.25, 0.25, 0.5])
    # 0.5 * (0.0625/0.75 + 0.0625/0.75 + 0.25/0.5) = 0.5 * (1/6 + 0.5) = 1/3
    assert S.separation_power(h1, h2) == pytest.approx(1 / 3)
    assert S.separation_power(h1, h1) == 0.0
    assert S.separation_power(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)


def test_normalised_histogram_drops_out_of_range_like_plt_hist_density():
    bins = np.array([0.0, 1.0, 2.0])
    h = S.normalised_histogram(np.array([0.5, 1.5, 1.5, 2.0, 7.0, np.nan]), bins)
    np.testing.assert_allclose(h, [0.25, 0.75])  # 2.0 is in the last (closed) bin; 7 and NaN dropped


def test_empty_histograms_are_documented_values_not_nan():
    assert S.separation_power(np.zeros(3), np.zeros(3)) == 0.0
    assert S.separation_power(np.array([1.0, 0, 0]), np.zeros(3)) == 1.0


def _features(g, n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.exponential(50.0, (n, g.n_voxels)) * (rng.random((n, g.n_voxels)) < 0.3)
    e = rng.choice(2.0 ** np.arange(8, 23), n)
    return F.compute(e, x * (1 + shift), g, threshold=0)


def test_identical_samples_give_zero_and_disjoint_give_one():
    g = builtin("dataset_1_photons")
    f = _features(g, 500, 0)
    out = S.separation_powers(f, f, g)
    assert out["sep/mean"] == 0.0 and all(v == 0.0 for k, v in out.items() if not k.startswith("sep/outside"))
    # disjoint: E_ratio 0.7 vs 1.2, E_layer differs by a factor 1.7 > one log bin (1.47)
    e = np.full(500, 65536.0)
    x_ref = np.zeros((500, g.n_voxels))
    x_ref[:, 0] = 0.7 * e   # E_ratio 0.7 for the reference ...
    x_gen = x_ref.copy()
    x_gen[:, 0] = 1.2 * e   # ... 1.2 for the generated sample
    d = S.separation_powers(F.compute(e, x_ref, g, 0), F.compute(e, x_gen, g, 0), g)
    assert d["sep/E_ratio"] == pytest.approx(1.0)
    assert d["sep/E_layer_0"] == pytest.approx(1.0)


def test_protocol_binnings():
    g = builtin("dataset_1_pions")
    f = _features(g, 200, 2)
    b = S.feature_binnings(g, f)
    # official evaluate_plotting_helper.py: 101 edges for E_tot/E_inc, centres and widths
    np.testing.assert_allclose(b["E_ratio"], np.linspace(0.5, 1.5, 101))
    np.testing.assert_allclose(b["ECeta_layer_1"], np.linspace(-100, 100, 101))
    np.testing.assert_allclose(b["ECphi_layer_12"], np.linspace(-500, 500, 101))
    np.testing.assert_allclose(b["width_eta_layer_13"], np.linspace(0, 400, 101))
    np.testing.assert_allclose(b["width_phi_layer_1"], np.linspace(0, 100, 101))
    # extras: the official helper functions' binnings (plot_sparsity, plot_ECR, plot_ECWidthR)
    np.testing.assert_allclose(b["sparsity_layer_0"], np.linspace(0, 1, 21))
    np.testing.assert_allclose(b["ECr_layer_14"], np.linspace(0, 1500, 101))
    np.testing.assert_allclose(b["width_r_layer_2"], np.linspace(0, 500, 101))
    e_bins = b["E_layer_2"]
    assert len(e_bins) == 40 and e_bins[0] == pytest.approx(1.0)  # min_energy 1 MeV for dataset 1
    assert e_bins[-1] == pytest.approx(f.E_layer[:, 2].max())
    assert "ECeta_layer_0" not in b  # layer 0 has one alpha bin
    g3 = builtin("dataset_2")
    b3 = S.feature_binnings(g3, _features(g3, 50, 3))
    np.testing.assert_allclose(b3["ECeta_layer_7"], np.linspace(-30, 30, 101))
    np.testing.assert_allclose(b3["width_phi_layer_44"], np.linspace(0, 30, 101))
    np.testing.assert_allclose(b3["ECr_layer_3"], np.linspace(0, 42, 101))
    np.testing.assert_allclose(b3["width_r_layer_3"], np.linspace(0, 20, 101))
    assert b3["E_layer_0"][0] == pytest.approx(0.5e-3 / 0.033)


def test_per_energy_response_and_names():
    g = builtin("dataset_1_photons")
    f = _features(g, 1000, 4)
    out = S.separation_powers(f, _features(g, 1000, 5), g)
    assert "sep/E_ratio_Einc_256" in out and "sep/E_ratio_Einc_4194304" in out
    assert "sep/E_ratio_per_energy" in out
    ph = dict(S.energy_ratio_bins(g))
    np.testing.assert_allclose(ph[2.0**12], np.linspace(0.9, 1.1, 21))  # photons above 2 GeV: narrow
    np.testing.assert_allclose(ph[2.0**11], np.linspace(0.4, 1.4, 21))
    assert S.energy_ratio_bins(builtin("dataset_3")) == []
    n_hl = len(S.feature_binnings(g, f))
    assert n_hl == 1 + 5 + 2 * 4 + 5 * 3  # E_ratio, E_layer, 4 eta/phi x 2 alpha layers, ECr/width_r/sparsity x 5
