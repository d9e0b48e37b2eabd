"""SLURM submission path through submitit's local executor (hydra/launcher=submitit_local): a training
run as a job, and its requeue continuing from the job directory's checkpoint into the same MLflow run."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from caloexp.cli import CONF_DIR
from conftest import run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TINY = ["+experiment=smoke", "data.n_showers=600", "data.eval_events=200", "trainer.plot_every=0",
        "trainer.num_threads=1", "trainer.log_every=2", "trainer.checkpoint_every=2", "trainer.eval_every=100"]


@pytest.mark.slow
def test_training_job_and_its_requeue_resume_into_the_same_run(tmp_path):
    job = ["caloexp.train", "--multirun", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           "resume=auto", f"hydra.sweep.dir={tmp_path}/sweep", *TINY]
    first = run_cli(job + ["trainer.max_steps=4"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    job_dir = tmp_path / "sweep" / "0"
    a = torch.load(job_dir / "checkpoints/last.ckpt", weights_only=True)
    assert a["state"]["step"] == 4
    logs = list((tmp_path / "sweep" / ".submitit").glob("*/*_0_log.out"))
    assert logs, "the run did not go through submitit"
    # the job's command again in its own directory, as a requeued job runs it (submitit re-runs the same
    # call; here without the launcher's second process, and with more steps so that it has work left)
    again = run_cli(["caloexp.train", "resume=auto", f"hydra.run.dir={job_dir}", *TINY, "trainer.max_steps=8"],
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    b = torch.load(job_dir / "checkpoints/last.ckpt", weights_only=True)
    assert b["state"]["step"] == 8 and b["run_id"] == a["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("caloexp").experiment_id])
    assert [r.info.run_id for r in runs] == [a["run_id"]] and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(a["run_id"], "loss/critic")]
    assert steps == [2, 4, 6, 8]   # one history, continued after the requeue


def test_slurm_launcher_configs_compose():
    """The SLURM launcher options the README names: one GPU, N GPUs with torchrun, one trial per job."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        one = compose("train", ["hydra/launcher=slurm_gpu", "resume=auto"], return_hydra_config=True)
        multi = compose("train", ["hydra/launcher=slurm_multigpu", "trainer.nproc_per_node=4"],
                        return_hydra_config=True)
        sweep = compose("train", ["hydra/launcher=slurm_sweep"], return_hydra_config=True)
    for cfg in (one, multi, sweep):
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout >= 1
        assert launcher.tasks_per_node == 1 and launcher.nodes == 1
    assert one.hydra.launcher.gpus_per_node == 1 and one.resume == "auto"
    assert multi.hydra.launcher.gpus_per_node == multi.trainer.nproc_per_node == 4
    assert OmegaConf.select(one, "trainer.compile") is False
