"""From a dataset config to training batches and a held-out reference sample.

``ShowerDataModule`` gets the files onto disk (generating the embedded dataset or
downloading a real one), reads and validates them, splits off a held-out sample
used as the physics reference at evaluation, fits the invertible transform and
serves batches in a deterministic order: epoch ``e`` uses the permutation seeded
by ``(seed, e)``, so training resumed at (epoch, batch) sees exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from caloexp import geometry as geo
from caloexp.data import calochallenge
from caloexp.data.calochallenge import Showers
from caloexp.data.transforms import ShowerTransform
from caloexp.errors import ConfigError, InputError
from caloexp.models.base import Batch


@dataclass
class Split:
    train: Showers
    val: Showers


class ShowerDataModule:
    """A CaloChallenge-format dataset (embedded, local files or downloadable) ready for training."""

    def __init__(self, name: str, geometry: str, data_dir: str, source: str = "files",
                 files: Sequence[str] = (), n_showers: int = 15000, embedded_seed: int = 1234,
                 max_showers: int | None = None, val_fraction: float = 0.2, batch_size: int = 256,
                 eval_showers: int = 5000, transform: dict | None = None, split_seed: int = 0,
                 download: bool = True):
        if source not in ("embedded", "files"):
            raise ConfigError(f"data.source={source!r}: choose 'embedded' or 'files'")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must be in (0, 1)")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be >= 1")
        self.name = name
        self.geometry = geo.load(geometry)
        self.data_dir = Path(data_dir)
        self.source = source
        self.files = list(files)
        self.n_showers = int(n_showers)
        self.embedded_seed = int(embedded_seed)
        self.max_showers = max_showers
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.eval_showers = int(eval_showers)
        self.transform_cfg = dict(transform or {})
        self.split_seed = int(split_seed)
        self.download = download
        self.split: Split | None = None
        self.transform: ShowerTransform | None = None
        self._train_x: torch.Tensor | None = None
        self._train_cond: torch.Tensor | None = None

    # ---------------------------------------------------------------- files
    def prepare(self) -> list[Path]:
        """Make sure the dataset files exist locally; return their paths."""
        if self.source == "embedded":
            from caloexp.data.embedded import ensure_embedded
            return [ensure_embedded(self.data_dir, n_showers=self.n_showers, seed=self.embedded_seed)]
        if not self.files:
            raise ConfigError(f"data={self.name}: no files listed (data.files)")
        from caloexp.data.download import KNOWN_FILES, ensure_file

        paths = []
        for name in self.files:
            p = Path(name).expanduser()
            if not p.is_absolute():
                p = self.data_dir / name
            if p.name in KNOWN_FILES and (self.download or p.exists()):
                p = ensure_file(p.name, p.parent)  # downloads if missing; verifies size/sha256 once
            elif not p.exists():
                hint = "" if self.download else " (data.download=false)"
                raise InputError(f"{p}: file not found{hint}")
            paths.append(p)
        return paths

    def setup(self) -> "ShowerDataModule":
        """Read, validate and split the data (held-out fraction = reference for evaluation)."""
        parts = [calochallenge.read(p, geometry=self.geometry, stop=self.max_showers) for p in self.prepare()]
        data = Showers(np.concatenate([p.energies for p in parts]), np.concatenate([p.showers for p in parts]))
        if self.max_showers is not None:
            data = data.subset(slice(0, int(self.max_showers)))
        n = len(data)
        n_val = int(round(n * self.val_fraction))
        if n - n_val < self.batch_size or n_val < 1:
            raise ConfigError(f"data={self.name}: {n} showers are too few for batch_size={self.batch_size} "
                              f"with val_fraction={self.val_fraction}")
        perm = np.random.default_rng(self.split_seed).permutation(n)
        self.split = Split(train=data.subset(np.sort(perm[n_val:])), val=data.subset(np.sort(perm[:n_val])))
        return self

    # ------------------------------------------------------------ transform
    def fit_transform(self, output_range: tuple[float, float] | None = None, device: str | torch.device = "cpu") -> ShowerTransform:
        """Fit the transform on the training split and cache the network-space training set."""
        assert self.split is not None, "call setup() first"
        tr = self.split.train
        self.transform = ShowerTransform(self.geometry.n_voxels, output_range=output_range, **self.transform_cfg)
        self.transform.fit(tr.showers, tr.energies)
        with torch.no_grad():
            e = torch.as_tensor(tr.energies)
            self._train_x = self.transform(torch.as_tensor(tr.showers), e).float().to(device)
            self._train_cond = self.transform.condition(e).float().to(device)
        self.transform.to(device)
        return self.transform

    # ---------------------------------------------------------------- shapes
    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.geometry.n_voxels,)

    @property
    def cond_dim(self) -> int:
        return 1

    @property
    def steps_per_epoch(self) -> int:
        assert self.split is not None
        return len(self.split.train) // self.batch_size

    # ---------------------------------------------------------------- batches
    def train_batches(self, epoch: int, start: int = 0, seed: int = 0) -> Iterator[Batch]:
        """Batches of epoch ``epoch`` from batch index ``start`` on (drop-last, deterministic order)."""
        assert self._train_x is not None, "call fit_transform() first"
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(len(self._train_x), generator=g).to(self._train_x.device)
        for b in range(start, self.steps_per_epoch):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield Batch(self._train_x[idx], self._train_cond[idx])

    def reference(self) -> Showers:
        """The held-out showers (MeV) that generated showers are compared against."""
        assert self.split is not None
        return self.split.val.subset(slice(0, self.eval_showers))
