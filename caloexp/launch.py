"""One training run on several GPUs of one node from a single process: torchrun inside the job.

A SLURM job submitted by ``hydra/launcher=slurm_multigpu`` (one task, N GPUs) runs
``caloexp.train`` once; with ``trainer.nproc_per_node=N`` that process starts N ranks with
``torch.distributed.run --standalone`` (rendezvous on this node), each running ``caloexp.train``
with the job's own overrides in the job's own output directory, and waits for them. The run's best
monitored value is read back from its last checkpoint, so sweeps see the same objective as from a
single-process run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from caloexp import checkpoint
from caloexp.errors import CaloexpError, ConfigError


def wants_torchrun(cfg: DictConfig) -> bool:
    """True in the job's first process when it should start the ranks (not inside a rank)."""
    n = cfg.trainer.get("nproc_per_node")
    if n is None or int(n) == 1:
        return False
    if int(n) < 1:
        raise ConfigError(f"trainer.nproc_per_node={n}: must be >= 1")
    return "WORLD_SIZE" not in os.environ


def torchrun(cfg: DictConfig) -> float:
    """Run the N ranks of this run in its output directory; return its best monitored value."""
    n = int(cfg.trainer.nproc_per_node)
    out = Path(cfg.paths.output_dir)
    overrides = [o for o in (HydraConfig.get().overrides.task if HydraConfig.initialized() else [])
                 if o.split("=", 1)[0].lstrip("+~") not in ("hydra.run.dir", "trainer.strategy")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "caloexp.train", *overrides, "trainer.strategy=ddp", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise CaloexpError(f"torchrun with {n} processes exited with status {proc.returncode} (see the ranks' "
                           f"messages above; run directory {out})")
    state = checkpoint.load(out / "checkpoints" / checkpoint.LAST)
    return float(state["state"]["best"])
