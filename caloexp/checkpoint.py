"""Training checkpoints: atomic save, safe load (``weights_only=True``), and finding them.

A checkpoint holds everything needed to continue a run bit-for-bit: model, optimizer
and scheduler states, the data transform, the step/epoch/batch counters, every RNG
state, the MLflow run id and the resolved config. It is written to a temporary file
and renamed, so a ``kill -9`` during a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from caloexp.errors import InputError

LAST = "last.ckpt"
BEST = "best.ckpt"


def save(path: str | Path, state: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(f"{path}: not a readable caloexp checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config_yaml" not in state:
        raise InputError(f"{path}: not a caloexp checkpoint (missing model/config)")
    return state


def find(spec: str, outputs_root: str | Path, tracking_uri: str | None = None) -> Path:
    """Resolve a resume/generate source to a checkpoint file.

    ``spec`` may be a checkpoint file, a run directory (``<dir>/checkpoints/last.ckpt``),
    ``last`` (the newest run under ``outputs_root``), or an MLflow run id (its local
    output directory if still there, else the checkpoint artifact is downloaded).
    """
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / "checkpoints" / LAST, p / LAST):
            if cand.is_file():
                return cand
        raise InputError(f"{p}: no checkpoints/{LAST} in this run directory")
    if spec == "last":
        cands = sorted(Path(outputs_root).glob(f"**/checkpoints/{LAST}"), key=lambda q: q.stat().st_mtime)
        if not cands:
            raise InputError(f"{outputs_root}: no run with a checkpoint to resume ('resume=last')")
        return cands[-1]
    if len(spec) == 32 and all(c in "0123456789abcdef" for c in spec):
        return _from_mlflow(spec, tracking_uri)
    raise InputError(f"{spec}: neither a checkpoint file, a run directory, 'last' nor an MLflow run id")


def _from_mlflow(run_id: str, tracking_uri: str | None) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise InputError(f"MLflow run {run_id} not found at {tracking_uri}") from None
    local = run.data.tags.get("caloexp.checkpoint_dir")
    if local and (Path(local) / LAST).is_file():
        return Path(local) / LAST
    try:
        return Path(client.download_artifacts(run_id, f"checkpoints/{LAST}"))
    except (MlflowException, OSError):
        raise InputError(f"MLflow run {run_id} has no checkpoints/{LAST}") from None
