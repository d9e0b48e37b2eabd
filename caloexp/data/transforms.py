"""Invertible preprocessing between physical events and what a network sees, declared in the data config.

A :class:`Transform` is a chain of event steps plus one step per named condition::

    transform:
      steps:                          # applied in order; the inverse runs them backwards
        - {step: energy_fraction}     # x / E_inc          (removes the trivial scale)
        - {step: log, eps: 1.0e-7}    # log(x + eps)       (compresses ~7 decades)
        - {step: normalise, mode: standard}   # per-cell (x - mean) / std
      conditions:
        energy: {step: log_scale}     # log10 E mapped onto [0, 1] over the training range
      nonnegative: true               # clamp the physical output at 0 (energies)

Steps are chosen by name from :data:`STEPS` / :data:`COND_STEPS` (a plain description, never an
import path, so a config read back from a checkpoint cannot name arbitrary code). Every step is
fitted on the training split, keeps its statistics in buffers (saved in checkpoints, carried by the
exported generator) and has an exact inverse. The CaloChallenge preset above reproduces the
original caloexp preprocessing bit for bit.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from caloexp.errors import ConfigError

Tensor = torch.Tensor


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    """A per-event value (N,) or (N, 1) shaped to broadcast over x's event dimensions."""
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


class Step(nn.Module):
    """One invertible event step. ``fit`` sees the data as it arrives at this step (float64).

    ``event_shape`` is the shape the step receives; ``out_shape`` the one it returns (the same
    unless the step reshapes, e.g. :class:`LayerEnergies`).
    """

    name = ""

    def __init__(self, event_shape: tuple[int, ...]):
        super().__init__()
        self.event_shape = tuple(event_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.event_shape

    def settings(self) -> dict[str, Any]:
        return {}

    def fit(self, x: Tensor, cond: Mapping[str, Tensor]) -> None:
        pass

    def forward(self, x: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def inverse(self, x: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError


class EnergyFraction(Step):
    """x / c[key] (a per-event scale, e.g. the incident energy): showers become energy fractions."""

    name = "energy_fraction"

    def __init__(self, event_shape, key: str = "energy", factor: float = 1.0):
        super().__init__(event_shape)
        self.key, self.factor = str(key), float(factor)

    def settings(self):
        return {"key": self.key, "factor": self.factor}

    def _scale(self, x, cond):
        if self.key not in cond:
            raise ConfigError(f"transform step energy_fraction: condition '{self.key}' not in the data "
                              f"(conditions: {sorted(cond)})")
        return _bcast(cond[self.key], x) * self.factor

    def forward(self, x, cond):
        return x / self._scale(x, cond)

    def inverse(self, x, cond):
        return x * self._scale(x, cond)


class Log(Step):
    """log(x + eps); the inverse exp(v) - eps may dip slightly below 0 (clamped at the chain's end).

    ``columns`` (tabular events (N, V)): only these columns (indices, or variable names the data module
    resolves) are logged; the others, e.g. signed variables, pass unchanged.
    """

    name = "log"

    def __init__(self, event_shape, eps: float = 1e-7, columns: Sequence[int] | None = None):
        super().__init__(event_shape)
        if not eps > 0:
            raise ConfigError(f"transform step log: eps={eps} must be > 0")
        self.eps = float(eps)
        self.columns = None if columns is None else [int(c) for c in columns]
        if self.columns is not None:
            if len(self.event_shape) != 1 or not all(0 <= c < self.event_shape[0] for c in self.columns):
                raise ConfigError(f"transform step log: columns={self.columns} must index the {self.event_shape} "
                                  "variables of a tabular event")
            mask = torch.zeros(self.event_shape, dtype=torch.bool)
            mask[self.columns] = True
            self.register_buffer("mask", mask, persistent=False)

    def settings(self):
        return {"eps": self.eps} if self.columns is None else {"eps": self.eps, "columns": list(self.columns)}

    def forward(self, x, cond):
        if self.columns is None:
            return torch.log(x + self.eps)
        return torch.where(self.mask, torch.log(torch.where(self.mask, x, 1.0) + self.eps), x)

    def inverse(self, x, cond):
        if self.columns is None:
            return torch.exp(x) - self.eps
        return torch.where(self.mask, torch.exp(torch.where(self.mask, x, 0.0)) - self.eps, x)


class Logit(Step):
    """logit(alpha + (1 - 2 alpha) x) for x in [0, 1] (e.g. energy fractions); inverse sigmoid."""

    name = "logit"

    def __init__(self, event_shape, alpha: float = 1e-6):
        super().__init__(event_shape)
        if not 0 < alpha < 0.5:
            raise ConfigError(f"transform step logit: alpha={alpha} must be in (0, 0.5)")
        self.alpha = float(alpha)

    def settings(self):
        return {"alpha": self.alpha}

    def forward(self, x, cond):
        u = self.alpha + (1 - 2 * self.alpha) * x.clamp(0, 1)
        return torch.log(u) - torch.log1p(-u)

    def inverse(self, x, cond):
        return (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha)


class Power(Step):
    """sign(x)|x|^p (3DGAN uses p = 0.85 on cell energies); inverse with 1/p."""

    name = "power"

    def __init__(self, event_shape, p: float = 0.5):
        super().__init__(event_shape)
        if not p > 0:
            raise ConfigError(f"transform step power: p={p} must be > 0")
        self.p = float(p)

    def settings(self):
        return {"p": self.p}

    def forward(self, x, cond):
        return torch.sign(x) * x.abs() ** self.p

    def inverse(self, x, cond):
        return torch.sign(x) * x.abs() ** (1.0 / self.p)


class Scale(Step):
    """x * factor (e.g. GeV -> a network-friendly scale)."""

    name = "scale"

    def __init__(self, event_shape, factor: float = 1.0):
        super().__init__(event_shape)
        if not factor or not math.isfinite(factor):
            raise ConfigError(f"transform step scale: factor={factor} must be finite and non-zero")
        self.factor = float(factor)

    def settings(self):
        return {"factor": self.factor}

    def forward(self, x, cond):
        return x * self.factor

    def inverse(self, x, cond):
        return x / self.factor


class Normalise(Step):
    """Per-cell (or global) standardisation, or a min/max map onto ``range`` (a generator's output range)."""

    name = "normalise"

    def __init__(self, event_shape, mode: str = "standard", per: str = "cell",
                 range: Sequence[float] = (-1.0, 1.0)):  # noqa: A002 - the config's word
        super().__init__(event_shape)
        if mode not in ("standard", "minmax", "none"):
            raise ConfigError(f"transform step normalise: mode={mode!r}: choose standard, minmax or none")
        if per not in ("cell", "global"):
            raise ConfigError(f"transform step normalise: per={per!r}: choose cell or global")
        lo, hi = (float(v) for v in range)
        if not hi > lo:
            raise ConfigError(f"transform step normalise: range={list(range)} must be increasing")
        self.mode, self.per = mode, per
        self.register_buffer("shift", torch.zeros(self.event_shape))
        self.register_buffer("scale", torch.ones(self.event_shape))
        self.register_buffer("range", torch.tensor([lo, hi]))

    def settings(self):
        return {"mode": self.mode, "per": self.per, "range": [float(v) for v in self.range]}

    def fit(self, x, cond):
        dims = 0 if self.per == "cell" else tuple(range(x.dim()))
        self.shift.fill_(0.0)
        self.scale.fill_(1.0)
        if self.mode == "standard":
            self.shift.copy_(x.mean(dims).expand(self.event_shape))
            self.scale.copy_(x.std(dims).clamp_min(1e-6).expand(self.event_shape))
        elif self.mode == "minmax":
            vmin = x.amin(dim=dims) if dims == 0 else x.min()
            vmax = x.amax(dim=dims) if dims == 0 else x.max()
            lo, hi = float(self.range[0]), float(self.range[1])
            # v -> lo + (v - vmin) / (vmax - vmin) * (hi - lo), written as (v - shift) / scale
            scale = (vmax - vmin).clamp_min(1e-6) / (hi - lo)
            self.scale.copy_(scale.expand(self.event_shape))
            self.shift.copy_((vmin - lo * scale).expand(self.event_shape))

    def forward(self, x, cond):
        return (x - self.shift) / self.scale

    def inverse(self, x, cond):
        return x * self.scale + self.shift


class Quantile(Step):
    """Per-column map onto a standard normal through the training data's quantiles (tabular variables).

    ``knots`` quantiles x_i of each column at probabilities p_i (evenly spaced in (0, 1)) are joined to
    z_i = Phi^-1(p_i) by straight lines, extended linearly beyond the end knots: a strictly increasing
    piecewise-linear map, so the inverse is exact (the same lines read backwards) and any value, also
    outside the training range, has an image. Sharp peaks and long tails become a Gaussian the network
    learns easily; the network then only has to learn how the variables depend on each other.
    """

    name = "quantile"

    def __init__(self, event_shape, knots: int = 512):
        super().__init__(event_shape)
        if len(self.event_shape) != 1:
            raise ConfigError(f"transform step quantile: needs tabular events (N, V), got {self.event_shape}")
        if knots < 3:
            raise ConfigError(f"transform step quantile: knots={knots} must be >= 3")
        self.knots = int(knots)
        p = (torch.arange(self.knots, dtype=torch.float64) + 0.5) / self.knots
        z = torch.special.ndtri(p)
        self.register_buffer("z", z.float().expand(self.event_shape[0], -1).clone())
        self.register_buffer("x", z.float().expand(self.event_shape[0], -1).clone())

    def settings(self):
        return {"knots": self.knots}

    def fit(self, x, cond):
        p = (torch.arange(self.knots, dtype=torch.float64) + 0.5) / self.knots
        q = torch.quantile(x.to(torch.float64), p.to(x.device), dim=0).T          # (V, K)
        span = (q[:, -1] - q[:, 0]).abs().clamp_min(1.0)
        step = span[:, None] * 1e-6 / self.knots                                  # strictly increasing knots
        q = torch.cummax(q + step * torch.arange(self.knots, device=q.device), dim=1).values
        q = q + step * torch.arange(self.knots, device=q.device)
        self.x.copy_(q.float())

    @staticmethod
    def _interp(v: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
        """Piecewise-linear y(v) per column through (xs, ys) (V, K), extended linearly at both ends."""
        xs, ys = xs.to(v.dtype), ys.to(v.dtype)
        idx = torch.searchsorted(xs.contiguous(), v.T.contiguous()).clamp(1, xs.shape[1] - 1)   # (V, N)
        x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
        y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
        return (y0 + (v.T - x0) * (y1 - y0) / (x1 - x0)).T

    def forward(self, x, cond):
        return self._interp(x, self.x, self.z)

    def inverse(self, x, cond):
        return self._interp(x, self.z, self.x)


class LayerEnergies(Step):
    """Voxels (V,) -> (L + V,): the energy content made explicit, the shapes normalised per layer.

    Features of a shower with incident energy E and layer energies E_l (``layers``: voxels per layer,
    in voxel order), E_tot = sum E_l::

        f_0     = log(E_tot / E)
        f_{l+1} = logit(a + (1 - 2a) r_l),  r_l = E_l / sum_{j>=l} E_j      (l < L - 1)
        g_k     = log(x_k / E_layer(k) + alpha)                             (each voxel k)

    The inverse rebuilds E_tot and every E_l from the f's and spreads E_l over its voxels with the
    g's renormalised within the layer, so per-voxel errors cannot change total or layer energies
    (the unbounded exp of the plain log transform turns small voxel errors into a runaway response).

    ``threshold`` (MeV, the readout threshold the evaluation applies): voxels below it are cut before
    the features are computed, and generated voxels below it are cut with their energy handed to the
    surviving voxels of the same layer, so the visible layer energies are the ones learned. The
    forward map then drops sub-threshold energy (the inverse is exact on thresholded showers).

    ``dequantise`` (a fraction dq of the threshold, needs ``threshold``): the empty voxels of a shower
    (42 % of dataset-1 voxels) are a spike in the log shapes that a flow cannot reproduce (it leaves
    too few or too many hits near threshold). With dq > 0 each empty voxel gets a pseudo-random value in
    U(0, dq·thr), a function of the shower and the voxel alone (the same in any chunking or order),
    and the shapes become ``g_k = log((x_k + delta·thr) / max(E_layer, thr))``; the inverse cuts
    everything below thr again and rescales the survivors to E_layer, so the hit pattern is decided by
    where the generated values cross the threshold. The empty band ends log((1 + delta) / (dq + delta))
    below the threshold in g: a gap the flow's smoothing must cross to make a spurious hit. Its place in
    g moves with E_layer, so per voxel it is a fraction of the spread of g; a narrow gap (0.6 for
    dq = 0.5, delta = 0.1) leaks empty voxels into hits just above thr, most visibly in rarely hit outer
    voxels; too wide a gap starves the hits just above thr (README "The gap below the threshold").
    ``dequantise`` and ``delta`` are one number, or one per layer: each layer then has its own gap.

    ``dequantise_layers`` (a fraction dl of the threshold, needs ``threshold``): the same for whole
    layers. A layer with no visible energy (26-43 % of showers in dataset 1's sparse layers) makes the
    ratios r exactly 0 or 1, spikes the energy flow smooths into too few layers just above the
    threshold. With dl > 0 an empty layer gets a pseudo-energy in thr·U(dl/2, dl) (a function of the
    shower alone) before the features are computed; the inverse empties every layer whose energy is
    below thr, so only the visible energies come back.

    ``hit_counts`` (needs ``dequantise``): the number of visible voxels n_l of each layer becomes an
    explicit feature, ``h_l = log(1 + n_l + u)`` with u a pseudo-random offset in [0.05, 0.95), placed
    after the layer-energy features (so a two-stage model learns the counts jointly with the layer
    energies; ``model.energy_dims`` is then 2 L). The inverse keeps the n_l highest voxels of each layer
    (n_l capped at E_l / thr and at the layer's size, at least 1 in a visible layer) and spreads E_l over
    them as thr + their excess above thr, so every kept voxel is visible and the hit count is the one
    generated. Without it the count is wherever the shape flow's voxels cross the threshold, which it
    gets wrong by ~2 of ~100 hits in dataset 1's dense layers (measured: README, "Hit counts as features").
    """

    name = "layer_energies"

    def __init__(self, event_shape, layers: Sequence[int], key: str = "energy", alpha: float = 1e-6,
                 alpha_e: float = 1e-6, threshold: float = 0.0, dequantise: float | Sequence[float] = 0.0,
                 delta: float | Sequence[float] = 0.1,
                 dequantise_layers: float = 0.0, hit_counts: bool = False):
        super().__init__(event_shape)
        if isinstance(layers, str):
            raise ConfigError(f"transform step layer_energies: layers={layers!r} is filled in only for CaloChallenge "
                              "data (data=embedded|photons|pions|dataset2|dataset3); give the voxels per layer")
        sizes = [int(n) for n in layers]
        if len(self.event_shape) != 1 or sum(sizes) != self.event_shape[0] or min(sizes, default=0) < 1:
            raise ConfigError(f"transform step layer_energies: layers={sizes} must be positive voxel counts "
                              f"summing to the event size {self.event_shape}")
        if not (alpha > 0 and 0 < alpha_e < 0.5):
            raise ConfigError(f"transform step layer_energies: alpha={alpha} must be > 0, alpha_e={alpha_e} in (0, 0.5)")
        if not threshold >= 0:
            raise ConfigError(f"transform step layer_energies: threshold={threshold} must be >= 0")
        self.layers, self.key, self.alpha, self.alpha_e = sizes, str(key), float(alpha), float(alpha_e)
        self.threshold = float(threshold)
        dq_l, delta_l = self._per_layer("dequantise", dequantise), self._per_layer("delta", delta)
        for key, value, values in (("dequantise", dequantise, dq_l),
                                   ("dequantise_layers", dequantise_layers, [float(dequantise_layers)])):
            if not all(0 <= v < 1 for v in values) or (max(values) > 0 and self.threshold <= 0):
                raise ConfigError(f"transform step layer_energies: {key}={value} must be in [0, 1) and needs "
                                  f"threshold > 0 (threshold={threshold})")
        if 0 in dq_l and max(dq_l) > 0:
            raise ConfigError(f"transform step layer_energies: dequantise={dequantise} must be > 0 for every layer "
                              "or 0 for all")
        if not all(d > 0 for d in delta_l):
            raise ConfigError(f"transform step layer_energies: delta={delta} must be > 0")
        # the settings as given (one number, or one per layer) and their values at each voxel
        self.dequantise = float(dequantise) if isinstance(dequantise, (int, float)) else dq_l
        self.delta = float(delta) if isinstance(delta, (int, float)) else delta_l
        # dq·thr and delta·thr at each voxel, in MeV (float64, as the Python products were when they were scalars)
        per_voxel = torch.tensor(sizes)
        self.register_buffer("dq_thr", (torch.tensor(dq_l, dtype=torch.float64) * self.threshold)
                             .repeat_interleave(per_voxel), persistent=False)
        self.register_buffer("delta_thr", (torch.tensor(delta_l, dtype=torch.float64) * self.threshold)
                             .repeat_interleave(per_voxel), persistent=False)
        self.dequantised = max(dq_l) > 0
        self.dequantise_layers = float(dequantise_layers)
        if not isinstance(hit_counts, bool):
            raise ConfigError(f"transform step layer_energies: hit_counts={hit_counts!r} must be true or false")
        if hit_counts and not self.dequantised:
            raise ConfigError("transform step layer_energies: hit_counts=true needs dequantise > 0 "
                              f"(dequantise={dequantise})")
        self.hit_counts = hit_counts
        self.register_buffer("layer_of", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
                             persistent=False)
        ends = np.cumsum(sizes).tolist()
        self.slices = list(zip([0, *ends[:-1]], ends))      # each layer's voxel range

    def _per_layer(self, key: str, value: float | Sequence[float]) -> list[float]:
        """A setting given as one number or one per layer -> one per layer."""
        try:
            values = [float(value)] * len(self.layers) if isinstance(value, (int, float)) else [float(v) for v in value]
        except (TypeError, ValueError):
            values = []
        if len(values) != len(self.layers):
            raise ConfigError(f"transform step layer_energies: {key}={value!r} must be a number or one number per "
                              f"layer ({len(self.layers)} layers)")
        return values

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.energy_features + self.event_shape[0],)

    @property
    def energy_features(self) -> int:
        """How many leading features describe energies (and hit counts): a two-stage model's first stage."""
        return (2 if self.hit_counts else 1) * len(self.layers)

    def settings(self):
        return {"layers": list(self.layers), "key": self.key, "alpha": self.alpha, "alpha_e": self.alpha_e,
                "threshold": self.threshold, "dequantise": self.dequantise, "delta": self.delta,
                "dequantise_layers": self.dequantise_layers, "hit_counts": self.hit_counts}

    def _layer_sums(self, x: Tensor) -> Tensor:
        """(N, V) -> (N, L) per-layer sums. The layers are contiguous voxel ranges: slice reductions
        (several times faster than index_add or scatter over the voxel axis, and exportable)."""
        return torch.stack([x[:, a:b].sum(1) for a, b in self.slices], 1)

    def _layer_max(self, x: Tensor) -> Tensor:
        return torch.stack([x[:, a:b].amax(1) for a, b in self.slices], 1)

    def _per_voxel(self, v: Tensor) -> Tensor:
        """(N, L) -> (N, V): each layer's value at its voxels."""
        return v.index_select(1, self.layer_of.to(v.device))

    def forward(self, x, cond):
        e = cond[self.key].reshape(-1, 1).to(x.dtype)
        if self.threshold > 0:
            x = torch.where(x < self.threshold, torch.zeros_like(x), x)
        visible = self._layer_sums(x)
        hits = self._layer_sums((x > 0).to(x.dtype)) if self.hit_counts else None   # before any dequantisation
        el = visible
        if self.dequantise_layers:   # empty layers: pseudo-energies below the threshold (columns after the voxels')
            u = _hash_uniform(visible, el.shape[1], first=x.shape[1] + 1).to(x.dtype)
            el = torch.where(visible > 0, visible, self.dequantise_layers * self.threshold * (1 + u) / 2)
        etot = el.sum(1, keepdim=True)
        tail = torch.flip(torch.cumsum(torch.flip(el, [1]), 1), [1])[:, :-1]
        rest = torch.cat([tail[:, 1:], el[:, -1:]], 1)                  # sum_{j>l} E_j
        r = torch.where(tail > 0, el[:, :-1] / tail.clamp_min(1e-30), torch.zeros_like(tail))
        q = torch.where(tail > 0, rest / tail.clamp_min(1e-30), torch.ones_like(tail))   # 1 - r, without cancellation
        a = self.alpha_e
        den = self._per_voxel(visible)
        if self.dequantised:
            thr = self.threshold
            x = torch.where(x > 0, x, self.dq_thr.to(x) * _hash_uniform(visible, x.shape[1]).to(x.dtype))
            g = torch.log((x + self.delta_thr.to(x)) / den.clamp_min(thr))
        else:
            g = torch.log(torch.where(den > 0, x / den.clamp_min(1e-30), torch.zeros_like(x)) + self.alpha)
        logit = torch.log(a + (1 - 2 * a) * r) - torch.log(a + (1 - 2 * a) * q)
        feats = [torch.log(etot.clamp_min(1e-3) / e), logit]
        if self.hit_counts:   # offsets away from the integers, so the floor of the inverse is exact in float32
            u = 0.05 + 0.9 * _hash_uniform(visible, el.shape[1], first=x.shape[1] + el.shape[1] + 1).to(x.dtype)
            feats.append(torch.log1p(hits + u))
        return torch.cat([*feats, g], 1)

    def inverse(self, y, cond):
        n_l = len(self.layers)
        e = cond[self.key].reshape(-1, 1).to(y.dtype)
        n_f = self.energy_features
        f, g = y[:, :n_l], y[:, n_f:]
        etot = e * torch.exp(f[:, :1])
        r = ((torch.sigmoid(f[:, 1:]) - self.alpha_e) / (1 - 2 * self.alpha_e)).clamp(0, 1)
        # 1 - r as sigmoid(-f): no cancellation where r is near 1 (float32 differences stay relative)
        q = ((torch.sigmoid(-f[:, 1:]) - self.alpha_e) / (1 - 2 * self.alpha_e)).clamp(0, 1)
        keep = _cumprod(torch.cat([torch.ones_like(r[:, :1]), q], 1))   # prod_{j<l} (1 - r_j)
        el = etot * keep * torch.cat([r, torch.ones_like(r[:, :1])], 1)
        if self.dequantise_layers:   # below the threshold a layer is empty (its pseudo-energy, or a generated one)
            el = el * (el >= self.threshold).to(el.dtype)
        if self.dequantised:
            v = torch.exp(g) * self._per_voxel(el).clamp_min(self.threshold) - self.delta_thr.to(g)
            if self.hit_counts:
                return self._keep_top(v, el, torch.floor(torch.expm1(y[:, n_l:n_f])))
            return self._cut(v, el, repeat=3)
        w = (torch.exp(g) - self.alpha).clamp_min(0)
        tot = self._per_voxel(self._layer_sums(w))
        soft = torch.exp(g - g.amax(1, keepdim=True))   # a layer the model left empty keeps its energy
        w = torch.where(tot > 0, w / tot.clamp_min(1e-300), soft / self._per_voxel(self._layer_sums(soft)))
        x = w * self._per_voxel(el)
        return self._cut(x, el) if self.threshold > 0 else x

    def _keep_top(self, v: Tensor, el: Tensor, n: Tensor) -> Tensor:
        """Keep the ``n`` highest voxels ``v`` of each layer and give them the layer energy ``el``.

        Kept voxels become thr + their excess over thr, scaled so the layer sums to E_l (exact on real
        showers). Where the shape stage made more hits than the energy stage, the lowest are dropped and
        their energy goes to the others by the scale. Where it made fewer, a voxel promoted from below thr
        gets an excess spread evenly over [0, thr) by the digits of its value (dataset 1's spectrum is
        nearly flat from 1 to 2 MeV), not a spike at exactly thr (a low-level classifier sees one)."""
        thr = self.threshold
        size = torch.tensor(self.layers, dtype=v.dtype, device=v.device)
        n = torch.minimum(torch.minimum(n.clamp_min(1), torch.floor(el / thr)), size)
        n = torch.where(el >= thr, n, torch.zeros_like(n))                      # (N, L)
        keep = []
        for i, (a, b) in enumerate(self.slices):   # rank within the layer (0 = highest) below n: kept
            rank = torch.argsort(torch.argsort(v[:, a:b], dim=1, descending=True), dim=1)
            keep.append((rank < n[:, i:i + 1]).to(v.dtype))
        keep = torch.cat(keep, 1)
        w = v.double() * (9973.0 / thr)
        spread = thr * (w - torch.floor(w)).to(v.dtype)        # in [0, thr) also for v < 0 (frac keeps the sign)
        excess = torch.where(v >= thr, v - thr, spread) * keep
        spare = (el - n * thr).clamp_min(0)                                      # energy above n thr
        total = self._layer_sums(excess)
        share = torch.where(total > 0, spare / total.clamp_min(1e-30), torch.zeros_like(spare))
        flat = torch.where(total > 0, torch.zeros_like(spare), spare / n.clamp_min(1))   # all at thr: equal
        return keep * (thr + excess * self._per_voxel(share) + self._per_voxel(flat))

    def _cut(self, x: Tensor, el: Tensor, repeat: int = 1) -> Tensor:
        """Cut what a readout would not see and rescale the survivors to each layer's energy ``el``
        (rescaling can push a voxel below threshold again, hence ``repeat``). Masks are multiplied
        rather than selected with ``torch.where`` (4x faster on CPU); a NaN from the net stays NaN, so
        generation reports it instead of hiding it as an empty voxel."""
        for _ in range(repeat):
            kept = x * (x >= self.threshold).to(x.dtype)
            ksum = self._layer_sums(kept)
            passes = ksum > 0
            scale = torch.where(passes, el / ksum, torch.zeros_like(el))                             # (N, L)
            # no voxel of the layer passes: the layer's energy goes to its hottest voxel(s)
            top = (x == self._per_voxel(self._layer_max(x))).to(x.dtype)
            share = torch.where(passes, torch.zeros_like(el), el / self._layer_sums(top).clamp_min(1.0))
            x = kept * self._per_voxel(scale) + top * self._per_voxel(share)
        return x


def _cumprod(v: Tensor) -> Tensor:
    """torch.cumprod over the (few, fixed) columns, unrolled: the same float64 accumulation as torch's CPU
    kernel, in ops every exporter (ONNX) supports."""
    acc = v[:, :1].double()
    out = [acc]
    for i in range(1, v.shape[1]):
        acc = acc * v[:, i:i + 1].double()
        out.append(acc)
    return torch.cat(out, 1).to(v.dtype)


def _hash_uniform(key: Tensor, n: int, first: int = 1) -> Tensor:
    """(N, n) pseudo-random numbers in [0, 1) that depend only on each row of ``key`` (float) and the
    column (``first`` ... ``first + n - 1``): the same for an event whichever chunk, order or device it
    arrives in (splitmix64 mixing)."""
    bits = key.to(torch.float64).contiguous().view(torch.int64)
    h = torch.zeros(len(key), dtype=torch.int64, device=key.device)
    for j in range(bits.shape[1]):
        h = _mix(h ^ bits[:, j])
    h = h[:, None] + torch.arange(first, first + n, device=key.device, dtype=torch.int64) * -7046029254386353131
    return (_mix(h) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)


def _mix(h: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 (wrapping arithmetic; masks make the shifts logical)."""
    h = (h ^ ((h >> 30) & ((1 << 34) - 1))) * -4658895280553007687      # 0xBF58476D1CE4E5B9
    h = (h ^ ((h >> 27) & ((1 << 37) - 1))) * -7723592293110705685      # 0x94D049BB133111EB
    return h ^ ((h >> 31) & ((1 << 33) - 1))


STEPS: dict[str, type[Step]] = {c.name: c for c in (EnergyFraction, Log, Logit, Power, Scale, Normalise,
                                                    LayerEnergies, Quantile)}


def calo_image_layout(layers: Sequence[Sequence[int]]) -> tuple[tuple[int, int], np.ndarray]:
    """Image shape and the pixel of every voxel for the 2D view of a CaloChallenge shower.

    ``layers``: (n_alpha, n_r) per non-empty layer, in voxel order. Rows are layer x alpha bin (a
    layer takes n_alpha consecutive rows), columns the radial bins (r = 0 at column 0); layers with
    fewer radial bins than the widest are zero-padded on the right. Returns ((rows, cols), pixel)
    with ``pixel[k]`` the flat image index of voxel k (voxel order: layer, then alpha, then r).
    """
    sizes = [(int(a), int(r)) for a, r in layers]
    cols = max(r for _, r in sizes)
    rows = sum(a for a, _ in sizes)
    pix, row0 = [], 0
    for a, r in sizes:
        grid = (row0 + np.arange(a))[:, None] * cols + np.arange(r)[None, :]
        pix.append(grid.reshape(-1))
        row0 += a
    return (rows, cols), np.concatenate(pix).astype(np.int64)


class CaloImage(Step):
    """Voxels (V,) -> a (rows, cols) image: rows = layer x alpha bin, columns = radial bin (see
    :func:`calo_image_layout`), so 2D conv nets see neighbouring cells as neighbouring pixels.

    A pure re-indexing: the inverse reads the voxels back from their pixels and is exact; padding
    pixels hold ``fill`` and are ignored by the inverse (``mask`` marks the real pixels). Put it last
    in the chain so the padding stays at ``fill`` in network space.
    """

    name = "calo_image"

    def __init__(self, event_shape, layers: Sequence[Sequence[int]], fill: float = 0.0):
        super().__init__(event_shape)
        if isinstance(layers, str):
            raise ConfigError(f"transform step calo_image: layers={layers!r} is filled in only for CaloChallenge "
                              "data (data=embedded|photons|pions|atlas_csv|...); give [n_alpha, n_r] per layer")
        try:
            sizes = [(int(a), int(r)) for a, r in layers]
        except (TypeError, ValueError):
            raise ConfigError(f"transform step calo_image: layers={layers!r} must be [n_alpha, n_r] pairs") from None
        if not sizes or min(min(p) for p in sizes) < 1 or len(self.event_shape) != 1 \
                or sum(a * r for a, r in sizes) != self.event_shape[0]:
            raise ConfigError(f"transform step calo_image: layers={[list(p) for p in sizes]} (n_alpha x n_r) must "
                              f"hold exactly the event's {self.event_shape} voxels")
        self.layers, self.fill = sizes, float(fill)
        self.shape, pixel = calo_image_layout(sizes)
        self.register_buffer("pixel", torch.as_tensor(pixel), persistent=False)
        mask = torch.zeros(self.shape[0] * self.shape[1])
        mask[self.pixel] = 1.0
        self.register_buffer("mask", mask.reshape(self.shape), persistent=False)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape

    def settings(self):
        return {"layers": [list(p) for p in self.layers], "fill": self.fill}

    def forward(self, x, cond):
        out = torch.full((len(x), self.shape[0] * self.shape[1]), self.fill, dtype=x.dtype, device=x.device)
        out[:, self.pixel.to(x.device)] = x
        return out.reshape(len(x), *self.shape)

    def inverse(self, x, cond):
        return x.reshape(len(x), -1)[:, self.pixel.to(x.device)]


STEPS[CaloImage.name] = CaloImage


# ------------------------------------------------------------------ conditions
class CondStep(nn.Module):
    """Maps one physical condition (N,) or (N, k) to network inputs (N, out_dim)."""

    name = ""

    def __init__(self, in_dim: int = 1):
        super().__init__()
        self.in_dim = int(in_dim)

    @property
    def out_dim(self) -> int:
        return self.in_dim

    def settings(self) -> dict[str, Any]:
        return {}

    def fit(self, c: Tensor) -> None:
        pass

    def forward(self, c: Tensor) -> Tensor:
        raise NotImplementedError


class LogScale(CondStep):
    """log10(c) mapped linearly onto [0, 1] over the training range (incident energies)."""

    name = "log_scale"

    def __init__(self, in_dim: int = 1):
        super().__init__(in_dim)
        self.register_buffer("lo_hi", torch.tensor([[math.log10(256.0)], [math.log10(4.2e6)]]).repeat(1, self.in_dim))

    def fit(self, c):
        if (c <= 0).any():
            raise ConfigError("condition transform log_scale: the condition has values <= 0 (use linear)")
        v = torch.log10(c.reshape(len(c), -1))
        lo, hi = v.min(0).values, v.max(0).values
        narrow = (hi - lo) < 1e-6  # a single value: avoid a zero-width range
        self.lo_hi.copy_(torch.stack([torch.where(narrow, lo - 0.5, lo), torch.where(narrow, hi + 0.5, hi)]))

    def forward(self, c):
        v = torch.log10(c.reshape(c.shape[0], -1).to(self.lo_hi.dtype))
        return (v - self.lo_hi[0]) / (self.lo_hi[1] - self.lo_hi[0])


class Linear(LogScale):
    """c mapped linearly onto [0, 1] over the training range (angles, positions, any sign)."""

    name = "linear"

    def fit(self, c):
        v = c.reshape(len(c), -1)
        lo, hi = v.min(0).values, v.max(0).values
        narrow = (hi - lo) < 1e-12
        self.lo_hi.copy_(torch.stack([torch.where(narrow, lo - 0.5, lo), torch.where(narrow, hi + 0.5, hi)]))

    def forward(self, c):
        v = c.reshape(c.shape[0], -1).to(self.lo_hi.dtype)
        return (v - self.lo_hi[0]) / (self.lo_hi[1] - self.lo_hi[0])


class Standardise(CondStep):
    """(c - mean) / std per column (particle-property vectors)."""

    name = "standardise"

    def __init__(self, in_dim: int = 1):
        super().__init__(in_dim)
        self.register_buffer("mean", torch.zeros(self.in_dim))
        self.register_buffer("std", torch.ones(self.in_dim))

    def fit(self, c):
        v = c.reshape(len(c), -1)
        self.mean.copy_(v.mean(0))
        self.std.copy_(v.std(0).clamp_min(1e-12) if len(v) > 1 else torch.ones_like(self.std))

    def forward(self, c):
        return (c.reshape(c.shape[0], -1).to(self.mean.dtype) - self.mean) / self.std


class OneHot(CondStep):
    """Integer class label -> one-hot vector of ``n_classes`` (fitted from the data when null)."""

    name = "one_hot"

    def __init__(self, in_dim: int = 1, n_classes: int | None = None):
        super().__init__(in_dim)
        if in_dim != 1:
            raise ConfigError(f"condition transform one_hot needs a single label column (got {in_dim})")
        if n_classes is not None and n_classes < 1:
            raise ConfigError(f"condition transform one_hot: n_classes={n_classes} must be >= 1")
        self.n_classes = n_classes

    @property
    def out_dim(self) -> int:
        if self.n_classes is None:
            raise ConfigError("condition transform one_hot: n_classes unknown before fitting")
        return int(self.n_classes)

    def settings(self):
        return {"n_classes": self.n_classes}

    def fit(self, c):
        v = c.reshape(-1)
        if (v < 0).any() or (v != v.round()).any():
            raise ConfigError("condition transform one_hot: labels must be integers >= 0")
        seen = int(v.max()) + 1 if len(v) else 1
        if self.n_classes is None:
            self.n_classes = seen
        elif seen > self.n_classes:
            raise ConfigError(f"condition transform one_hot: label {seen - 1} >= n_classes={self.n_classes}")

    def forward(self, c):
        v = c.reshape(-1).long()
        traced = torch.jit.is_tracing() or getattr(torch.compiler, "is_exporting", lambda: False)()  # graphs: no check
        if not traced and len(v) and (int(v.min()) < 0 or int(v.max()) >= self.out_dim):
            raise ConfigError(f"label out of range 0..{self.out_dim - 1}")
        return (v[:, None] == torch.arange(self.out_dim, device=v.device)).float()


class Identity(CondStep):
    name = "identity"

    def forward(self, c):
        return c.reshape(c.shape[0], -1).float()


COND_STEPS: dict[str, type[CondStep]] = {c.name: c for c in (LogScale, Linear, Standardise, OneHot, Identity)}


# ----------------------------------------------------------------------- chain
def _parse(entry: Any, registry: Mapping[str, type], where: str) -> tuple[type, dict[str, Any]]:
    entry = {"step": entry} if isinstance(entry, str) else dict(entry)
    name = entry.pop("step", None)
    if name not in registry:
        raise ConfigError(f"{where}: unknown step {name!r}; choose one of {sorted(registry)}")
    return registry[name], entry


class Transform(nn.Module):
    """Event steps + condition steps; physical (x, cond) <-> network (x, cond vector), exactly invertible."""

    def __init__(self, event_shape: Sequence[int], steps: Sequence[Any] = (),
                 conditions: Mapping[str, Any] | None = None, cond_dims: Mapping[str, int] | None = None,
                 nonnegative: bool = True, output_range: Sequence[float] | None = None):
        super().__init__()
        self.event_shape = tuple(int(d) for d in event_shape)
        self.nonnegative = bool(nonnegative)
        self._entries = list(steps)
        self.steps = self._build_steps(output_range)
        self.cond_steps = nn.ModuleDict()
        for name, entry in (conditions or {}).items():
            cls, kwargs = _parse(entry, COND_STEPS, f"data.transform.conditions.{name}")
            try:
                self.cond_steps[name] = cls(in_dim=int((cond_dims or {}).get(name, 1)), **kwargs)
            except TypeError as exc:
                raise ConfigError(f"data.transform.conditions.{name} ({cls.name}): {exc}") from None

    def _build_steps(self, output_range: Sequence[float] | None) -> nn.ModuleList:
        built: list[Step] = []
        shape = self.event_shape
        for i, entry in enumerate(self._entries):
            cls, kwargs = _parse(entry, STEPS, f"data.transform.steps[{i}]")
            if cls is Normalise and output_range is not None:
                kwargs = dict(kwargs, mode="minmax", range=list(output_range))  # the generator's range decides
            try:
                built.append(cls(shape, **kwargs))
            except TypeError as exc:
                raise ConfigError(f"data.transform.steps[{i}] ({cls.name}): {exc}") from None
            shape = built[-1].out_shape
        if output_range is not None and not any(isinstance(s, Normalise) for s in built):
            built.append(Normalise(shape, mode="minmax", range=list(output_range)))
        return nn.ModuleList(built)

    @property
    def net_shape(self) -> tuple[int, ...]:
        """The shape a network sees (the event shape unless a step reshapes)."""
        return self.steps[-1].out_shape if len(self.steps) else self.event_shape

    def use_output_range(self, output_range: Sequence[float] | None) -> "Transform":
        """Map the data onto a generator's output range (e.g. [-1, 1] for tanh); call before :meth:`fit`."""
        if output_range is not None:
            self.steps = self._build_steps(output_range)
        return self

    # ----------------------------------------------------------------- spec
    def spec(self) -> dict[str, Any]:
        """A plain description (no code) from which :meth:`from_spec` rebuilds this transform."""
        return {"event_shape": list(self.event_shape), "nonnegative": self.nonnegative,
                "steps": [dict(step=s.name, **s.settings()) for s in self.steps],
                "conditions": {k: dict(step=s.name, **s.settings()) for k, s in self.cond_steps.items()},
                "cond_dims": {k: s.in_dim for k, s in self.cond_steps.items()}}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "Transform":
        return cls(spec["event_shape"], spec["steps"], spec["conditions"], spec.get("cond_dims"),
                   nonnegative=spec.get("nonnegative", True))

    @property
    def cond_names(self) -> list[str]:
        return list(self.cond_steps.keys())

    @property
    def cond_dim(self) -> int:
        return sum(s.out_dim for s in self.cond_steps.values())

    @property
    def device(self) -> torch.device:
        b = next(iter(self.buffers()), None)
        return b.device if b is not None else torch.device("cpu")

    # ------------------------------------------------------------------ fit
    @torch.no_grad()
    def fit_conditions(self, cond: Mapping[str, np.ndarray | Tensor]) -> "Transform":
        for name, step in self.cond_steps.items():
            if name not in cond:
                raise ConfigError(f"data.transform.conditions.{name}: no such condition in the data "
                                  f"(conditions: {sorted(cond)})")
            step.fit(torch.as_tensor(np.asarray(cond[name]), dtype=torch.float64))
        return self

    @torch.no_grad()
    def fit(self, x: np.ndarray | Tensor, cond: Mapping[str, np.ndarray | Tensor]) -> "Transform":
        """Fit every event step in order on (a sample of) the training data, in float64."""
        v = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        c = {k: torch.as_tensor(np.asarray(val), dtype=torch.float64) for k, val in cond.items()}
        for step in self.steps:
            step.fit(v, c)
            v = _apply64(step, v, c)
        return self

    # -------------------------------------------------------------- forward
    def forward(self, x: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Physical events (N, *event_shape) -> network space (float32)."""
        v = x.to(torch.float32)
        c = {k: t.to(v.device) for k, t in cond.items()}
        for step in self.steps:
            v = step(v, c)
        return v

    def inverse(self, x: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Network space -> physical events, clamped at 0 for energies (``nonnegative``)."""
        v = x.to(torch.float32).reshape(x.shape[0], *self.net_shape)
        c = {k: t.to(v.device) for k, t in cond.items()}
        for step in reversed(self.steps):
            v = step.inverse(v, c)
        return v.clamp_min(0.0) if self.nonnegative else v

    def condition(self, cond: Mapping[str, Tensor]) -> Tensor:
        """Physical conditions -> the model's condition vector (N, cond_dim), in ``cond_names`` order."""
        missing = [k for k in self.cond_steps if k not in cond]
        if missing:
            raise ConfigError(f"missing condition(s) {missing}; this model needs {self.cond_names}")
        parts = [step(torch.as_tensor(cond[k], device=self.device)).to(torch.float32)
                 for k, step in self.cond_steps.items()]
        if parts:
            return torch.cat(parts, dim=1)
        return torch.zeros(len(next(iter(cond.values()))) if cond else 0, 0, device=self.device)

    # numpy conveniences for I/O code
    def to_network(self, x: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return self(torch.as_tensor(x), {k: torch.as_tensor(v) for k, v in cond.items()}).cpu().numpy()

    def to_physical(self, x: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return self.inverse(torch.as_tensor(x), {k: torch.as_tensor(v) for k, v in cond.items()}).cpu().numpy()


def _apply64(step: Step, v: Tensor, c: Mapping[str, Tensor]) -> Tensor:
    """Run a fitted step in float64 (its buffers are float32; fitting the next step needs the data)."""
    saved = {n: b for n, b in step.named_buffers() if b.is_floating_point()}
    for n, b in saved.items():
        setattr(step, n, b.to(torch.float64))
    try:
        return step(v, c)
    finally:
        for n, b in saved.items():
            setattr(step, n, b)


# The CaloChallenge preprocessing (the original caloexp ShowerTransform): voxel/E_inc -> log -> standardise
CALO_STEPS = [{"step": "energy_fraction"}, {"step": "log", "eps": 1e-7}, {"step": "normalise", "mode": "standard"}]
CALO_CONDITIONS = {"energy": {"step": "log_scale"}}
