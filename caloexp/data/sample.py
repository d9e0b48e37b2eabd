"""Events and their conditions: the one data type every reader, transform, model and metric shares.

A :class:`Sample` holds ``x`` (N, *event_shape) in physical units (MeV voxels, GeV cells, photon
counts, tabular variables, ...) and named conditions ``cond`` (each (N,) or (N, k)): e.g.
``energy`` for CaloChallenge showers, ``energy`` and ``theta`` for 3DGAN grids, ``label`` for a
tabular class, ``particle`` (N, 9) for the ZDC. ``kind`` says which metric groups apply:

``calo``     CaloChallenge cylindrical geometry (flat voxel vectors, ``cond['energy']`` in MeV)
``grid``     a regular 3D grid of cells
``image``    a 2D image (optionally with a leading channel axis)
``tabular``  a vector of named variables (any sign)

A :class:`Batch` is the network-space version of a slice of a sample: tensors on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

KINDS = ("calo", "grid", "image", "tabular")


@dataclass
class Sample:
    """``x`` (N, *event_shape) in physical units plus named conditions, each with N rows."""

    x: np.ndarray
    cond: dict[str, np.ndarray] = field(default_factory=dict)
    kind: str = "calo"

    def __post_init__(self) -> None:
        self.cond = {k: np.asarray(v) for k, v in self.cond.items()}
        for k, v in self.cond.items():
            if len(v) != len(self.x):
                raise ValueError(f"condition '{k}' has {len(v)} rows for {len(self.x)} events")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, index: np.ndarray | slice) -> "Sample":
        return Sample(self.x[index], {k: v[index] for k, v in self.cond.items()}, self.kind)

    @staticmethod
    def concatenate(parts: list["Sample"]) -> "Sample":
        first = parts[0]
        return Sample(np.concatenate([p.x for p in parts]),
                      {k: np.concatenate([p.cond[k] for p in parts]) for k in first.cond}, first.kind)

    # CaloChallenge showers are the calo kind with one condition, the incident energy in MeV
    @property
    def energies(self) -> np.ndarray:
        return np.asarray(self.cond["energy"]).reshape(-1)

    @property
    def showers(self) -> np.ndarray:
        return self.x.reshape(len(self.x), -1)


@dataclass
class Batch:
    """One training batch in network space: ``x`` (B, *data_shape) and the condition vector (B, cond_dim).

    ``cond`` is the concatenation of the transformed conditions in the data module's order
    (``cond_names``); ``raw`` keeps the physical conditions for families that need them
    (e.g. auxiliary regression targets).
    """

    x: torch.Tensor
    cond: torch.Tensor
    raw: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)
