"""ALICE Zero Degree Calorimeter (ZDC) responses: files, the response properties, the data module.

Events are photon-count images ``x`` (N, 1, 44, 44) (non-negative) with one condition, ``particle``
(N, 9): energy [GeV], vertex x, y, z [cm], momentum x, y, z [GeV/c], mass [GeV/c^2], charge [e]
(:data:`PARTICLE_COLUMNS`). Accepted files (``data.files``, each entry one of):

* an HDF5 file with datasets ``responses`` ((N, 44, 44) or (N, 1, 44, 44)) and ``particles`` (N, 9);
* a ``.npz`` holding both arrays under those keys;
* a pair ``[responses.npz, particles.npz]`` of ``.npz`` files, each holding one array (any key, e.g.
  ``arr_0`` as ``np.savez`` writes it) or the named key - the layout of the original ZDC sets.

Every file is validated (shapes, NaN/inf, negative counts); each problem is one ``InputError`` line
naming the file, the array and the first bad row. ``data=zdc_embedded`` generates its files with the
toy simulator of :mod:`caloexp.data.zdc_sim` (cached in ``data_dir``).

Response properties (:func:`properties`, vectorised over events; the CorrVAE's controllable
properties, computed like the seed on ``v = log(1 + counts)``), in :data:`PROPERTIES` order:
``max_x``, ``max_y`` (column, row of the brightest pixel), ``com_x``, ``com_y`` (centre of mass of
``v``; the image centre for an empty response), ``nonzero`` (pixels with at least half a photon),
``nonzero_class`` (``nonzero`` in 5 classes: 0 | 1-9 | 10-49 | 50-149 | >= 150), ``above_1`` (pixels
with ``v > 1``, i.e. more than e - 1 ~ 1.7 photons), ``sum`` and ``max`` of ``v``.
:class:`PropertyScaling` maps them onto [0, 1] (min/max of the training split) and back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from caloexp.data.arrays import _open
from caloexp.data.base import DataModule, Source
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError, InputError

PARTICLE_COLUMNS = ("energy", "vx", "vy", "vz", "px", "py", "pz", "mass", "charge")
PROPERTIES = ("max_x", "max_y", "com_x", "com_y", "nonzero", "nonzero_class", "above_1", "sum", "max")
NONZERO_EDGES = (1, 10, 50, 150)   # class k: at least NONZERO_EDGES[k-1] non-zero pixels
HALF_PHOTON = float(np.log1p(0.5))  # "non-zero": at least half a photon (generated counts are continuous)
X_KEY, COND_KEY = "responses", "particles"


# ------------------------------------------------------------------ properties
def properties(v: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The 9 properties (N, 9) of images ``v`` = log(1 + counts), (N, H, W) or (N, 1, H, W), in float64."""
    t = torch.as_tensor(v).to(torch.float64)
    t = t.reshape(len(t), t.shape[-2], t.shape[-1])
    n, h, w = t.shape
    flat = t.reshape(n, -1)
    arg = flat.argmax(dim=1)
    ys = torch.arange(h, dtype=torch.float64, device=t.device)
    xs = torch.arange(w, dtype=torch.float64, device=t.device)
    pos = t.clamp_min(0)
    tot = pos.sum(dim=(1, 2))
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    com_x = torch.where(tot > 0, (pos.sum(1) * xs).sum(1) / safe, torch.full_like(tot, (w - 1) / 2))
    com_y = torch.where(tot > 0, (pos.sum(2) * ys).sum(1) / safe, torch.full_like(tot, (h - 1) / 2))
    nonzero = (flat >= HALF_PHOTON).sum(1).to(torch.float64)
    edges = torch.tensor(NONZERO_EDGES, dtype=torch.float64, device=t.device)
    cls = (nonzero[:, None] >= edges).sum(1).to(torch.float64)
    return torch.stack([(arg % w).to(torch.float64), (arg // w).to(torch.float64), com_x, com_y, nonzero, cls,
                        (flat > 1.0).sum(1).to(torch.float64), flat.sum(1), flat.amax(1)], 1)


def properties_of_counts(x: np.ndarray) -> np.ndarray:
    """:func:`properties` of photon-count images (physical units), as a NumPy array."""
    return properties(np.log1p(np.clip(np.asarray(x, np.float64), 0, None))).numpy()


class PropertyScaling:
    """Min/max scaling of the properties onto [0, 1] and its exact inverse (kept as plain numbers)."""

    def __init__(self, lo: Sequence[float], hi: Sequence[float]):
        self.lo = torch.as_tensor(lo, dtype=torch.float64)
        self.hi = torch.as_tensor(hi, dtype=torch.float64)

    @classmethod
    def fit(cls, props: torch.Tensor) -> "PropertyScaling":
        lo, hi = props.amin(0), props.amax(0)
        return cls(lo, torch.where(hi > lo, hi, lo + 1.0))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.lo.to(p)) / (self.hi - self.lo).to(p)

    def inverse(self, s: torch.Tensor) -> torch.Tensor:
        return s * (self.hi - self.lo).to(s) + self.lo.to(s)


