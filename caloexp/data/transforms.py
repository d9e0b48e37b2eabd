"""Preprocessing between physical showers (MeV) and what a network sees, with an exact inverse.

The forward chain is the one most CaloChallenge GANs use:

1. ``u = voxel / E_inc``            (energy fractions: removes the trivial scale with E_inc)
2. ``v = log(u + eps)``             (compresses the ~7 decades of voxel energies)
3. per-voxel standardisation, or a min/max map onto a generator's output range
   (e.g. ``[-1, 1]`` for a ``tanh`` output layer).

Every step is invertible, so metrics and generated files are always in MeV: the
inverse is ``voxel = E_inc * (exp(v) - eps)``, clamped at 0 (a generator may emit
values below ``log(eps)``, i.e. a voxel a bit below zero energy, which is zero).

The condition given to a model is ``log10(E_inc)`` mapped linearly onto [0, 1] over
the training range. The transform is an ``nn.Module`` whose fitted statistics are
buffers: it is saved in checkpoints and travels inside the exported generator.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from caloexp.errors import ConfigError


class ShowerTransform(nn.Module):
    """Invertible map showers (MeV) <-> network space, plus the energy condition."""

    def __init__(self, n_voxels: int, energy_scale: bool = True, log_eps: float | None = 1e-7,
                 normalize: str = "standard", output_range: tuple[float, float] | None = None):
        super().__init__()
        if normalize not in ("standard", "minmax", "none"):
            raise ConfigError(f"data.transform.normalize={normalize!r}: choose standard, minmax or none")
        if output_range is not None:
            normalize = "minmax"  # the generator's output range decides the data range
        if log_eps is not None and log_eps <= 0:
            raise ConfigError(f"data.transform.log_eps={log_eps}: must be > 0 (or null for no log)")
        self.energy_scale = energy_scale
        self.log_eps = log_eps
        self.normalize = normalize
        lo, hi = output_range if output_range is not None else (-1.0, 1.0)
        self.register_buffer("shift", torch.zeros(n_voxels))
        self.register_buffer("scale", torch.ones(n_voxels))
        self.register_buffer("range", torch.tensor([float(lo), float(hi)]))
        self.register_buffer("log_e_range", torch.tensor([math.log10(256.0), math.log10(4.2e6)]))

    # ----------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(self, showers: np.ndarray | torch.Tensor, energies: np.ndarray | torch.Tensor) -> "ShowerTransform":
        """Fit the normalisation and the energy range on (a sample of) training showers."""
        showers = torch.as_tensor(np.asarray(showers), dtype=torch.float64)
        energies = torch.as_tensor(np.asarray(energies), dtype=torch.float64).reshape(-1)
        log_e = torch.log10(energies)
        lo_e, hi_e = float(log_e.min()), float(log_e.max())
        if hi_e - lo_e < 1e-6:  # a single energy: avoid a zero-width range
            lo_e, hi_e = lo_e - 0.5, hi_e + 0.5
        self.log_e_range.copy_(torch.tensor([lo_e, hi_e]))
        self.shift.fill_(0.0)
        self.scale.fill_(1.0)
        v = self._pre(showers, energies)
        if self.normalize == "standard":
            self.shift.copy_(v.mean(0))
            self.scale.copy_(v.std(0).clamp_min(1e-6))
        elif self.normalize == "minmax":
            vmin, vmax = v.min(0).values, v.max(0).values
            lo, hi = float(self.range[0]), float(self.range[1])
            # v -> lo + (v - vmin) / (vmax - vmin) * (hi - lo)   written as (v - shift) / scale
            width = (vmax - vmin).clamp_min(1e-6)
            self.scale.copy_(width / (hi - lo))
            self.shift.copy_(vmin - lo * self.scale)
        return self

    # ------------------------------------------------------------- forward
    def _pre(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        u = showers / energies.reshape(-1, 1) if self.energy_scale else showers
        return torch.log(u + self.log_eps) if self.log_eps is not None else u

    def forward(self, showers: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Showers in MeV (N, V) -> network space (N, V)."""
        v = self._pre(showers.to(self.shift.dtype), energies.to(self.shift.dtype))
        return (v - self.shift) / self.scale

    def inverse(self, x: torch.Tensor, energies: torch.Tensor) -> torch.Tensor:
        """Network space (N, V) -> showers in MeV, non-negative."""
        v = x.to(self.shift.dtype) * self.scale + self.shift
        u = torch.exp(v) - self.log_eps if self.log_eps is not None else v
        out = u * energies.to(u.dtype).reshape(-1, 1) if self.energy_scale else u
        return out.clamp_min(0.0)

    def condition(self, energies: torch.Tensor) -> torch.Tensor:
        """Incident energy (MeV) -> model condition (N, 1): log10(E) scaled to [0, 1] on the training range."""
        lo, hi = self.log_e_range[0], self.log_e_range[1]
        return ((torch.log10(energies.to(self.shift.dtype)) - lo) / (hi - lo)).reshape(-1, 1)

    # numpy conveniences for I/O code
    def to_network(self, showers: np.ndarray, energies: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self(torch.as_tensor(showers), torch.as_tensor(energies)).numpy()

    def to_physical(self, x: np.ndarray, energies: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.inverse(torch.as_tensor(x), torch.as_tensor(energies)).numpy()
