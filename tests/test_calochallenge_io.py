import h5py
import numpy as np
import pytest

from caloexp import geometry as geo
from caloexp.data import calochallenge as cc
from caloexp.errors import InputError

from conftest import random_showers

G = geo.builtin("dataset_1_photons")


def write_raw(path, energies, showers):
    with h5py.File(path, "w") as f:
        if energies is not None:
            f["incident_energies"] = energies
        if showers is not None:
            f["showers"] = showers
    return path


def test_roundtrip_and_chunked_reading(tmp_path):
    e, s = random_showers(1000)
    path = cc.write(tmp_path / "a.hdf5", e, s, geometry=G)
    with h5py.File(path) as f:  # exactly the CaloChallenge layout
        assert f["incident_energies"].shape == (1000, 1) and f["showers"].shape == (1000, 368)
    back = cc.read(path, geometry=G)
    np.testing.assert_array_equal(back.showers, s)
    np.testing.assert_array_equal(back.energies, e)
    chunks = list(cc.iter_chunks(path, chunk_size=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([c.showers for c in chunks]), s)
    assert len(cc.read(path, start=100, stop=250)) == 150


def test_streaming_writer(tmp_path):
    e, s = random_showers(500)
    with cc.ShowerWriter(tmp_path / "w.hdf5", 368) as w:
        w.append(e[:200], s[:200])
        w.append(e[200:], s[200:])
    np.testing.assert_array_equal(cc.read(tmp_path / "w.hdf5").showers, s)
    assert not (tmp_path / "w.hdf5.part").exists()


def test_read_refuses_what_does_not_fit(tmp_path):
    e, s = random_showers(100)
    path = cc.write(tmp_path / "a.hdf5", e, s)
    with pytest.raises(InputError, match="iter_chunks"):
        cc.read(path, max_bytes=1000)


@pytest.mark.parametrize("case, match", [
    ("missing_key", "missing dataset 'showers'"),
    ("wrong_voxels", "367 voxels but geometry dataset_1_photons has 368"),
    ("count_mismatch", "10 incident energies but 9 showers"),
    ("energy_shape", r"shape \(10, 2\)"),
    ("nan_voxel", "'showers' contains NaN/inf \\(first at row 3\\)"),
    ("nan_energy", "'incident_energies' contains NaN/inf"),
    ("negative_voxel", "negative voxel energy at row 5"),
    ("zero_energy", "non-positive incident energy"),
])
def test_bad_files_give_one_clear_line(tmp_path, case, match):
    e, s = random_showers(10)
    e = e.reshape(-1, 1)
    if case == "missing_key":
        s = None
    elif case == "wrong_voxels":
        s = s[:, :367]
    elif case == "count_mismatch":
        s = s[:9]
    elif case == "energy_shape":
        e = np.hstack([e, e])
    elif case == "nan_voxel":
        s[3, 7] = np.nan
    elif case == "nan_energy":
        e[2] = np.inf
    elif case == "negative_voxel":
        s[5, 0] = -1.0
    elif case == "zero_energy":
        e[4] = 0.0
    path = write_raw(tmp_path / f"{case}.hdf5", e, s)
    with pytest.raises(InputError, match=match) as info:
        cc.read(path, geometry=G)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        cc.read(tmp_path / "nope.hdf5")
    bad = tmp_path / "corrupt.hdf5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        cc.read(bad)


@pytest.mark.parametrize("name, content, looks_like", [
    ("showers.csv.hdf5", b"incident_energy,v0,v1\n65536,0.1,0.2\n", "CSV/TSV text"),
    ("arr.hdf5", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", "a NumPy .npy array"),
    ("arr.npz", b"PK\x03\x04" + b"\x00" * 64, "a ZIP archive"),
    ("dl.hdf5", b"\x1f\x8b\x08\x00" + b"\x00" * 64, "a gzip-compressed file"),
    ("page.hdf5", b"<!DOCTYPE html><html><body>Not Found</body></html>", "XML/HTML text"),
    ("empty.hdf5", b"", "an empty file"),
])
def test_files_of_another_format_name_the_accepted_format(tmp_path, name, content, looks_like):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        cc.inspect(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not an HDF5 file (looks like {looks_like}") and "\n" not in msg
    assert "caloexp reads CaloChallenge HDF5 (.hdf5/.h5)" in msg and "'showers' (N,n_voxels)" in msg


def test_hdf5_with_wrong_kind_of_content_names_the_accepted_format(tmp_path):
    grp = tmp_path / "group.hdf5"
    with h5py.File(grp, "w") as f:
        f.create_group("showers")
        f["incident_energies"] = np.ones((3, 1))
    with pytest.raises(InputError, match="'showers' is an HDF5 group, not a dataset; caloexp reads CaloChallenge"):
        cc.read(grp)
    txt = tmp_path / "strings.hdf5"
    with h5py.File(txt, "w") as f:
        f["incident_energies"] = np.array([b"a", b"b"])
        f["showers"] = np.ones((2, 368))
    with pytest.raises(InputError, match="'incident_energies' holds \\|S1 values, not numbers"):
        cc.read(txt)
    with pytest.raises(InputError, match="is a directory; caloexp reads CaloChallenge HDF5"):
        cc.inspect(tmp_path)


def _official_cls_low_input(path):
    """What the official evaluate.py builds for cls-low: [log10 E_inc, voxel / E_inc, label], keeping the file's dtype."""
    with h5py.File(path) as f:
        e, x = f["incident_energies"][:], f["showers"][:]
    return np.concatenate([np.log10(e), x / e, np.ones_like(e)], axis=1)


def test_written_files_are_float64_by_default_so_the_official_classifier_runs(tmp_path):
    torch = pytest.importorskip("torch")
    e, s = random_showers(50)
    gen = cc.write(tmp_path / "gen.hdf5", e, s, geometry=G)
    with cc.ShowerWriter(tmp_path / "streamed.hdf5", 368) as w:
        w.append(e, s)
    ref32 = cc.write(tmp_path / "ref32.hdf5", e, s, geometry=G, dtype="float32")
    gen32 = cc.write(tmp_path / "gen32.hdf5", e, s, geometry=G, dtype="float32")
    for p in (gen, tmp_path / "streamed.hdf5"):
        with h5py.File(p) as f:
            assert f["showers"].dtype == np.float64 and f["incident_energies"].dtype == np.float64
        np.testing.assert_array_equal(cc.read(p).showers, s)  # float32 input round-trips exactly
    with h5py.File(ref32) as f:
        assert f["showers"].dtype == np.float32
    layer = torch.nn.Linear(369, 1).double()  # the official script sets torch's default dtype to float64
    # the official ttv_split concatenates generated and reference rows: one float64 file is enough
    layer(torch.tensor(np.concatenate([_official_cls_low_input(gen), _official_cls_low_input(ref32)])[:, :-1]))
    with pytest.raises(RuntimeError, match="dtype"):  # the failure of issue 15 with two float32 files
        layer(torch.tensor(np.concatenate([_official_cls_low_input(gen32), _official_cls_low_input(ref32)])[:, :-1]))


def test_write_rejects_other_dtypes(tmp_path):
    e, s = random_showers(5)
    with pytest.raises(InputError, match="float16"):
        cc.write(tmp_path / "x.hdf5", e, s, dtype="float16")
    with pytest.raises(InputError, match="int32"):
        cc.ShowerWriter(tmp_path / "y.hdf5", 368, dtype="int32")
