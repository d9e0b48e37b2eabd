"""The ATLAS open-data FastCaloGAN voxelisation CSVs, the files CaloChallenge dataset 1 was built from.

CERN Open Data record 15012 ("Datasets used to train the GANs in AtlFast3", https://opendata.cern.ch/record/15012)
publishes archives such as ``photon_samples.tgz``, ``photons_samples_highStat.tgz`` and ``pion_samples.tgz``.
Each holds one CSV per incident energy (256 MeV .. 4 TeV in powers of two), named
``pid<PDG id>_E<MeV>_eta_<10|eta|_min>_<10|eta|_max>_voxalisation.csv`` (e.g.
``pid22_E65536_eta_20_25_voxalisation.csv``): one shower per line, its voxel energies in MeV in the
CaloChallenge voxel order (layer, then alpha, then r), no header. Photons (pid 22) have the 368
voxels of the dataset-1 photon binning, pions (pid 211) the 533 of the pion binning. The incident
energy comes from the file name. The CaloChallenge conversion (its ``Dataset_creation.ipynb``)
refused NaN and clipped negative cells to 0; so does this reader by default (``negative: clip``,
logged per file), or it refuses them (``negative: error``).

A folder is indexed once (line offsets, in bounded memory) and read in row blocks on demand, so
``streaming: true`` works on it; a ``.tgz`` is read member by member in one pass (into memory).
Every problem is one :class:`~caloexp.errors.InputError` line naming the file (and line, column):
a malformed file name, a short or long row, a non-numeric or empty cell, NaN/inf, a negative cell.

``python -m caloexp.data.atlas_csv convert <folder|.tgz> <out.hdf5>`` writes a CaloChallenge HDF5 file;
``python -m caloexp.data.atlas_csv embedded <folder|.tgz>`` writes the embedded simulator's photons as
such CSVs, so the whole path runs offline.
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from caloexp import geometry as geo
from caloexp.data.base import MemorySource, Source
from caloexp.data.datamodule import ShowerDataModule
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError, InputError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"pid(\d+)_E(\d+)_eta_(\d+)_(\d+)_voxalisation\.csv")
NAME_FORM = "pid<PID>_E<MeV>_eta_<min>_<max>_voxalisation.csv"
#: The CaloChallenge dataset-1 binning of each particle's files.
GEOMETRY_OF_PID = {22: "dataset_1_photons", 211: "dataset_1_pions"}
SCAN_BYTES = 1 << 24      # bytes read at a time while indexing a file


@dataclass(frozen=True)
class CsvName:
    """What a file name says: PDG id, incident energy (MeV), eta range (x 100)."""

    pid: int
    energy: float
    eta: tuple[int, int]


def parse_name(name: str, where: str | Path) -> CsvName:
    """Fields of a ``pid<PID>_E<MeV>_eta_<a>_<b>_voxalisation.csv`` name; InputError otherwise."""
    m = NAME_RE.fullmatch(Path(name).name)
    if m is None:
        raise InputError(f"{where}: file name does not read {NAME_FORM} (the incident energy comes from the name)")
    pid, energy, lo, hi = (int(g) for g in m.groups())
    if energy <= 0:
        raise InputError(f"{where}: incident energy E{energy} MeV in the file name must be > 0")
    return CsvName(pid, float(energy), (lo, hi))


def _numeric(line: str) -> bool:
    try:
        [float(t) for t in line.split(",")]
    except ValueError:
        return False
    return True


def _first_bad_cell(lines: Sequence[str], numbers: np.ndarray) -> tuple[int, int, str]:
    """(line number, column, cell) of the first cell that is not a number (only called on an error)."""
    for line, no in zip(lines, numbers):
        for j, tok in enumerate(line.split(",")):
            try:
                float(tok)
            except ValueError:
                return int(no), j + 1, tok
    return int(numbers[0]), 0, ""


def parse_lines(data: bytes, n_cols: int, where: str, first_line: int = 1,
                negative: str = "clip") -> tuple[np.ndarray, int]:
    """Showers (N, n_cols) float32 MeV from complete CSV lines; (array, number of negative cells clipped).

    Blank lines are skipped; ``first_line`` is the file line number of the first line of ``data``
    (errors name file lines, 1-based). Column counts are checked for all lines at once.
    """
    text = data.decode("latin-1").replace("\r", "")
    lines = text.split("\n")
    numbers = first_line + np.arange(len(lines))
    keep = np.array([bool(s.strip()) for s in lines], dtype=bool) if lines else np.zeros(0, bool)
    lines = [s for s, k in zip(lines, keep) if k]
    numbers = numbers[keep]
    if not lines:
        return np.zeros((0, n_cols), np.float32), 0
    cols = np.array([s.count(",") for s in lines]) + 1
    bad = np.flatnonzero(cols != n_cols)
    if len(bad):
        i = int(bad[0])
        hint = ("; the first two columns look like phiMod and eta of the internal FastCaloGAN files: drop them"
                if cols[i] == n_cols + 2 else "")
        raise InputError(f"{where}: line {numbers[i]} has {cols[i]} columns, expected {n_cols} voxels{hint}")
    try:
        x = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        no, col, tok = _first_bad_cell(lines, numbers)
        what = "an empty cell" if not tok.strip() else f"non-numeric cell {tok.strip()[:20]!r}"
        raise InputError(f"{where}: line {no} column {col}: {what}") from None
    finite = np.isfinite(x)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise InputError(f"{where}: line {numbers[r]} column {c + 1}: {x[r, c]} (NaN/inf voxel energy)")
    neg = x < 0
    n_neg = int(neg.sum())
    if n_neg:
        if negative != "clip":
            r, c = np.argwhere(neg)[0]
            raise InputError(f"{where}: line {numbers[r]} column {c + 1}: negative voxel energy {x[r, c]:.4g} MeV "
                             "(data.negative=clip clips such cells to 0, as the CaloChallenge conversion did)")
        np.maximum(x, 0.0, out=x)
    return x.astype(np.float32), n_neg


def _header(first: str, header: str | bool, where: str) -> bool:
    """Whether the first line is a header: ``auto`` = it is not all numbers."""
    if header in (True, "true"):
        return True
    if header in (False, "false"):
        return False
    if header != "auto":
        raise ConfigError(f"data.header={header!r}: choose auto, true or false")
    return bool(first.strip()) and not _numeric(first.replace("\r", ""))


def _warn_clipped(where: str, n: int) -> None:
    log.warning("%s: %d negative voxel energies clipped to 0 (as the CaloChallenge dataset-1 conversion did; "
                "data.negative=error refuses them)", where, n)


# --------------------------------------------------------------------- folders
class CsvFile:
    """One CSV on disk, indexed once: the byte offset and line number of every non-blank data line."""

    def __init__(self, path: Path, n_cols: int, header: str | bool = "auto", limit: int | None = None):
        self.path, self.n_cols = path, n_cols
        self.info = parse_name(path.name, path)
        newlines, size = [], 0
        with open(path, "rb") as fh:
            while block := fh.read(SCAN_BYTES):
                newlines.append(size + np.flatnonzero(np.frombuffer(block, np.uint8) == 10))
                size += len(block)
        line_start = np.concatenate([[0], *[n + 1 for n in newlines]]).astype(np.int64)
        line_start = line_start[line_start < size]
        line_end = np.append(line_start[1:], size)
        length = line_end - line_start
        blank = length <= 2     # nothing but a newline (and maybe a carriage return)? only these few are read
        with open(path, "rb") as fh:
            for i in np.flatnonzero(blank):
                fh.seek(int(line_start[i]))
                blank[i] = not fh.read(int(length[i])).strip()
            fh.seek(0)
            first = fh.read(int(min(length[0], 1 << 20))) if len(line_start) else b""
        self.has_header = bool(len(line_start)) and _header(first.decode("latin-1"), header, str(path))
        data = ~blank
        if self.has_header:
            data[0] = False
        self.starts, self.ends = line_start[data][:limit], line_end[data][:limit]
        self.numbers = (np.arange(1, len(line_start) + 1)[data])[:limit]
        self._clipped_warned = False

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, a: int, b: int, negative: str) -> np.ndarray:
        if b <= a:
            return np.zeros((0, self.n_cols), np.float32)
        lo, hi = int(self.starts[a]), int(self.ends[b - 1])
        with open(self.path, "rb") as fh:
            fh.seek(lo)
            data = fh.read(hi - lo)
        x, n_neg = parse_lines(data, self.n_cols, str(self.path), int(self.numbers[a]), negative)
        if n_neg and not self._clipped_warned:
            _warn_clipped(str(self.path), n_neg)
            self._clipped_warned = True
        return x


def _check_set(names: Sequence[CsvName], where: str, geometry: geo.Geometry) -> None:
    pids = sorted({n.pid for n in names})
    etas = sorted({n.eta for n in names})
    if len(pids) > 1:
        raise InputError(f"{where}: mixes particles pid {pids}; point data.path at one particle's files")
    if len(etas) > 1:
        raise InputError(f"{where}: mixes eta ranges {[list(e) for e in etas]}; point data.path at one range")
    energies = [n.energy for n in names]
    if len(set(energies)) != len(energies):
        raise InputError(f"{where}: two files with the same incident energy")
    expect = GEOMETRY_OF_PID.get(pids[0])
    if expect is not None and geometry.particle != geo.builtin(expect).particle and geometry.name != expect:
        raise InputError(f"{where}: files are pid {pids[0]} ({expect}) but data.geometry={geometry.name}; "
                         f"set data.geometry={expect}")


class CsvFolder(Source):
    """Every ``*.csv`` of a folder (all must be named ``pid.._E.._eta_.._.._voxalisation.csv``), read on demand."""

    kind = "calo"

    def __init__(self, folder: Path, geometry: geo.Geometry, header: str | bool = "auto", negative: str = "clip",
                 per_energy: int | None = None):
        csvs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and not p.name.startswith("."))
        if not csvs:
            raise InputError(f"{folder}: no {NAME_FORM} files in this folder")
        names = [parse_name(p.name, p) for p in csvs]
        _check_set(names, str(folder), geometry)
        order = np.argsort([n.energy for n in names], kind="stable")
        self.geometry, self.negative = geometry, negative
        self.files = [CsvFile(csvs[i], geometry.n_voxels, header, per_energy) for i in order]
        self.paths = [f.path for f in self.files]
        self.offsets = np.concatenate([[0], np.cumsum([len(f) for f in self.files])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.geometry.n_voxels,)

    def read(self, lo: int, hi: int) -> Sample:
        xs, es = [np.zeros((0, self.geometry.n_voxels), np.float32)], [np.zeros(0, np.float32)]
        for i, f in enumerate(self.files):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a < b:
                x = f.read(int(a - self.offsets[i]), int(b - self.offsets[i]), self.negative)
                xs.append(x)
                es.append(np.full(len(x), f.info.energy, np.float32))
        return Sample(np.concatenate(xs), {"energy": np.concatenate(es)}, "calo")


# -------------------------------------------------------------------- archives
def iter_archive(path: Path, geometry: geo.Geometry, header: str | bool = "auto", negative: str = "clip",
                 per_energy: int | None = None, chunk_bytes: int = 1 << 25) -> Iterator[tuple[CsvName, np.ndarray]]:
    """(name, showers) blocks of a ``.tgz``/``.tar.gz``/``.tar`` of voxelisation CSVs, member by member in one pass
    (blocks of about ``chunk_bytes``). Members are only read, never extracted; other files are ignored."""
    try:
        tar = tarfile.open(path, "r|*")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: not a readable tar archive ({exc})") from None
    seen: list[CsvName] = []
    with tar:
        try:
            for member in tar:
                base = Path(member.name).name
                if not member.isfile() or not base.lower().endswith(".csv") or base.startswith("."):
                    continue
                where = f"{path}:{member.name}"
                info = parse_name(base, where)
                seen.append(info)
                _check_set(seen, str(path), geometry)
                fh = tar.extractfile(member)
                yield from _stream_member(fh, info, where, geometry.n_voxels, header, negative, per_energy, chunk_bytes)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InputError(f"{path}: corrupt archive ({exc.__class__.__name__}: {exc})") from None
    if not seen:
        raise InputError(f"{path}: no {NAME_FORM} files in this archive")


def _stream_member(fh, info: CsvName, where: str, n_cols: int, header, negative: str, per_energy: int | None,
                   chunk_bytes: int) -> Iterator[tuple[CsvName, np.ndarray]]:
    line, rest, first, n_rows, n_neg = 1, b"", True, 0, 0
    while per_energy is None or n_rows < per_energy:
        block = fh.read(chunk_bytes)
        data = rest + block
        if not block:
            cut = len(data)
        else:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
        body, rest = data[:cut], data[cut:]
        if first and body:
            end = body.find(b"\n")
            head = body[:end if end >= 0 else len(body)]
            if _header(head.decode("latin-1"), header, where):
                body = body[end + 1:] if end >= 0 else b""
                line += 1
            first = False
        x, neg = parse_lines(body, n_cols, where, line, negative)
        line += body.count(b"\n")
        n_neg += neg
        if per_energy is not None:
            x = x[:per_energy - n_rows]
        n_rows += len(x)
        if len(x):
            yield info, x
        if not block:
            break
    if n_neg:
        _warn_clipped(where, n_neg)


def is_archive(path: Path) -> bool:
    return path.is_file() and (path.name.endswith((".tgz", ".tar.gz", ".tar")))


def read_archive(path: Path, geometry: geo.Geometry, header: str | bool = "auto", negative: str = "clip",
                 per_energy: int | None = None) -> Sample:
    """All showers of an archive, in memory, ordered by incident energy."""
    parts = list(iter_archive(path, geometry, header, negative, per_energy))
    order = np.argsort([info.energy for info, _ in parts], kind="stable")
    x = np.concatenate([parts[i][1] for i in order])
    e = np.concatenate([np.full(len(parts[i][1]), parts[i][0].energy, np.float32) for i in order])
    return Sample(x, {"energy": e}, "calo")


class CsvArchive(MemorySource):
    """The showers of a ``.tgz`` of voxelisation CSVs, read in one pass into memory."""

    def __init__(self, path: Path, geometry: geo.Geometry, header: str | bool = "auto", negative: str = "clip",
                 per_energy: int | None = None):
        super().__init__(read_archive(path, geometry, header, negative, per_energy))
        self.paths = [path]


def open_path(path: str | Path, geometry: geo.Geometry, header: str | bool = "auto", negative: str = "clip",
              per_energy: int | None = None) -> Source:
    """A folder or an archive of voxelisation CSVs as a :class:`~caloexp.data.base.Source`."""
    path = Path(path).expanduser()
    if negative not in ("clip", "error"):
        raise ConfigError(f"data.negative={negative!r}: choose clip (as the CaloChallenge conversion) or error")
    if per_energy is not None and int(per_energy) < 1:
        raise ConfigError(f"data.per_energy={per_energy}: must be >= 1 (or null for all rows)")
    if path.is_dir():
        return CsvFolder(path, geometry, header, negative, per_energy)
    if is_archive(path):
        return CsvArchive(path, geometry, header, negative, per_energy)
    if not path.exists():
        raise InputError(f"{path}: not found (data.path: a folder of {NAME_FORM} files or a .tgz of them)")
    raise InputError(f"{path}: neither a folder nor a .tgz/.tar.gz/.tar archive of {NAME_FORM} files")


# ------------------------------------------------------------------ data module
class AtlasCsvDataModule(ShowerDataModule):
    """Showers from the ATLAS voxelisation CSVs (``kind: calo``, CaloChallenge dataset-1 geometry)."""

    def __init__(self, name: str, path: str, geometry: str = "dataset_1_photons", header: str | bool = "auto",
                 negative: str = "clip", per_energy: int | None = None, data_dir: str = ".", **kwargs: Any):
        if kwargs.get("max_events") is not None:
            raise ConfigError(f"data.max_events={kwargs['max_events']}: the CSV rows are ordered by energy, so the first "
                              "rows would be the low energies only; use data.per_energy (rows per energy file)")
        if path in (None, "", "???"):
            raise ConfigError("data.path: give a folder of voxelisation CSVs or a .tgz of them")
        super().__init__(name, geometry=geometry, data_dir=data_dir, source="files", **kwargs)
        self.path = Path(str(path)).expanduser()
        self.header, self.negative = header, str(negative)
        self.per_energy = None if per_energy is None else int(per_energy)

    def prepare(self) -> list[Path]:
        return [self.path]

    def open_files(self) -> Source:
        if self.streaming and is_archive(self.path):
            raise ConfigError(f"data.streaming=true needs random access: extract {self.path} "
                              f"(tar xzf) and set data.path to the folder")
        src = open_path(self.path, self.geometry, self.header, self.negative, self.per_energy)
        self.paths = list(getattr(src, "paths", [self.path]))
        return src

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), path=str(self.path), format="atlas_csv", negative=self.negative)


# ---------------------------------------------------------------------- writing
def file_name(pid: int, energy: float, eta: tuple[int, int] = (20, 25)) -> str:
    return f"pid{pid}_E{int(round(energy))}_eta_{eta[0]}_{eta[1]}_voxalisation.csv"


def csv_bytes(showers: np.ndarray) -> bytes:
    """Rows of voxel energies as CSV text (``%.9g``: float32 values read back exactly)."""
    buf = io.StringIO()
    np.savetxt(buf, np.asarray(showers, np.float32), fmt="%.9g", delimiter=",")
    return buf.getvalue().encode("ascii")


def write_csvs(out: str | Path, energies: np.ndarray, showers: np.ndarray, pid: int = 22,
               eta: tuple[int, int] = (20, 25)) -> Path:
    """Write showers as one voxelisation CSV per incident energy into a folder, or a ``.tgz`` of them."""
    out = Path(out)
    energies = np.asarray(energies).reshape(-1)
    files = {file_name(pid, e, eta): csv_bytes(showers[energies == e]) for e in np.unique(energies)}
    if out.name.endswith((".tgz", ".tar.gz")):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        with tarfile.open(tmp, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{out.name.split('.')[0]}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        tmp.replace(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def write_embedded(out: str | Path, n_showers: int = 15000, seed: int = 1234) -> Path:
    """The embedded simulator's photons (the same showers as ``data=embedded`` for that seed) as CSVs."""
    from caloexp.data.embedded import simulate

    g = geo.builtin("dataset_1_photons")
    data = simulate(n_showers, seed=seed, geometry=g)
    return write_csvs(out, data.energies, data.showers, pid=22)


