"""Standalone physics evaluation of a generated CaloChallenge file against a reference file.

``python -m caloexp.evaluate generated=gen.hdf5 reference=ref.hdf5 geometry=dataset_1_photons out=eval``

Writes ``metrics.json`` (a flat dict of every metric, see ``docs/metrics.md``) and the
validation PNGs to ``out``; with ``mlflow=true`` (new run) or ``mlflow_run=<id>`` (existing
run) also logs them to MLflow. Files are streamed chunk by chunk through
:func:`caloexp.metrics.evaluate_stream` (dataset 3 holds 40,500 voxels per shower): each metric
group accumulates per chunk; only the classifier's low-level inputs (``classifier.max_showers``
per sample) and the plotted showers (``plot_bytes``) are held in memory.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from caloexp import geometry as geo
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.data import calochallenge
from caloexp import metrics
from caloexp.data.calochallenge import Showers
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError, InputError
from caloexp.metrics import features

log = logging.getLogger("caloexp.evaluate")


def chunk_rows(geometry: geo.Geometry, n_bytes: int) -> int:
    return max(1, int(n_bytes) // (4 * geometry.n_voxels))


def file_source(path: Path, geometry: geo.Geometry, stop: int | None, chunk: int) -> Callable[[], Iterator[Sample]]:
    """A re-iterable source of a CaloChallenge file for :func:`caloexp.metrics.evaluate_stream`."""
    def chunks() -> Iterator[Sample]:
        for c in calochallenge.iter_chunks(path, chunk, geometry, stop=stop):
            yield Sample(c.showers, {"energy": c.energies.astype(np.float64)}, "calo")
    return chunks


def read_head(path: Path, geometry: geo.Geometry, n: int) -> Showers:
    """The first ``n`` showers of a file (for the plots)."""
    s = calochallenge.read(path, geometry, stop=n)
    return Showers(s.energies.astype(np.float64), s.showers)


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
    groups = metrics.check_groups(list(cfg.metrics.groups), "calo", setting="metrics.groups")
    geometry = resolve_geometry(cfg.geometry, ref_path)
    for p in (ref_path, gen_path):
        calochallenge.inspect(p, geometry)  # missing, corrupt, or wrong voxel count: one line
    thr = features.default_threshold(geometry) if cfg.threshold is None else float(cfg.threshold)
    stop = None if cfg.max_showers is None else int(cfg.max_showers)
    chunk = chunk_rows(geometry, int(cfg.chunk_bytes))
    keep = chunk_rows(geometry, int(cfg.plot_bytes)) if cfg.plots else 0
    cls_settings = OmegaConf.to_container(cfg.metrics.classifier, resolve=True) if cfg.metrics.classifier else None
    t0 = time.perf_counter()
    log.info("evaluating %s against %s (%s, threshold %.4g MeV, groups %s)", gen_path, ref_path,
             geometry.name, thr, ",".join(groups))
    ev = metrics.evaluate_stream(file_source(ref_path, geometry, stop, chunk), file_source(gen_path, geometry, stop, chunk),
                                 geometry, groups=groups, kind="calo", threshold=thr, classifier=cls_settings,
                                 seed=int(cfg.seed))
    result = ev.metrics
    result = {k: float(v) for k, v in sorted(result.items())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    t_metrics = time.perf_counter() - t0
    pngs: list[Path] = []
    if cfg.plots:
        from caloexp import plots

        # plots take the first showers of each file (features for the whole files are in ev)
        pngs = plots.plot_all(read_head(ref_path, geometry, keep), read_head(gen_path, geometry, keep), geometry, out,
                              full=bool(cfg.metrics.get("plots_full", True)), threshold=thr)
    log.info("%d metrics in %.1f s, %d plots in %.1f s -> %s; sep/mean = %.4f, monitor/score = %.4f", len(result),
             t_metrics, len(pngs), time.perf_counter() - t0 - t_metrics, out, result.get("sep/mean", float("nan")),
             result.get("monitor/score", float("nan")))
    if cfg.mlflow or cfg.mlflow_run:
        log_to_mlflow(cfg, result, out, pngs, geometry, ev.n_reference, ev.n_generated, thr)
    return result


def log_to_mlflow(cfg: DictConfig, result: dict[str, float], out: Path, pngs: list[Path], geometry: geo.Geometry,
                  n_ref: int, n_gen: int, thr: float) -> str:
    """Log metrics, parameters, metrics.json and the plots to a new evaluation run; return its id.

    With ``mlflow_run=<training run id>`` the evaluation run is created in the training run's
    experiment as its child (``mlflow.parentRunId``) and tagged ``caloexp.evaluates=<id>``; the
    training run itself is never reopened, so its status, end time and metrics stay as they were.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from caloexp.tracking import start_side_run

    client = MlflowClient(str(cfg.tracking_uri))
    run_id = start_side_run(client, str(cfg.tracking_uri), str(cfg.experiment_name), cfg.mlflow_run,
                            "caloexp.evaluates", "evaluate", Path(str(cfg.generated)).stem)
    status = "FAILED"
    try:
        params = {"generated": str(cfg.generated), "reference": str(cfg.reference), "geometry": geometry.name,
                  "threshold_MeV": thr, "n_reference": n_ref, "n_generated": n_gen,
                  "groups": ",".join(cfg.metrics.groups)}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in result.items() if np.isfinite(v)]
        for i in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[i:i + 500])
        client.log_artifact(run_id, str(out / "metrics.json"), "evaluation")
        for p in pngs:
            client.log_artifact(run_id, str(p), "evaluation/plots")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    log.info("logged to MLflow run %s%s", run_id, f" (evaluates run {cfg.mlflow_run})" if cfg.mlflow_run else "")
    return run_id


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        run(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="evaluate")


if __name__ == "__main__":
    main()
