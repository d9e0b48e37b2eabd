"""The interface every model family implements.

The trainer (:mod:`caloexp.train`) only ever calls:

* ``model.roles``, ``model.parameters_for(role)``, ``model.module_for(role)`` - parameter groups with
  an optimiser each (any names); ``model.ema`` - ``{role: decay}`` for weights to average
* ``model.training_step(batch, step, optim)`` - the family's maths; ``optim.step(role, loss)`` does
  backward, scaling, clipping, the optimiser step, gradient sync and EMA (:class:`caloexp.optim.Optim`)
* ``model.prepare(data)`` - once before training: statistics of the training data kept in buffers
* ``model.sampler()`` - an ``nn.Module`` with ``sample(cond, rng, **options)`` for generation

A family with one loss per role only writes :meth:`GenerativeModel.losses`; the default
``training_step`` then steps every role on its loss. Nets are built from ``(data_shape, cond_dim)``,
so MLPs, 2D and 3D conv nets all fit (see :mod:`caloexp.models.nets`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from caloexp.data.sample import Batch
from caloexp.errors import ConfigError

Losses = dict[str, torch.Tensor]


class GenerativeModel(nn.Module):
    """Base class: data shape, condition size, the noise RNG, role bookkeeping."""

    roles: tuple[str, ...] = ("generator",)

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, ema: dict[str, float] | None = None):
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)
        self.data_dim = int(math.prod(self.data_shape))
        self.cond_dim = int(cond_dim)
        self.ema = dict(ema or {})
        self.rng: torch.Generator | None = None  # set by the trainer (seeded per rank); checkpointed

    def module_for(self, role: str) -> nn.Module:
        return getattr(self, role)

    def parameters_for(self, role: str) -> Iterable[nn.Parameter]:
        return self.module_for(role).parameters()

    def prepare(self, data) -> None:
        """Fit statistics of the training data (a set-up ``DataModule``) that the family keeps in buffers;
        called once before training (a resumed run then loads them from the checkpoint). Default: none."""

    def losses(self, batch: Batch, step: int) -> tuple[Losses, dict[str, torch.Tensor]]:
        """``({role: loss}, logs)`` for families with one loss per role and step."""
        raise NotImplementedError

    def training_step(self, batch: Batch, step: int, optim) -> dict[str, torch.Tensor]:
        with optim.autocast():
            losses, logs = self.losses(batch, step)
        for role, loss in losses.items():
            optim.step(role, loss)
        return {**{f"loss/{r}": v.detach() for r, v in losses.items()}, **logs}

    def sampler(self) -> nn.Module:
        raise NotImplementedError

    def spec_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The model config a checkpoint stores to rebuild this model for sampling; a family drops
        what only training needs (e.g. a distillation teacher)."""
        return cfg

    @property
    def output_range(self) -> tuple[float, float] | None:
        """Value range of generated data (None: unbounded); the data transform maps data onto it."""
        return None


