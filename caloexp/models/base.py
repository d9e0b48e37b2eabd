"""The interface every model family implements, and the generator that gets exported.

The training loop (:mod:`caloexp.train`) only ever calls:

* ``model.roles``                       - names of parameter groups that get an optimizer
* ``model.parameters_for(role)``
* ``model.training_step(batch, step, optimizers)`` - one step of the family's own update order
* ``model.sampler()``                   - an ``nn.Module`` with ``sample(cond, rng)`` for generation

Data of any shape fits: ``data_shape`` is ``(n_voxels,)`` for CaloChallenge vectors,
``(25, 51, 51)`` for 3DGAN ECAL grids, ``(n_features,)`` for tabular physics variables;
``cond_dim`` counts condition inputs (log-energy, angle, one-hot particle class, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from caloexp.data.transforms import ShowerTransform
from caloexp.errors import ConfigError


@dataclass
class Batch:
    """One training batch in network space: data ``x`` (B, *data_shape) and condition ``cond`` (B, cond_dim)."""

    x: torch.Tensor
    cond: torch.Tensor


class GenerativeModel(nn.Module):
    """Base class: holds the data shape and condition size, and the RNG used for noise."""

    roles: tuple[str, ...] = ("generator",)

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int):
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)
        self.data_dim = int(math.prod(self.data_shape))
        self.cond_dim = int(cond_dim)
        self.rng: torch.Generator | None = None  # set by the trainer; checkpointed

    def parameters_for(self, role: str) -> Iterable[nn.Parameter]:
        return getattr(self, role).parameters()

    def training_step(self, batch: Batch, step: int, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sampler(self) -> nn.Module:
        raise NotImplementedError

    @property
    def output_range(self) -> tuple[float, float] | None:
        """Value range of generated data (None: unbounded); the data transform maps data onto it."""
        return None


class LatentSampler(nn.Module):
    """A conditional generator net plus its latent prior: ``sample(cond) -> x`` in network space."""

    def __init__(self, net: nn.Module, latent_dim: int, data_shape: tuple[int, ...], conditional: bool):
        super().__init__()
        self.net = net
        self.latent_dim = latent_dim
        self.data_shape = tuple(data_shape)
        self.conditional = conditional

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([z, cond], dim=1) if self.conditional else z
        return self.net(inp).reshape(len(z), *self.data_shape)

    def sample(self, cond: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(len(cond), self.latent_dim, generator=rng, device=cond.device, dtype=cond.dtype)
        return self(z, cond)


class AdversarialModel(GenerativeModel):
    """Shared parts of GAN families: a generator net, a critic net, noise, freezing."""

    roles = ("generator", "critic")

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, generator: Callable[..., nn.Module],
                 critic: Callable[..., nn.Module], latent_dim: int = 128, conditional: bool = True):
        super().__init__(data_shape, cond_dim)
        if latent_dim < 1:
            raise ConfigError(f"model.latent_dim={latent_dim}: must be >= 1")
        self.latent_dim = int(latent_dim)
        self.conditional = bool(conditional)
        c = self.cond_dim if self.conditional else 0
        self.generator = LatentSampler(generator(in_dim=self.latent_dim + c, out_dim=self.data_dim),
                                       self.latent_dim, self.data_shape, self.conditional)
        self.critic = critic(in_dim=self.data_dim + c, out_dim=1)

    def criticise(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        return self.critic(torch.cat([x, cond], dim=1) if self.conditional else x).reshape(-1)

    def generate(self, cond: torch.Tensor) -> torch.Tensor:
        return self.generator.sample(cond, self.rng)

    def sampler(self) -> nn.Module:
        return self.generator

    @property
    def output_range(self) -> tuple[float, float] | None:
        return getattr(self.generator.net, "output_range", None)

    @staticmethod
    def set_trainable(module: nn.Module, flag: bool) -> None:
        for p in module.parameters():
            p.requires_grad_(flag)

    def update_generator(self, cond: torch.Tensor, optimizer: torch.optim.Optimizer,
                         loss_of_score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One generator step on ``loss_of_score(critic(G(z, cond)))``, the critic frozen meanwhile."""
        self.set_trainable(self.critic, False)
        loss = loss_of_score(self.criticise(self.generate(cond), cond))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.set_trainable(self.critic, True)
        return loss.detach()


class ShowerGenerator(nn.Module):
    """The exported, self-contained generator: incident energies (MeV) -> showers (MeV).

    It bundles the model's sampler with the fitted data transform, so a user of the
    MLflow model (``mlflow.pytorch.load_model``) or of a checkpoint needs nothing else.
    """

    def __init__(self, sampler: nn.Module, transform: ShowerTransform):
        super().__init__()
        self.sampler = sampler
        self.transform = transform

    @torch.no_grad()
    def forward(self, energies: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        energies = energies.reshape(-1).to(self.transform.shift.device)
        dtype = next(self.sampler.parameters()).dtype
        cond = self.transform.condition(energies).to(dtype)
        x = self.sampler.sample(cond, rng)
        return self.transform.inverse(x.reshape(len(x), -1), energies).to(torch.float32)
