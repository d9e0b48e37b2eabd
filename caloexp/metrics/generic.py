"""Generic metric groups for the kinds without a CaloChallenge geometry: ``cells`` (and the binning ``tabular`` shares).

They histogram per-event scalars on a *common* binning built from the pooled reference and
generated values (one bin per value when there are at most :data:`MAX_DISCRETE` distinct values,
else 50 equal bins between the pooled 0.5 % and 99.5 % quantiles) with an underflow and an
overflow bin, and report the separation power (:mod:`caloexp.metrics.separation`) normalised
over all entries, so values far outside the bulk are counted, never dropped.

``tabular`` lives in :mod:`caloexp.metrics.tabular` (it uses :func:`common_bins`).

``cells`` (grid (N, X, Y, Z) or image (N, H, W); a leading channel axis, (N, C, ...), is summed):

* ``cells/sep_total`` of the per-event cell sum, ``cells/sep_centroid_ax<i>`` and
  ``cells/sep_width_ax<i>`` of the energy-weighted centroid and width (cell units) along each axis,
  ``cells/sep_occupancy`` of the fraction of non-zero cells, ``cells/sep_spectrum`` of all cell
  values (50 bins from the reference's smallest positive to its largest value, log-spaced when
  the reference has no negative cell; zeros and values outside count as under/overflow);
* ``cells/mean``: their mean; ``resp/*`` (:mod:`caloexp.metrics.response`) of the cell sum over
  the ``energy`` condition (without one: of the cell sum itself, one bin ``all``);
* ``monitor/score`` = ``cells/mean`` + ``resp/log_mean_dev`` + ``resp/log_width_dev``.
"""
from __future__ import annotations

import numpy as np

from caloexp.metrics import response
from caloexp.metrics.engine import Accumulator, Chunk, Context, MetricGroup, register
from caloexp.metrics.separation import counts_with_overflow, separation_from_counts

MAX_DISCRETE = 50
N_BINS = 50


def common_bins(ref: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """Bin edges from the pooled finite values of both samples (see the module doc)."""
    pooled = np.concatenate([np.ravel(ref), np.ravel(gen)])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return np.array([0.0, 1.0])
    values = np.unique(pooled)
    if len(values) <= MAX_DISCRETE:
        if len(values) == 1:
            return np.array([values[0] - 0.5, values[0] + 0.5])
        mid = 0.5 * (values[1:] + values[:-1])
        return np.concatenate([[2 * values[0] - mid[0]], mid, [2 * values[-1] - mid[-1]]])
    lo, hi = np.quantile(pooled, [0.005, 0.995])
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return np.linspace(lo, hi, N_BINS + 1)


def separation_common(ref: np.ndarray, gen: np.ndarray) -> float:
    """Separation power with under/overflow bins on :func:`common_bins`."""
    b = common_bins(ref, gen)
    return separation_from_counts(counts_with_overflow(ref, b), counts_with_overflow(gen, b))


class _Collect(Accumulator):
    """Collects per-event arrays of both samples (cell-sum statistics)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.parts: dict[str, list] = {"reference": [], "generated": []}


# -------------------------------------------------------------------- cells
def _cell_array(x: np.ndarray, kind: str) -> np.ndarray:
    """(N, *spatial) float64: a leading channel axis (image (N, C, H, W), grid (N, C, X, Y, Z)) is summed."""
    x = np.asarray(x, np.float64)
    spatial = 3 if kind == "grid" else 2
    if x.ndim == spatial + 2:
        x = x.sum(axis=1)
    if x.ndim != spatial + 1:
        from caloexp.errors import ConfigError

        raise ConfigError(f"{kind} events have shape {x.shape[1:]}; expected {spatial} spatial axes "
                          f"(optionally after a channel axis)")
    return x


def cell_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-event total, occupancy and, per axis, energy-weighted centroid and width (cell units)."""
    n = len(x)
    tot = x.reshape(n, -1).sum(axis=1)
    out = {"total": tot, "occupancy": (x.reshape(n, -1) != 0).mean(axis=1)}
    for a in range(1, x.ndim):
        prof = np.clip(x.sum(axis=tuple(i for i in range(1, x.ndim) if i != a)), 0, None)
        w = prof.sum(axis=1)
        safe = np.where(w > 0, w, 1.0)
        idx = np.arange(prof.shape[1], dtype=np.float64)
        c = prof @ idx / safe
        out[f"centroid_ax{a - 1}"] = c
        out[f"width_ax{a - 1}"] = np.sqrt(np.clip(prof @ idx**2 / safe - c**2, 0, None))
    return out


class _Cells(_Collect):
    second_pass = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.energy: dict[str, list[np.ndarray]] = {"reference": [], "generated": []}
        self.lo, self.hi, self.neg = np.inf, -np.inf, False
        self.bins: np.ndarray | None = None
        self.spec = {"reference": None, "generated": None}

    def _energy(self, chunk: Chunk) -> np.ndarray:
        self.has_energy = "energy" in chunk.cond
        if self.has_energy:
            return np.asarray(chunk.cond["energy"], np.float64).reshape(len(chunk), -1)[:, 0]
        return np.ones(len(chunk))

    def add(self, which: str, chunk: Chunk) -> None:
        x = _cell_array(chunk.x, self.ctx.kind)
        self.parts[which].append(cell_statistics(x))
        self.energy[which].append(self._energy(chunk))
        if which == "reference":
            pos = x[x > 0]
            if pos.size:
                self.lo = min(self.lo, float(pos.min()))
            self.hi = max(self.hi, float(x.max(initial=-np.inf)))
            self.neg = self.neg or bool((x < 0).any())
            return
        self._count("generated", x)

    def _count(self, which: str, x: np.ndarray) -> None:
        if self.bins is None:
            if self.neg:
                lo = min(float(self.lo) if np.isfinite(self.lo) else 0.0, 0.0)
                self.bins = np.linspace(lo, self.hi if self.hi > lo else lo + 1.0, N_BINS + 1)
            else:
                lo = self.lo if np.isfinite(self.lo) else 1e-6
                hi = self.hi if self.hi > lo else lo * 10
                self.bins = np.logspace(np.log10(lo), np.log10(hi), N_BINS + 1)
        c = counts_with_overflow(x, self.bins)
        self.spec[which] = c if self.spec[which] is None else self.spec[which] + c

    def add_second(self, chunk: Chunk) -> None:
        self._count("reference", _cell_array(chunk.x, self.ctx.kind))

    def result(self, rf, gf) -> dict[str, float]:
        rs, gs = ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                  for parts in (self.parts["reference"], self.parts["generated"]))
        out = {f"cells/sep_{k}": separation_common(rs[k], gs[k]) for k in rs}
        out["cells/sep_spectrum"] = separation_from_counts(self.spec["reference"], self.spec["generated"])
        out["cells/mean"] = float(np.mean([v for k, v in out.items() if k.startswith("cells/sep_")]))
        re, ge = np.concatenate(self.energy["reference"]), np.concatenate(self.energy["generated"])
        resp = response.response_metrics(re, rs["total"], ge, gs["total"])
        if not self.has_energy:  # one bin at "energy" 1: name it "all"
            resp = {(k[:-2] + "_all" if k.endswith("_ratio_1") else k): v for k, v in resp.items()}
        out.update(resp)
        out["monitor/score"] = response.monitor_score(out["cells/mean"], resp)
        return out


register(MetricGroup("cells", ("grid", "image"), _Cells,
                     "cells/* total, centroid, width, occupancy, spectrum separations; resp/*; monitor/score"))

__all__ = ["cell_statistics", "common_bins", "separation_common"]
