"""Write the best trial as an experiment config (``# @package _global_``) that reproduces it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf


def render_best_config(*, study_name: str, trial_number: int, value: float, metric: str, direction: str,
                       params: Dict[str, Any], fixed: Dict[str, Override], groups: set,
                       experiment_group: str = "experiment") -> str:
    """YAML text: group choices go to ``defaults`` (``override /group: option``), values to the body.

    ``fixed`` are the overrides every trial received (sweep-file fixed params and the command
    line, e.g. ``sweeps=...`` which brings the sweep's training budget along).
    """
    defaults: List[Any] = []
    body = OmegaConf.create({})
    skipped: List[str] = []

    def put(key: str, val: Any, how: str = "") -> None:
        if key.startswith("hydra.") or key == "hydra":
            return
        if key in groups:
            if val is None:
                skipped.append(f"{key}=null")
            elif key == experiment_group:  # an experiment used by the sweep: load it as a config
                defaults.append(f"/{key}/{val}")
            else:
                defaults.append({f"{'' if how == '+' else 'override '}/{key}": val})
        else:
            OmegaConf.update(body, key, val, force_add=True)

    for key, ov in fixed.items():
        if ov.is_delete():
            skipped.append(ov.input_line or f"~{key}")
            continue
        put(ov.key_or_group, ov.value(), "+" if ov.is_add() else "")
    for key, val in params.items():
        put(key, val)

    lines = [
        "# @package _global_",
        f"# Best trial {trial_number} of Optuna study '{study_name}': {metric} = {value:.6g} ({direction}).",
        "# Written by the caloexp_optuna sweeper; rerun the sweep to refresh it.",
    ]
    if any(isinstance(d, dict) and "override /sweeps" in d for d in defaults):
        lines.append("# `override /sweeps` brings the sweep's metric and short training budget along (the")
        lines.append("# trial as it ran); delete that line to train these hyper-parameters at full length.")
    if skipped:
        lines.append(f"# not representable here, add on the command line: {' '.join(skipped)}")
    text = "\n".join(lines) + "\n"
    if defaults:  # Hydra wants `override` entries after the plain ones
        defaults.sort(key=lambda d: isinstance(d, dict) and next(iter(d)).startswith("override "))
        text += OmegaConf.to_yaml(OmegaConf.create({"defaults": defaults}))
    if len(body):
        text += OmegaConf.to_yaml(body)
    return text


def write_best_config(path: Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (concurrent workers may both write it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{id(text)}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path

