"""Histograms with the CaloChallenge binnings and their separation power.

Separation power (triangular discrimination, eq. 15 of arXiv:2009.03796) of two histograms
normalised to unit sum: ``S = 0.5 * sum_i (h1_i - h2_i)^2 / (h1_i + h2_i)``; 0 for identical
and 1 for disjoint distributions. As in the official code (``plt.hist(..., density=True)``),
entries outside the binning range are dropped and each histogram is normalised over its
in-range entries.

Binnings (official ``evaluate_plotting_helper.py``, CaloChallenge/homepage):

=====================  ==========================================================================
E_tot / E_inc          linspace(0.5, 1.5, 31)
E_tot / E_inc per E    ds1 only, per incident energy 2^k MeV: linspace(0.4, 1.4, 21); photons
                       above 4 GeV (k > 11): linspace(0.9, 1.1, 21)
E_layer                logspace(log10(min_energy), log10(max of reference), 40)
EC eta / phi           linspace(-L, L, 51): L = 30 mm (ds2/3), 500 mm (ds1 layers 12, 13), else 100 mm
width eta / phi        linspace(0, W, 51):  W = 30 mm (ds2/3), 400 mm (ds1 layers 12, 13), else 100 mm
sparsity               the hit fraction 1 - sparsity in linspace(0, 1, 20)
voxel energies         logspace(log10(min_energy), log10(max of reference), 50), all voxels
EC r, width r          linspace(0, max of reference, 51)   (caloexp: not in the public helper)
=====================  ==========================================================================

``min_energy`` is 10 MeV for dataset 1 and 0.5 keV / 0.033 for datasets 2-3.

Degenerate cases (documented, never NaN): a histogram with no entry in range is treated as
maximally different from a non-empty one (S = 1); two empty histograms give S = 0.
"""
from __future__ import annotations

import numpy as np

from caloexp.geometry import Geometry
from caloexp.metrics.features import ALPHA_FEATURES, Features, alpha_layers, histogram_min_energy, is_ds23

DS1_ENERGIES = 2.0 ** np.arange(8, 23)  # 256 MeV .. 4 TeV


