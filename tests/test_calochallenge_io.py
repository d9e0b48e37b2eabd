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
