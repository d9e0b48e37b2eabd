"""Typed schemas and up-front checks for the config values the loop relies on.

``TrainerConfig`` is registered in Hydra's ConfigStore and used as the base of
``conf/trainer/*.yaml``, so a wrong type on the command line (``trainer.max_steps=abc``) is
rejected at composition time; :func:`validate_trainer` checks ranges and cross-field rules before
any work starts, each problem as one line naming the setting.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from caloexp.errors import ConfigError


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = 4000
    max_epochs: Optional[int] = None
    max_time: Optional[float] = None
    device: str = "auto"
    precision: str = "32"
    strategy: str = "auto"
    nproc_per_node: Optional[int] = None
    compile: bool = False
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
    if tc.max_steps is None and tc.max_epochs is None and tc.get("max_time") is None:
        raise ConfigError("set trainer.max_steps, trainer.max_epochs or trainer.max_time: training needs an end")
    if tc.get("max_time") is not None and not tc.max_time > 0:
        raise ConfigError(f"trainer.max_time={tc.max_time}: must be > 0 minutes (or null)")
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


_SKIP_OVERRIDE = re.compile(r"^(model|data|experiment|sweeps)=|^(hydra|logger|paths)\.|_dir=|^resume=")


def run_name(model: str, data: str, overrides: Sequence[str] = (), when: datetime | None = None,
             max_overrides: int = 3, max_len: int = 60) -> str:
    """``<model>-<data>-<short key overrides>-<MMDD-HHMMSS>``: distinguishable at a glance.

    Overrides are shortened to the last key component (``optimizer.generator.lr=1e-4`` ->
    ``lr=1e-4``); model/data choices, paths, hydra and logger settings are left out.
    """
    data = data.replace("embedded_", "").replace("dataset_", "ds")
    short = []
    for o in overrides:
        o = str(o)
        o = o.lstrip("+~")
        if "=" not in o or _SKIP_OVERRIDE.search(o):
            continue
        key, value = o.split("=", 1)
        short.append(f"{key.rsplit('.', 1)[-1]}={value.strip(chr(39) + chr(34))[:12]}")
    stamp = (when or datetime.now()).strftime("%m%d-%H%M%S")
    middle = ",".join(short[:max_overrides]) + (",..." if len(short) > max_overrides else "")
    name = "-".join(p for p in (model, data, middle) if p)
    return f"{name[:max_len - len(stamp) - 1]}-{stamp}"


def _run_name_resolver(model: str, data: str, overrides: Any = ()) -> str:
    return run_name(model, data, list(overrides or ()))


if not OmegaConf.has_resolver("caloexp.run_name"):
    # cached per config object: the name (and its time stamp) stays the same however often it is read
    OmegaConf.register_new_resolver("caloexp.run_name", _run_name_resolver, use_cache=True)


register()
