"""The CaloChallenge 2022 HDF5 shower format: the one place that reads and writes it.

A file holds ``incident_energies`` (N, 1) and ``showers`` (N, n_voxels), both in MeV,
voxels flattened layer-major, then alpha, then r (see :mod:`caloexp.geometry`).
Reading is chunked so that dataset 3 (40,500 voxels, ~8 GB per file) never has to
fit in memory; every chunk is validated (shapes, NaN/inf, negative energies) and a
problem is reported as one line naming the file, the dataset and the first bad row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from caloexp.errors import InputError
from caloexp.geometry import Geometry

ENERGY_KEY = "incident_energies"
SHOWER_KEY = "showers"


@dataclass
class Showers:
    """A batch of showers in physical units: incident energies (N,) and voxels (N, n_voxels), MeV."""

    energies: np.ndarray
    showers: np.ndarray

    def __len__(self) -> int:
        return len(self.energies)

    def subset(self, index: np.ndarray | slice) -> "Showers":
        return Showers(self.energies[index], self.showers[index])


@dataclass(frozen=True)
class FileInfo:
    path: Path
    n_showers: int
    n_voxels: int
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return self.n_showers * self.n_voxels * self.dtype.itemsize


ACCEPTED = ("CaloChallenge HDF5 (.hdf5/.h5) with datasets 'incident_energies' (N,1) and "
            "'showers' (N,n_voxels)")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# leading bytes of formats users mistake for a shower file -> a name for the error line
_SIGNATURES = ((b"\x93NUMPY", "a NumPy .npy array"), (b"PK\x03\x04", "a ZIP archive (.npz/.zip/torch)"),
               (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"), (b"root", "a ROOT file"),
               (b"\x80", "a Python pickle"), (b"BZh", "a bzip2-compressed file"),
               (b"\xfd7zXZ", "an xz-compressed file"), (b"\x89PNG", "a PNG image"), (b"%PDF", "a PDF"),
               (b"\x7fELF", "an executable"))


def _sniff(path: Path) -> str | None:
    """What a non-HDF5 file looks like (None when it is HDF5 or unknown)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return None
    if head.startswith(_HDF5_MAGIC) or _HDF5_MAGIC in head:  # HDF5 may sit after a user block
        return None
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if first.startswith(("{", "[")):
        return "JSON text"
    if first.startswith("<"):
        return "XML/HTML text"
    if "," in first or "\t" in first:
        return "CSV/TSV text"
    return "a text file"


def _open(path: Path) -> h5py.File:
    """Open a shower file read-only; anything but HDF5 gets one line naming the accepted format."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; caloexp reads {ACCEPTED}")
    looks_like = _sniff(path)
    if looks_like is not None:
        raise InputError(f"{path}: not an HDF5 file (looks like {looks_like}); caloexp reads {ACCEPTED}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__}: {exc}); "
                         f"caloexp reads {ACCEPTED}") from None


def inspect(path: str | Path, geometry: Geometry | None = None) -> FileInfo:
    """Check a file's layout without reading the voxels; return its size."""
    path = Path(path)
    with _open(path) as f:
        for key in (ENERGY_KEY, SHOWER_KEY):
            if key not in f:
                raise InputError(f"{path}: missing dataset '{key}' (found {sorted(f.keys())}); "
                                 "a CaloChallenge file needs 'incident_energies' (N,1) and 'showers' (N,n_voxels)")
        e, s = f[ENERGY_KEY], f[SHOWER_KEY]
        for key, ds in ((ENERGY_KEY, e), (SHOWER_KEY, s)):
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"{path}: '{key}' is an HDF5 {type(ds).__name__.lower()}, not a dataset; "
                                 f"caloexp reads {ACCEPTED}")
            if ds.dtype.kind not in "fiu":
                raise InputError(f"{path}: '{key}' holds {ds.dtype} values, not numbers; caloexp reads {ACCEPTED}")
        if e.ndim not in (1, 2) or (e.ndim == 2 and e.shape[1] != 1):
            raise InputError(f"{path}: '{ENERGY_KEY}' has shape {e.shape}, expected (N, 1)")
        if s.ndim != 2:
            raise InputError(f"{path}: '{SHOWER_KEY}' has shape {s.shape}, expected (N, n_voxels)")
        if s.shape[0] != e.shape[0]:
            raise InputError(f"{path}: {e.shape[0]} incident energies but {s.shape[0]} showers")
        if geometry is not None and s.shape[1] != geometry.n_voxels:
            raise InputError(f"{path}: showers have {s.shape[1]} voxels but geometry "
                             f"{geometry.name} has {geometry.n_voxels}")
        return FileInfo(path, int(s.shape[0]), int(s.shape[1]), np.dtype(s.dtype))


def validate(energies: np.ndarray, showers: np.ndarray, source: str, row0: int = 0) -> None:
    """Raise :class:`InputError` on non-finite or negative energies (first bad row named)."""
    for name, arr in (("incident_energies", energies), ("showers", showers)):
        bad = ~np.isfinite(arr)
        if bad.any():
            row = row0 + int(np.argwhere(bad)[0][0])
            raise InputError(f"{source}: '{name}' contains NaN/inf (first at row {row})")
    if (energies <= 0).any():
        row = row0 + int(np.argmax(energies <= 0))
        raise InputError(f"{source}: non-positive incident energy {energies[row - row0]} at row {row}")
    neg = showers < 0
    if neg.any():
        row = row0 + int(np.argwhere(neg)[0][0])
        raise InputError(f"{source}: negative voxel energy at row {row} (min {showers.min():.3g} MeV)")


