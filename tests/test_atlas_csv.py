"""The ATLAS open-data voxelisation CSVs: folders and archives read back exactly what was written, every
malformed input is one line naming the file (and line), the converter writes CaloChallenge HDF5, and the
data module trains from them (tests/test_gan2d.py runs the whole loop on CSVs the simulator wrote)."""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from caloexp import geometry as geo
from caloexp.data import atlas_csv as ac
from caloexp.data import calochallenge
from caloexp.errors import ConfigError, InputError

from conftest import random_showers

PHOTONS = geo.builtin("dataset_1_photons")
PIONS = geo.builtin("dataset_1_pions")


def showers(n: int = 60, n_voxels: int = 368, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Showers at three energies (random sparse voxels), some cells with long decimals."""
    e, s = random_showers(n, n_voxels, seed)
    e = np.array([1024.0, 65536.0, 256.0])[np.arange(n) % 3].astype(np.float32)
    return e, s


def by_energy(e: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(e, kind="stable")
    return e[o], s[o]


@pytest.mark.parametrize("form", ["folder", "tgz"])
def test_written_csvs_read_back_exactly(form, tmp_path):
    e, s = showers()
    out = ac.write_csvs(tmp_path / ("csv" if form == "folder" else "photon_samples.tgz"), e, s)
    src = ac.open_path(out, PHOTONS)
    got = src.read(0, len(src))
    want_e, want_s = by_energy(e, s)
    assert len(src) == 60 and src.event_shape == (368,)
    np.testing.assert_array_equal(got.x, want_s)          # %.9g text holds float32 exactly
    np.testing.assert_array_equal(got.energies, want_e)   # the energy comes from the file name
    np.testing.assert_array_equal(src.read(13, 47).x, want_s[13:47])   # blocks across files
    names = sorted(p.name for p in out.iterdir()) if form == "folder" else None
    if names:
        assert names == ["pid22_E1024_eta_20_25_voxalisation.csv", "pid22_E256_eta_20_25_voxalisation.csv",
                         "pid22_E65536_eta_20_25_voxalisation.csv"]


def test_header_crlf_blank_lines_and_per_energy(tmp_path):
    e, s = showers(9)
    body = ac.csv_bytes(s[:3]).replace(b"\n", b"\r\n")
    header = (",".join(f"v{i}" for i in range(368)) + "\r\n").encode()
    (tmp_path / "pid22_E1024_eta_20_25_voxalisation.csv").write_bytes(header + body + b"\r\n\n")
    src = ac.open_path(tmp_path, PHOTONS)          # header: auto skips a line that is not all numbers
    assert len(src) == 3
    np.testing.assert_array_equal(src.read(0, 3).x, s[:3])
    assert len(ac.open_path(tmp_path, PHOTONS, per_energy=2)) == 2
    with pytest.raises(InputError, match=r"line 1 column 1: non-numeric cell 'v0'"):
        ac.open_path(tmp_path, PHOTONS, header="false").read(0, 1)
    # header=true drops the first line even when it is numbers
    (tmp_path / "pid22_E1024_eta_20_25_voxalisation.csv").write_bytes(body)
    assert len(ac.open_path(tmp_path, PHOTONS, header="true")) == 2


def _folder(tmp_path: Path, text: bytes, name: str = "pid22_E4096_eta_20_25_voxalisation.csv") -> Path:
    d = tmp_path / "csv"
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(text)
    return d / name


def _rows(n: int = 4, cols: int = 368) -> list[list[str]]:
    return [["0.5"] * cols for _ in range(n)]


def _text(rows) -> bytes:
    return ("\n".join(",".join(r) for r in rows) + "\n").encode()


def _bad_rows(kind: str):
    rows = _rows()
    if kind == "short":
        rows[2] = rows[2][:-1]
    elif kind == "phimod_eta":
        rows = [["1.2", "0.22"] + r for r in rows]
    elif kind == "text":
        rows[2][7] = "abc"
    elif kind == "empty":
        rows[2][7] = ""
    elif kind == "nan":
        rows[2][7] = "nan"
    elif kind == "inf":
        rows[2][7] = "-inf"
    elif kind == "negative":
        rows[2][7] = "-3.5"
    return rows


@pytest.mark.parametrize("kind, match", [
    ("short", r"line 3 has 367 columns, expected 368 voxels$"),
    ("phimod_eta", r"line 1 has 370 columns, expected 368 voxels; the first two columns look like phiMod and eta"),
    ("text", r"line 3 column 8: non-numeric cell 'abc'$"),
    ("empty", r"line 3 column 8: an empty cell$"),
    ("nan", r"line 3 column 8: nan \(NaN/inf voxel energy\)$"),
    ("inf", r"line 3 column 8: -inf \(NaN/inf voxel energy\)$"),
    ("negative", r"line 3 column 8: negative voxel energy -3.5 MeV \(data.negative=clip clips"),
])
@pytest.mark.parametrize("form", ["folder", "tgz"])
def test_each_malformed_file_is_one_line_naming_file_and_line(kind, match, form, tmp_path):
    path = _folder(tmp_path, _text(_bad_rows(kind)))
    where = path.parent
    if form == "tgz":
        where = tmp_path / "bad.tgz"
        with tarfile.open(where, "w:gz") as tar:
            tar.add(path, arcname=f"photons/{path.name}")
    with pytest.raises(InputError, match=match) as info:
        src = ac.open_path(where, PHOTONS, negative="error")
        src.read(0, len(src))
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg


def test_negative_cells_are_clipped_by_default_and_said(tmp_path, caplog):
    rows = _bad_rows("negative")
    rows[0][0] = "-0.25"
    _folder(tmp_path, _text(rows))
    with caplog.at_level(logging.WARNING, logger="caloexp.data.atlas_csv"):
        src = ac.open_path(tmp_path / "csv", PHOTONS)
        x = src.read(0, len(src)).x
    assert x.min() == 0.0 and x[2, 7] == 0.0 and x[0, 0] == 0.0 and x[1, 0] == 0.5
    assert "2 negative voxel energies clipped to 0 (as the CaloChallenge dataset-1 conversion did" in caplog.text


@pytest.mark.parametrize("name, files, match", [
    ("photons_E1024.csv", None, r"photons_E1024.csv: file name does not read pid<PID>_E<MeV>_eta_<min>_<max>_voxalisation"),
    ("pid22_E0_eta_20_25_voxalisation.csv", None, r"incident energy E0 MeV in the file name must be > 0"),
    (None, ["pid22_E256_eta_20_25_voxalisation.csv", "pid211_E512_eta_20_25_voxalisation.csv"],
     r"mixes particles pid \[22, 211\]"),
    (None, ["pid22_E256_eta_20_25_voxalisation.csv", "pid22_E512_eta_40_45_voxalisation.csv"],
     r"mixes eta ranges \[\[20, 25\], \[40, 45\]\]"),
    (None, ["pid211_E256_eta_20_25_voxalisation.csv"], r"files are pid 211 \(dataset_1_pions\) but "
                                                        r"data.geometry=dataset_1_photons; set data.geometry=dataset_1_pions"),
])
def test_file_set_errors(name, files, match, tmp_path):
    for n in files or [name]:
        _folder(tmp_path, _text(_rows()), n)
    with pytest.raises(InputError, match=match):
        ac.open_path(tmp_path / "csv", PHOTONS)


def test_path_and_setting_errors(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: not found \(data.path: a folder of"):
        ac.open_path(tmp_path / "nowhere", PHOTONS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no pid<PID>_E<MeV>_eta_<min>_<max>_voxalisation.csv files"):
        ac.open_path(tmp_path / "empty", PHOTONS)
    (tmp_path / "x.h5").write_bytes(b"123")
    with pytest.raises(InputError, match="x.h5: neither a folder nor a .tgz"):
        ac.open_path(tmp_path / "x.h5", PHOTONS)
    (tmp_path / "broken.tgz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputError, match="broken.tgz: (not a readable tar archive|corrupt archive)"):
        ac.open_path(tmp_path / "broken.tgz", PHOTONS)
    with pytest.raises(ConfigError, match="data.negative='drop'"):
        ac.open_path(tmp_path, PHOTONS, negative="drop")
    with pytest.raises(ConfigError, match="data.header='maybe'"):
        _folder(tmp_path, _text(_rows()))
        ac.open_path(tmp_path / "csv", PHOTONS, header="maybe")


def test_pion_files_have_their_own_voxel_count_and_convert(tmp_path):
    e, s = showers(30, PIONS.n_voxels, seed=2)
    folder = ac.write_csvs(tmp_path / "pions", e, s, pid=211)
    assert all(p.name.startswith("pid211_") for p in folder.iterdir())
    out = ac.convert(folder, tmp_path / "pions.hdf5")             # geometry from the pid in the names
    got = calochallenge.read(out, PIONS)
    want_e, want_s = by_energy(e, s)
    np.testing.assert_array_equal(got.showers, want_s)
    np.testing.assert_array_equal(got.energies, want_e)
    with pytest.raises(InputError, match="x.csv: line 1 has 533 columns, expected 368 voxels"):
        ac.parse_lines(ac.csv_bytes(s[:1]), 368, "x.csv")     # pion rows read as photons


def test_cli_writes_the_embedded_photons_and_converts_them(tmp_path, capsys):
    from caloexp.data.embedded import simulate

    tgz = ac.main(["embedded", str(tmp_path / "sim.tgz"), "--n-showers", "60", "--seed", "5"])
    h5 = ac.main(["convert", str(tgz), str(tmp_path / "sim.hdf5"), "--per-energy", "3"])
    assert capsys.readouterr().out.split() == [str(tgz), str(h5)]
    got = calochallenge.read(h5, PHOTONS)
    sim = simulate(60, seed=5, geometry=PHOTONS)
    want_e, want_s = by_energy(sim.energies, sim.showers)
    keep = np.concatenate([np.flatnonzero(want_e == v)[:3] for v in np.unique(want_e)])
    assert len(got) == 45                                     # 3 per energy of the 15
    np.testing.assert_array_equal(got.showers, want_s[keep])
    with pytest.raises(SystemExit) as info:
        ac.main(["convert", str(tmp_path / "missing"), str(tmp_path / "o.hdf5")])
    assert info.value.code == 2 and "missing: neither a folder" in capsys.readouterr().err


def test_data_module_splits_streams_and_refuses_bad_settings(tmp_path):
    e, s = showers(90)
    folder = ac.write_csvs(tmp_path / "csv", e, s)
    kw = dict(name="atlas_csv", data_dir=str(tmp_path), batch_size=16, eval_events=10)
    dm = ac.AtlasCsvDataModule(path=str(folder), streaming=True, buffer_mb=0.05, block_events=8, **kw).setup()
    dm.fit_transform()
    batches = list(dm.train_batches(0))
    assert dm.event_shape == (368,) and len(batches) == 72 // 16 and batches[0].x.shape == (16, 368)
    assert len(dm.reference()) == 10 and dm.describe()["format"] == "atlas_csv"
    assert dm.writer_spec() == {"format": "calochallenge", "geometry": "dataset_1_photons"}
    with pytest.raises(ConfigError, match="data.max_events=50: .* use data.per_energy"):
        ac.AtlasCsvDataModule(path=str(folder), max_events=50, **kw)
    tgz = ac.write_csvs(tmp_path / "a.tgz", e, s)
    with pytest.raises(ConfigError, match="data.streaming=true needs random access: extract"):
        ac.AtlasCsvDataModule(path=str(tgz), streaming=True, **kw).setup()
    with pytest.raises(ConfigError, match="data.path: give a folder"):
        ac.AtlasCsvDataModule(path="???", **kw)


def test_archive_members_are_read_not_extracted(tmp_path):
    e, s = showers(6)
    tgz = tmp_path / "evil.tgz"
    data = ac.csv_bytes(s[:2])
    with tarfile.open(tgz, "w:gz") as tar:
        for name in ("../../escape/pid22_E256_eta_20_25_voxalisation.csv", "README.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = ac.open_path(tgz, PHOTONS)
    assert len(src) == 2 and not (tmp_path.parent / "escape").exists()
