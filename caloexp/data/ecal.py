"""The 3DGAN ECAL HDF5 format (CERN's 3DGAN; Khattak et al., EPJC 82 (2022) 386): the one place that reads it.

A file holds ``ECAL`` (N, 51, 51, 25) cell energies (x, y, layer; GeV as stored) and the primary
energy and incident angle of each shower, in one of the layouts the 3DGAN data came in:

* variable-angle files: ``energy`` (N,) or (N, 1) in GeV and ``theta`` (N,) in radians and/or
  ``eta`` (N,) (converted: theta = 2 atan(exp(-eta))); ``theta`` wins when both are present;
* older fixed-angle files: ``target`` (N, 2+) whose second column is the energy (GeV); they have
  no angle, so every shower gets ``fixed_theta`` (degrees, default 90: perpendicular incidence).

Events become ``Sample(x=(N, 51, 51, 25), cond={"energy": GeV, "theta": radians}, kind="grid")``.
Files are read in row ranges (never whole) and every chunk is validated: shapes, missing keys,
NaN/inf and negative cells are each one :class:`~caloexp.errors.InputError` line naming the file,
the dataset and the first bad row. Generated events are written back in the same layout
(``ECAL``, ``energy``, ``theta``) by :mod:`caloexp.data.formats`.

The repository's NumPy samples (one (64, 64, 32) event per ``.npy``, the 51 x 51 x 25 image
zero-padded by 3DGAN's ``hdf_to_numpy.py``) are read by :func:`load_npy`, which crops the padding
exactly (``a[7:58, 7:58, 4:29]``); ``python -m caloexp.data.ecal`` converts them to HDF5.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from caloexp.data.base import DataModule, Source
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError, InputError

#: Cells per event: x, y (51 x 51 cells of the CLIC-like ECAL window) and 25 layers.
SHAPE = (51, 51, 25)
#: The zero padding of 3DGAN's NumPy samples: (64, 64, 32) -> SHAPE by these slices.
PAD_SHAPE = (64, 64, 32)
PAD_CROP = (slice(7, 58), slice(7, 58), slice(4, 29))


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file (3DGAN ECAL files are HDF5 with 'ECAL' and 'energy'/'target')") \
            from None


def _layout(path: Path, f: h5py.File, shape: tuple[int, ...]) -> tuple[int, str, str | None]:
    """(rows, energy key, angle key or None) of one file; one-line errors for what cannot be read."""
    keys = sorted(f.keys())
    if "ECAL" not in keys:
        raise InputError(f"{path}: missing dataset 'ECAL' (found {keys})")
    x = f["ECAL"]
    if x.ndim != 1 + len(shape) or tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"{path}: 'ECAL' has shape {x.shape}; expected (N, {', '.join(map(str, shape))}) "
                         "(x, y, layer)")
    n = int(x.shape[0])
    if "energy" in keys:
        e_key = "energy"
        e = f["energy"]
        if e.shape not in ((n,), (n, 1)):
            raise InputError(f"{path}: 'energy' has shape {e.shape} for {n} events; expected ({n},) or ({n}, 1)")
    elif "target" in keys:
        e_key = "target"
        t = f["target"]
        if t.ndim != 2 or t.shape[0] != n or t.shape[1] < 2:
            raise InputError(f"{path}: 'target' has shape {t.shape}; expected ({n}, 2+) with the energy in column 1")
    else:
        raise InputError(f"{path}: missing the primary energy: no dataset 'energy' or 'target' (found {keys})")
    a_key = "theta" if "theta" in keys else "eta" if "eta" in keys else None
    if a_key is not None and f[a_key].shape not in ((n,), (n, 1)):
        raise InputError(f"{path}: '{a_key}' has shape {f[a_key].shape} for {n} events; expected ({n},)")
    return n, e_key, a_key


def _first_bad(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


class EcalFiles(Source):
    """Rows of one or more 3DGAN ECAL files, read on demand as ``grid`` samples (energy GeV, theta rad)."""

    kind = "grid"

    def __init__(self, paths: Sequence[Path], fixed_theta: float | None = 90.0, shape: Sequence[int] = SHAPE):
        self.paths = list(paths)
        self.shape = tuple(int(s) for s in shape)
        self.fixed_theta = fixed_theta
        self.layouts = []
        sizes = []
        for p in self.paths:
            with _open(p) as f:
                n, e_key, a_key = _layout(p, f, self.shape)
            if a_key is None and fixed_theta is None:
                raise InputError(f"{p}: no incident angle ('theta' or 'eta'); set data.fixed_theta=<degrees> "
                                 "for fixed-angle files")
            self.layouts.append((e_key, a_key))
            sizes.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.shape

    def _read_file(self, i: int, a: int, b: int) -> Sample:
        path, (e_key, a_key) = self.paths[i], self.layouts[i]
        with _open(path) as f:
            try:
                x = np.asarray(f["ECAL"][a:b], dtype=np.float32)
                e = np.asarray(f[e_key][a:b], dtype=np.float64)
                ang = None if a_key is None else np.asarray(f[a_key][a:b], dtype=np.float64).reshape(-1)
            except OSError as exc:
                raise InputError(f"{path}: corrupt data in rows {a}-{b} ({exc})") from None
        e = e[:, 1] if e_key == "target" else e.reshape(-1)
        flat = x.reshape(len(x), -1)
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            raise InputError(f"{path}: 'ECAL' contains NaN/inf (first at row {a + _first_bad(bad)})")
        neg = (flat < 0).any(axis=1)
        if neg.any():
            raise InputError(f"{path}: 'ECAL' has negative cell energies (first at row {a + _first_bad(neg)})")
        what = "'target'[:, 1]" if e_key == "target" else "'energy'"
        bad = ~np.isfinite(e) | (e <= 0)
        if bad.any():
            raise InputError(f"{path}: {what} has a non-finite or non-positive primary energy "
                             f"(first at row {a + _first_bad(bad)})")
        if ang is None:
            theta = np.full(len(x), math.radians(self.fixed_theta))
        else:
            bad = ~np.isfinite(ang)
            if bad.any():
                raise InputError(f"{path}: '{a_key}' contains NaN/inf (first at row {a + _first_bad(bad)})")
            theta = ang if a_key == "theta" else 2.0 * np.arctan(np.exp(-ang))
            bad = (theta <= 0) | (theta >= math.pi)
            if bad.any():
                raise InputError(f"{path}: '{a_key}' gives an angle outside (0, pi) rad (first at row "
                                 f"{a + _first_bad(bad)}: {ang[_first_bad(bad)]:g}); 'theta' must be in radians")
        return Sample(x, {"energy": e.astype(np.float32), "theta": theta.astype(np.float32)}, "grid")

    def read(self, lo: int, hi: int) -> Sample:
        parts = []
        for i in range(len(self.paths)):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a < b:
                parts.append(self._read_file(i, int(a - self.offsets[i]), int(b - self.offsets[i])))
        if not parts:
            return Sample(np.zeros((0, *self.shape), np.float32),
                          {"energy": np.zeros(0, np.float32), "theta": np.zeros(0, np.float32)}, "grid")
        return Sample.concatenate(parts)


def load_npy(path: str | Path) -> np.ndarray:
    """Events (N, 51, 51, 25) float32 from a ``.npy`` of one or many events, padded (64, 64, 32) or not.

    Padded events (3DGAN's ``hdf_to_numpy.py``) are cropped back exactly. Nothing is unpickled.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if a.shape in (SHAPE, PAD_SHAPE):
        a = a[None]
    if a.ndim != 4 or tuple(a.shape[1:]) not in (SHAPE, PAD_SHAPE):
        raise InputError(f"{path}: array of shape {a.shape}; expected (N,) {SHAPE} or the padded (N,) {PAD_SHAPE}")
    if tuple(a.shape[1:]) == PAD_SHAPE:
        a = a[(slice(None), *PAD_CROP)]
    a = np.asarray(a, dtype=np.float32)
    flat = a.reshape(len(a), -1)
    if not np.isfinite(flat).all():
        raise InputError(f"{path}: contains NaN/inf (first at event {_first_bad(~np.isfinite(flat).all(1))})")
    if (flat < 0).any():
        raise InputError(f"{path}: has negative cell energies (first at event {_first_bad((flat < 0).any(1))})")
    return a


class EcalDataModule(DataModule):
    """3DGAN ECAL showers (``kind: grid``): the embedded grid simulator or the user's HDF5 files."""

    kind = "grid"
    default_transform = {"steps": [{"step": "energy_fraction"}, {"step": "power", "p": 0.85},
                                   {"step": "scale", "factor": 100.0}],
                         "conditions": {"energy": {"step": "linear"}, "theta": {"step": "linear"}},
                         "nonnegative": True}

    def __init__(self, name: str, data_dir: str, source: str = "files", files: Sequence[str] = (),
                 n_showers: int = 2000, embedded_seed: int = 1234, fixed_theta: float | None = 90.0,
                 **kwargs: Any):
        if source not in ("embedded", "files"):
            raise ConfigError(f"data.source={source!r}: choose 'embedded' or 'files'")
        if source == "embedded" and files:
            raise ConfigError(f"data.files={list(files)}: data={name} uses the embedded simulator; "
                              "use data=ecal data.files=[...] for files")
        if source == "files" and not files:
            raise ConfigError(f"data={name}: no files listed (data.files=[/path/to/file.h5, ...])")
        if source == "embedded" and n_showers < 2:
            raise ConfigError(f"data.n_showers={n_showers}: must be >= 2")
        if fixed_theta is not None and not 0.0 < float(fixed_theta) < 180.0:
            raise ConfigError(f"data.fixed_theta={fixed_theta}: must be in (0, 180) degrees (or null)")
        super().__init__(name, **kwargs)
        self.data_dir = Path(data_dir)
        self.source_kind = source
        self.files = list(files)
        self.n_showers = int(n_showers)
        self.embedded_seed = int(embedded_seed)
        self.fixed_theta = None if fixed_theta is None else float(fixed_theta)
        self.paths: list[Path] = []

    def prepare(self) -> list[Path]:
        if self.source_kind == "embedded":
            from caloexp.data.ecal_embedded import ensure_embedded

            return [ensure_embedded(self.data_dir, self.n_showers, self.embedded_seed)]
        paths = []
        for name in self.files:
            p = Path(name).expanduser()
            p = p if p.is_absolute() else self.data_dir / p
            if not p.exists():
                raise InputError(f"{p}: file not found")
            paths.append(p)
        return paths

    def prepare_data(self) -> None:
        self.prepare()

    def open_files(self) -> Source:
        self.paths = self.prepare()
        return EcalFiles(self.paths, self.fixed_theta)

    def writer_spec(self) -> dict[str, Any]:
        return {"format": "arrays", "x_key": "ECAL", "conditions": {"energy": "energy", "theta": "theta"},
                "kind": "grid"}

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), files=[str(p) for p in self.paths], source=self.source_kind,
                    units="ECAL cells GeV, energy GeV, theta rad")


