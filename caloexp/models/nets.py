"""Network building blocks, configurable from Hydra (depth, width, activation, norm).

Nets are instantiated with ``_partial_: true`` in the config and completed by the
model with the input/output sizes that only the data knows, so the same net config
serves every dataset geometry.
"""
from __future__ import annotations

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


def _norm(kind: str, width: int) -> nn.Module:
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

    def __init__(self, in_dim: int, out_dim: int, depth: int = 3, width: int | list[int] = 256,
                 activation: str = "leaky_relu", norm: str = "none", dropout: float = 0.0,
                 out_activation: str = "none"):
        super().__init__()
        widths = list(width) if isinstance(width, (list, tuple)) else [int(width)] * int(depth)
        if not widths or min(widths) < 1:
            raise ConfigError(f"MLP needs depth >= 1 and width >= 1 (got depth={depth}, width={width})")
        layers: list[nn.Module] = []
        d = in_dim
        for w in widths:
            layers += [nn.Linear(d, w), _norm(norm, w), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = w
        layers += [nn.Linear(d, out_dim), make_activation(out_activation)]
        self.net = nn.Sequential(*layers)
        self.out_activation = out_activation

    @property
    def output_range(self) -> tuple[float, float] | None:
        return OUTPUT_RANGES.get(self.out_activation)

    def forward(self, x):
        return self.net(x)