def normalised_histogram(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Counts of finite ``values`` in ``bins`` divided by their in-range total (zeros if none)."""
    values = np.asarray(values)
    counts = np.histogram(values[np.isfinite(values)], bins=bins)[0].astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """0.5 * sum (h1 - h2)^2 / (h1 + h2) of two unit-sum histograms (see module doc for empties)."""
    s1, s2 = h1.sum(), h2.sum()
    if s1 == 0 and s2 == 0:
        return 0.0
    if s1 == 0 or s2 == 0:
        return 1.0
    return float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + 1e-16)))


def separation_from_counts(c1: np.ndarray, c2: np.ndarray) -> float:
    """Separation power of two raw count histograms (normalised here)."""
    c1, c2 = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
    h1 = c1 / c1.sum() if c1.sum() > 0 else c1
    h2 = c2 / c2.sum() if c2.sum() > 0 else c2
    return separation_power(h1, h2)


def _log_bins(lo: float, hi: float, n_edges: int) -> np.ndarray:
    hi = hi if np.isfinite(hi) and hi > lo else lo * 10.0
    return np.logspace(np.log10(lo), np.log10(hi), n_edges)


def _lin_to_max(ref: np.ndarray, n_edges: int = 51) -> np.ndarray:
    finite = ref[np.isfinite(ref)]
    hi = float(finite.max()) if finite.size else 0.0
    return np.linspace(0.0, hi if hi > 0 else 1.0, n_edges)


def feature_binnings(geometry: Geometry, reference: Features) -> dict[str, np.ndarray]:
    """Bin edges per feature name (as in :meth:`Features.columns`), some from the reference sample."""
    ds23 = is_ds23(geometry)
    emin = histogram_min_energy(geometry)
    ids = geometry.layer_ids
    bins: dict[str, np.ndarray] = {"E_ratio": np.linspace(0.5, 1.5, 31)}
    for j, lid in enumerate(ids):
        bins[f"E_layer_{lid}"] = _log_bins(emin, float(np.max(reference.E_layer[:, j], initial=0.0)), 40)
    for lid in (ids[i] for i in alpha_layers(geometry)):
        big = (not ds23) and lid in (12, 13)
        lim = 30.0 if ds23 else (500.0 if big else 100.0)
        wid = 30.0 if ds23 else (400.0 if big else 100.0)
        bins[f"ECeta_layer_{lid}"] = bins[f"ECphi_layer_{lid}"] = np.linspace(-lim, lim, 51)
        bins[f"width_eta_layer_{lid}"] = bins[f"width_phi_layer_{lid}"] = np.linspace(0.0, wid, 51)
    for j, lid in enumerate(ids):
        bins[f"ECr_layer_{lid}"] = _lin_to_max(reference.ECr[:, j])
        bins[f"width_r_layer_{lid}"] = _lin_to_max(reference.width_r[:, j])
        bins[f"sparsity_layer_{lid}"] = np.linspace(0.0, 1.0, 20)
    return bins


def _hist_values(name: str, values: np.ndarray) -> np.ndarray:
    # the official code histograms the hit fraction (1 - sparsity)
    return 1.0 - values if name.startswith("sparsity") else values


def feature_histograms(features: Features, geometry: Geometry, bins: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Normalised histogram of every feature with the given binnings."""
    cols = features.columns(geometry)
    return {name: normalised_histogram(_hist_values(name, cols[name]), b) for name, b in bins.items()}


def voxel_bins(geometry: Geometry, reference_max: float) -> np.ndarray:
    """Bins of the voxel (cell) energy histogram: 50 log edges from min_energy to the reference maximum."""
    return _log_bins(histogram_min_energy(geometry), float(reference_max), 50)


def voxel_counts(showers: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Raw counts of all voxel energies in ``bins`` (accumulate over chunks for streaming)."""
    return np.histogram(np.asarray(showers).ravel(), bins=bins)[0].astype(np.float64)


def energy_ratio_bins(geometry: Geometry) -> list[tuple[float, np.ndarray]]:
    """(incident energy, E_tot/E_inc bins) per discrete dataset-1 energy; empty for ds2/3."""
    if is_ds23(geometry):
        return []
    out = []
    for k, e in enumerate(DS1_ENERGIES):
        narrow = geometry.particle == "photon" and k > 3
        out.append((float(e), np.linspace(0.9, 1.1, 21) if narrow else np.linspace(0.4, 1.4, 21)))
    return out


def separation_powers(reference: Features, generated: Features, geometry: Geometry,
                      bins: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """``sep/<feature>`` for every high-level feature, per-energy E_ratio (ds1) and the means.

    ``sep/mean`` averages all high-level feature histograms (E_ratio and every per-layer
    feature); ``sep/mean_<family>`` averages one family over layers. The per-energy
    ``sep/E_ratio_Einc_<MeV>`` values (only energies present in both samples) are averaged in
    ``sep/E_ratio_per_energy`` and are not part of ``sep/mean``.
    """
    bins = bins or feature_binnings(geometry, reference)
    h_ref = feature_histograms(reference, geometry, bins)
    h_gen = feature_histograms(generated, geometry, bins)
    out = {f"sep/{name}": separation_power(h_ref[name], h_gen[name]) for name in bins}
    out["sep/mean"] = float(np.mean([out[f"sep/{n}"] for n in bins]))
    families = ("E_layer",) + tuple(f for f in ("ECeta", "ECphi", "width_eta", "width_phi", "ECr", "width_r", "sparsity"))
    for fam in families:
        vals = [v for k, v in out.items() if k.startswith(f"sep/{fam}_") and not k.startswith("sep/mean")]
        if vals:
            out[f"sep/mean_{fam}"] = float(np.mean(vals))
    per_e = []
    ref_ratio, gen_ratio = reference.E_ratio, generated.E_ratio
    for e, b in energy_ratio_bins(geometry):
        # bins [2^k, 2^(k+1)) as in the official plot_Etot_Einc_discrete
        mr = (reference.E_inc >= e) & (reference.E_inc < 2 * e)
        mg = (generated.E_inc >= e) & (generated.E_inc < 2 * e)
        if mr.any() and mg.any():
            s = separation_power(normalised_histogram(ref_ratio[mr], b), normalised_histogram(gen_ratio[mg], b))
            out[f"sep/E_ratio_Einc_{int(e)}"] = s
            per_e.append(s)
    if per_e:
        out["sep/E_ratio_per_energy"] = float(np.mean(per_e))
    return out


__all__ = ["ALPHA_FEATURES", "feature_binnings", "feature_histograms", "normalised_histogram",
           "separation_power", "separation_powers", "voxel_bins", "voxel_counts", "energy_ratio_bins"]
