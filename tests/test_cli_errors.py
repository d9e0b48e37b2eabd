"""Bad input gets one clear line, a non-zero exit, and loses nothing already recorded."""
from __future__ import annotations

import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from caloexp.data import calochallenge

from conftest import random_showers, run_cli

SMALL = ["+experiment=smoke", "data.n_showers=600", "trainer.max_steps=20"]


def one_error_line(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize("override, expected", [
    ("foo=1", "unknown config key 'foo'"),
    ("model=wgan", "Could not find 'model/wgan' (available: cfm, cfm_vit, cgan"),
    ("trainer.max_steps=abc", "could not be converted to Integer"),
    ("optimizer=adamax", "Could not find 'optimizer/adamax'"),
])
def test_wrong_override(tmp_path, override, expected):
    r = run_cli(["caloexp.train", override], cwd=tmp_path)
    assert r.returncode == 2
    assert expected in one_error_line(r.stderr)
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_missing_real_dataset_offline_fails_fast(tmp_path):
    t0 = time.time()
    r = run_cli(["caloexp.train", "data=photons"], cwd=tmp_path, env={"CALOEXP_OFFLINE": "1"})
    assert time.time() - t0 < 60
    assert r.returncode == 3
    line = one_error_line(r.stderr)
    assert "dataset_1_photons_1.hdf5" in line and "data=embedded" in line and str(tmp_path / "data") in line


@pytest.mark.parametrize("defect, match", [("nan", "NaN"), ("shape", "voxels but geometry"), ("corrupt", "not an HDF5 file")])
def test_bad_data_file(tmp_path, defect, match):
    path = tmp_path / "bad.hdf5"
    e, s = random_showers(300)
    if defect == "nan":
        s[17, 3] = np.nan
        import h5py
        with h5py.File(path, "w") as f:
            f["incident_energies"], f["showers"] = e.reshape(-1, 1), s
    elif defect == "shape":
        calochallenge.write(path, e, s[:, :300])
    else:
        path.write_bytes(b"not an hdf5 file at all")
    r = run_cli(["caloexp.train", "data=photons", f"data.files=[{path}]", *SMALL[1:]], cwd=tmp_path)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert str(path) in line and match in line


@pytest.mark.parametrize("override, match", [
    ("trainer.monitor=no/such_metric", "trainer.monitor='no/such_metric'"),
    ("trainer.eval_every=0", "trainer.eval_every=0"), ("trainer.max_steps=-1", "trainer.max_steps=-1"),
    ("trainer.precision=16", "trainer.precision=16"), ("model.critic_steps=0", "model.critic_steps=0"),
    ("model.gp_lambda=-10", "model.gp_lambda=-10"), ("trainer.plot_every=-1", "trainer.plot_every=-1"),
    ("data.files=[x.hdf5]", "data.files"), ("trainer.device=mps", "trainer.device=mps"),
    ("trainer.num_threads=-1", "trainer.num_threads=-1"), ("data.eval_events=0", "data.eval_events=0"),
])
def test_bad_settings_are_rejected_before_a_run_starts(tmp_path, override, match):
    r = run_cli(["caloexp.train", *SMALL, override], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert match in one_error_line(r.stderr)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("caloexp")
    assert exp is None or not client.search_runs([exp.experiment_id])   # nothing started, nothing left RUNNING


def test_diverged_training_is_reported(tmp_path):
    r = run_cli(["caloexp.train", *SMALL, "optimizer.lr=1e30", "trainer.log_every=1"], cwd=tmp_path)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "diverged" in one_error_line(r.stderr)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("caloexp").experiment_id])
    assert run.info.status == "FAILED"


def test_generate_from_unknown_source(tmp_path):
    r = run_cli(["caloexp.generate", "source=0123456789abcdef0123456789abcdef"], cwd=tmp_path)
    assert r.returncode == 2
    assert "0123456789abcdef0123456789abcdef" in one_error_line(r.stderr)
