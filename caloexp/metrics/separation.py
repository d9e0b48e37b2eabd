"""Histograms with the official CaloChallenge binnings and their separation power.

Separation power (triangular discrimination, eq. 15 of arXiv:2009.03796) of two histograms
normalised to unit sum: ``S = 0.5 * sum_i (h1_i - h2_i)^2 / (h1_i + h2_i)``; 0 for identical
and 1 for disjoint distributions. As in the official code (``plt.hist(..., density=True)`` times
the bin widths) ``sep/<feature>`` drops entries outside the binning range and normalises each
histogram over its in-range entries. That makes it blind to a runaway energy scale, so
``sep/mean_with_overflow`` repeats the official features with an underflow and an overflow bin
(NaN counts as overflow), normalised over all entries: the monitored separation.

Binnings follow ``evaluate_plotting_helper.py`` of CaloChallenge/homepage (last changed
2023-10-06) with the ``min_energy`` of ``evaluate.py`` at commit ad3a816 (2025-01-02):

=====================  ==========================================================================
E_tot / E_inc          linspace(0.5, 1.5, 101)
E_tot / E_inc per E    ds1 only, per incident energy 2^k MeV: linspace(0.4, 1.4, 21); photons
                       above 4 GeV (k > 11): linspace(0.9, 1.1, 21)
E_layer                logspace(log10(min_energy), log10(max of reference), 40)
EC eta / phi           linspace(-L, L, 101): L = 30 mm (ds2/3), 500 mm (ds1 layers 12, 13), else 100 mm
width eta / phi        linspace(0, W, 101):  W = 30 mm (ds2/3), 400 mm (ds1 layers 12, 13), else 100 mm
voxel energies         logspace(log10(min_energy), log10(max of reference), 50), all voxels
---------------------  -------------- extras: helper functions the official mode does not call ----
sparsity               linspace(0, 1, 21) of the zero fraction
EC r                   linspace(0, R, 101): R = 42 mm (ds2/3), 1500 mm (ds1 layers 12-14), else 500 mm
width r                linspace(0, R, 101): R = 20 mm (ds2/3), 1500 mm (ds1 layers 12-14), else 500 mm
=====================  ==========================================================================

``min_energy`` is 1 MeV for dataset 1 and 0.5 keV / 0.033 for datasets 2-3.

Degenerate cases (documented, never NaN): a histogram with no entry in range is treated as
maximally different from a non-empty one (S = 1); two empty histograms give S = 0.
"""
from __future__ import annotations

import numpy as np

from caloexp.geometry import Geometry
from caloexp.metrics.features import ALPHA_FEATURES, Features, alpha_layers, histogram_min_energy, is_ds23

DS1_ENERGIES = 2.0 ** np.arange(8, 23)  # 256 MeV .. 4 TeV
#: Feature families whose histograms the official ``hist`` mode compares (with E_ratio): ``sep/mean``.
OFFICIAL_FAMILIES = ("E_layer", "ECeta", "ECphi", "width_eta", "width_phi")
#: Families caloexp adds (official binnings of helper functions the official mode does not call): ``sep/mean_extra``.
EXTRA_FAMILIES = ("ECr", "width_r", "sparsity")


def family(name: str) -> str:
    """Feature family of a column name (``E_layer_2`` -> ``E_layer``, ``E_ratio`` -> ``E_ratio``)."""
    if name.startswith("E_layer_"):
        return "E_layer"
    return name if name == "E_ratio" else name.rsplit("_layer", 1)[0]


def is_official(name: str) -> bool:
    """True for the features whose separations the official ``hist`` mode reports (E_ratio, E, EC, widths)."""
    return family(name) in ("E_ratio",) + OFFICIAL_FAMILIES


def normalised_histogram(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in ``bins`` divided by their in-range total (zeros if none): the official way."""
    counts = np.histogram(_finite(values), bins=bins)[0].astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def counts_with_overflow(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Raw counts [underflow, bins..., overflow] (len(bins) + 1); NaN and +-inf go to the outer bins."""
    values = np.asarray(values).ravel()
    fin = np.isfinite(values)
    inner = np.histogram(values[fin], bins=bins)[0].astype(np.float64)
    under = float(np.count_nonzero(values[fin] < bins[0])) + float(np.count_nonzero(values == -np.inf))
    over = float(len(values) - inner.sum() - under)  # above the range, +inf and NaN
    return np.concatenate([[under], inner, [over]])


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values).ravel()
    return values[np.isfinite(values)]


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


