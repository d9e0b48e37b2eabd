"""A real sweep against a real ``mlflow server``: parent run, one child run per trial with
params, the objective metric and artifacts; the Optuna study and the best-trial config."""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from sweeper_toy_app.mlflow_fixtures import (  # noqa: F401 - fixtures
    EXPERIMENT, N_TRIALS, REPO, STUDY, mlflow_server, real_sweep)

pytestmark = pytest.mark.slow
METRIC = "monitor/score"
PARAMS = ("optimizer.generator.lr", "optimizer.critic.lr")


def test_sweep_is_tracked_as_parent_and_child_runs(real_sweep):
    client = MlflowClient(tracking_uri=real_sweep.server.url)
    exp = client.get_experiment(real_sweep.experiment_id)
    assert exp.name == EXPERIMENT and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{real_sweep.root / 'optuna.db'}")
    assert len(study.trials) == N_TRIALS
    assert all(t.state == TrialState.COMPLETE for t in study.trials), \
        [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("caloexp.sweep_role") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_study"] == STUDY
    assert parent.data.metrics[METRIC] == pytest.approx(study.best_value)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == N_TRIALS and len(runs) == N_TRIALS + 1

    for child in children:
        trial = study.trials[int(child.data.tags["optuna_trial"])]
        assert child.info.status == "FINISHED"
        assert child.data.tags["sweep_id"] == study.user_attrs["sweep_id"]
        assert child.data.tags["optuna_study"] == STUDY and child.data.tags["optuna_state"] == "COMPLETE"
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        for name in PARAMS:  # the trial's hyper-parameters, as the training run logged its config
            assert float(child.data.params[name]) == pytest.approx(trial.params[name])
        assert METRIC in child.data.metrics and f"best/{METRIC}" in child.data.metrics
        assert child.data.metrics[f"best/{METRIC}"] == pytest.approx(trial.value)
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "config.yaml" in arts, arts

    parent_arts = {a.path for d in ("optuna", "best_config")
                   for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png", "optuna/trials.csv",
            f"best_config/{STUDY}_best.yaml"} <= parent_arts, parent_arts
    png = client.download_artifacts(parent.info.run_id, "optuna/optimization_history.png",
                                     str(real_sweep.root / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_best_trial_config_is_a_ready_experiment(real_sweep):
    """`+experiment=<study>_best` composes to the best trial's parameters and the sweep's settings."""
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{real_sweep.root / 'optuna.db'}")
    conf_dir = real_sweep.root / "conf"
    text = (conf_dir / "experiment" / f"{STUDY}_best.yaml").read_text()
    assert text.startswith("# @package _global_") and "/sweeps: wgangp_lr" in text
    env = dict(os.environ, CALOEXP_ROOT=str(real_sweep.root),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "caloexp.train", f"+experiment={STUDY}_best",
                           f"hydra.searchpath=[file://{conf_dir}]", "--cfg", "job"],
                          cwd=real_sweep.root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(proc.stdout)
    for name in PARAMS:
        assert OmegaConf.select(cfg, name) == pytest.approx(study.best_params[name])
    assert cfg.trainer.max_steps == 6 and cfg.model.latent_dim == 16  # the sweep's command line came along
    assert cfg.optimized_metric == METRIC


def test_each_trial_has_its_own_folder_and_checkpoint(real_sweep):
    """Trial folders are `<sweep dir>/<sweep_id>/trial_<n>`; `checkpoint.find(<child run id>)` returns
    that trial's own checkpoint and it verifies as belonging to that run."""
    from pathlib import Path

    from caloexp import checkpoint

    client = MlflowClient(tracking_uri=real_sweep.server.url)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{real_sweep.root / 'optuna.db'}")
    sweep_id = study.user_attrs["sweep_id"]
    children = [r for r in client.search_runs([real_sweep.experiment_id])
                if r.data.tags.get("caloexp.sweep_role") != "parent"]
    dirs = set()
    for child in children:
        n = int(child.data.tags["optuna_trial"])
        out = Path(child.data.tags["caloexp.output_dir"])
        assert out.parts[-2:] == (sweep_id, f"trial_{n:04d}") and out == Path(study.trials[n].user_attrs["output_dir"])
        dirs.add(out)
        path = checkpoint.find(child.info.run_id, real_sweep.root / "outputs", real_sweep.server.url)
        assert path == out / "checkpoints" / "last.ckpt"
        assert checkpoint.load(path, run_id=child.info.run_id)["run_id"] == child.info.run_id
    assert len(dirs) == N_TRIALS
