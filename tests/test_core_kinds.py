"""One core for every kind of event: a 3D grid (energy + angle, 3D conv nets), a 2D image (a vector of
particle conditions, 2D conv nets) and a signed tabular set (a class label, MLPs) each train, resume
bit-exactly, generate in their own file format and are evaluated with the metrics of their kind."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from caloexp.data.sample import Sample

from conftest import run_cli, train_twice_and_resume

pytestmark = pytest.mark.slow


def grid_events(n: int, rng) -> tuple[np.ndarray, dict]:
    """Showers on a (6, 12, 12) grid: energy sets the scale, the angle tilts the axis across layers."""
    e = rng.uniform(2.0, 100.0, n)
    theta = rng.uniform(60.0, 120.0, n)
    z, y, x = np.meshgrid(np.arange(6), np.arange(12), np.arange(12), indexing="ij")
    cx = 5.5 + (theta[:, None, None, None] - 90.0) / 30.0 * (z[None] - 2.5)
    r2 = (x[None] - cx) ** 2 + (y[None] - 5.5) ** 2
    prof = np.exp(-r2 / 4.0) * np.exp(-((z[None] - 2.0) ** 2) / 4.0)
    ev = prof / prof.sum((1, 2, 3), keepdims=True) * e[:, None, None, None] * rng.normal(1, 0.05, (n, 1, 1, 1))
    return ev.astype(np.float32), {"energy": e.astype(np.float32), "theta": theta.astype(np.float32)}


def image_events(n: int, rng) -> tuple[np.ndarray, dict]:
    """12 x 12 spots placed and sized by a particle vector (energy, x, y, charge)."""
    p = np.stack([rng.uniform(10, 100, n), rng.uniform(3, 9, n), rng.uniform(3, 9, n), rng.integers(-1, 2, n)], 1)
    y, x = np.mgrid[0:12, 0:12]
    r2 = (x[None] - p[:, 1, None, None]) ** 2 + (y[None] - p[:, 2, None, None]) ** 2
    img = p[:, 0, None, None] * np.exp(-r2 / (2.0 + p[:, 3, None, None]))
    return img.astype(np.float32), {"particle": p.astype(np.float32)}


def table_events(n: int, rng) -> tuple[np.ndarray, dict]:
    """Three correlated signed variables whose distribution depends on a class label."""
    label = rng.integers(0, 2, n)
    a = rng.normal(-1.0 + 2.0 * label, 1.0)
    b = 0.8 * a + rng.normal(0, 0.5, n)
    c = -np.abs(rng.normal(0, 1 + label, n))
    return np.stack([a, b, c], 1).astype(np.float32), {"label": label.astype(np.float32)}


KINDS = {
    "grid": (grid_events, "ECAL", {"energy": "energy", "theta": "theta"},
             "{energy: {step: log_scale}, theta: {step: linear}}",
             "[{step: energy_fraction}, {step: log, eps: 1.0e-6}, {step: normalise}]", "wgangp_conv", True),
    "image": (image_events, "images", {"particle": "particle"}, "{particle: {step: standardise}}",
              "[{step: log, eps: 1.0e-3}, {step: normalise}]", "wgangp_conv", True),
    "tabular": (table_events, "x", {"label": "label"}, "{label: {step: one_hot}}", "[{step: normalise}]", "wgangp",
                False),
}


def make_file(path: Path, kind: str, n: int = 600, seed: int = 0) -> None:
    fn, x_key, conds = KINDS[kind][0], KINDS[kind][1], KINDS[kind][2]
    x, c = fn(n, np.random.default_rng(seed))
    with h5py.File(path, "w") as f:
        f[x_key] = x
        for name, key in conds.items():
            f[key] = c[name]


def overrides(kind: str, path: Path) -> list[str]:
    _, x_key, conds, cond_tf, steps, model, nonneg = KINDS[kind]
    keys = "{" + ", ".join(f"{k}: {v}" for k, v in conds.items()) + "}"
    small = ["model.latent_dim=16"]
    if model == "wgangp_conv":
        small += ["model.generator.channels=[16,8]", "model.critic.channels=[8,16]", "model.critic.head_width=32"]
    else:
        small += ["model.generator.width=32", "model.critic.width=32"]
    return ["data=arrays", f"data.files=[{path}]", f"data.kind={kind}", f"data.x_key={x_key}",
            f"data.conditions={keys}", f"data.transform.conditions={cond_tf}", f"data.transform.steps={steps}",
            f"data.nonnegative={str(nonneg).lower()}", f"model={model}", *small, "data.batch_size=32",
            "data.eval_events=100", "model.critic_steps=2", "trainer.log_every=2", "trainer.eval_every=6",
            "trainer.checkpoint_every=3", "trainer.num_threads=1", "trainer.plot_every=0"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_trains_resumes_generates_and_evaluates(kind, tmp_path):
    data = tmp_path / f"{kind}.h5"
    make_file(data, kind)
    sa, _ = train_twice_and_resume(["caloexp.train", *overrides(kind, data)], tmp_path, 12)
    assert sa["spec"]["kind"] == kind

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("caloexp").experiment_id])}
    run = runs[sa["run_id"]]
    assert run.info.status == "FINISHED" and run.data.tags["caloexp.kind"] == kind
    assert "monitor/score" in run.data.metrics and np.isfinite(run.data.metrics["monitor/score"])

    # generation: conditions from a file, events in the data's own format
    conds = tmp_path / "conds.h5"
    x, c = KINDS[kind][0](50, np.random.default_rng(7))
    with h5py.File(conds, "w") as f:
        for name, v in c.items():
            f[name] = v
    out = tmp_path / "gen.h5"
    g = run_cli(["caloexp.generate", f"source={sa['run_id']}", f"conditions={conds}", "n_showers=null",
                 f"output={out}"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    with h5py.File(out) as f:
        x_key = KINDS[kind][1]
        assert f[x_key].shape == (50, *x.shape[1:]) and f.attrs["kind"] == kind
        assert np.isfinite(f[x_key][:]).all()
        if KINDS[kind][6]:
            assert (f[x_key][:] >= 0).all()
        for name, key in KINDS[kind][2].items():
            np.testing.assert_array_equal(f[key][:], c[name])

    # evaluation with the metrics of the kind, against the data itself as a sanity scale
    from caloexp import metrics
    with h5py.File(out) as f:
        gen = Sample(f[KINDS[kind][1]][:], c, kind)
    ref = Sample(x, c, kind)
    same = metrics.evaluate(ref, ref, groups=None)
    vs_gen = metrics.evaluate(ref, gen, groups=None)
    assert same["monitor/score"] == pytest.approx(0.0, abs=1e-9) and vs_gen["monitor/score"] > same["monitor/score"]
