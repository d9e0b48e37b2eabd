"""Standalone physics evaluation of a generated CaloChallenge file against a reference file.

``python -m caloexp.evaluate generated=gen.hdf5 reference=ref.hdf5 geometry=dataset_1_photons out=eval``

Writes ``metrics.json`` (a flat dict of every metric, see ``docs/metrics.md``) and the
validation PNGs to ``out``; with ``mlflow=true`` (new run) or ``mlflow_run=<id>`` (existing
run) also logs them to MLflow. Files are streamed chunk by chunk (dataset 3 holds 40,500
voxels per shower): features, histograms, average images and shower shapes are accumulated
per chunk; only the classifier's low-level inputs (``classifier.max_showers`` per sample) and
the plotted showers (``plot_bytes``) are held in memory.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from caloexp import geometry as geo
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.data import calochallenge
from caloexp.data.calochallenge import Showers
from caloexp.errors import ConfigError, InputError
from caloexp.metrics import ALL, distances, features, separation, shapes3d
from caloexp.metrics.features import Features

log = logging.getLogger("caloexp.evaluate")


@dataclass
class SampleSummary:
    """Everything the metrics need from one file, accumulated chunk by chunk."""

    features: list[Features] = field(default_factory=list)
    shapes: list[dict[str, np.ndarray]] = field(default_factory=list)
    images: distances.AverageImages | None = None
    voxel_max: float = 0.0
    kept_e: list[np.ndarray] = field(default_factory=list)
    kept_x: list[np.ndarray] = field(default_factory=list)
    kept_rows: int = 0
    n: int = 0

    def feats(self) -> Features:
        return Features.concatenate(self.features)

    def shape_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([s[k] for s in self.shapes]) for k in self.shapes[0]}

    def kept(self) -> Showers:
        return Showers(np.concatenate(self.kept_e), np.concatenate(self.kept_x))


def chunk_rows(geometry: geo.Geometry, n_bytes: int) -> int:
    return max(1, int(n_bytes) // (4 * geometry.n_voxels))


def summarise(path: Path, geometry: geo.Geometry, threshold: float, stop: int | None, chunk: int,
              keep_rows: int) -> SampleSummary:
    """One streaming pass: features, shapes, average images, voxel maximum, first ``keep_rows`` showers."""
    s = SampleSummary(images=distances.AverageImages(geometry))
    for c in calochallenge.iter_chunks(path, chunk, geometry, stop=stop):
        x = features.apply_threshold(c.showers, threshold)
        e = c.energies.astype(np.float64)
        s.features.append(features.compute(e, x, geometry, threshold=0))
        s.shapes.append(shapes3d.geometry_shapes(x, geometry))
        s.images.add(e, x)
        s.voxel_max = max(s.voxel_max, float(np.max(x, initial=0.0)))
        if s.kept_rows < keep_rows:
            take = keep_rows - s.kept_rows
            s.kept_e.append(e[:take])
            s.kept_x.append(x[:take])
            s.kept_rows += len(e[:take])
        s.n += len(e)
    if s.n < 2:
        raise InputError(f"{path}: holds {s.n} showers; an evaluation needs at least 2")
    return s


def voxel_histogram(path: Path, geometry: geo.Geometry, threshold: float, stop: int | None, chunk: int,
                    bins: np.ndarray) -> np.ndarray:
    counts = np.zeros(len(bins) - 1)
    for c in calochallenge.iter_chunks(path, chunk, geometry, stop=stop, check=False):
        counts += separation.voxel_counts(features.apply_threshold(c.showers, threshold), bins)
    return counts


def read_head(path: Path, geometry: geo.Geometry, n: int, threshold: float) -> Showers:
    s = calochallenge.read(path, geometry, stop=n)
    return Showers(s.energies.astype(np.float64), features.apply_threshold(s.showers, threshold))


def resolve_geometry(spec: Any, reference: Path) -> geo.Geometry:
    if spec is not None:
        return geo.load(str(spec))
    info = calochallenge.inspect(reference)
    g = geo.by_voxel_count(info.n_voxels)
    if g is None:
        raise InputError(f"{reference}: {info.n_voxels} voxels per shower match no built-in geometry; "
                         "give geometry=<name or binning XML>")
    return g


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate as configured; return the metrics (also written to ``<out>/metrics.json``)."""
    for key in ("generated", "reference"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key}=<file> is required (a CaloChallenge HDF5 file)")
    gen_path, ref_path, out = Path(str(cfg.generated)), Path(str(cfg.reference)), Path(str(cfg.out))
    groups = list(cfg.metrics.groups)
    unknown = sorted(set(groups) - set(ALL))
    if unknown:
        raise ConfigError(f"metrics.groups: unknown group(s) {unknown}; choose from {list(ALL)}")
    geometry = resolve_geometry(cfg.geometry, ref_path)
    for p in (ref_path, gen_path):
        calochallenge.inspect(p, geometry)  # missing, corrupt, or wrong voxel count: one line
    thr = features.default_threshold(geometry) if cfg.threshold is None else float(cfg.threshold)
    stop = None if cfg.max_showers is None else int(cfg.max_showers)
    chunk = chunk_rows(geometry, int(cfg.chunk_bytes))
    keep = chunk_rows(geometry, int(cfg.plot_bytes)) if cfg.plots else 0
    cls_settings = OmegaConf.to_container(cfg.metrics.classifier, resolve=True) if cfg.metrics.classifier else None
    seed = int(cfg.seed)
    t0 = time.perf_counter()
    log.info("evaluating %s against %s (%s, threshold %.4g MeV, groups %s)", gen_path, ref_path,
             geometry.name, thr, ",".join(groups))

    ref = summarise(ref_path, geometry, thr, stop, chunk, keep)
    gen = summarise(gen_path, geometry, thr, stop, chunk, keep)
    rf, gf = ref.feats(), gen.feats()
    result: dict[str, float] = {}
    if "separation" in groups:
        result.update(separation.separation_powers(rf, gf, geometry))
        vb = separation.voxel_bins(geometry, ref.voxel_max)
        result["sep/voxel"] = separation.separation_from_counts(
            voxel_histogram(ref_path, geometry, thr, stop, chunk, vb),
            voxel_histogram(gen_path, geometry, thr, stop, chunk, vb))
    if "images" in groups:
        result.update(distances.compare_average_images(ref.images, gen.images, geometry))
    if "wasserstein" in groups:
        result.update(distances.wasserstein(rf, gf, geometry))
    if "fpd_kpd" in groups:
        result.update(distances.fpd_kpd(features.classifier_features(rf), features.classifier_features(gf), seed=seed))
    if "shapes3d" in groups:
        result.update(shapes3d.compare_shapes(ref.shape_arrays(), gen.shape_arrays(), rf.E_inc, gf.E_inc, geometry))
    if "classifier" in groups:
        from caloexp.metrics import classifier as cls

        settings = cls.resolve_settings(cls_settings)
        low = [k for k in settings["inputs"] if k != "high"]
        n_low = min(ref.n, gen.n, int(settings["max_showers"] or max(ref.n, gen.n)),
                    chunk_rows(geometry, 1 << 30))  # low-level inputs: <= 1 GiB of voxels per sample
        r_low = read_head(ref_path, geometry, n_low, thr) if low else None
        g_low = read_head(gen_path, geometry, n_low, thr) if low else None
        result.update(cls.classifier_metrics(r_low, g_low, geometry, rf, gf, settings=settings, seed=seed))
    result = {k: float(v) for k, v in sorted(result.items())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    t_metrics = time.perf_counter() - t0
    pngs: list[Path] = []
    if cfg.plots:
        from caloexp import plots

        pngs = plots.plot_all(ref.kept(), gen.kept(), geometry, out, full=bool(cfg.metrics.get("plots_full", True)),
                              threshold=0)
    log.info("%d metrics in %.1f s, %d plots in %.1f s -> %s; sep/mean = %.4f", len(result), t_metrics,
             len(pngs), time.perf_counter() - t0 - t_metrics, out, result.get("sep/mean", float("nan")))
    if cfg.mlflow or cfg.mlflow_run:
        log_to_mlflow(cfg, result, out, pngs, geometry, ref.n, gen.n, thr)
    return result


def log_to_mlflow(cfg: DictConfig, result: dict[str, float], out: Path, pngs: list[Path], geometry: geo.Geometry,
                  n_ref: int, n_gen: int, thr: float) -> str:
    """Log metrics, metrics.json and the plots to a new run or into ``mlflow_run``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from caloexp.tracking import get_or_create_experiment

    mlflow.set_tracking_uri(str(cfg.tracking_uri))
    client = MlflowClient(str(cfg.tracking_uri))
    existing = cfg.mlflow_run is not None
    prefix = "evaluate/" if existing else ""
    try:
        if existing:
            run = mlflow.start_run(run_id=str(cfg.mlflow_run))
        else:
            exp = get_or_create_experiment(client, str(cfg.experiment_name))
            run = mlflow.start_run(experiment_id=exp, run_name=f"evaluate-{Path(str(cfg.generated)).stem}")
    except MlflowException as exc:
        raise InputError(f"mlflow_run={cfg.mlflow_run}: cannot open the run at {cfg.tracking_uri} "
                         f"({str(exc).splitlines()[0]})") from None
    with run:
        items = [(prefix + k, v) for k, v in result.items() if np.isfinite(v)]
        for i in range(0, len(items), 500):
            mlflow.log_metrics(dict(items[i:i + 500]))
        params = {"generated": str(cfg.generated), "reference": str(cfg.reference), "geometry": geometry.name,
                  "threshold_MeV": thr, "n_reference": n_ref, "n_generated": n_gen,
                  "groups": ",".join(cfg.metrics.groups)}
        if existing:
            mlflow.set_tags({f"caloexp.evaluate.{k}": str(v) for k, v in params.items()})
        else:
            mlflow.log_params(params)
        mlflow.log_artifact(str(out / "metrics.json"), "evaluation")
        for p in pngs:
            mlflow.log_artifact(str(p), "evaluation/plots")
        log.info("logged to MLflow run %s", run.info.run_id)
        return run.info.run_id


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        run(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="evaluate")


if __name__ == "__main__":
    main()
