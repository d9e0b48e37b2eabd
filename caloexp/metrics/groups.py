"""The built-in metric groups, registered by name with the kinds they apply to.

calo (CaloChallenge geometry): ``separation`` (also ``resp/*`` and ``monitor/score``), ``images``,
``wasserstein``, ``classifier``, ``fpd_kpd``, ``shapes3d``, ``projections``; grid: ``cells`` and ``grid``
(:mod:`caloexp.metrics.grid`); image: ``cells``, ``zdc``; tabular: ``tabular`` (see :mod:`caloexp.metrics.tabular`).
Every kind's default groups compute ``monitor/score``, the default training monitor.
"""
from __future__ import annotations

import numpy as np

from caloexp.data.calochallenge import Showers
from caloexp.metrics import distances, features, response, separation, shapes3d
from caloexp.metrics.engine import Accumulator, Chunk, Context, MetricGroup, register
from caloexp.metrics.features import Features

#: Official random seed of jetnet's fpd/kpd, which the official evaluate.py leaves at its default.
FPD_KPD_SEED = 42


class _Separation(Accumulator):
    """Official separation powers + voxel spectrum + response per energy + monitor/score."""

    second_pass = True

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.ref_max = 0.0
        self.bins: np.ndarray | None = None
        self.gen_counts: np.ndarray | None = None
        self.ref_counts: np.ndarray | None = None

    def add(self, which: str, chunk: Chunk) -> None:
        if which == "reference":
            self.ref_max = max(self.ref_max, float(np.max(chunk.x, initial=0.0)))
            return
        if self.bins is None:
            self.bins = separation.voxel_bins(self.ctx.geometry, self.ref_max)
            self.gen_counts = np.zeros(len(self.bins) + 1)
        self.gen_counts += separation.counts_with_overflow(chunk.x, self.bins)

    def add_second(self, chunk: Chunk) -> None:
        if self.ref_counts is None:
            self.ref_counts = np.zeros(len(self.bins) + 1)
        self.ref_counts += separation.counts_with_overflow(chunk.x, self.bins)

    def result(self, rf: Features, gf: Features) -> dict[str, float]:
        g = self.ctx.geometry
        out = separation.separation_powers(rf, gf, g)
        out["sep/voxel"] = separation.separation_from_counts(self.ref_counts[1:-1], self.gen_counts[1:-1])
        out["sep/voxel_with_overflow"] = separation.separation_from_counts(self.ref_counts, self.gen_counts)
        resp = response.response_metrics(rf.E_inc, rf.E_tot, gf.E_inc, gf.E_tot)
        out.update(resp)
        out["monitor/score"] = response.monitor_score(out["sep/mean_with_overflow"], resp)
        return out


class _Images(Accumulator):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.acc = {w: distances.AverageImages(ctx.geometry) for w in ("reference", "generated")}

    def add(self, which: str, chunk: Chunk) -> None:
        self.acc[which].add(chunk.energies, chunk.x)

    def result(self, rf: Features, gf: Features) -> dict[str, float]:
        return distances.compare_average_images(self.acc["reference"], self.acc["generated"], self.ctx.geometry)


class _FromFeatures(Accumulator):
    """Groups computed from the features of the whole samples alone."""

    def __init__(self, ctx: Context, fn):
        self.ctx, self.fn = ctx, fn

    def add(self, which: str, chunk: Chunk) -> None:
        pass

    def result(self, rf: Features, gf: Features) -> dict[str, float]:
        return self.fn(self.ctx, rf, gf)


class _Shapes(Accumulator):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {"reference": [], "generated": []}

    def add(self, which: str, chunk: Chunk) -> None:
        self.parts[which].append(shapes3d.geometry_shapes(chunk.x, self.ctx.geometry))

    def result(self, rf: Features, gf: Features) -> dict[str, float]:
        rs, gs = ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                  for parts in (self.parts["reference"], self.parts["generated"]))
        return shapes3d.compare_shapes(rs, gs, rf.E_inc, gf.E_inc, self.ctx.geometry)


class _Classifier(Accumulator):
    """Keeps the first ``max_showers`` thresholded showers of each sample for the low-level inputs."""

    def __init__(self, ctx: Context):
        from caloexp.metrics import classifier as cls

        self.ctx = ctx
        self.settings = cls.resolve_settings(ctx.classifier)
        self.low = any(k != "high" for k in self.settings["inputs"])
        cap = int(ctx.options.get("classifier_max_bytes", 1 << 30)) // (4 * ctx.geometry.n_voxels)
        self.keep = min(int(self.settings["max_showers"] or 1 << 62), max(cap, 10)) if self.low else 0
        self.kept: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"reference": [], "generated": []}
        self.n = {"reference": 0, "generated": 0}

    def add(self, which: str, chunk: Chunk) -> None:
        take = self.keep - self.n[which]
        if take > 0:
            self.kept[which].append((chunk.energies[:take], np.asarray(chunk.x[:take], np.float32)))
            self.n[which] += len(chunk.x[:take])

    def _showers(self, which: str) -> Showers | None:
        if not self.kept[which]:
            return None
        return Showers(np.concatenate([e for e, _ in self.kept[which]]),
                       np.concatenate([x for _, x in self.kept[which]]))

    def result(self, rf: Features, gf: Features) -> dict[str, float]:
        from caloexp.metrics import classifier as cls

        return cls.classifier_metrics(self._showers("reference"), self._showers("generated"), self.ctx.geometry,
                                      rf, gf, settings=self.settings, seed=self.ctx.seed)


def _wasserstein(ctx: Context, rf: Features, gf: Features) -> dict[str, float]:
    return distances.wasserstein(rf, gf, ctx.geometry)


def _fpd_kpd(ctx: Context, rf: Features, gf: Features) -> dict[str, float]:
    return distances.fpd_kpd(features.classifier_features(rf), features.classifier_features(gf), seed=FPD_KPD_SEED,
                             **ctx.options.get("fpd_kpd", {}))


CALO = ("calo",)
register(MetricGroup("separation", CALO, _Separation,
                     "sep/* official separation powers, sep/voxel, resp/* response per energy, monitor/score"))
register(MetricGroup("images", CALO, _Images, "images/* MSE and SSIM of the average showers"))
register(MetricGroup("wasserstein", CALO, lambda c: _FromFeatures(c, _wasserstein), "wd/* 1D Wasserstein distances"))
register(MetricGroup("classifier", CALO, _Classifier, "cls/auc_*, cls/jsd_* of the DNN classifier test"))
register(MetricGroup("fpd_kpd", CALO, lambda c: _FromFeatures(c, _fpd_kpd), "fpd, kpd on the 30 high-level features"))
register(MetricGroup("shapes3d", CALO, _Shapes, "shapes/* 3DGAN-style shower shapes"))

from caloexp.metrics import generic, grid, tabular  # noqa: E402  (register cells, grid and tabular)
from caloexp.metrics import projections  # noqa: E402,F401  (registers projections: GAN_602's layer x r images)
from caloexp.metrics import zdc  # noqa: E402,F401  (registers zdc, for image data)

FAST: tuple[str, ...] = ("separation", "images", "wasserstein")
ALL: tuple[str, ...] = FAST + ("classifier", "fpd_kpd", "shapes3d", "projections")
#: Groups used when none are named, per kind; each computes ``monitor/score``.
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {"calo": FAST, "grid": ("cells",), "image": ("cells",),
                                              "tabular": ("tabular",)}

__all__ = ["ALL", "DEFAULT_GROUPS", "FAST", "generic", "grid", "tabular"]
