"""Network building blocks, configurable from Hydra (depth, width, channels, activation, norm).

Every net is built as ``net(in_shape, out_shape, cond_dim)`` and called as ``net(x, cond)``:
``x`` (B, *in_shape), ``cond`` (B, cond_dim), output (B, *out_shape). Nets are given with
``_partial_: true`` in the config and completed by the model with the shapes only the data knows,
so one net config serves every geometry:

* :class:`MLP` flattens ``x``, appends ``cond`` and reshapes its output (any event shape);
* :class:`ConvGenerator` maps a latent vector to a 2D image or a 3D grid (upsampling convs);
* :class:`ConvCritic` maps a 2D image or 3D grid to scores (strided convs, ``cond`` at the head).

Spatial shapes ``(H, W)`` / ``(D, H, W)`` carry no channel axis; ``(C, H, W)`` needs ``dims: 2``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from caloexp.errors import ConfigError

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "elu": lambda: nn.ELU(),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "softplus": lambda: nn.Softplus(),
    "none": lambda: nn.Identity(),
}

# the value range each output activation produces (None: unbounded)
OUTPUT_RANGES = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{name}': choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _with_cond(h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Flat features with the condition vector appended (unchanged when there is none)."""
    return torch.cat([h, cond.to(h.dtype)], dim=1) if cond is not None and cond.shape[1] else h


def _shape(s: int | Sequence[int]) -> tuple[int, ...]:
    return (int(s),) if isinstance(s, int) else tuple(int(d) for d in s)


