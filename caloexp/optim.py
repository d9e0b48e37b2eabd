"""The trainer's side of optimisation: one optimiser (and scheduler) per model role, and the step.

A family computes losses; :meth:`Optim.step` does the rest, the same for every family::

    zero grad -> (scaled) backward -> all-reduce gradients across ranks -> unscale -> clip
              -> optimiser step -> scaler update -> EMA update

Roles are the model's own names (``generator``/``critic``, ``flow``, ``encoder``/``decoder``, ...).
Optimiser settings are shared by every role and overridden per role (``optimizer.<role>.lr``).
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from caloexp.build import resolve_class
from caloexp.errors import ConfigError
from caloexp.runtime import Runtime

ALLOWED_PREFIXES = ("torch.optim.",)


def _settings(cfg: DictConfig | Mapping | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


SCHEDULER_BASES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _optim_class(target: str, what: str, base: type | tuple[type, ...]) -> type:
    """The torch.optim class named ``<module>.<Class>`` exactly, of the right kind."""
    return resolve_class(target, what, ALLOWED_PREFIXES, base, owner="torch.optim")


def check_optim_config(optimizer: DictConfig | Mapping | None, scheduler: DictConfig | Mapping | None) -> None:
    """Every ``_target_`` of the optimizer (shared and per-role) and scheduler sections is a torch.optim
    class of the right kind, before anything is built (configs read back from checkpoints)."""
    settings = _settings(optimizer)
    targets = [settings.get("_target_")] + [v["_target_"] for v in settings.values()
                                            if isinstance(v, dict) and "_target_" in v]
    for target in targets:
        _optim_class(target, "optimizer", torch.optim.Optimizer)
    target = _settings(scheduler).get("_target_")
    if target:
        _optim_class(target, "scheduler", SCHEDULER_BASES)


def build_optimizer(cfg: DictConfig | Mapping, role: str, roles: tuple[str, ...], params) -> torch.optim.Optimizer:
    """Shared settings, overridden by the role's own section; sections of other names must be defaults."""
    settings = _settings(cfg)
    sections = {k: v for k, v in settings.items() if isinstance(v, dict)}
    shared = {k: v for k, v in settings.items() if k not in sections}
    for name, section in sections.items():
        if name not in roles and any(shared.get(k) != v for k, v in section.items()):
            raise ConfigError(f"optimizer.{name}: this model has no role '{name}' (roles: {', '.join(roles)})")
    kwargs = dict(shared, **sections.get(role, {}))
    cls = _optim_class(kwargs.pop("_target_", None), "optimizer", torch.optim.Optimizer)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer for {role}: {exc}") from None


def build_scheduler(cfg: DictConfig | Mapping | None, optimizer: torch.optim.Optimizer):
    settings = _settings(cfg)
    target = settings.pop("_target_", None)
    settings.pop("monitor", None)
    if not target:
        return None
    cls = _optim_class(target, "scheduler", SCHEDULER_BASES)
    try:
        return cls(optimizer, **settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler {target}: {exc}") from None


class EMA:
    """Exponential moving average of a module's parameters (sampling uses the averaged weights).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not
    dominated by the random initial weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"model.ema decay={decay}: must be in (0, 1)")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        live = [p.detach().clone() for p in module.parameters()]
        with torch.no_grad():
            for p, s in zip(module.parameters(), self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(module.parameters(), live):
                    p.copy_(s)


class Optim:
    """Owns every optimiser, scheduler, the grad scaler and EMA copies of a model."""

    def __init__(self, model: nn.Module, optimizer: DictConfig | Mapping, scheduler: DictConfig | Mapping | None,
                 runtime: Runtime, clip_grad_norm: float | None = None):
        self.model = model
        self.runtime = runtime
        self.roles: tuple[str, ...] = tuple(model.roles)
        self.optimizers = {r: build_optimizer(optimizer, r, self.roles, list(model.parameters_for(r))) for r in self.roles}
        self.schedulers = {r: s for r, o in self.optimizers.items() if (s := build_scheduler(scheduler, o))}
        self.plateau = any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in self.schedulers.values())
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ConfigError(f"trainer.gradient_clip_val={clip_grad_norm}: must be > 0 (or null)")
        self.clip = clip_grad_norm
        self.scaler = torch.amp.GradScaler("cuda") if runtime.precision == "16" else None
        self.ema = {r: EMA(model.module_for(r), d) for r, d in (getattr(model, "ema", None) or {}).items()}

    def autocast(self):
        return self.runtime.autocast()

    # ------------------------------------------------------------------ step
    def step(self, role: str, loss: torch.Tensor) -> None:
        """One optimiser step of ``role`` on ``loss``."""
        opt = self.optimizers[role]
        opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.runtime.distributed:
            self._all_reduce(params)
        if self.scaler:
            self.scaler.unscale_(opt)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        if role in self.ema:
            self.ema[role].update(self.model.module_for(role))

    def _all_reduce(self, params: list[torch.Tensor]) -> None:
        """Average gradients over ranks in one flat buffer (what DDP does, for any family's update order)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.runtime.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    @contextmanager
    def frozen(self, role: str) -> Iterator[None]:
        """No gradients into ``role``'s parameters meanwhile (e.g. the critic during a generator step)."""
        params = [p for p in self.model.parameters_for(role) if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The model with its EMA weights in place (for evaluation, generation and export)."""
        with contextlib.ExitStack() as stack:
            for role, ema in self.ema.items():
                stack.enter_context(ema.applied(self.model.module_for(role)))
            yield

    # ------------------------------------------------------------- schedule
    def scheduler_step(self, metric: float | None = None) -> None:
        """Step-based schedulers every training step; ``ReduceLROnPlateau`` at evaluations (metric given)."""
        for s in self.schedulers.values():
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if metric is not None:
                    s.step(metric)
            elif metric is None:
                s.step()

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{r}": o.param_groups[0]["lr"] for r, o in self.optimizers.items()}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
                "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": {r: {"shadow": e.shadow, "updates": e.updates} for r, e in self.ema.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for r, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][r])
        for r, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][r])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for r, e in self.ema.items():
            e.shadow = [t.to(p.device) for t, p in zip(state["ema"][r]["shadow"], e.shadow)]
            e.updates = int(state["ema"][r]["updates"])

