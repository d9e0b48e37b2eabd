"""Typed schemas and up-front checks for the config values the loop relies on.

``TrainerConfig`` is registered in Hydra's ConfigStore and used as the base of
``conf/trainer/*.yaml``, so a wrong type on the command line (``trainer.max_steps=abc``) is
rejected at composition time; :func:`validate_trainer` checks ranges and cross-field rules before
any work starts, each problem as one line naming the setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from caloexp.errors import ConfigError


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = 4000
    max_epochs: Optional[int] = None
    device: str = "auto"
    precision: str = "32"
    strategy: str = "auto"
    num_threads: Optional[int] = None
    deterministic: bool = True
    gradient_clip_val: Optional[float] = None
    log_every: int = 25
    eval_every: int = 1000
    plot_every: int = 2
    checkpoint_every: int = 250
    metrics: Optional[list[str]] = None
    classifier: Optional[Any] = None
    monitor: str = "monitor/score"


def validate_trainer(tc: Any) -> None:
    """Ranges and cross-field rules of ``trainer.*`` (types are checked by the schema)."""
    if tc.max_steps is None and tc.max_epochs is None:
        raise ConfigError("set trainer.max_steps or trainer.max_epochs: training needs an end")
    for key in ("max_steps", "max_epochs"):
        value = tc.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{key}={value}: must be >= 1 (or null)")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if tc[key] < 1:
            raise ConfigError(f"trainer.{key}={tc[key]}: must be >= 1")
    if tc.plot_every < 0:
        raise ConfigError(f"trainer.plot_every={tc.plot_every}: must be >= 0 (0: no plots)")
    if tc.num_threads is not None and tc.num_threads < 1:
        raise ConfigError(f"trainer.num_threads={tc.num_threads}: must be >= 1 (or null)")
    if tc.gradient_clip_val is not None and not tc.gradient_clip_val > 0:
        raise ConfigError(f"trainer.gradient_clip_val={tc.gradient_clip_val}: must be > 0 (or null)")
    if tc.metrics is not None and len(tc.metrics) == 0:
        raise ConfigError("trainer.metrics=[]: evaluation needs at least one metric group (null: the data's default)")


def register() -> None:
    ConfigStore.instance().store(group="trainer", name="schema", node=TrainerConfig)


register()