def write(path: str | Path, x: np.ndarray, energy: np.ndarray, theta: np.ndarray | None = None) -> Path:
    """A 3DGAN-layout HDF5 file (``ECAL``, ``energy``, ``theta``) with an atomic rename."""
    from caloexp.data import arrays

    cond = {"energy": np.asarray(energy, np.float32)}
    if theta is not None:
        cond["theta"] = np.asarray(theta, np.float32)
    return arrays.write(path, Sample(np.asarray(x, np.float32), cond, "grid"), x_key="ECAL", kind="grid")


def main(argv: list[str] | None = None) -> Path:
    """``python -m caloexp.data.ecal a.npy b.npy --output f.h5 [--energy GeV --theta DEG]``: NumPy events to HDF5."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m caloexp.data.ecal",
                                 description="Convert 3DGAN NumPy ECAL events (padded 64x64x32 or 51x51x25) "
                                             "to a 3DGAN HDF5 file (ECAL, energy, theta).")
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--energy", type=float, default=None,
                    help="primary energy in GeV of every event (the NumPy samples carry none; without it the "
                         "file holds ECAL only and cannot be trained on)")
    ap.add_argument("--theta", type=float, default=None, help="incident angle in degrees of every event")
    args = ap.parse_args(argv)
    try:
        x = np.concatenate([load_npy(p) for p in args.inputs])
        from caloexp.data import arrays

        cond = {}
        if args.energy is not None:
            cond["energy"] = np.full(len(x), args.energy, np.float32)
        if args.theta is not None:
            cond["theta"] = np.full(len(x), math.radians(args.theta), np.float32)
        path = arrays.write(args.output, Sample(x, cond, "grid"), x_key="ECAL", kind="grid")
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)
    return path


if __name__ == "__main__":
    main()
