"""Shared fixtures: reference files beside the checkout, small CaloChallenge files, a tmp project."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference data not found at {SHARED} (it lies beside the checkout in CI)")
    return SHARED


def random_showers(n: int, n_voxels: int = 368, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse positive showers (MeV) at dataset-1 energies: small, real-shaped test input."""
    rng = np.random.default_rng(seed)
    e = rng.choice(2.0 ** np.arange(8, 23), n)
    s = rng.exponential(1.0, (n, n_voxels)) * (rng.random((n, n_voxels)) < 0.3) * e[:, None] / 100
    return e.astype(np.float32), s.astype(np.float32)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` as a user would, in ``cwd``, with an isolated MLflow store."""
    # always explicit: mlflow.set_tracking_uri() in this process exports MLFLOW_TRACKING_URI
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def train_twice_and_resume(args: list[str], tmp_path: Path, steps: int) -> tuple[dict, dict]:
    """Run A for ``steps`` steps; run B for half, then ``resume=`` it to ``steps``. Returns both last checkpoints."""
    import torch

    a = run_cli(args + [f"trainer.max_steps={steps}", f"hydra.run.dir={tmp_path}/A"], cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(args + [f"trainer.max_steps={steps // 2}", f"hydra.run.dir={tmp_path}/B"], cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    b2 = run_cli(["caloexp.train", f"resume={tmp_path}/B", f"trainer.max_steps={steps}"], cwd=tmp_path)
    assert b2.returncode == 0, b2.stderr[-3000:]
    sa = torch.load(tmp_path / "A/checkpoints/last.ckpt", weights_only=True)
    sb = torch.load(tmp_path / "B/checkpoints/last.ckpt", weights_only=True)
    assert sa["state"]["step"] == sb["state"]["step"] == steps
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    return sa, sb