def _norm1d(kind: str, width: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ConfigError(f"unknown norm '{kind}': choose none, batch or layer")


class MLP(nn.Module):
    """Fully connected net: ``depth`` hidden layers of ``width`` units, then a linear output.

    A ``width`` list gives each hidden layer its own size (``depth`` is then ignored).
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], cond_dim: int = 0,
                 depth: int = 3, width: int | Sequence[int] = 256, activation: str = "leaky_relu",
                 norm: str = "none", dropout: float = 0.0, out_activation: str = "none"):
        super().__init__()
        widths = list(width) if isinstance(width, (list, tuple)) or hasattr(width, "__len__") else [int(width)] * int(depth)
        if not widths or min(widths) < 1:
            raise ConfigError(f"MLP needs depth >= 1 and width >= 1 (got depth={depth}, width={width})")
        self.out_shape = _shape(out_shape)
        layers: list[nn.Module] = []
        d = math.prod(_shape(in_shape)) + int(cond_dim)
        for w in widths:
            layers += [nn.Linear(d, int(w)), _norm1d(norm, int(w)), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = int(w)
        layers += [nn.Linear(d, math.prod(self.out_shape)), make_activation(out_activation)]
        self.net = nn.Sequential(*layers)
        self.out_activation = out_activation

    @property
    def output_range(self) -> tuple[float, float] | None:
        return OUTPUT_RANGES.get(self.out_activation)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(_with_cond(x.reshape(x.shape[0], -1), cond)).reshape(x.shape[0], *self.out_shape)


def _spatial(shape: tuple[int, ...], dims: int | None) -> tuple[int, tuple[int, ...], int]:
    """(channels, spatial shape, number of spatial dims) of an event shape."""
    if dims is None:
        dims = {2: 2, 3: 3, 4: 3}.get(len(shape))
        if dims is None:
            raise ConfigError(f"conv nets need 2D or 3D events (got event shape {shape})")
    if len(shape) == dims:
        return 1, shape, dims
    if len(shape) == dims + 1:
        return shape[0], shape[1:], dims
    raise ConfigError(f"event shape {shape} does not fit a {dims}D conv net")


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm_nd(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ConfigError(f"unknown norm '{kind}': choose none, batch or layer")


class ConvGenerator(nn.Module):
    """Latent (+ condition) -> a coarse grid -> ``len(channels) - 1`` x (upsample x2, conv) -> event.

    The coarse grid is ceil(size / 2^k) per axis; the result is centre-cropped to the event shape.
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: Sequence[int], cond_dim: int = 0,
                 channels: Sequence[int] = (64, 32, 16), kernel: int = 3, activation: str = "leaky_relu",
                 norm: str = "batch", out_activation: str = "none", dims: int | None = None):
        super().__init__()
        self.out_shape = _shape(out_shape)
        self.out_channels, self.size, self.dims = _spatial(self.out_shape, dims)
        chans = [int(c) for c in channels]
        if not chans or min(chans) < 1 or kernel % 2 == 0:
            raise ConfigError(f"ConvGenerator needs channels >= 1 and an odd kernel (got {list(channels)}, {kernel})")
        k = len(chans) - 1
        self.base = tuple(math.ceil(s / 2 ** k) for s in self.size)
        self.fc = nn.Linear(math.prod(_shape(in_shape)) + int(cond_dim), chans[0] * math.prod(self.base))
        conv = _conv(self.dims)
        blocks: list[nn.Module] = [_norm_nd(norm, chans[0], self.dims), make_activation(activation)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c_in, c_out, kernel, padding=kernel // 2),
                       _norm_nd(norm, c_out, self.dims), make_activation(activation)]
        blocks += [conv(chans[-1], self.out_channels, kernel, padding=kernel // 2), make_activation(out_activation)]
        self.body = nn.Sequential(*blocks)
        self.chans0 = chans[0]
        self.out_activation = out_activation

    @property
    def output_range(self) -> tuple[float, float] | None:
        return OUTPUT_RANGES.get(self.out_activation)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self.body(self.fc(_with_cond(z.reshape(z.shape[0], -1), cond)).reshape(z.shape[0], self.chans0, *self.base))
        crop = [slice(None), slice(None)] + [slice((g - s) // 2, (g - s) // 2 + s) for g, s in zip(y.shape[2:], self.size)]
        return y[tuple(crop)].reshape(z.shape[0], *self.out_shape)


class ConvCritic(nn.Module):
    """Event -> strided convs -> flatten, append condition -> MLP head -> (B, *out_shape)."""

    def __init__(self, in_shape: Sequence[int], out_shape: int | Sequence[int], cond_dim: int = 0,
                 channels: Sequence[int] = (16, 32, 64), kernel: int = 3, activation: str = "leaky_relu",
                 norm: str = "none", head_width: int = 128, dims: int | None = None):
        super().__init__()
        self.in_shape = _shape(in_shape)
        self.out_shape = _shape(out_shape)
        c_in, size, self.dims = _spatial(self.in_shape, dims)
        conv = _conv(self.dims)
        layers: list[nn.Module] = []
        for c in channels:
            layers += [conv(c_in, int(c), kernel, stride=2, padding=kernel // 2), _norm_nd(norm, int(c), self.dims),
                       make_activation(activation)]
            c_in = int(c)
            size = tuple((s + 2 * (kernel // 2) - kernel) // 2 + 1 for s in size)
        self.body = nn.Sequential(*layers)
        self.channels_in = _spatial(self.in_shape, dims)[0]
        self.head = nn.Sequential(nn.Linear(c_in * math.prod(size) + int(cond_dim), int(head_width)),
                                  make_activation(activation), nn.Linear(int(head_width), math.prod(self.out_shape)))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x.reshape(len(x), self.channels_in, *x.shape[-self.dims:])).reshape(len(x), -1)
        return self.head(_with_cond(h, cond)).reshape(len(x), *self.out_shape)


def total_head(n_in: int, hidden: int, activation: str, n_out: int = 1) -> nn.Sequential:
    """MLP (generator input -> log(total / total0), or ``n_out`` such outputs) of a per-event total head,
    zero-initialised so that the first events get the starting total ``total0`` (:func:`mean_total`); used with
    :func:`rescale_total`."""
    head = nn.Sequential(nn.Linear(int(n_in), int(hidden)), make_activation(activation),
                         nn.Linear(int(hidden), int(n_out)))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def rescale_total(y: torch.Tensor, total: torch.Tensor, power: float, scale: float) -> torch.Tensor:
    """Network cells y = scale * c^power (N, ...) rescaled so that the data-unit cells c sum to ``total`` (N,).

    Undoing the transform, normalising and redoing it is one factor per event: c -> c * total / sum(c)
    is y -> y * (total / sum(c))^power. Differentiable in y and total; events with no energy stay empty.
    """
    flat = y.reshape(len(y), -1)
    s = ((flat / scale).clamp_min(0.0) ** (1.0 / power)).sum(dim=1)
    factor = (total / s.clamp_min(torch.finfo(y.dtype).tiny)) ** power
    return y * torch.where(s > 0, factor, torch.zeros_like(factor)).reshape(-1, *([1] * (y.dim() - 1)))


def mean_total(data, power: float, scale: float, max_events: int = 2048) -> float:
    """Mean total in data units (sum of (x / scale)^(1 / power)) of the first ``max_events`` training events of a
    set-up DataModule (a streamed data set is not read to its end for it): where a total head starts."""
    totals, n = [], 0
    batches = data.train_batches(0, 0, seed=0)
    for b in batches:
        totals.append(((b.x / scale).clamp_min(0.0) ** (1.0 / power)).reshape(len(b.x), -1).sum(1))
        n += len(b.x)
        if n >= max_events:
            break
    if hasattr(batches, "close"):
        batches.close()                  # a streamed reader stops its prefetch now
    return float(torch.cat(totals).double().mean())
