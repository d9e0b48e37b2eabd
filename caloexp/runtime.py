"""Where and how a process runs: device, precision, threads, seeds per rank, distributed set-up.

``torchrun --nproc_per_node=N -m caloexp.train trainer.strategy=ddp`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU). Rank 0 is
the main process: it alone tracks to MLflow, writes checkpoints and evaluates.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist

from caloexp.errors import ConfigError

PRECISIONS = {"32": "32", "fp32": "32", "32-true": "32", "bf16": "bf16", "bf16-mixed": "bf16",
              "16": "16", "fp16": "16", "16-mixed": "16"}


@dataclass
class Runtime:
    device: torch.device
    precision: str = "32"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> ContextManager:
        """Mixed precision for forward passes only (the trainer's step runs outside it)."""
        if self.precision == "32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value on every rank (e.g. the monitored metric that steps a plateau scheduler)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers."""
        if self.distributed:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` takes the GPU when there is one; an unavailable device is one line."""
    name = str(name)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name}: CUDA is not available on this machine (use trainer.device=cpu)")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("trainer.device=mps: MPS is not available on this machine (use trainer.device=cpu)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"trainer.device={name}: choose auto, cpu, cuda, cuda:N or mps")


def check_precision(precision: str, device: torch.device, key: str = "trainer.precision") -> str:
    """The canonical name (32 | bf16 | 16) of a precision setting ``key``; a bad one is one line."""
    p = PRECISIONS.get(str(precision))
    if p is None:
        raise ConfigError(f"{key}={precision}: choose 32, bf16 or 16 (fp16, CUDA only)")
    if p == "16" and device.type != "cuda":
        raise ConfigError(f"{key}={precision}: fp16 needs CUDA (use bf16 or 32 on {device.type})")
    return p


def setup(device: str = "auto", precision: str = "32", strategy: str = "auto", num_threads: int | None = None,
          deterministic: bool = True, seed: int = 0, tf32: bool = True) -> Runtime:
    """Join the process group if launched by torchrun, pick the device, seed every RNG identically.

    All ranks get the same torch seed, so models are initialised identically; per-rank noise comes
    from :func:`rank_seed`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if strategy not in ("auto", "ddp", "single"):
        raise ConfigError(f"trainer.strategy={strategy}: choose auto, ddp or single")
    if world > 1 and strategy == "single":
        raise ConfigError("trainer.strategy=single but launched with WORLD_SIZE > 1 (use trainer.strategy=ddp)")
    if strategy == "ddp" and world == 1:
        world = 1  # ddp on one process is plain training
    dev = pick_device(device, local_rank)
    prec = check_precision(precision, dev)
    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError(f"trainer.num_threads={num_threads}: must be >= 1 (or null for torch's default)")
        torch.set_num_threads(int(num_threads))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if dev.type == "cuda" and tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return Runtime(dev, prec, rank, world, local_rank)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed for each rank's noise."""
    return int(seed) + 1_000_003 * int(rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
