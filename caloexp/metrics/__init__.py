"""Physics validation metrics: CaloChallenge 2022 protocol plus the seeds' metrics, made honest.

One entry point, :func:`evaluate`, compares a reference and a generated sample (both in MeV,
each with its own incident energies) and returns a flat dict of floats with MLflow-safe
names. Metric groups (see ``docs/metrics.md`` for every definition):

``separation``  ``sep/<feature>`` separation powers with the protocol binnings, ``sep/voxel``,
                per-energy ``sep/E_ratio_Einc_<MeV>`` (ds1) and the aggregate ``sep/mean``
                (mean over all high-level feature histograms; the default objective)
``images``      ``images/mse``, ``images/rel_mse``, ``images/ssim`` of the average showers and
                their ``*_per_energy`` means
``wasserstein`` ``wd/<feature>`` 1D Wasserstein distances and the scale-free ``wd/mean``
``classifier``  ``cls/auc_<inputs>``, ``cls/jsd_<inputs>`` for inputs low, low_normed, high
``fpd_kpd``     ``fpd``, ``fpd_err``, ``kpd``, ``kpd_err`` on the high-level features
``shapes3d``    ``shapes/*``: 3DGAN-style longitudinal/transverse moments, response, hits

Non-finite voxels raise :class:`~caloexp.errors.InputError` (one line, naming the first bad row).
Both samples get the same voxel threshold first (``threshold=None``: 1 MeV for dataset 1,
0.5 keV / 0.033 for datasets 2-3). Degenerate input (e.g. all-zero generated showers) gives
finite values that signal "maximally different" (separation 1, large distances), never NaN,
except that a metric whose definition cannot apply to the geometry is left out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from caloexp.data.calochallenge import Showers
from caloexp.errors import ConfigError, InputError
from caloexp.geometry import Geometry
from caloexp.metrics import distances, features, separation
from caloexp.metrics.features import Features, apply_threshold, default_threshold

FAST: tuple[str, ...] = ("separation", "images", "wasserstein")
ALL: tuple[str, ...] = FAST + ("classifier", "fpd_kpd", "shapes3d")
GROUPS = ALL


def _check(showers: Showers, geometry: Geometry, what: str) -> None:
    x = np.asarray(showers.showers)
    if x.ndim != 2 or x.shape[1] != geometry.n_voxels:
        raise ConfigError(f"{what} showers have shape {x.shape}, geometry {geometry.name} needs "
                          f"(N, {geometry.n_voxels})")
    if len(x) != len(showers.energies):
        raise ConfigError(f"{what}: {len(showers.energies)} energies for {len(x)} showers")
    if len(x) < 2:
        raise ConfigError(f"{what} sample has {len(x)} showers; metrics need at least 2")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise InputError(f"{what} showers contain NaN/inf in {int(bad.sum())} of {len(x)} showers "
                         f"(first: row {int(np.argmax(bad))})")


def evaluate(reference: Showers, generated: Showers, geometry: Geometry, groups: Sequence[str] = FAST,
             threshold: float | None = None, classifier: dict | None = None, seed: int = 0) -> dict[str, float]:
    """All metrics of the requested groups, as a flat dict of Python floats (lower is better,
    except AUC = 0.5 and SSIM = 1 for a perfect model)."""
    groups = list(groups)
    unknown = sorted(set(groups) - set(ALL))
    if unknown:
        raise ConfigError(f"unknown metric group(s) {unknown}: choose from {list(ALL)}")
    _check(reference, geometry, "reference")
    _check(generated, geometry, "generated")
    thr = default_threshold(geometry) if threshold is None else float(threshold)
    ref_x = apply_threshold(reference.showers, thr)
    gen_x = apply_threshold(generated.showers, thr)
    ref_e = np.asarray(reference.energies, np.float64).reshape(-1)
    gen_e = np.asarray(generated.energies, np.float64).reshape(-1)
    ref_f = features.compute(ref_e, ref_x, geometry, threshold=0)
    gen_f = features.compute(gen_e, gen_x, geometry, threshold=0)
    out: dict[str, float] = {}
    if "separation" in groups:
        out.update(separation.separation_powers(ref_f, gen_f, geometry))
        vb = separation.voxel_bins(geometry, float(np.max(ref_x, initial=0.0)))
        out["sep/voxel"] = separation.separation_from_counts(separation.voxel_counts(ref_x, vb),
                                                             separation.voxel_counts(gen_x, vb))
    if "images" in groups:
        out.update(distances.image_metrics(ref_e, ref_x, gen_e, gen_x, geometry))
    if "wasserstein" in groups:
        out.update(distances.wasserstein(ref_f, gen_f, geometry))
    if "fpd_kpd" in groups:
        out.update(distances.fpd_kpd(features.classifier_features(ref_f), features.classifier_features(gen_f),
                                     seed=seed))
    if "classifier" in groups:
        from caloexp.metrics import classifier as cls

        out.update(cls.classifier_metrics(Showers(ref_e, ref_x), Showers(gen_e, gen_x), geometry,
                                          ref_f, gen_f, settings=classifier, seed=seed))
    if "shapes3d" in groups:
        from caloexp.metrics import shapes3d

        out.update(shapes3d.shape_metrics(ref_e, ref_x, gen_e, gen_x, geometry))
    return {k: _finite(v) for k, v in out.items()}


def _finite(v: float) -> float:
    v = float(v)
    if np.isnan(v):
        return v  # only metrics that cannot apply are NaN; they are left out above
    return float(np.clip(v, -1e30, 1e30))


__all__ = ["ALL", "FAST", "Features", "default_threshold", "evaluate"]


def evaluate_sample(reference, generated, geometry: Geometry | None = None, groups: Sequence[str] | None = None,
                    classifier: dict | None = None, seed: int = 0) -> dict[str, float]:
    """Metrics of the data's kind for two :class:`~caloexp.data.sample.Sample` objects (training's entry)."""
    kind = getattr(reference, "kind", "calo")
    if kind == "calo":
        return evaluate(reference, generated, geometry, groups=FAST if groups is None else groups,
                        classifier=classifier, seed=seed)
    # generic moments until the registry's kind-specific groups land
    r = np.asarray(reference.x, np.float64).reshape(len(reference), -1)
    g = np.asarray(generated.x, np.float64).reshape(len(generated), -1)
    sr, sg = r.sum(1), g.sum(1)
    edges = np.histogram_bin_edges(np.concatenate([sr, sg]), bins=30)
    hr, _ = np.histogram(sr, edges)
    hg, _ = np.histogram(sg, edges)
    hr, hg = hr / max(hr.sum(), 1), hg / max(hg.sum(), 1)
    sep = 0.5 * float(np.sum(np.where(hr + hg > 0, (hr - hg) ** 2 / np.maximum(hr + hg, 1e-300), 0.0)))
    scale = r.std(0) + 1e-12
    return {"sep/sum": sep, "sep/mean": sep, "moments/mean_dev": float(np.mean(np.abs(r.mean(0) - g.mean(0)) / scale))}


def metric_names(sample, geometry: Geometry | None = None, groups: Sequence[str] | None = None) -> set[str]:
    """Names the groups compute on data like ``sample`` (a cheap dry run on the sample against itself)."""
    cheap = None if groups is None else [g for g in groups if g not in ("classifier", "fpd_kpd")]
    names = set(evaluate_sample(sample, sample, geometry, cheap or None) if cheap != [] else {})
    if groups and "fpd_kpd" in groups:
        names |= {"fpd", "fpd_err", "kpd", "kpd_err"}
    if groups and "classifier" in groups:
        names |= {f"cls/{p}_{i}" for p in ("auc", "jsd") for i in ("low", "low_normed", "high")}
    return names
