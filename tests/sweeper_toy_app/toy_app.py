"""A tiny Hydra app (no torch) for fast tests of the caloexp_optuna sweeper.

It honours the same contracts as ``caloexp.train``: returns ``optimized_metric``'s value (lower
is better), raises on failure (``TrainingDiverged`` for "divergence"), and when
``logger.tracking_uri`` is set creates an MLflow run as a child of ``logger.parent_run_id``
with ``logger.tags``. Every call appends a JSON line to ``record_file`` so tests can count runs.
"""
from __future__ import annotations

import json
import math
import os
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from caloexp.errors import TrainingDiverged


def objective(cfg: DictConfig) -> float:
    """(x-2)^2, plus small terms for the other searched knobs; minimum 0.01 at x=2, lr=1e-3, kind=a, n=1."""
    return ((cfg.x - 2.0) ** 2 + 0.1 * (math.log10(cfg.lr) + 3.0) ** 2
            + (0.0 if cfg.kind == "a" else 1.0) + 0.01 * cfg.n)


def _work(cfg: DictConfig) -> float:
    if cfg.record_file:
        out_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
        with open(cfg.record_file, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "x": cfg.x, "lr": cfg.lr, "n": cfg.n, "kind": cfg.kind,
                                 "trial": cfg.logger.tags.get("optuna_trial"), "out_dir": out_dir}) + "\n")
        if out_dir:  # like train.log: a file a trial owns in its output directory
            with open(os.path.join(out_dir, "trial.log"), "a") as fh:
                fh.write(f"pid={os.getpid()} x={cfg.x}\n")
    if cfg.sleep:
        time.sleep(cfg.sleep)
    if cfg.fail_when_x_above is not None and cfg.x > cfg.fail_when_x_above:
        raise RuntimeError(f"toy crash at x={cfg.x:.3f}")
    if cfg.diverge_when_x_below is not None and cfg.x < cfg.diverge_when_x_below:
        raise TrainingDiverged(f"loss is nan at step 3 (x={cfg.x:.3f})")
    return objective(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    if not cfg.logger.tracking_uri:
        return _work(cfg)
    import mlflow

    # like caloexp.train: the run is open while the trial works (a killed worker leaves it RUNNING)
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    exp = mlflow.set_experiment(cfg.logger.experiment_name)
    tags = {k: str(v) for k, v in cfg.logger.tags.items()}
    if cfg.logger.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.logger.parent_run_id
    with mlflow.start_run(experiment_id=exp.experiment_id, tags=tags):
        mlflow.log_params({"x": cfg.x, "lr": cfg.lr, "n": cfg.n, "kind": cfg.kind})
        value = _work(cfg)
        mlflow.log_metric(cfg.optimized_metric, value)
    return value


if __name__ == "__main__":
    main()
