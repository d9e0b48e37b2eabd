"""Ctrl-C as a user does it: SIGINT to a real training process, one line, a KILLED run, a resume that finishes it."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow

MAX_STEPS = 300
TRAIN = ["caloexp.train", "+experiment=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.checkpoint_every=10",
         "trainer.eval_every=150", "trainer.plot_every=0"]
LINE = re.compile(r"error: interrupted at step (\d+); checkpoint saved at step (\d+) in (\S+); "
                  r"continue with: (python -m caloexp\.train resume=\S+)")


def ckpt_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["state"]["step"]
    except Exception:  # noqa: BLE001 - not written yet, or being written right now
        return -1


def test_sigint_stops_with_one_line_and_the_resume_command_finishes_the_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # create the store now: a first run would print MLflow's table-creation lines
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=uri)
    proc = subprocess.Popen([sys.executable, "-m", *TRAIN, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and ckpt_step(last) < 20:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be interrupted:\n" + proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{err[-3000:]}"
    m = LINE.fullmatch(lines[0])
    assert m, lines[0]
    step, saved_at, ckpt_dir, resume = int(m[1]), int(m[2]), Path(m[3]), m[4]
    assert 20 <= step < MAX_STEPS and saved_at == step
    assert ckpt_dir == tmp_path / "run" / "checkpoints"
    assert ckpt_step(last) == step  # the checkpoint really is at the step the line names
    assert "Traceback" not in out + err

    (run,) = client.search_runs([client.get_experiment_by_name("caloexp").experiment_id])
    assert run.info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss/critic")) <= step

    args = shlex.split(resume)
    assert args[:3] == ["python", "-m", "caloexp.train"]
    done = run_cli(args[2:], cwd=tmp_path)  # the printed command, as is (run_cli supplies the interpreter)
    assert done.returncode == 0, done.stderr[-3000:]
    (again,) = client.search_runs([run.info.experiment_id])
    assert again.info.run_id == run.info.run_id
    assert again.info.status == "FINISHED"
    assert again.data.tags["caloexp.final_step"] == str(MAX_STEPS)
    assert ckpt_step(last) == MAX_STEPS


def run_dirs(project: Path) -> list[Path]:
    return sorted((project / "outputs" / "train").glob("*")) if (project / "outputs" / "train").is_dir() else []


def test_sigint_during_set_up_gives_one_line_and_leaves_no_empty_run_folder(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.Popen([sys.executable, "-m", *TRAIN], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob("outputs/train/*/train.log")):
        time.sleep(0.02)
    time.sleep(0.3)  # inside the job now: the embedded data set is being simulated (seconds)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip() == "error: interrupted (Ctrl-C); nothing new was saved"
    assert run_dirs(tmp_path) == []


def test_a_command_that_fails_before_work_leaves_no_run_folder(tmp_path: Path) -> None:
    r = run_cli(["caloexp.train", "data=photons"], cwd=tmp_path, env={"CALOEXP_OFFLINE": "1"})
    assert r.returncode == 3 and r.stderr.startswith("error: "), r.stderr[-3000:]
    assert run_dirs(tmp_path) == []
    # a folder that holds anything besides Hydra's files and the log is kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = run_cli(["caloexp.train", "data=photons", f"hydra.run.dir={mine}"], cwd=tmp_path, env={"CALOEXP_OFFLINE": "1"})
    assert r.returncode == 3
    assert (mine / "notes.txt").exists() and (mine / ".hydra").is_dir()


def test_ctrl_c_during_set_up_is_kept_until_a_safe_point_and_the_handler_is_given_back() -> None:
    from caloexp.train import _StopFlag

    before = signal.getsignal(signal.SIGINT)
    with _StopFlag() as stop:
        stop.check()                          # nothing asked yet
        os.kill(os.getpid(), signal.SIGINT)   # lands wherever set-up is: recorded, not raised there
        time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            stop.release()                    # after the loop: the handling before it, and the request acted on
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGINT) is before
    with _StopFlag():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):   # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