# ------------------------------------------------------------------ files
def _array(path: Path, f: Any, key: str | None, what: str) -> np.ndarray:
    keys = list(f.keys()) if hasattr(f, "keys") else list(f.files)
    if key is None:  # a single-array .npz of a pair: whatever its key
        if len(keys) != 1:
            raise InputError(f"{path}: expected one array of {what} (found {sorted(keys)})")
        key = keys[0]
    if key not in keys:
        raise InputError(f"{path}: missing dataset '{key}' ({what}; found {sorted(keys)})")
    return f[key]


def _check(path: Path, key: str, arr: np.ndarray, row0: int, nonneg: bool) -> None:
    flat = arr.reshape(len(arr), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise InputError(f"{path}: '{key}' contains NaN/inf (first at row {row0 + int(np.argmax(bad))})")
    if nonneg:
        neg = (flat < 0).any(axis=1)
        if neg.any():
            raise InputError(f"{path}: '{key}' has negative photon counts (first at row {row0 + int(np.argmax(neg))})")


class ZDCFile:
    """One ZDC file (HDF5 or ``.npz``) or ``[responses.npz, particles.npz]`` pair, checked on opening."""

    def __init__(self, entry: str | Path | Sequence[str | Path]):
        if isinstance(entry, (str, Path)):
            self.x_path = self.c_path = Path(entry)
            self.x_key, self.c_key = X_KEY, COND_KEY
        else:
            parts = [Path(p) for p in entry]
            if len(parts) != 2:
                raise ConfigError(f"data.files entry {list(map(str, parts))}: a pair is [responses.npz, particles.npz]")
            self.x_path, self.c_path = parts
            self.x_key = self.c_key = None
        with _open(self.x_path) as fx:
            x = _array(self.x_path, fx, self.x_key, "responses (N, 1, 44, 44)")
            shape = tuple(int(d) for d in x.shape)
        with _open(self.c_path) as fc:
            c_shape = tuple(int(d) for d in _array(self.c_path, fc, self.c_key, "particles (N, 9)").shape)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[1] != 1):
            raise InputError(f"{self.x_path}: responses have shape {shape}; expected (N, H, W) or (N, 1, H, W)")
        if len(c_shape) != 2 or c_shape[1] != len(PARTICLE_COLUMNS):
            raise InputError(f"{self.c_path}: particles have shape {c_shape}; expected (N, 9) = "
                             f"({', '.join(PARTICLE_COLUMNS)})")
        if c_shape[0] != shape[0]:
            raise InputError(f"{self.c_path}: {c_shape[0]} particles for {shape[0]} responses in {self.x_path}")
        self.n, self.event_shape = shape[0], (1, shape[-2], shape[-1])

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for path, key, what in ((self.x_path, self.x_key, "responses"), (self.c_path, self.c_key, "particles")):
            with _open(path) as f:
                arr = _array(path, f, key, what)
                try:
                    v = np.asarray(arr[a:b], dtype=np.float32)
                except (OSError, ValueError) as exc:
                    raise InputError(f"{path}: corrupt data in rows {a}-{b} ({exc})") from None
            _check(path, key or what, v, a, nonneg=what == "responses")
            out.append(v)
        return out[0].reshape(len(out[0]), *self.event_shape), out[1]


