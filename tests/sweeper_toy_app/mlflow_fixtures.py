"""Shared fixtures of the MLflow-server sweep test and the MLflow-UI browser test.

One ``mlflow server`` (127.0.0.1, SQLite backend, artifacts in a temp dir) and one small real
sweep (``python -m caloexp.train --multirun sweeps=wgangp_lr``, 3 trials of a few steps) are
made once per pytest process, whichever test module asks first, and stopped at session end.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
N_TRIALS = 3
EXPERIMENT = "sweep_e2e"
STUDY = "wgangp_lr_e2e"
# a few steps on a small slice of the embedded photons: seconds per trial on a CPU
TINY = ["trainer.max_steps=6", "trainer.eval_every=6", "trainer.log_every=3", "trainer.checkpoint_every=6",
        "trainer.num_threads=1", "data.n_showers=1200", "data.eval_events=300", "data.batch_size=64",
        "model.generator.width=32", "model.critic.width=32", "model.latent_dim=16", "model.critic_steps=1"]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    root: Path
    log: Path


@dataclass
class Sweep:
    server: Server
    root: Path
    proc: subprocess.CompletedProcess
    experiment_id: str


_server: Optional[Server] = None
_sweep: Optional[Sweep] = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def start_server(root: Path) -> Server:
    """``mlflow server`` on a free 127.0.0.1 port; returns once /health answers."""
    port = _free_port()
    log = root / "mlflow_server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, root, log)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    _stop(server)
    raise RuntimeError(f"mlflow server did not answer in 120 s:\n{log.read_text()[-3000:]}")


def sweep_arg(name: str) -> str:
    """``sweeps=<name>`` once conf/train.yaml lists the group (``- optional sweeps: null``), else ``+sweeps=``."""
    listed = re.search(r"^\s*-\s*(optional\s+)?sweeps\s*:", (REPO / "conf" / "train.yaml").read_text(), re.M)
    return f"{'' if listed else '+'}sweeps={name}"


def run_sweep(server: Server, root: Path) -> Sweep:
    """The README's sweep command, shrunk: 3 trials of a few training steps, tracked on ``server``."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.url, CALOEXP_ROOT=str(root),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "caloexp.train", "--multirun", sweep_arg("wgangp_lr"),
           f"hydra.sweeper.n_trials={N_TRIALS}", f"hydra.sweeper.study_name={STUDY}",
           f"hydra.sweeper.best_config_dir={root / 'conf' / 'experiment'}",
           f"logger.experiment_name={EXPERIMENT}", *TINY]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    (root / "sweep.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=server.url).get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"experiment {EXPERIMENT} missing; sweep output:\n{proc.stderr[-4000:]}"
    return Sweep(server, root, proc, exp.experiment_id)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, request) -> Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = start_server(tmp_path_factory.mktemp("mlflow_server"))
        request.addfinalizer(lambda: _stop(_server))
    return _server


@pytest.fixture(scope="session")
def real_sweep(mlflow_server, tmp_path_factory) -> Sweep:
    global _sweep
    if _sweep is None or _sweep.server is not mlflow_server:
        _sweep = run_sweep(mlflow_server, tmp_path_factory.mktemp("sweep"))
    return _sweep
