"""The 3DGAN ECAL format (caloexp/data/ecal.py): constructed files in every layout, each one-line error, the
real padded NumPy showers, and the embedded grid simulator (caloexp/data/ecal_embedded.py)."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from caloexp.data import ecal
from caloexp.data.ecal import EcalFiles, load_npy
from caloexp.errors import InputError

SHAPE = (51, 51, 25)


def make(path: Path, n: int = 6, seed: int = 0, **datasets) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.exponential(0.1, (n, *SHAPE)) * (rng.random((n, *SHAPE)) < 0.02)).astype(np.float32)
    e = rng.uniform(2, 500, n).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["ECAL"] = datasets.pop("ECAL", x)
        for k, v in datasets.items():
            f[k] = v
    return x, e


def test_variable_angle_files_read_in_chunks_across_files(tmp_path):
    x1, e1 = make(tmp_path / "a.h5", 5, 0)
    th1 = np.radians(np.linspace(60, 120, 5))
    with h5py.File(tmp_path / "a.h5", "a") as f:
        f["energy"], f["theta"] = e1.reshape(-1, 1), th1
    x2, e2 = make(tmp_path / "b.h5", 4, 1)
    eta = np.array([-0.5, 0.0, 0.3, 0.5])
    with h5py.File(tmp_path / "b.h5", "a") as f:
        f["energy"], f["eta"] = e2, eta
    src = EcalFiles([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert len(src) == 9 and src.event_shape == SHAPE
    s = src.read(3, 8)                              # spans both files
    np.testing.assert_array_equal(s.x, np.concatenate([x1[3:], x2[:3]]))
    np.testing.assert_allclose(s.cond["energy"], np.concatenate([e1[3:], e2[:3]]))
    want = np.concatenate([th1[3:], 2 * np.arctan(np.exp(-eta[:3]))])
    np.testing.assert_allclose(s.cond["theta"], want, rtol=1e-6)
    assert s.cond["theta"][3] == pytest.approx(math.pi / 2) and s.kind == "grid"


def test_fixed_angle_target_files(tmp_path):
    x, e = make(tmp_path / "t.h5", 4)
    target = np.stack([np.zeros(4), e, np.ones(4)], 1)
    with h5py.File(tmp_path / "t.h5", "a") as f:
        f["target"] = target
    s = EcalFiles([tmp_path / "t.h5"], fixed_theta=80.0).read(0, 4)
    np.testing.assert_allclose(s.cond["energy"], e)
    np.testing.assert_allclose(s.cond["theta"], np.radians(80.0), rtol=1e-6)
    with pytest.raises(InputError, match=r"t.h5: no incident angle .*data.fixed_theta"):
        EcalFiles([tmp_path / "t.h5"], fixed_theta=None)


def _bad(tmp_path: Path, name: str, mutate) -> Path:
    path = tmp_path / f"{name}.h5"
    x, e = make(path, 4)
    with h5py.File(path, "a") as f:
        f["energy"], f["theta"] = e, np.full(4, 1.5)
        mutate(f, x, e)
    return path


def _replace(key, value):
    def mutate(f, x, e):
        del f[key]
        if value is not None:
            f[key] = value(x, e) if callable(value) else value
    return mutate


@pytest.mark.parametrize("name, mutate, message", [
    ("noecal", _replace("ECAL", None), r"missing dataset 'ECAL'"),
    ("shape", _replace("ECAL", lambda x, e: x[:, :50]), r"'ECAL' has shape \(4, 50, 51, 25\); expected \(N, 51, 51, 25\)"),
    ("noenergy", _replace("energy", None), r"missing the primary energy: no dataset 'energy' or 'target'"),
    ("energyrows", _replace("energy", lambda x, e: e[:3]), r"'energy' has shape \(3,\) for 4 events"),
    ("target", lambda f, x, e: (f.__delitem__("energy"), f.create_dataset("target", data=e[:, None])),
     r"'target' has shape \(4, 1\); expected \(4, 2\+\)"),
    ("nan", _replace("ECAL", lambda x, e: np.where(np.arange(4)[:, None, None, None] == 2, np.nan, x)),
     r"'ECAL' contains NaN/inf \(first at row 2\)"),
    ("negative", _replace("ECAL", lambda x, e: np.where(np.arange(4)[:, None, None, None] == 3, -x - 1, x)),
     r"'ECAL' has negative cell energies \(first at row 3\)"),
    ("zeroenergy", _replace("energy", lambda x, e: np.array([1.0, 0.0, 2.0, 3.0])),
     r"'energy' has a non-finite or non-positive primary energy \(first at row 1\)"),
    ("degrees", _replace("theta", np.array([1.0, 90.0, 1.0, 1.0])), r"outside \(0, pi\) rad \(first at row 1: 90\)"),
    ("thetanan", _replace("theta", np.array([1.0, 1.0, np.nan, 1.0])), r"'theta' contains NaN/inf \(first at row 2\)"),
])
def test_each_problem_is_one_line_naming_the_file(tmp_path, name, mutate, message):
    path = _bad(tmp_path, name, mutate)
    with pytest.raises(InputError, match=message) as err:
        EcalFiles([path]).read(0, 4)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_hdf5_and_missing_files(tmp_path):
    (tmp_path / "x.h5").write_text("ECAL,energy\n1,2\n")
    with pytest.raises(InputError, match=r"x.h5: not an HDF5 file"):
        EcalFiles([tmp_path / "x.h5"])
    with pytest.raises(InputError, match=r"nope.h5: file not found"):
        EcalFiles([tmp_path / "nope.h5"])


def test_real_padded_numpy_showers_crop_exactly(shared_data, tmp_path):
    files = sorted((shared_data / "3dgan_angle_ecal_samples").glob("*.npy"))
    if not files:
        pytest.skip("3DGAN NumPy samples absent")
    for p in files:
        raw = np.load(p)
        assert raw.shape == ecal.PAD_SHAPE
        x = load_npy(p)
        assert x.shape == (1, *SHAPE)
        np.testing.assert_array_equal(x[0], raw[7:58, 7:58, 4:29].astype(np.float32))
        border = raw.copy()
        border[7:58, 7:58, :] = 0
        assert not border.any()                     # the x/y padding holds no energy: nothing is lost
        assert 100 < x.sum() < 250 and 1000 < (x > 0).sum() < 2000
        assert 8 <= np.argmax(x[0].sum((0, 1))) <= 14   # longitudinal peak (SOURCE.txt: layers 10-13)
    out = ecal.main([*map(str, files), "--output", str(tmp_path / "real.h5"), "--energy", "100", "--theta", "90"])
    s = EcalFiles([out]).read(0, len(files))
    assert s.x.shape == (len(files), *SHAPE) and np.allclose(s.cond["theta"], math.pi / 2)
    np.testing.assert_array_equal(s.x[0], load_npy(files[0])[0])


def test_npy_errors(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((3, 50, 51, 25), np.float32))
    with pytest.raises(InputError, match=r"bad.npy: array of shape \(3, 50, 51, 25\)"):
        load_npy(tmp_path / "bad.npy")
    np.save(tmp_path / "neg.npy", -np.ones(SHAPE, np.float32))
    with pytest.raises(InputError, match=r"neg.npy: has negative cell energies"):
        load_npy(tmp_path / "neg.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"obj.npy: not a readable .npy array"):
        load_npy(tmp_path / "obj.npy")


def test_embedded_grid_simulator_is_deterministic_and_physical(tmp_path):
    from caloexp.data import ecal_embedded as ee
    from caloexp.metrics.grid import event_features

    x, e, th = ee.simulate(60, seed=3)
    x2, e2, th2 = ee.simulate(60, seed=3)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(ee.simulate(60, seed=4)[0], x)
    assert x.shape == (60, *SHAPE) and (x >= 0).all() and ((x > 0) & (x < ee.CELL_THRESHOLD)).sum() == 0
    assert e.min() >= 2 and e.max() <= 500 and np.degrees(th).min() >= 60 and np.degrees(th).max() <= 120
    f = event_features(x, e, th)
    assert 0.85 < np.median(f["sf"]) < 1.02                        # calibrated cells: sum/E = containment
    hi, lo = e > 250, e < 100
    assert f["m1_z"][hi].mean() > f["m1_z"][lo].mean()             # deeper showers at higher energy
    tilt = np.polyfit(np.degrees(th), np.degrees(th) + f["angle_res"], 1)[0]
    assert tilt > 0.7                                               # the measured angle follows the requested one
    path = ee.ensure_embedded(tmp_path, 20, 5)
    mtime = path.stat().st_mtime_ns
    assert ee.ensure_embedded(tmp_path, 20, 5) == path and path.stat().st_mtime_ns == mtime   # cached
    s = EcalFiles([path]).read(0, 20)
    np.testing.assert_array_equal(s.x, ee.simulate(20, seed=5)[0])


def test_ecal_configs_compose_and_name_their_problems(tmp_path):
    from test_configs import compose_cfg

    from caloexp.build import instantiate
    from caloexp.data.base import DataModule
    from caloexp.errors import ConfigError

    dm = instantiate(compose_cfg(["model=gan3d", "data=ecal_embedded"], tmp_path).data, "data", DataModule)
    assert dm.kind == "grid" and dm.source_kind == "embedded" and dm.transform_cfg["steps"][1] == {"step": "power", "p": 0.85}
    assert dm.writer_spec() == {"format": "arrays", "x_key": "ECAL", "conditions": {"energy": "energy", "theta": "theta"},
                                "kind": "grid"}
    dm = instantiate(compose_cfg(["data=ecal", "data.files=[f.h5]"], tmp_path).data, "data", DataModule)
    with pytest.raises(InputError, match=r"data/f.h5: file not found"):
        dm.prepare()
    with pytest.raises(ConfigError, match=r"data=ecal: no files listed"):
        instantiate(compose_cfg(["data=ecal", "data.files=[]"], tmp_path).data, "data", DataModule)
    with pytest.raises(ConfigError, match=r"data.fixed_theta=200: must be in \(0, 180\) degrees"):
        instantiate(compose_cfg(["data=ecal", "data.files=[f.h5]", "data.fixed_theta=200"], tmp_path).data, "data",
                    DataModule)