def feature_binnings(geometry: Geometry, reference: Features) -> dict[str, np.ndarray]:
    """Bin edges per feature name (as in :meth:`Features.columns`); E_layer bins depend on the reference."""
    ds23 = is_ds23(geometry)
    emin = histogram_min_energy(geometry)
    ids = geometry.layer_ids
    bins: dict[str, np.ndarray] = {"E_ratio": np.linspace(0.5, 1.5, 101)}
    for j, lid in enumerate(ids):
        bins[f"E_layer_{lid}"] = _log_bins(emin, float(np.max(reference.E_layer[:, j], initial=0.0)), 40)
    for lid in (ids[i] for i in alpha_layers(geometry)):
        big = (not ds23) and lid in (12, 13)
        lim = 30.0 if ds23 else (500.0 if big else 100.0)
        wid = 30.0 if ds23 else (400.0 if big else 100.0)
        bins[f"ECeta_layer_{lid}"] = bins[f"ECphi_layer_{lid}"] = np.linspace(-lim, lim, 101)
        bins[f"width_eta_layer_{lid}"] = bins[f"width_phi_layer_{lid}"] = np.linspace(0.0, wid, 101)
    for lid in ids:
        big = (not ds23) and lid in (12, 13, 14)
        bins[f"ECr_layer_{lid}"] = np.linspace(0.0, 42.0 if ds23 else (1500.0 if big else 500.0), 101)
        bins[f"width_r_layer_{lid}"] = np.linspace(0.0, 20.0 if ds23 else (1500.0 if big else 500.0), 101)
        bins[f"sparsity_layer_{lid}"] = np.linspace(0.0, 1.0, 21)
    return bins


def feature_histograms(features: Features, geometry: Geometry, bins: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Normalised (official, in-range) histogram of every feature with the given binnings."""
    cols = features.columns(geometry)
    return {name: normalised_histogram(cols[name], b) for name, b in bins.items()}


def voxel_bins(geometry: Geometry, reference_max: float) -> np.ndarray:
    """Bins of the voxel (cell) energy histogram: 50 log edges from min_energy to the reference maximum."""
    return _log_bins(histogram_min_energy(geometry), float(reference_max), 50)


def voxel_counts(showers: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Raw in-range counts of all voxel energies in ``bins`` (accumulate over chunks for streaming)."""
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

    ``sep/mean`` averages the official feature histograms (E_ratio, E_layer, EC eta/phi, widths
    eta/phi; :func:`is_official`), so it compares with published numbers; ``sep/mean_extra``
    averages caloexp's extras (sparsity, EC r, width r); ``sep/mean_<family>`` one family over
    layers. ``sep/mean_with_overflow`` is ``sep/mean`` with under- and overflow bins and
    ``sep/outside_gen`` / ``sep/outside_ref`` the mean fraction of entries outside the official
    ranges. The per-energy ``sep/E_ratio_Einc_<MeV>`` values (energies present in both samples)
    are averaged in ``sep/E_ratio_per_energy``; they and ``sep/voxel`` are not part of the means.
    """
    bins = bins or feature_binnings(geometry, reference)
    ref_cols, gen_cols = reference.columns(geometry), generated.columns(geometry)
    out: dict[str, float] = {}
    with_of, out_ref, out_gen = [], [], []
    for name, b in bins.items():
        cr, cg = counts_with_overflow(ref_cols[name], b), counts_with_overflow(gen_cols[name], b)
        out[f"sep/{name}"] = separation_from_counts(cr[1:-1], cg[1:-1])
        if is_official(name):
            with_of.append(separation_from_counts(cr, cg))
            out_ref.append((cr[0] + cr[-1]) / max(cr.sum(), 1.0))
            out_gen.append((cg[0] + cg[-1]) / max(cg.sum(), 1.0))
    official = [v for k, v in out.items() if is_official(k[4:])]
    extra = [v for k, v in out.items() if not is_official(k[4:])]
    out["sep/mean"] = float(np.mean(official))
    if extra:
        out["sep/mean_extra"] = float(np.mean(extra))
    out["sep/mean_with_overflow"] = float(np.mean(with_of))
    out["sep/outside_ref"] = float(np.mean(out_ref))
    out["sep/outside_gen"] = float(np.mean(out_gen))
    for fam in OFFICIAL_FAMILIES + EXTRA_FAMILIES:
        vals = [out[f"sep/{n}"] for n in bins if family(n) == fam]
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


__all__ = ["ALPHA_FEATURES", "EXTRA_FAMILIES", "OFFICIAL_FAMILIES", "counts_with_overflow", "energy_ratio_bins",
           "feature_binnings", "feature_histograms", "is_official", "normalised_histogram", "separation_power",
           "separation_powers", "voxel_bins", "voxel_counts"]