def iter_chunks(path: str | Path, chunk_size: int = 10_000, geometry: Geometry | None = None,
                start: int = 0, stop: int | None = None, check: bool = True,
                dtype: type = np.float32) -> Iterator[Showers]:
    """Stream a file in chunks of ``chunk_size`` showers (memory stays O(chunk))."""
    path = Path(path)
    info = inspect(path, geometry)
    stop = info.n_showers if stop is None else min(stop, info.n_showers)
    with _open(path) as f:
        e_ds, s_ds = f[ENERGY_KEY], f[SHOWER_KEY]
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            try:
                e = np.asarray(e_ds[lo:hi], dtype=dtype).reshape(-1)
                s = np.asarray(s_ds[lo:hi], dtype=dtype)
            except OSError as exc:
                raise InputError(f"{path}: corrupt data in rows {lo}-{hi} ({exc})") from None
            if check:
                validate(e, s, str(path), row0=lo)
            yield Showers(e, s)


def read(path: str | Path, geometry: Geometry | None = None, start: int = 0,
         stop: int | None = None, check: bool = True, max_bytes: int = 8 << 30) -> Showers:
    """Read (a slice of) a file into memory; refuses reads larger than ``max_bytes``."""
    info = inspect(path, geometry)
    n = (info.n_showers if stop is None else min(stop, info.n_showers)) - start
    if n * info.n_voxels * 4 > max_bytes:
        raise InputError(f"{path}: reading {n} showers x {info.n_voxels} voxels needs "
                         f"{n * info.n_voxels * 4 / 2**30:.1f} GiB; stream it with iter_chunks or read a slice")
    parts = list(iter_chunks(path, 20_000, geometry, start, stop, check))
    if not parts:
        return Showers(np.zeros(0, np.float32), np.zeros((0, info.n_voxels), np.float32))
    return Showers(np.concatenate([p.energies for p in parts]), np.concatenate([p.showers for p in parts]))


#: dtype of written files: float64 as the official CaloChallenge datasets, so the official
#: ``evaluate.py`` (which runs its classifier in float64 and keeps the files' dtype) reads them in
#: every mode, whatever the reference's dtype. ``dtype="float32"`` halves the size (then the
#: official ``cls-low``/``cls-low-normed`` modes need a float64 reference).
WRITE_DTYPE = "float64"


def _write_dtype(dtype: str | np.dtype, path: Path) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype("float64"), np.dtype("float32")):
        raise InputError(f"{path}: cannot write dtype {dt}; CaloChallenge files are float64 (default) or float32")
    return dt


def write(path: str | Path, energies: np.ndarray, showers: np.ndarray,
          geometry: Geometry | None = None, compression: str | None = "gzip",
          attrs: dict | None = None, dtype: str | np.dtype = WRITE_DTYPE) -> Path:
    """Write a CaloChallenge-format file (energies (N,1), showers (N,V), MeV, ``dtype`` float64 by default).

    The file is written to a temporary name and renamed, so a crash never leaves a
    half-written file that looks complete.
    """
    path = Path(path)
    dt = _write_dtype(dtype, path)
    energies = np.asarray(energies, dtype=dt).reshape(-1, 1)
    showers = np.asarray(showers, dtype=dt)
    if showers.ndim != 2 or showers.shape[0] != energies.shape[0]:
        raise InputError(f"{path}: cannot write showers of shape {showers.shape} with {energies.shape[0]} energies")
    if geometry is not None and showers.shape[1] != geometry.n_voxels:
        raise InputError(f"{path}: showers have {showers.shape[1]} voxels, geometry {geometry.name} has {geometry.n_voxels}")
    validate(energies.reshape(-1), showers, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.create_dataset(ENERGY_KEY, data=energies, compression=compression)
        rows = max(1, 2**20 // max(1, showers.shape[1] * dt.itemsize // 4))
        chunks = (min(len(showers), rows), showers.shape[1]) if len(showers) else None
        f.create_dataset(SHOWER_KEY, data=showers, compression=compression, chunks=chunks)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    tmp.replace(path)
    return path


class ShowerWriter:
    """Append showers chunk by chunk to a CaloChallenge file (for generation at scale), float64 by default."""

    def __init__(self, path: str | Path, n_voxels: int, compression: str | None = "gzip",
                 dtype: str | np.dtype = WRITE_DTYPE):
        self.path = Path(path)
        self.dtype = _write_dtype(dtype, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".part")
        self._f = h5py.File(self._tmp, "w")
        self._e = self._f.create_dataset(ENERGY_KEY, shape=(0, 1), maxshape=(None, 1), dtype=self.dtype,
                                         chunks=(4096, 1), compression=compression)
        rows = max(1, 2**22 // (n_voxels * self.dtype.itemsize))  # ~4 MB chunks
        self._s = self._f.create_dataset(SHOWER_KEY, shape=(0, n_voxels), maxshape=(None, n_voxels),
                                         dtype=self.dtype, chunks=(rows, n_voxels), compression=compression)

    def append(self, energies: np.ndarray, showers: np.ndarray) -> None:
        n0, n = self._e.shape[0], len(energies)
        validate(np.asarray(energies).reshape(-1), showers, str(self.path), row0=n0)
        self._e.resize(n0 + n, axis=0)
        self._s.resize(n0 + n, axis=0)
        self._e[n0:] = np.asarray(energies, self.dtype).reshape(-1, 1)
        self._s[n0:] = np.asarray(showers, self.dtype)

    def close(self) -> Path:
        self._f.close()
        self._tmp.replace(self.path)
        return self.path

    def __enter__(self) -> "ShowerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self._tmp.unlink(missing_ok=True)
