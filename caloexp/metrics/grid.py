"""Shower physics on regular 3D grids (3DGAN ECAL, ``kind: grid``): the metric group ``grid``.

Events are (N, X, Y, Z) cells (X, Y transverse, Z the layer), conditions ``energy`` (primary, GeV)
and optionally ``theta`` (incident angle, rad). Per event: the cell sum S and the sampling
fraction S / E, the hit multiplicity (cells above ``hit_threshold``, the data's 1e-4 GeV), the
first and second moments (energy-weighted mean and width, in cells) along x, y and z, the measured
incident angle (:func:`measured_angle`, 3DGAN's definition) minus the requested one; per sample:
the longitudinal (z) and transverse (x, y) profiles (mean of per-event energy fractions) and the
cell-energy spectrum (log bins 1e-6 .. 1e4 GeV, under/overflow counted). Metrics (``grid/``):

* ``sep_<feature>`` separation power of each per-event feature (``sf``, ``hits``, ``m1_x`` ..,
  ``m2_z``, ``angle_res``), ``sep_profile_<axis>`` of the mean profiles, ``sep_spectrum``, and
  ``sep_mean`` their mean; ``e<bin>/sep_mean`` and ``a<bin>/sep_mean`` within energy / angle bins;
* ``sf_ratio_e<bin>`` = mean S/E generated / reference per energy bin (GeV: 0-10, 10-50, 50-100,
  100-200, ..., 400-inf), ``sf_max_dev`` = max |ratio - 1| and ``sf_within_5pct`` (1 or 0);
  ``sf_ratio_a<bin>`` and ``sf_angle_max_dev`` per 10-degree angle bin;
* ``peak_layer_ref``, ``peak_layer_gen`` (argmax of the mean longitudinal profile), ``peak_layer_dev``
  = |difference|, ``peak_layer_within_1`` (1 or 0), ``peak_layer_max_dev`` over the energy bins;
* ``angle_bias_ref``, ``angle_bias_gen`` = mean(measured - requested) in degrees, ``angle_mae_gen``.

Bins with fewer than :data:`MIN_BIN` events in either sample are left out. The group does not set
``monitor/score`` (the ``cells`` group does); :data:`HEADLINE` keys are printed in the training log.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from caloexp.metrics.engine import Accumulator, Chunk, Context, MetricGroup, register
from caloexp.metrics.generic import separation_common
from caloexp.metrics.separation import counts_with_overflow, separation_from_counts

E_EDGES_GEV = (0.0, 10.0, 50.0, 100.0, 200.0, 300.0, 400.0, math.inf)
ANGLE_STEP_DEG = 10.0
SPECTRUM_BINS = np.logspace(-6, 4, 61)
HIT_THRESHOLD = 1e-4
MIN_BIN = 5
FEATURES = ("sf", "hits", "m1_x", "m1_y", "m1_z", "m2_x", "m2_y", "m2_z", "angle_res")
HEADLINE = ("grid/sf_max_dev", "grid/sf_within_5pct", "grid/peak_layer_dev", "grid/peak_layer_within_1",
            "grid/angle_bias_gen")


def measured_angle(cells: torch.Tensor) -> torch.Tensor:
    """3DGAN's measured incident angle (rad) of showers (N, X, Y, Z) in physical units.

    Per layer z the energy barycentre y_z; the slope m_z = (y_z - y_ref) / |(x_z, z) - (x_ref, z_ref)|
    relative to the shower barycentre (sign flipped in front of it), angle_z = pi/2 - atan(m_z);
    the result is the mean of angle_z weighted by the layer position (z + 1/2) over non-empty layers.
    Empty showers give 100 (the original's marker). Differentiable in the cells (3DGAN uses it as a loss).
    """
    n, nx, ny, nz = cells.shape
    dt = cells.dtype
    ix = torch.arange(nx, device=cells.device, dtype=dt) + 0.5
    iy = torch.arange(ny, device=cells.device, dtype=dt) + 0.5
    iz = torch.arange(nz, device=cells.device, dtype=dt) + 0.5
    s_yz, s_xz = cells.sum(dim=1), cells.sum(dim=2)             # the only passes over the grid
    sumz = s_yz.sum(1)                                            # (n, nz)
    tot = sumz.sum(1)
    safe_tot = torch.where(tot > 0, tot, torch.ones_like(tot))
    x_ref = (s_xz.sum(2) * ix).sum(1) / safe_tot
    y_ref = (s_yz.sum(2) * iy).sum(1) / safe_tot
    z_ref = (sumz * iz).sum(1) / safe_tot
    safe_z = torch.where(sumz > 0, sumz, torch.ones_like(sumz))
    x_mid = (s_xz * ix[None, :, None]).sum(1) / safe_z
    y_mid = (s_yz * iy[None, :, None]).sum(1) / safe_z
    zproj = torch.sqrt(torch.clamp((x_mid - x_ref[:, None]) ** 2 + (iz[None] - z_ref[:, None]) ** 2,
                                   min=torch.finfo(dt).eps))
    m = (y_mid - y_ref[:, None]) / zproj
    m = torch.where(iz[None] < z_ref[:, None], -m, m)
    ang = math.pi / 2 - torch.atan(m)
    w = iz[None] * (sumz > 0).to(dt)
    out = (ang * w).sum(1) / torch.clamp(w.sum(1), min=torch.finfo(dt).eps)
    return torch.where(tot > 0, out, torch.full_like(out, 100.0))


def _grid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim == 5:           # (N, C, X, Y, Z): channels summed
        x = x.sum(axis=1)
    if x.ndim != 4:
        from caloexp.errors import ConfigError

        raise ConfigError(f"grid metrics need events (N, X, Y, Z); got shape {x.shape}")
    return x


def event_features(x: np.ndarray, energy: np.ndarray, theta: np.ndarray | None,
                   hit_threshold: float = HIT_THRESHOLD) -> dict[str, np.ndarray]:
    """Per-event features (module doc) and per-event axis profiles normalised to the event's sum."""
    x = _grid(x)
    n = len(x)
    tot = x.reshape(n, -1).sum(axis=1)
    safe = np.where(tot > 0, tot, 1.0)
    out = {"sf": tot / np.asarray(energy, np.float64).reshape(n),
           "hits": (x.reshape(n, -1) > hit_threshold).sum(axis=1).astype(np.float64)}
    for a, name in enumerate("xyz"):
        prof = x.sum(axis=tuple(i for i in (1, 2, 3) if i != a + 1)) / safe[:, None]
        idx = np.arange(prof.shape[1], dtype=np.float64)
        m1 = prof @ idx
        out[f"m1_{name}"] = m1
        out[f"m2_{name}"] = np.sqrt(np.clip(prof @ idx ** 2 - m1 ** 2, 0, None))
        out[f"profile_{name}"] = prof
    ang = measured_angle(torch.from_numpy(x)).numpy()
    req = np.full(n, math.pi / 2) if theta is None else np.asarray(theta, np.float64).reshape(n)
    out["angle_res"] = np.degrees(ang - req)
    out["theta_deg"] = np.degrees(req)
    out["energy"] = np.asarray(energy, np.float64).reshape(n)
    return out


def energy_bins() -> list[tuple[str, float, float]]:
    lab = lambda v: str(int(v))  # noqa: E731
    return [(f"{lab(lo)}-{lab(hi)}" if math.isfinite(hi) else f"{lab(lo)}-inf", lo, hi)   # MLflow-safe names
            for lo, hi in zip(E_EDGES_GEV[:-1], E_EDGES_GEV[1:])]


def angle_bins(theta_deg: np.ndarray) -> list[tuple[str, float, float]]:
    ks = np.unique(np.floor(np.asarray(theta_deg) / ANGLE_STEP_DEG + 1e-9))
    return [(f"{int(k * ANGLE_STEP_DEG)}-{int((k + 1) * ANGLE_STEP_DEG)}", k * ANGLE_STEP_DEG,
             (k + 1) * ANGLE_STEP_DEG) for k in ks]


def _peak(prof: np.ndarray) -> float:
    return float(np.argmax(prof.mean(axis=0)))


def compare(ref: dict[str, np.ndarray], gen: dict[str, np.ndarray], spectra: tuple[np.ndarray, np.ndarray] | None = None
            ) -> dict[str, float]:
    """The metrics of the module doc from the features of both samples (and their cell spectra)."""
    out: dict[str, float] = {}
    seps = []
    for f in FEATURES:
        out[f"grid/sep_{f}"] = separation_common(ref[f], gen[f])
        seps.append(out[f"grid/sep_{f}"])
    for a in "xyz":
        out[f"grid/sep_profile_{a}"] = separation_from_counts(ref[f"profile_{a}"].mean(0), gen[f"profile_{a}"].mean(0))
        seps.append(out[f"grid/sep_profile_{a}"])
    if spectra is not None:
        out["grid/sep_spectrum"] = separation_from_counts(*spectra)
        seps.append(out["grid/sep_spectrum"])
    out["grid/sep_mean"] = float(np.mean(seps))
    # sampling fraction and separations per energy and per angle bin
    devs, peak_devs, adevs = [], [], []
    for what, key, bins in (("e", "energy", energy_bins()), ("a", "theta_deg", angle_bins(ref["theta_deg"]))):
        for label, lo, hi in bins:
            mr = (ref[key] >= lo) & (ref[key] < hi)
            mg = (gen[key] >= lo) & (gen[key] < hi)
            if mr.sum() < MIN_BIN or mg.sum() < MIN_BIN:
                continue
            ratio = float(gen["sf"][mg].mean() / max(ref["sf"][mr].mean(), 1e-30))
            out[f"grid/sf_ratio_{what}{label}"] = ratio
            (devs if what == "e" else adevs).append(abs(ratio - 1.0))
            out[f"grid/{what}{label}/sep_mean"] = float(np.mean([separation_common(ref[f][mr], gen[f][mg])
                                                                 for f in FEATURES]))
            if what == "e":
                peak_devs.append(abs(_peak(ref["profile_z"][mr]) - _peak(gen["profile_z"][mg])))
    if devs:
        out["grid/sf_max_dev"] = float(max(devs))
        out["grid/sf_within_5pct"] = float(max(devs) <= 0.05)
        out["grid/peak_layer_max_dev"] = float(max(peak_devs))
    if adevs:
        out["grid/sf_angle_max_dev"] = float(max(adevs))
    out["grid/peak_layer_ref"] = _peak(ref["profile_z"])
    out["grid/peak_layer_gen"] = _peak(gen["profile_z"])
    out["grid/peak_layer_dev"] = abs(out["grid/peak_layer_ref"] - out["grid/peak_layer_gen"])
    out["grid/peak_layer_within_1"] = float(out["grid/peak_layer_dev"] <= 1.0)
    for which, feats in (("ref", ref), ("gen", gen)):
        res = feats["angle_res"][np.abs(feats["angle_res"]) < 1000]   # empty showers (marker 100 rad) left out
        out[f"grid/angle_bias_{which}"] = float(res.mean()) if res.size else 1e30
    res = gen["angle_res"][np.abs(gen["angle_res"]) < 1000]
    out["grid/angle_mae_gen"] = float(np.abs(res).mean()) if res.size else 1e30
    return out


class _Grid(Accumulator):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.hit = float(ctx.options.get("grid_hit_threshold", HIT_THRESHOLD))
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {"reference": [], "generated": []}
        self.spec = {w: np.zeros(len(SPECTRUM_BINS) + 1) for w in self.parts}

    def add(self, which: str, chunk: Chunk) -> None:
        if "energy" not in chunk.cond:
            from caloexp.errors import ConfigError

            raise ConfigError("grid metrics need the 'energy' condition (primary energy, GeV)")
        x = _grid(chunk.x)
        self.parts[which].append(event_features(x, chunk.cond["energy"], chunk.cond.get("theta"), self.hit))
        self.spec[which] += counts_with_overflow(x[x > 0], SPECTRUM_BINS)

    def result(self, rf, gf) -> dict[str, float]:
        ref, gen = ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                    for parts in (self.parts["reference"], self.parts["generated"]))
        return compare(ref, gen, (self.spec["reference"], self.spec["generated"]))


register(MetricGroup("grid", ("grid",), _Grid,
                     "grid/* 3D shower physics: profiles, moments, sampling fraction per energy/angle, hits, "
                     "spectrum, measured angle, separations, peak layer", headline=HEADLINE))

__all__ = ["HEADLINE", "compare", "event_features", "measured_angle"]
