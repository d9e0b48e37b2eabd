"""Events stored as named arrays in HDF5 (or NumPy ``.npz``) files: grids, images and tables.

One dataset (``x_key``) holds the events (N, *event_shape); each condition is another dataset
named in ``conditions`` (``{condition name: dataset key}``). This covers the 3DGAN ECAL files
(``ECAL`` (N, 51, 51, 25), ``energy``, ``theta``), image sets and tabular physics variables
(``x`` (N, n_variables), any sign, with ``columns`` naming them and a ``label`` condition).
Files are validated chunk by chunk (shapes, NaN/inf, negative values where ``nonnegative``);
each problem is one line naming the file, the dataset and the first bad row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from caloexp.data.base import DataModule, Source, check_kind
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError, InputError


def _open(path: Path):
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".npz":
        try:
            return np.load(path, allow_pickle=False)  # nothing read from a file may run code
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    try:
        return h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file (accepted: HDF5 .h5/.hdf5, NumPy .npz)") from None


class ArrayFiles(Source):
    """Rows of one or more array files; HDF5 is read on demand, ``.npz`` is read whole."""

    def __init__(self, paths: Sequence[Path], x_key: str, conditions: Mapping[str, str], kind: str,
                 nonnegative: bool):
        self.paths, self.x_key, self.conditions = list(paths), x_key, dict(conditions)
        self.kind, self.nonnegative = kind, nonnegative
        sizes, shapes = [], []
        for p in self.paths:
            with _open(p) as f:
                keys = list(f.keys()) if hasattr(f, "keys") else list(f.files)
                for k in [x_key, *self.conditions.values()]:
                    if k not in keys:
                        raise InputError(f"{p}: missing dataset '{k}' (found {sorted(keys)})")
                x = f[x_key]
                if x.ndim < 2:
                    raise InputError(f"{p}: '{x_key}' has shape {x.shape}; expected (N, *event_shape)")
                for name, k in self.conditions.items():
                    if f[k].shape[0] != x.shape[0]:
                        raise InputError(f"{p}: '{k}' has {f[k].shape[0]} rows for {x.shape[0]} events")
                sizes.append(int(x.shape[0]))
                shapes.append(tuple(int(d) for d in x.shape[1:]))
        if len(set(shapes)) > 1:
            raise InputError(f"{self.paths[1]}: events of shape {shapes[1]} differ from {self.paths[0]}'s {shapes[0]}")
        self._shape = shapes[0]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self._shape

    def _validate(self, path: Path, key: str, arr: np.ndarray, row0: int, nonneg: bool) -> None:
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if bad.any():
            raise InputError(f"{path}: '{key}' contains NaN/inf (first at row {row0 + int(np.argmax(bad))})")
        if nonneg:
            neg = (arr.reshape(len(arr), -1) < 0).any(axis=1)
            if neg.any():
                raise InputError(f"{path}: '{key}' has negative values (first at row {row0 + int(np.argmax(neg))}); "
                                 "set data.nonnegative=false for signed variables")

    def read(self, lo: int, hi: int) -> Sample:
        xs, conds = [], {k: [] for k in self.conditions}
        for i, path in enumerate(self.paths):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a >= b:
                continue
            a, b = int(a - self.offsets[i]), int(b - self.offsets[i])
            with _open(path) as f:
                try:
                    x = np.asarray(f[self.x_key][a:b], dtype=np.float32)
                    c = {n: np.asarray(f[k][a:b], dtype=np.float32) for n, k in self.conditions.items()}
                except OSError as exc:
                    raise InputError(f"{path}: corrupt data in rows {a}-{b} ({exc})") from None
            self._validate(path, self.x_key, x, a, self.nonnegative)
            for n, v in c.items():
                self._validate(path, self.conditions[n], v, a, False)
            xs.append(x)
            for n, v in c.items():
                conds[n].append(v)
        if not xs:
            return Sample(np.zeros((0, *self._shape), np.float32), {n: np.zeros(0, np.float32) for n in self.conditions},
                          self.kind)
        return Sample(np.concatenate(xs), {n: np.concatenate(v) for n, v in conds.items()}, self.kind)


class ArrayDataModule(DataModule):
    """Grids, images or tables from named-array files (``kind``: grid | image | tabular)."""

    def __init__(self, name: str, files: Sequence[str], kind: str = "grid", x_key: str = "x",
                 conditions: Mapping[str, str] | None = None, columns: Sequence[str] | None = None,
                 nonnegative: bool = True, data_dir: str = ".", **kwargs: Any):
        super().__init__(name, **kwargs)
        self.kind = check_kind(kind)
        if self.kind == "calo":
            raise ConfigError("data.kind=calo: CaloChallenge files use data=embedded|photons|... (ShowerDataModule)")
        if not files:
            raise ConfigError(f"data={name}: no files listed (data.files)")
        self.files = [Path(f).expanduser() if Path(f).expanduser().is_absolute() else Path(data_dir) / f for f in files]
        self.x_key = str(x_key)
        self.cond_keys = dict(conditions or {})
        self.columns = list(columns) if columns else None
        self.nonnegative = bool(nonnegative)
        if "nonnegative" not in self.transform_cfg:
            self.transform_cfg["nonnegative"] = self.nonnegative

    def open_files(self) -> Source:
        files = ArrayFiles(self.files, self.x_key, self.cond_keys, self.kind, self.nonnegative)
        if self.columns and self.kind == "tabular" and len(self.columns) != files.event_shape[0]:
            raise ConfigError(f"data.columns has {len(self.columns)} names for {files.event_shape[0]} variables")
        return files

    def writer_spec(self) -> dict[str, Any]:
        return {"format": "arrays", "x_key": self.x_key, "conditions": self.cond_keys, "kind": self.kind,
                "columns": self.columns}

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), files=[str(p) for p in self.files], x_key=self.x_key,
                    conditions=self.cond_keys)


def write(path: str | Path, sample: Sample, x_key: str = "x", conditions: Mapping[str, str] | None = None,
          columns: Sequence[str] | None = None, kind: str | None = None, compression: str | None = "gzip") -> Path:
    """Write events and their conditions under the keys they were read from (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    keys = dict(conditions or {n: n for n in sample.cond})
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(x_key, data=np.asarray(sample.x, np.float32), compression=compression)
            for name, arr in sample.cond.items():
                f.create_dataset(keys.get(name, name), data=np.asarray(arr), compression=compression)
            f.attrs["kind"] = kind or sample.kind
            if columns:
                f.attrs["columns"] = list(columns)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
