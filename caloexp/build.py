"""Objects from configs, through an allow-list: a config can only name caloexp's own classes.

A config stored in a checkpoint is text anyone could have edited; instantiating its ``_target_``s
blindly would run whatever callable it names (``pathlib.Path.write_text``, ``torch.load``, ...).
:func:`instantiate` therefore accepts, anywhere in the tree, only ``_target_``s that are classes
defined in ``caloexp`` and derived from the base class the group expects (a data module, a
generative model, a network ``nn.Module``), and refuses every other target with one line.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from caloexp.errors import ConfigError

ALLOWED_MODULES = ("caloexp.",)
ALLOWED_KEYS = {"_target_", "_partial_"}


def _resolve_class(target: Any, where: str) -> type:
    if not isinstance(target, str) or not target.startswith(ALLOWED_MODULES) or target.count(".") < 2:
        raise ConfigError(f"{where}._target_={target!r}: refused (only caloexp classes may be built from a config)")
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{where}._target_={target}: no such class") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{where}._target_={target}: refused (not a class)")
    return obj


def check_targets(node: Any, where: str, top: type | None = None) -> None:
    """Raise :class:`ConfigError` unless every ``_target_`` in ``node`` is an allowed caloexp class."""
    if isinstance(node, (DictConfig, Mapping)):
        items = node.items() if isinstance(node, Mapping) else ((k, node[k]) for k in node)
        items = list(items)
        keys = {k for k, _ in items}
        for special in keys - ALLOWED_KEYS:
            if isinstance(special, str) and special.startswith("_") and special.endswith("_"):
                raise ConfigError(f"{where}.{special}: refused (only _target_ and _partial_ are allowed)")
        if "_target_" in keys:
            cls = _resolve_class(dict(items)["_target_"], where)
            base = top or nn.Module
            if not issubclass(cls, base):
                raise ConfigError(f"{where}._target_={cls.__module__}.{cls.__name__}: refused (not a {base.__name__})")
        for k, v in items:
            if k != "_target_":
                check_targets(v, f"{where}.{k}")
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, v in enumerate(node):
            check_targets(v, f"{where}[{i}]")


def instantiate(cfg: DictConfig | Mapping, where: str, base: type, **kwargs: Any) -> Any:
    """Build ``cfg`` after :func:`check_targets`; a failure becomes one line naming ``where``."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    check_targets(cfg, where, base)
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ConfigError):
            raise cause from None
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"cannot build '{where}' ({cfg.get('_target_')}): {msg}") from None
