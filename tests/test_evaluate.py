"""The standalone evaluator end to end: files in CaloChallenge format in, metrics.json + PNGs (+ MLflow) out."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from caloexp import evaluate as ev
from caloexp.data import calochallenge
from caloexp.geometry import builtin
from tests.conftest import random_showers, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    g = builtin("dataset_1_photons")
    e1, s1 = random_showers(600, seed=1)
    e2, s2 = random_showers(600, seed=2)
    calochallenge.write(d / "ref.hdf5", e1, s1, geometry=g)
    calochallenge.write(d / "gen.hdf5", e2, s2, geometry=g)
    return d


def _cfg(files, out, **kw):
    base = OmegaConf.load(ev.CONF_DIR / "evaluate.yaml")
    base.pop("defaults")
    base.pop("hydra")
    base.metrics = OmegaConf.load(ev.CONF_DIR / "metrics" / "fast.yaml")
    base.generated, base.reference, base.out = str(files / "gen.hdf5"), str(files / "ref.hdf5"), str(out)
    base.tracking_uri = f"sqlite:///{out.parent}/mlflow.db"
    for k, v in kw.items():
        OmegaConf.update(base, k, v, force_add=True)
    return base


def test_streaming_equals_in_memory(files, tmp_path):
    """Small chunks (streaming) give the same metrics as caloexp.metrics.evaluate on the whole arrays."""
    from caloexp import metrics

    res = ev.run(_cfg(files, tmp_path / "o", chunk_bytes=368 * 4 * 70, plots=False,
                      **{"metrics.groups": ["separation", "images", "wasserstein", "shapes3d"]}))
    g = builtin("dataset_1_photons")
    ref = calochallenge.read(files / "ref.hdf5")
    gen = calochallenge.read(files / "gen.hdf5")
    direct = metrics.evaluate(ref, gen, g, groups=["separation", "images", "wasserstein", "shapes3d"])
    assert set(res) == set(direct)
    for k in res:
        assert res[k] == pytest.approx(direct[k], rel=1e-6, abs=1e-12), k
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved == pytest.approx(res)


def test_cli_end_to_end_with_mlflow(files, tmp_path):
    out = tmp_path / "eval"
    r = run_cli(["caloexp.evaluate", f"generated={files / 'gen.hdf5'}", f"reference={files / 'ref.hdf5'}",
                 "geometry=dataset_1_photons", f"out={out}", "metrics=full", "metrics.classifier.epochs=2",
                 "metrics.classifier.n_hidden=32", "mlflow=true"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("sep/mean", "sep/voxel", "images/ssim", "wd/mean", "fpd", "kpd_err", "cls/auc_low", "cls/jsd_high",
                "shapes/long_profile_tv"):
        assert key in m and np.isfinite(m[key]), key
    assert (out / "layers_average.png").exists() and (out / "hist_EC_eta.png").exists()

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("caloexp-evaluate")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["sep/mean"] == pytest.approx(m["sep/mean"])
    assert run.data.params["geometry"] == "dataset_1_photons"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/plots")}
    assert "evaluation/plots/shower_3d.png" in arts


def _bad(tmp_path, name, energies, showers):
    p = tmp_path / name
    with h5py.File(p, "w") as f:
        f["incident_energies"] = energies
        f["showers"] = showers
    return p


@pytest.mark.parametrize("case", ["missing", "corrupt", "nan", "voxels", "unknown_geometry", "no_generated"])
def test_bad_input_gives_one_line_and_nonzero_exit(files, tmp_path, case):
    gen = files / "gen.hdf5"
    extra = []
    if case == "missing":
        gen = tmp_path / "nope.hdf5"
    elif case == "corrupt":
        gen = tmp_path / "corrupt.hdf5"
        gen.write_bytes(b"this is not hdf5" * 100)
    elif case == "nan":
        s = np.ones((20, 368), np.float32)
        s[3, 5] = np.nan
        gen = _bad(tmp_path, "nan.hdf5", np.full((20, 1), 1000.0), s)
    elif case == "voxels":
        gen = _bad(tmp_path, "v.hdf5", np.full((20, 1), 1000.0), np.ones((20, 533), np.float32))
    elif case == "unknown_geometry":
        extra = ["geometry=dataset_9"]
    args = ["caloexp.evaluate", f"reference={files / 'ref.hdf5'}", f"out={tmp_path / 'o'}", "plots=false", *extra]
    if case != "no_generated":
        args.append(f"generated={gen}")
    r = run_cli(args, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_mlflow_run_logs_a_child_evaluation_run_and_leaves_the_training_run_alone(files, tmp_path):
    """``mlflow_run=<id>``: a new run, child of and tagged with the training run, which is not reopened."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("trainings", artifact_location=(tmp_path / "artifacts").as_uri())
    trained = client.create_run(exp, run_name="wgangp-embedded-0101-000000")
    client.log_metric(trained.info.run_id, "sep/mean", 0.5, step=40)
    client.set_terminated(trained.info.run_id, "FINISHED")
    before = client.get_run(trained.info.run_id)
    args = ["caloexp.evaluate", f"generated={files / 'gen.hdf5'}", f"reference={files / 'ref.hdf5'}",
            f"out={tmp_path / 'e2'}", "metrics=fast", "plots=false"]
    r = run_cli([*args, f"mlflow_run={trained.info.run_id}"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    after = client.get_run(trained.info.run_id)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert after.data.metrics == before.data.metrics and after.data.params == before.data.params
    (child,) = client.search_runs([exp], filter_string=f"tags.`caloexp.evaluates` = '{trained.info.run_id}'")
    assert child.info.run_id != trained.info.run_id and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == trained.info.run_id
    assert child.info.run_name == "evaluate-wgangp-embedded-0101-000000"
    saved = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert child.data.metrics["sep/mean"] == pytest.approx(saved["sep/mean"])
    assert child.data.params["n_generated"] == "600"
    assert {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")} == {"evaluation/metrics.json"}

    bad = run_cli([*args, "mlflow_run=0123456789abcdef0123456789abcdef"], cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: mlflow_run=0123456789abcdef"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