def convert(path: str | Path, out: str | Path, geometry: str | None = None, header: str | bool = "auto",
            negative: str = "clip", per_energy: int | None = None) -> Path:
    """A folder/archive of voxelisation CSVs -> one CaloChallenge HDF5 file (energy order), streamed."""
    from caloexp.data.calochallenge import ShowerWriter

    path = Path(path)
    g = geo.load(geometry) if geometry else _geometry_from_names(path)
    if is_archive(path):
        blocks = ((np.full(len(x), info.energy), x) for info, x in iter_archive(path, g, header, negative, per_energy))
    else:
        src = open_path(path, g, header, negative, per_energy)

        def folder_blocks(rows: int = 10_000):
            for lo in range(0, len(src), rows):
                s = src.read(lo, min(lo + rows, len(src)))
                yield s.energies, s.x
        blocks = folder_blocks()
    with ShowerWriter(out, g.n_voxels) as w:
        for e, x in blocks:
            w.append(e, x)
    return Path(out)


def _geometry_from_names(path: Path) -> geo.Geometry:
    """The binning of the particle the file names give (pid 22: photons, 211: pions)."""
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.suffix.lower() == ".csv" and not p.name.startswith(".")]
    elif is_archive(path):
        with tarfile.open(path, "r|*") as tar:
            names = [Path(m.name).name for m in tar if m.isfile() and m.name.lower().endswith(".csv")]
    else:
        raise InputError(f"{path}: neither a folder nor a .tgz/.tar.gz/.tar archive of {NAME_FORM} files")
    pids = {parse_name(n, path).pid for n in names if not n.startswith(".")}
    if len(pids) != 1 or next(iter(pids)) not in GEOMETRY_OF_PID:
        raise InputError(f"{path}: file names give pid {sorted(pids)}; give --geometry (a name or binning XML)")
    return geo.builtin(GEOMETRY_OF_PID[pids.pop()])


