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

from caloexp.errors import ConfigError, InputError

ALLOWED_MODULES = ("caloexp.",)
ALLOWED_KEYS = {"_target_", "_partial_"}


def resolve_class(target: Any, where: str, prefixes: tuple[str, ...] = ALLOWED_MODULES,
                  base: type | tuple[type, ...] = object, owner: str = "caloexp") -> type:
    """The class named exactly ``<module>.<Class>``, defined under ``prefixes`` and derived from ``base``.

    No attribute walk through other modules and no names a module merely imported (``Path``,
    ``partial``): anything else is one :class:`ConfigError` line saying it is refused.
    """
    if not isinstance(target, str) or not target.startswith(prefixes) or target.count(".") < 2:
        raise ConfigError(f"{where}._target_={target!r}: refused (only {owner} classes may be built from a config)")
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{where}._target_={target}: no such class") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{where}._target_={target}: refused (not a class)")
    if not (obj.__module__ or "").startswith(prefixes):  # a name the module merely imported
        raise ConfigError(f"{where}._target_={target}: refused (a {obj.__module__} class, not one of {owner}'s)")
    if not issubclass(obj, base):
        names = " or ".join(b.__name__ for b in (base if isinstance(base, tuple) else (base,)))
        raise ConfigError(f"{where}._target_={target}: refused (not a {names})")
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
            resolve_class(dict(items)["_target_"], where, base=top or nn.Module)
        for k, v in items:
            if k != "_target_":
                check_targets(v, f"{where}.{k}")
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, v in enumerate(node):
            check_targets(v, f"{where}[{i}]")


def check_group(cfg: Any, where: str, base: type) -> None:
    """A group that must be built: a mapping with a ``_target_`` that :func:`check_targets` accepts."""
    if not isinstance(cfg, (DictConfig, Mapping)) or "_target_" not in cfg:
        raise ConfigError(f"{where}: refused (not a mapping with a caloexp _target_)")
    check_targets(cfg, where, base)


def check_stored_config(cfg: DictConfig, source: Any) -> None:
    """Refuse a config read from a file (a checkpoint's ``config_yaml``) unless everything that training
    would build from it is allowed: data, model (caloexp classes), optimizer and scheduler (torch.optim
    classes). Raises :class:`InputError` naming ``source``, the key and that it is refused."""
    from caloexp.data.base import DataModule
    from caloexp.models.base import GenerativeModel
    from caloexp.optim import check_optim_config

    try:
        check_group(cfg.get("data"), "data", DataModule)
        check_group(cfg.get("model"), "model", GenerativeModel)
        check_optim_config(cfg.get("optimizer"), cfg.get("scheduler"))
    except ConfigError as exc:
        raise InputError(f"{source}: stored config: {exc}") from None


def instantiate(cfg: DictConfig | Mapping, where: str, base: type, **kwargs: Any) -> Any:
    """Build ``cfg`` after :func:`check_targets`; a failure becomes one line naming ``where``.

    The config is resolved first and the resolved copy is both checked and built, so an
    interpolation cannot resolve to something else between the check and the build."""
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise ConfigError(f"{where}: refused (not a mapping with a caloexp _target_)")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        cfg = OmegaConf.create(plain)
    except Exception as exc:  # noqa: BLE001 - OmegaConf raises several types for bad values/interpolations
        raise ConfigError(f"{where}: unreadable config ({str(exc).splitlines()[0][:160]})") from None
    check_group(cfg, where, base)
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ConfigError):
            raise cause from None
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"cannot build '{where}' ({cfg.get('_target_')}): {msg}") from None
