"""Full disks and interrupted starts leave no debris (issue 8.4), on real full file systems.

A small tmpfs is mounted for the output directory or the MLflow store (needs root, else skipped;
the unit tests of checkpoint.save cover ENOSPC without it). Whatever fills up: one line
``error: <path>: no space left on device ...``, exit 2, no temp file, the last good checkpoint
intact, and the run marked FAILED when the store can still be written. A run killed (-9) before
its first checkpoint is marked KILLED with its reason at the next start in the same store.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from caloexp import checkpoint
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TINY = ["caloexp.train", "+experiment=smoke", "trainer.max_steps=10", "data.n_showers=600", "trainer.plot_every=0",
        "trainer.checkpoint_every=5"]
_MLFLOW_INFO = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow")


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(name, size)``: a tmpfs of ``size`` mounted at tmp_path/name (unmounted afterwards)."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:100]}); needs root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where: Path) -> None:
    """Fill the file system at ``where`` to the last byte."""
    try:
        fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except OSError:   # not even room for a new file
        return
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def error_line(proc) -> str:
    """The one line on stderr (MLflow's own 'creating tables' INFO lines aside)."""
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not _MLFLOW_INFO.match(ln)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("caloexp")
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time"])


# ---------------------------------------------------------- output directory
def test_output_dir_fills_up_during_training(tmp_path, small_fs):
    """2 MB: last.ckpt at step 5 and best.ckpt at step 10 fit, the step-10 last.ckpt does not."""
    out = small_fs("out", "2m")
    proc = run_cli(TINY + [f"hydra.run.dir={out}/run"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = out / "run" / "checkpoints" / "last.ckpt"
    assert error_line(proc) == (f"error: {last}: no space left on device while saving the checkpoint; nothing "
                                "was replaced (the previous checkpoint, if any, is intact)")
    assert not list(out.rglob("*.tmp"))
    assert checkpoint.load(last)["state"]["step"] in (5, 10)           # the last good one, intact
    (run,) = runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.info.status == "FAILED"


def test_output_dir_full_before_the_start(tmp_path, small_fs):
    """Hydra's own .hydra/config.yaml cannot be written: one line naming it (not a Hydra traceback)."""
    out = small_fs("out", "1m")
    fill(out)
    proc = run_cli(TINY + [f"hydra.run.dir={out}/run"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith(f"error: {out}/run/.hydra/config.yaml: no space left on device")
    assert runs(f"sqlite:///{tmp_path}/mlflow.db") == []                # no run was opened


# ---------------------------------------------------------------- MLflow store
def test_mlflow_store_fills_up_during_training(tmp_path, small_fs):
    """3 MB store: the database and the first checkpoint copies fit, a later artifact copy does not. The
    database still takes the FAILED status; no half-copied artifact stays behind."""
    store = small_fs("store", "3m")
    uri = f"sqlite:///{store}/mlflow.db"
    proc = run_cli(TINY, cwd=tmp_path, env={**ENV, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    (run,) = runs(uri)
    assert line.startswith(f"error: {store}/mlruns/{run.info.run_id}/artifacts") and \
        "no space left on device while logging" in line, line
    assert run.info.status == "FAILED"
    for art in store.rglob("*.ckpt"):                                    # every copy there is whole
        assert checkpoint.load(art)["run_id"] == run.info.run_id
    (last,) = tmp_path.glob("outputs/train/*/checkpoints/last.ckpt")
    assert checkpoint.load(last)["state"]["step"] in (5, 10) and not list(tmp_path.rglob("*.tmp"))


def test_mlflow_database_full_before_the_start(tmp_path, small_fs):
    """SQLite's 'database or disk is full' when the run is opened: one line naming the database."""
    store = small_fs("store", "3m")
    uri = f"sqlite:///{store}/mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()                               # the schema exists, then the disk fills
    fill(store)
    proc = run_cli(TINY, cwd=tmp_path, env={**ENV, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith(f"error: {store}/mlflow.db: no space left on device while "), proc.stderr


def test_tracker_turns_store_failures_into_one_line(tmp_path, small_fs):
    """In-process: metrics into a full SQLite database and an artifact onto a full disk each raise one
    TrackingError line; the half-written artifact is removed; closing as FAILED never raises."""
    from omegaconf import OmegaConf

    from caloexp.tracking import Tracker, TrackingError

    store = small_fs("store", "2m")
    tracker = Tracker(f"sqlite:///{store}/mlflow.db", "caloexp", "full")
    tracker.start(OmegaConf.create({"a": 1}))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1_500_000))
    with pytest.raises(TrackingError) as err:
        tracker.log_artifact(big, "checkpoints")
    assert "no space left on device while logging an artifact" in str(err.value) and "\n" not in str(err.value)
    assert not list(store.rglob("big.bin"))                              # no partial copy left
    fill(store)
    with pytest.raises(TrackingError) as err:
        for step in range(100_000):
            tracker.log_metrics({f"m{i}": float(i) for i in range(50)}, step)
    msg = str(err.value)
    assert msg.startswith(f"{store}/mlflow.db: no space left on device while logging metrics") and "\n" not in msg
    tracker.end("FAILED")                                                # warns at most


# ------------------------------------------------ killed before the first save
def test_run_killed_before_its_first_checkpoint_is_closed_at_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=uri, **ENV)
    proc = subprocess.Popen([sys.executable, "-m", "caloexp.train", "data.n_showers=600", "trainer.max_steps=100000",
                             "trainer.checkpoint_every=100000", "trainer.eval_every=100000"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not runs(uri):
            time.sleep(0.5)
        (victim,) = runs(uri)
        time.sleep(1.0)                                                  # a few steps in, long before a save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    client = MlflowClient(uri)
    assert client.get_run(victim.info.run_id).info.status == "RUNNING"
    assert victim.data.tags["caloexp.pid"] == str(proc.pid)
    assert not list(tmp_path.rglob("*.ckpt"))

    # runs that must be left alone: a live process, another host, a dead one that left a checkpoint
    exp = victim.info.experiment_id
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    ckdir = tmp_path / "other" / "checkpoints"
    checkpoint.save(ckdir / "last.ckpt", {"model": {}, "config_yaml": "", "run_id": None})
    keep = {}
    for name, tags in {"alive": {"caloexp.pid": str(os.getpid()), "caloexp.host": host},
                       "other_host": {"caloexp.pid": dead, "caloexp.host": f"not-{host}-{uuid.uuid4().hex[:6]}"},
                       "resumable": {"caloexp.pid": dead, "caloexp.host": host,
                                     "caloexp.checkpoint_dir": str(ckdir)}}.items():
        keep[name] = client.create_run(exp, tags=tags).info.run_id

    done = run_cli(TINY, cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    closed = client.get_run(victim.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags["caloexp.end_reason"].startswith(f"process {proc.pid} on {host} died before its "
                                                             "first checkpoint")
    for name, rid in keep.items():
        assert client.get_run(rid).info.status == "RUNNING", name
    assert runs(uri)[-1].info.status == "FINISHED"
