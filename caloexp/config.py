"""Typed schemas for config groups whose values the loop relies on.

Registered in Hydra's ConfigStore and used as the base of ``conf/trainer/*.yaml``,
so a wrong type on the command line (``trainer.max_steps=abc``) is rejected at
composition time with a one-line error instead of failing mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = 4000
    max_epochs: Optional[int] = None
    device: str = "auto"
    precision: str = "32"
    num_threads: Optional[int] = None
    deterministic: bool = True
    log_every: int = 25
    eval_every: int = 1000
    plot_every: int = 2
    checkpoint_every: int = 250
    metrics: list[str] = field(default_factory=lambda: ["separation", "images", "wasserstein"])
    classifier: Optional[Any] = None
    monitor: str = "monitor/score"


def register() -> None:
    ConfigStore.instance().store(group="trainer", name="schema", node=TrainerConfig)


register()
