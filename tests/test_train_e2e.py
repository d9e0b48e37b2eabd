"""End to end, as a user runs it: train, get killed, resume, generate, find it all in MLflow."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from caloexp import geometry as geo
from caloexp import sampling
from caloexp.data import calochallenge

from conftest import run_cli

pytestmark = pytest.mark.slow

TRAIN = ["caloexp.train", "+experiment=smoke", "trainer.max_steps=60", "trainer.checkpoint_every=10",
         "trainer.eval_every=30", "trainer.log_every=5"]


def ckpt_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["state"]["step"]
    except Exception:  # noqa: BLE001 - being written right now
        return -1


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    h = client.get_metric_history(run_id, key)
    steps = [m.step for m in h]
    assert len(steps) == len(set(steps)), f"{key}: duplicated steps {sorted(steps)}"
    return {m.step: m.value for m in h}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def runs(project: Path) -> dict:
    """Run A uninterrupted; run B killed with SIGKILL mid-training and resumed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db")
    a = run_cli(TRAIN + [f"hydra.run.dir={project}/runA"], cwd=project)
    assert a.returncode == 0, a.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, "-m", *TRAIN, f"hydra.run.dir={project}/runB"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = project / "runB" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and ckpt_step(last) < 20:
        time.sleep(0.05)
    assert proc.poll() is None, "run B ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_step(last)
    assert 20 <= killed_at < 60

    b = run_cli(["caloexp.train", f"resume={project}/runB"], cwd=project)
    assert b.returncode == 0, b.stderr[-3000:]
    sa = torch.load(project / "runA/checkpoints/last.ckpt", weights_only=True)
    sb = torch.load(last, weights_only=True)
    return {"A": sa, "B": sb, "killed_at": killed_at, "client": MlflowClient(f"sqlite:///{project}/mlflow.db")}


def test_resumed_run_ends_with_the_same_weights(runs):
    a, b = runs["A"], runs["B"]
    assert a["state"]["step"] == b["state"]["step"] == 60
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resumed_run_has_every_metric_step_once(runs):
    client, a, b = runs["client"], runs["A"]["run_id"], runs["B"]["run_id"]
    assert a != b
    ha, hb = history(client, a, "loss/critic"), history(client, b, "loss/critic")
    assert sorted(hb) == list(range(5, 61, 5))
    assert ha == hb  # identical values: the resumed run recomputed the same steps
    assert sorted(history(client, b, "sep/mean")) == [30, 60]
    run = client.get_run(b)
    assert run.info.status == "FINISHED" and run.data.tags.get("caloexp.resumed") == "true"


def test_mlflow_run_has_params_metrics_plots_checkpoint_and_model(runs):
    client, rid = runs["client"], runs["A"]["run_id"]
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model._target_"] == "caloexp.models.wgangp.WGANGP" and p["data.name"] == "embedded_photons"
    assert p["trainer.max_steps"] == "60" and p["optimizer.generator.lr"] == "0.0001"
    assert "+experiment=smoke" in run.data.tags["caloexp.overrides"]
    assert run.data.tags["mlflow.source.git.commit"]
    m = run.data.metrics
    assert {"loss/critic", "loss/generator", "lr/generator", "perf/events_per_s", "sep/mean"} <= set(m)
    assert np.isfinite(m["sep/mean"])
    top = {f.path for f in client.list_artifacts(rid)}
    assert {"config.yaml", "checkpoints", "plots"} <= top
    assert "checkpoints/last.ckpt" in {f.path for f in client.list_artifacts(rid, "checkpoints")}
    plots = [f.path for f in client.list_artifacts(rid, "plots/step_0000060")]
    assert plots and all(p.endswith(".png") for p in plots)
    assert run.data.tags["caloexp.model_uri"] == f"runs:/{rid}/generator"
    gen, spec = sampling.load(rid, client._tracking_client.tracking_uri)   # weights + spec, no pickle
    assert spec["kind"] == "calo" and spec["writer"]["format"] == "calochallenge"
    showers = gen(torch.tensor([1024.0, 2.0**20]))
    assert showers.shape == (2, 368) and (showers >= 0).all()


@pytest.mark.parametrize("source", ["run_id", "run_dir"])
def test_generate_writes_a_calochallenge_file(runs, project, source):
    src = runs["A"]["run_id"] if source == "run_id" else str(project / "runA")
    out = project / f"gen_{source}.hdf5"
    r = run_cli(["caloexp.generate", f"source={src}", "n_showers=1000", f"output={out}"], cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    with h5py.File(out) as f:
        assert set(f) == {"incident_energies", "showers"}
        assert f["incident_energies"].shape == (1000, 1) and f["showers"].shape == (1000, 368)
    data = calochallenge.read(out, geometry=geo.builtin("dataset_1_photons"))
    assert set(np.unique(data.energies)) <= set(2.0 ** np.arange(8, 23))
    assert (data.showers.sum(1) > 0).mean() > 0.5


def test_generate_at_energies_of_a_reference_file(runs, project):
    e = np.array([512.0, 8192.0, 131072.0], np.float32)
    ref = calochallenge.write(project / "ref.hdf5", e, np.ones((3, 368), np.float32))
    out = project / "gen_ref.hdf5"
    r = run_cli(["caloexp.generate", f"source={project}/runA", f"energies={ref}", "n_showers=null",
                 f"output={out}"], cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(calochallenge.read(out).energies, e)


def test_max_time_ends_a_run_by_wall_time_and_counts_it_across_resumes(tmp_path):
    args = ["caloexp.train", "+experiment=smoke", "trainer.max_steps=null", "trainer.eval_every=100000",
            "trainer.checkpoint_every=100000", "trainer.plot_every=0", "data.n_showers=600", "data.eval_events=100"]
    a = run_cli(args + ["trainer.max_time=0.05", f"hydra.run.dir={tmp_path}/T"], cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    s1 = torch.load(tmp_path / "T/checkpoints/last.ckpt", weights_only=True)["state"]
    assert 3.0 <= s1["seconds"] < 60 and s1["step"] > 0
    b = run_cli(["caloexp.train", f"resume={tmp_path}/T", "trainer.max_time=0.1"], cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    s2 = torch.load(tmp_path / "T/checkpoints/last.ckpt", weights_only=True)["state"]
    assert 6.0 <= s2["seconds"] < 60 and s2["step"] > s1["step"]
    bad = run_cli(args + ["trainer.max_time=-1"], cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.max_time=-1" in bad.stderr