class LatentSampler(nn.Module):
    """A conditional generator net plus its Gaussian latent prior: ``sample(cond) -> x``."""

    def __init__(self, net: nn.Module, latent_dim: int, conditional: bool):
        super().__init__()
        self.net = net
        self.latent_dim = latent_dim
        self.conditional = conditional

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(z, cond if self.conditional else cond[:, :0])

    @property
    def noise_dim(self) -> int:
        return self.latent_dim

    def draw_noise(self, n: int, rng: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (n, noise_dim) standard-normal input :meth:`decode` maps to events."""
        return torch.randn(n, self.latent_dim, generator=rng, device=device, dtype=dtype)

    def decode(self, noise: torch.Tensor, cond: torch.Tensor, **options: Any) -> torch.Tensor:
        """Events from given noise: deterministic, so an exported graph takes the noise as an input."""
        if options:
            raise ConfigError(f"this sampler takes no options (got {sorted(options)})")
        return self(noise, cond)

    def sample(self, cond: torch.Tensor, rng: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        return self.decode(self.draw_noise(cond.shape[0], rng, cond.device, cond.dtype), cond, **options)


class AdversarialModel(GenerativeModel):
    """The GAN training step as a template; families fill in the hooks where their maths differs.

    Per step: ``critic_steps`` critic updates for each generator update, counted by step, and
    ``generator_steps`` generator updates (on fresh noise) where there is one (3DGAN's original: 2)::

        critic:    critic_loss(real_out, fake_out, batch, fake) + aux_loss(real_out, batch)
        generator: generator_loss(fake_out, batch, fake) + aux_loss(fake_out, batch)   (critic frozen)

    The critic net returns ``(B, 1 + n_aux)``: column 0 is the real/fake score, the others are
    auxiliary heads (e.g. 3DGAN's energy and angle regressions), which ``aux_loss`` uses.
    """

    roles = ("generator", "critic")

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, generator: Callable[..., nn.Module],
                 critic: Callable[..., nn.Module], latent_dim: int = 128, conditional: bool = True,
                 critic_steps: int = 1, n_aux: int = 0, ema: dict[str, float] | None = None,
                 generator_steps: int = 1):
        super().__init__(data_shape, cond_dim, ema)
        if latent_dim < 1:
            raise ConfigError(f"model.latent_dim={latent_dim}: must be >= 1")
        if critic_steps < 1:
            raise ConfigError(f"model.critic_steps={critic_steps}: must be >= 1")
        if generator_steps < 1:
            raise ConfigError(f"model.generator_steps={generator_steps}: must be >= 1")
        self.latent_dim = int(latent_dim)
        self.conditional = bool(conditional)
        self.critic_steps = int(critic_steps)
        self.generator_steps = int(generator_steps)
        self.n_aux = int(n_aux)
        c = self.cond_dim if self.conditional else 0
        self.generator = LatentSampler(generator(in_shape=(self.latent_dim,), out_shape=self.data_shape, cond_dim=c),
                                       self.latent_dim, self.conditional)
        self.critic = critic(in_shape=self.data_shape, out_shape=(1 + self.n_aux,), cond_dim=c)

    # ---------------------------------------------------------------- hooks
    def critic_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor, batch: Batch,
                    fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def generator_loss(self, fake_out: torch.Tensor, batch: Batch,
                       fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def aux_loss(self, out: torch.Tensor, batch: Batch, x: torch.Tensor,
                 real: bool) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """Auxiliary-head losses on critic outputs ``out[:, 1:]`` (none by default)."""
        return 0.0, {}

    # ------------------------------------------------------------- template
    def criticise(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Critic outputs (B, 1 + n_aux)."""
        return self.critic(x, cond if self.conditional else cond[:, :0]).reshape(len(x), -1)

    def generate(self, cond: torch.Tensor) -> torch.Tensor:
        return self.generator.sample(cond, self.rng)

    def training_step(self, batch: Batch, step: int, optim) -> dict[str, torch.Tensor]:
        with optim.autocast():
            with torch.no_grad():
                fake = self.generate(batch.cond)
            real_out, fake_out = self.criticise(batch.x, batch.cond), self.criticise(fake, batch.cond)
            loss_c, logs = self.critic_loss(real_out, fake_out, batch, fake)
            aux, aux_logs = self.aux_loss(real_out, batch, batch.x, real=True)
        optim.step("critic", loss_c + aux)
        out = {"loss/critic": loss_c.detach(), **logs, **{f"{k}/real": v for k, v in aux_logs.items()}}
        if (step + 1) % self.critic_steps == 0:
            out.update(self.generator_update(batch, optim))   # the first update's logs are reported
            for _ in range(self.generator_steps - 1):
                self.generator_update(batch, optim)
        return out

    def generator_update(self, batch: Batch, optim) -> dict[str, torch.Tensor]:
        """One generator step on fresh noise against the frozen critic; returns its logs."""
        with optim.frozen("critic"), optim.autocast():
            fake = self.generate(batch.cond)
            fake_out = self.criticise(fake, batch.cond)
            loss_g, glogs = self.generator_loss(fake_out, batch, fake)
            aux, aux_logs = self.aux_loss(fake_out, batch, fake, real=False)
        optim.step("generator", loss_g + aux)
        return {"loss/generator": loss_g.detach(), **glogs, **{f"{k}/fake": v for k, v in aux_logs.items()}}

    def sampler(self) -> nn.Module:
        return self.generator

    @property
    def output_range(self) -> tuple[float, float] | None:
        return getattr(self.generator.net, "output_range", None)
