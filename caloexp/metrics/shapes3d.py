"""3DGAN-style shower physics: shapes, moments, response, hit multiplicity, cell spectrum.

Two views of the same physics:

* functions on Cartesian 3D grids ``(N, X, Y, Z)`` (Z = depth), as used by the 3DGAN
  validation (Khattak et al.): :func:`longitudinal_profile`, :func:`transverse_profiles`,
  :func:`moments` (energy-weighted centroid and higher central moments along each axis, in
  cell units), :func:`sampling_fraction_profile` (E_tot / E_inc vs E_inc),
  :func:`hit_multiplicity`, :func:`cell_energy_spectrum`;
* the same quantities for CaloChallenge showers on their cylindrical geometry
  (:func:`geometry_shapes`: depth = layer index, transverse = radius r), and the metric group
  ``shapes3d`` (:func:`shape_metrics`) comparing reference and generated samples.
"""
from __future__ import annotations

import numpy as np

from caloexp.geometry import Geometry
from caloexp.metrics.distances import energy_bins


# ------------------------------------------------------------- Cartesian grids
def _grid(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected showers of shape (N, X, Y, Z), got {images.shape}")
    return images


def longitudinal_profile(images: np.ndarray) -> np.ndarray:
    """Energy per depth layer, (N, X, Y, Z) -> (N, Z)."""
    return _grid(images).sum(axis=(1, 2))


def transverse_profiles(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy per x column and per y row, each (N, X) / (N, Y), summed over depth."""
    g = _grid(images)
    return g.sum(axis=(2, 3)), g.sum(axis=(1, 3))


def _axis_moments(profile: np.ndarray, orders: int) -> np.ndarray:
    """(N, orders): energy-weighted mean (order 1) and central moments 2..orders in bin units."""
    x = np.arange(profile.shape[1], dtype=np.float64)
    tot = profile.sum(axis=1)
    safe = np.where(tot > 0, tot, 1.0)
    mean = (profile * x).sum(axis=1) / safe
    out = [mean]
    for k in range(2, orders + 1):
        out.append((profile * (x[None, :] - mean[:, None]) ** k).sum(axis=1) / safe)
    return np.stack(out, axis=1) * (tot > 0)[:, None]


def moments(images: np.ndarray, orders: int = 2) -> dict[str, np.ndarray]:
    """Per-shower moments along x, y, z: ``{"x": (N, orders), "y": ..., "z": ...}``.

    Order 1 is the centroid (bin index), order 2 the variance (bin^2), etc.; empty showers give 0.
    """
    px, py = transverse_profiles(images)
    return {"x": _axis_moments(px, orders), "y": _axis_moments(py, orders),
            "z": _axis_moments(longitudinal_profile(images), orders)}


def sampling_fraction_profile(e_tot: np.ndarray, e_inc: np.ndarray, bins: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and standard deviation of E_tot / E_inc in bins of E_inc (empty bins: NaN)."""
    e_tot, e_inc = np.asarray(e_tot, np.float64).ravel(), np.asarray(e_inc, np.float64).ravel()
    ratio = e_tot / e_inc
    which = np.digitize(e_inc, bins) - 1
    mean = np.full(len(bins) - 1, np.nan)
    std = np.full(len(bins) - 1, np.nan)
    count = np.zeros(len(bins) - 1, dtype=np.int64)
    for i in range(len(bins) - 1):
        m = which == i
        if i == len(bins) - 2:
            m |= e_inc == bins[-1]
        count[i] = m.sum()
        if count[i]:
            mean[i], std[i] = ratio[m].mean(), ratio[m].std()
    return {"centres": np.sqrt(bins[1:] * bins[:-1]) if bins[0] > 0 else 0.5 * (bins[1:] + bins[:-1]),
            "mean": mean, "std": std, "count": count}


def hit_multiplicity(images: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Number of cells above ``threshold`` per shower (any shape (N, ...))."""
    x = np.asarray(images)
    return (x.reshape(len(x), -1) > threshold).sum(axis=1)


def cell_energy_spectrum(images: np.ndarray, bins: np.ndarray | int = 50,
                         threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Histogram (counts, edges) of log10 of the cell energies above ``threshold``."""
    x = np.asarray(images).ravel()
    x = x[x > threshold]
    if isinstance(bins, int):
        lo, hi = (np.log10(x.min()), np.log10(x.max())) if x.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    return np.histogram(np.log10(x), bins=bins)[0], bins


# --------------------------------------------------------- cylindrical showers
def geometry_shapes(showers: np.ndarray, geometry: Geometry) -> dict[str, np.ndarray]:
    """Per-shower shapes on a CaloChallenge geometry.

    ``long_profile`` (N, L) energy per layer; ``depth_mean`` / ``depth_width``: energy-weighted
    centroid and spread of the layer index; ``r_mean`` / ``r_width``: the same for the voxel
    radius (mm) over the whole shower; ``hits``: voxels above zero.
    """
    x = np.asarray(showers, np.float64)
    e_layer = geometry.layer_energies(x)
    m = _axis_moments(e_layer, 2)
    tot = x.sum(axis=1)
    safe = np.where(tot > 0, tot, 1.0)
    r = geometry.voxel_r
    r_mean = x @ r / safe
    r_var = np.clip(x @ r**2 / safe - r_mean**2, 0, None)
    return {"long_profile": e_layer, "depth_mean": m[:, 0], "depth_width": np.sqrt(np.clip(m[:, 1], 0, None)),
            "r_mean": r_mean, "r_width": np.sqrt(r_var), "hits": hit_multiplicity(x), "E_tot": tot}


def radial_profile(showers: np.ndarray, geometry: Geometry, edges: np.ndarray) -> np.ndarray:
    """Mean energy per radial bin ``edges`` (mm), summed over layers and alpha: (len(edges) - 1,)."""
    x = np.asarray(showers, np.float64).mean(axis=0)
    return np.histogram(geometry.voxel_r, bins=edges, weights=x)[0]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else float(a != b)


def shape_metrics(ref_e: np.ndarray, ref_x: np.ndarray, gen_e: np.ndarray, gen_x: np.ndarray,
                  geometry: Geometry) -> dict[str, float]:
    """``shapes/*``: how far the generated shower shapes are from the reference's.

    ``long_profile_tv``: total variation 0.5 sum |p_gen - p_ref| of the mean longitudinal
    profiles normalised to unit sum (0 = same, 1 = disjoint); ``depth_mean_diff`` /
    ``depth_width_diff``: difference of the means of the per-shower depth centroid / spread, in
    layers; ``r_mean_rel_diff`` / ``r_width_rel_diff`` / ``hits_rel_diff``: relative difference of
    the means of the radial centroid / spread / hit multiplicity; ``response_rel_diff`` /
    ``resolution_rel_diff``: relative difference of mean(E_tot/E_inc) / std/mean, averaged
    over incident-energy bins present in both samples.
    """
    return compare_shapes(geometry_shapes(ref_x, geometry), geometry_shapes(gen_x, geometry), ref_e, gen_e,
                          geometry)


def compare_shapes(rs: dict[str, np.ndarray], gs: dict[str, np.ndarray], ref_e: np.ndarray, gen_e: np.ndarray,
                   geometry: Geometry) -> dict[str, float]:
    """:func:`shape_metrics` from per-shower shapes (:func:`geometry_shapes`, concatenated over chunks)."""
    ref_e, gen_e = np.asarray(ref_e, np.float64).ravel(), np.asarray(gen_e, np.float64).ravel()
    pr, pg = rs["long_profile"].mean(axis=0), gs["long_profile"].mean(axis=0)
    pr = pr / pr.sum() if pr.sum() > 0 else pr
    pg = pg / pg.sum() if pg.sum() > 0 else pg
    out = {"shapes/long_profile_tv": float(0.5 * np.abs(pr - pg).sum()) if pg.sum() > 0 else 1.0,
           "shapes/depth_mean_diff": float(abs(gs["depth_mean"].mean() - rs["depth_mean"].mean())),
           "shapes/depth_width_diff": float(abs(gs["depth_width"].mean() - rs["depth_width"].mean())),
           "shapes/r_mean_rel_diff": _rel(gs["r_mean"].mean(), rs["r_mean"].mean()),
           "shapes/r_width_rel_diff": _rel(gs["r_width"].mean(), rs["r_width"].mean()),
           "shapes/hits_rel_diff": _rel(gs["hits"].mean(), rs["hits"].mean())}
    resp, reso = [], []
    for (_, mr), (_, mg) in zip(energy_bins(geometry, ref_e), energy_bins(geometry, gen_e)):
        if mr.sum() > 1 and mg.sum() > 1:
            r = rs["E_tot"][mr] / ref_e[mr]
            g = gs["E_tot"][mg] / gen_e[mg]
            resp.append(_rel(g.mean(), r.mean()))
            res_r = r.std() / r.mean() if r.mean() > 0 else 0.0
            res_g = g.std() / g.mean() if g.mean() > 0 else 0.0
            reso.append(_rel(res_g, res_r))
    if resp:
        out["shapes/response_rel_diff"] = float(np.mean(resp))
        out["shapes/resolution_rel_diff"] = float(np.mean(reso))
    return out
