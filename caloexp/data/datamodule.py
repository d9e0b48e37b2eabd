"""CaloChallenge showers (embedded, local files or downloadable) as a data module.

Events are flat voxel vectors (N, n_voxels) in MeV with one condition, ``energy`` (the incident
energy, MeV). Files are read through :mod:`caloexp.data.calochallenge` (validated, chunked):
all into memory by default, or block by block with ``streaming: true`` (dataset 3). The default
transform is the CaloChallenge preset of :mod:`caloexp.data.transforms`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from caloexp import geometry as geo
from caloexp.data import calochallenge
from caloexp.data.base import DataModule, Source
from caloexp.data.sample import Sample
from caloexp.data.transforms import CALO_CONDITIONS, CALO_STEPS
from caloexp.errors import ConfigError, InputError


class ShowerFiles(Source):
    """Rows of one or more CaloChallenge files, read on demand (never all at once)."""

    kind = "calo"

    def __init__(self, paths: Sequence[Path], geometry: geo.Geometry):
        self.paths = list(paths)
        self.geometry = geometry
        sizes = [calochallenge.inspect(p, geometry).n_showers for p in self.paths]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.geometry.n_voxels,)

    def read(self, lo: int, hi: int) -> Sample:
        parts = []
        for i, path in enumerate(self.paths):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a < b:
                a, b = int(a - self.offsets[i]), int(b - self.offsets[i])
                parts.extend(calochallenge.iter_chunks(path, b - a, self.geometry, a, b))
        if not parts:
            return Sample(np.zeros((0, self.geometry.n_voxels), np.float32), {"energy": np.zeros(0, np.float32)})
        return Sample(np.concatenate([p.showers for p in parts]), {"energy": np.concatenate([p.energies for p in parts])})


class ShowerDataModule(DataModule):
    """A CaloChallenge-format dataset ready for training (``kind: calo``)."""

    kind = "calo"
    default_transform = {"steps": CALO_STEPS, "conditions": CALO_CONDITIONS, "nonnegative": True}

    def __init__(self, name: str, geometry: str, data_dir: str, source: str = "files", files: Sequence[str] = (),
                 n_showers: int = 15000, embedded_seed: int = 1234, download: bool = True, **kwargs: Any):
        if source not in ("embedded", "files"):
            raise ConfigError(f"data.source={source!r}: choose 'embedded' or 'files'")
        if source == "embedded" and files:
            raise ConfigError(f"data.files={list(files)}: data={name} uses the embedded simulator "
                              "(data.source=embedded); choose data=photons|pions|dataset2|dataset3 for files")
        if source == "embedded" and n_showers < 2:
            raise ConfigError(f"data.n_showers={n_showers}: must be >= 2")
        super().__init__(name, **kwargs)
        self.geometry = geo.load(geometry)
        self.data_dir = Path(data_dir)
        self.source_kind = source
        self.files = list(files)
        self.n_showers = int(n_showers)
        self.embedded_seed = int(embedded_seed)
        self.download = download
        self.paths: list[Path] = []

    def prepare(self) -> list[Path]:
        """Make sure the dataset files exist locally; return their paths."""
        if self.source_kind == "embedded":
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
                p = ensure_file(p.name, p.parent)  # downloads if missing; verifies size/hash once
            elif not p.exists():
                hint = "" if self.download else " (data.download=false)"
                raise InputError(f"{p}: file not found{hint}")
            paths.append(p)
        return paths

    def prepare_data(self) -> None:
        self.prepare()

    def open_files(self) -> Source:
        self.paths = self.prepare()
        return ShowerFiles(self.paths, self.geometry)

    def resolve_step(self, entry: Any) -> Any:
        """``layer_energies`` with ``layers: geometry`` / ``threshold: geometry`` gets the voxel count of each
        layer and the evaluation's voxel threshold (1 MeV for dataset 1) of this geometry; ``calo_image``
        with ``layers: geometry`` gets (n_alpha, n_r) of each layer."""
        if isinstance(entry, Mapping) and entry.get("step") == "calo_image" and entry.get("layers") == "geometry":
            return dict(entry, layers=[[layer.n_alpha, layer.n_r] for layer in self.geometry.layers])
        if isinstance(entry, Mapping) and entry.get("step") == "layer_energies":
            entry = dict(entry)
            if entry.get("layers") == "geometry":
                entry["layers"] = [int(n) for n in self.geometry.voxels_per_layer if n > 0]
            if entry.get("threshold") == "geometry":   # the readout threshold the evaluation applies
                from caloexp.metrics.features import default_threshold
                entry["threshold"] = float(default_threshold(self.geometry))
        return entry

    def writer_spec(self) -> dict[str, Any]:
        return {"format": "calochallenge", "geometry": self.geometry.name}

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), geometry=self.geometry.name, files=[str(p) for p in self.paths],
                    source=self.source_kind)