class ZDCFiles(Source):
    """Rows of one or more ZDC files."""

    kind = "image"

    def __init__(self, entries: Sequence[Any]):
        self.files = [ZDCFile(e) for e in entries]
        shapes = {f.event_shape for f in self.files}
        if len(shapes) > 1:
            raise InputError(f"{self.files[-1].x_path}: responses of shape {self.files[-1].event_shape} differ from "
                             f"{self.files[0].x_path}'s {self.files[0].event_shape}")
        self.paths = [f.x_path for f in self.files]
        self.offsets = np.concatenate([[0], np.cumsum([f.n for f in self.files])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.files[0].event_shape

    def read(self, lo: int, hi: int) -> Sample:
        xs, cs = [np.zeros((0, *self.event_shape), np.float32)], [np.zeros((0, 9), np.float32)]
        for i, f in enumerate(self.files):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a < b:
                x, c = f.read(int(a - self.offsets[i]), int(b - self.offsets[i]))
                xs.append(x)
                cs.append(c)
        return Sample(np.concatenate(xs), {"particle": np.concatenate(cs)}, "image")


def write(path: str | Path, sample: Sample, compression: str | None = "gzip") -> Path:
    """Responses and particles as HDF5 (``responses``, ``particles``; atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(X_KEY, data=np.asarray(sample.x, np.float32), compression=compression)
            f.create_dataset(COND_KEY, data=np.asarray(sample.cond["particle"], np.float32), compression=compression)
            f.attrs["kind"] = "image"
            f.attrs["particle_columns"] = list(PARTICLE_COLUMNS)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------ data module
class ZDCDataModule(DataModule):
    """ZDC responses with their particles (``kind: image``, condition ``particle``).

    ``source: embedded`` generates ``n_events`` responses with the toy simulator (seed ``embedded_seed``)
    into ``data_dir`` once; ``source: files`` reads ``files`` (see the module doc)."""

    kind = "image"
    default_transform = {"steps": [{"step": "log", "eps": 1.0}], "conditions": {"particle": {"step": "standardise"}},
                         "nonnegative": True}

    def __init__(self, name: str, data_dir: str = ".", source: str = "files", files: Sequence[Any] = (),
                 n_events: int = 20000, embedded_seed: int = 7, **kwargs: Any):
        if source not in ("embedded", "files"):
            raise ConfigError(f"data.source={source!r}: choose 'embedded' or 'files'")
        if source == "files" and not files:
            raise ConfigError(f"data={name}: no files listed (data.files: HDF5/.npz files or [responses, particles] "
                              ".npz pairs)")
        if source == "embedded" and files:
            raise ConfigError(f"data.files: data={name} uses the embedded simulator (data.source=embedded)")
        if n_events < 2:
            raise ConfigError(f"data.n_events={n_events}: must be >= 2")
        super().__init__(name, **kwargs)
        self.data_dir = Path(data_dir)
        self.source_kind = source
        self.entries = [self._path(f) for f in files]
        self.n_events, self.embedded_seed = int(n_events), int(embedded_seed)

    def _path(self, entry: Any) -> Any:
        if isinstance(entry, (str, Path)):
            p = Path(entry).expanduser()
            return p if p.is_absolute() else self.data_dir / p
        return [self._path(e) for e in entry]

    def prepare_data(self) -> None:
        if self.source_kind == "embedded":
            from caloexp.data.zdc_sim import ensure_embedded

            self.entries = [ensure_embedded(self.data_dir, self.n_events, self.embedded_seed)]

    def open_files(self) -> Source:
        if self.source_kind == "embedded":
            self.prepare_data()  # cached: only the first call simulates
        return ZDCFiles(self.entries)

    def writer_spec(self) -> dict[str, Any]:
        return {"format": "zdc", "conditions": {"particle": COND_KEY}}

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), source=self.source_kind, files=[str(e) for e in self.entries],
                    particle_columns=list(PARTICLE_COLUMNS))