def main(argv: list[str] | None = None) -> Path:
    """``convert <folder|tgz> <out.hdf5>`` or ``embedded <folder|tgz>``; prints the path written."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m caloexp.data.atlas_csv", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="voxelisation CSVs (folder or .tgz) -> CaloChallenge HDF5")
    c.add_argument("path", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--geometry", default=None, help="binning name or XML (default: from the pid in the file names)")
    c.add_argument("--per-energy", type=int, default=None, help="first N rows of each file (default: all)")
    c.add_argument("--negative", default="clip", choices=["clip", "error"])
    c.add_argument("--header", default="auto", choices=["auto", "true", "false"])
    e = sub.add_parser("embedded", help="write the embedded simulator's photons as voxelisation CSVs")
    e.add_argument("output", type=Path, help="a folder, or a .tgz file")
    e.add_argument("--n-showers", type=int, default=15000, help="showers over the 15 energies (default %(default)s)")
    e.add_argument("--seed", type=int, default=1234, help="simulator seed (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "convert":
            out = convert(args.path, args.output, args.geometry, args.header, args.negative, args.per_energy)
        else:
            if args.n_showers < 1:
                raise InputError(f"--n-showers={args.n_showers} must be >= 1")
            out = write_embedded(args.output, args.n_showers, args.seed)
    except (InputError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)
    return out


if __name__ == "__main__":
    main()
