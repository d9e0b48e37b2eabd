"""Conditional flow matching (rectified flow / optimal-transport path), one- or two-stage.

Objective: with data x, noise z ~ N(0, I) and t ~ U(0, 1), x_t = (1 - t) z + t x and the net
regresses the constant velocity of the straight path: L = E |v(x_t, t, c) - (x - z)|^2
(Lipman et al. 2023; Liu et al. 2023). Sampling integrates dx/dt = v from t = 0 (noise) to 1 (data)
with a fixed-step solver (``euler``, ``midpoint``, ``rk4``; ``steps`` per solve) on EMA weights.

Two-stage (CaloDREAM-style, ``energy_dims: L``): the first L network features (the layer-energy
features of the ``layer_energies`` transform) get their own small flow conditioned on the incident
energy; the shape flow learns the rest conditioned on the energy and those L features. Generation
chains both. Each stage is a role with its own optimiser and EMA, so they train (and can be tuned)
separately in one run.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from caloexp.errors import ConfigError
from caloexp.models.base import GenerativeModel

SOLVERS = ("euler", "midpoint", "rk4")


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1]."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(1000.0), dim // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.reshape(-1, 1) * self.freq * (2 * math.pi / 10)
        return torch.cat([a.sin(), a.cos()], 1)


class ResBlock(nn.Module):
    """LayerNorm -> FiLM(time, condition) -> Linear-SiLU-Linear, added to the input (zero-initialised)."""

    def __init__(self, width: int, emb: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(emb, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.act, self.drop = nn.SiLU(), nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, 1)
        u = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.drop(self.act(self.fc1(self.act(u)))))


class VelocityNet(nn.Module):
    """v(x, t, c): a residual MLP whose blocks are modulated by an embedding of (t, c)."""

    def __init__(self, dim: int, cond_dim: int, width: int = 512, n_blocks: int = 4, emb: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        if min(dim, width, n_blocks, emb) < 1:
            raise ConfigError(f"VelocityNet needs dim, width, n_blocks, emb >= 1 (got {dim}, {width}, {n_blocks}, {emb})")
        self.temb = TimeEmbedding(64)
        self.emb = nn.Sequential(nn.Linear(64 + cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Linear(dim + cond_dim, width)
        self.blocks = nn.ModuleList([ResBlock(width, emb, dropout) for _ in range(n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        emb = self.emb(torch.cat([self.temb(t), c], 1))
        h = self.inp(torch.cat([x, c], 1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def flow_matching_loss(net: nn.Module, x: torch.Tensor, c: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    z = torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)
    t = torch.rand(len(x), generator=rng, device=x.device, dtype=x.dtype)
    xt = (1 - t[:, None]) * z + t[:, None] * x
    return ((net(xt, t, c) - (x - z)) ** 2).mean()


@torch.no_grad()
def integrate(net: nn.Module, x: torch.Tensor, c: torch.Tensor, steps: int, solver: str) -> torch.Tensor:
    """Solve dx/dt = net(x, t, c) from t = 0 to 1 with ``steps`` fixed steps."""
    if solver not in SOLVERS:
        raise ConfigError(f"sampler solver={solver!r}: choose one of {list(SOLVERS)}")
    if int(steps) < 1:
        raise ConfigError(f"sampler steps={steps}: must be >= 1")
    h = 1.0 / int(steps)
    for i in range(int(steps)):
        t = torch.full_like(x[:, 0], i * h)   # follows x's batch size and device when traced
        if solver == "euler":
            x = x + h * net(x, t, c)
        elif solver == "midpoint":
            x = x + h * net(x + 0.5 * h * net(x, t, c), t + 0.5 * h, c)
        else:
            k1 = net(x, t, c)
            k2 = net(x + 0.5 * h * k1, t + 0.5 * h, c)
            k3 = net(x + 0.5 * h * k2, t + 0.5 * h, c)
            k4 = net(x + h * k3, t + h, c)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


class FlowSampler(nn.Module):
    """Noise -> network-space events by ODE solves (the energy stage first when there is one).

    The noise is (N, data_dim): the energy stage's L columns first, then the shape stage's."""

    def __init__(self, model: "CFM"):
        super().__init__()
        self.model = model

    @property
    def noise_dim(self) -> int:
        return self.model.data_dim

    def draw_noise(self, n: int, rng: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        m = self.model
        parts = [m.energy_dims, m.data_dim - m.energy_dims] if m.energy_dims else [m.data_dim]
        return torch.cat([torch.randn(n, d, generator=rng, device=device, dtype=dtype) for d in parts], 1)

    def decode(self, noise: torch.Tensor, cond: torch.Tensor, steps: int | None = None, solver: str | None = None,
               energy_steps: int | None = None) -> torch.Tensor:
        """Events from given noise with a fixed number of solver steps (an exported graph unrolls them)."""
        m = self.model
        steps, solver = int(steps or m.steps), str(solver or m.solver)
        n, L = noise.shape[0], m.energy_dims
        if not L:
            return integrate(m.flow, noise, cond, steps, solver).reshape(n, *m.data_shape)
        f = integrate(m.energy, noise[:, :L], cond, int(energy_steps or steps), solver)
        g = integrate(m.shape, noise[:, L:], torch.cat([cond, f], 1), steps, solver)
        return torch.cat([f, g], 1).reshape(n, *m.data_shape)

    def sample(self, cond: torch.Tensor, rng: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        return self.decode(self.draw_noise(cond.shape[0], rng, cond.device, cond.dtype), cond, **options)


class CFM(GenerativeModel):
    """Conditional flow matching; ``energy_dims > 0`` splits it into an energy and a shape stage."""

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, net: Any, energy_net: Any = None,
                 energy_dims: int = 0, steps: int = 20, solver: str = "midpoint", ema: dict[str, float] | None = None):
        super().__init__(data_shape, cond_dim, ema)
        if solver not in SOLVERS or steps < 1:
            raise ConfigError(f"model.solver={solver!r}, model.steps={steps}: choose {list(SOLVERS)} and steps >= 1")
        if not 0 <= energy_dims < self.data_dim:
            raise ConfigError(f"model.energy_dims={energy_dims}: must be in [0, {self.data_dim}) "
                              "(0: one stage; L: the layer-energy features of the layer_energies transform)")
        self.energy_dims, self.steps, self.solver = int(energy_dims), int(steps), str(solver)
        if self.energy_dims:
            self.roles = ("energy", "shape")
            self.energy = (energy_net or net)(dim=self.energy_dims, cond_dim=self.cond_dim)
            self.shape = net(dim=self.data_dim - self.energy_dims, cond_dim=self.cond_dim + self.energy_dims)
        else:
            self.roles = ("flow",)
            self.flow = net(dim=self.data_dim, cond_dim=self.cond_dim)
        unknown = set(self.ema) - set(self.roles)
        if unknown:
            raise ConfigError(f"model.ema names {sorted(unknown)}; this model's roles are {list(self.roles)}")

    def losses(self, batch, step: int):
        x = batch.x.reshape(len(batch.x), -1)
        if not self.energy_dims:
            return {"flow": flow_matching_loss(self.flow, x, batch.cond, self.rng)}, {}
        f, g = x[:, :self.energy_dims], x[:, self.energy_dims:]
        return {"energy": flow_matching_loss(self.energy, f, batch.cond, self.rng),
                "shape": flow_matching_loss(self.shape, g, torch.cat([batch.cond, f], 1), self.rng)}, {}

    def sampler(self) -> nn.Module:
        return FlowSampler(self)
