"""Exported generators (ONNX, TorchScript) reproduce caloexp's own generation for the same noise.

Every family: a tiny two-stage CFM trained through the CLI and exported by run id / run directory,
and WGAN-GP, GAN and one-stage CFM generators rebuilt from checkpoints. The files are run as a
consumer would (onnxruntime, ``torch.jit.load``) at batch sizes other than the traced one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from caloexp import checkpoint, export, sampling
from caloexp.data.transforms import CALO_CONDITIONS, CALO_STEPS, Transform
from caloexp.errors import ConfigError
from conftest import random_showers, run_cli

pytest.importorskip("onnxruntime")

MLP = {"_target_": "caloexp.models.nets.MLP", "_partial_": True, "depth": 2, "width": 24}
FAMILIES = {
    "wgangp": {"_target_": "caloexp.models.wgangp.WGANGP", "latent_dim": 8, "generator": MLP, "critic": MLP},
    "gan": {"_target_": "caloexp.models.gan.GAN", "latent_dim": 8, "critic": MLP,
            "generator": dict(MLP, norm="batch", out_activation="tanh")},
    "cfm": {"_target_": "caloexp.models.cfm.CFM", "steps": 2, "solver": "midpoint",
            "net": {"_target_": "caloexp.models.cfm.VelocityNet", "_partial_": True, "width": 24, "n_blocks": 1,
                    "emb": 16}},
}
N_VOX = 368


def own_and_exported(path: Path, gen: sampling.EventGenerator, n: int, seed: int, **options):
    """caloexp's generation at dataset-1 energies and the exported file on the very same noise."""
    energies = np.resize(2.0 ** np.arange(8, 23), n).astype(np.float32)
    own = sampling.generate(gen, {"energy": energies}, seed=seed, batch_size=n, **options).x.reshape(n, -1)
    noise = gen.sampler.draw_noise(n, torch.Generator().manual_seed(seed), torch.device("cpu"), torch.float32)
    got = export.run_exported(path, noise.numpy(), energies[:, None])
    return own, got


def check_file(path: Path, gen: sampling.EventGenerator, tolerance: float, **options) -> None:
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["inputs"][0]["shape"] == ["batch", gen.sampler.noise_dim]
    assert meta["inputs"][1]["columns"] == [{"name": "energy", "columns": 1, "unit": "MeV"}]
    assert meta["outputs"][0]["shape"] == ["batch", N_VOX] and meta["outputs"][0]["unit"] == "MeV"
    for n in (1, 9):  # traced at 4: the batch dimension is dynamic
        own, got = own_and_exported(path, gen, n, seed=n, **options)
        diff = export.max_rel_diff(got, own)
        print(f"{path.name}: batch {n}: max relative difference {diff:.2e}")
        assert got.shape == (n, N_VOX) and got.dtype == np.float32
        assert (own > 0).any() and diff <= tolerance


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of a WGAN-GP, a GAN and a one-stage CFM (weights as initialised, a fitted transform)."""
    root = tmp_path_factory.mktemp("export_families")
    e, s = random_showers(300)
    out = {}
    torch.manual_seed(0)
    for name, cfg in FAMILIES.items():
        model = sampling.build_model(cfg, (N_VOX,), 1)
        tr = Transform((N_VOX,), CALO_STEPS, CALO_CONDITIONS).use_output_range(model.output_range)
        tr.fit_conditions({"energy": e}).fit(s, {"energy": e})
        spec = sampling.spec_of(cfg, (N_VOX,), 1, tr, "calo", {"format": "calochallenge"}, {"name": "random"})
        out[name] = checkpoint.save(root / f"{name}.ckpt", {"model": model.state_dict(), "transform": tr.state_dict(),
                                                           "spec": spec, "config_yaml": "", "run_id": None})
    return out


@pytest.mark.parametrize("family,fmt", [("wgangp", "onnx"), ("wgangp", "torchscript"), ("gan", "onnx"),
                                        ("gan", "torchscript"), ("cfm", "torchscript")])  # cfm to ONNX: below
def test_every_family_exports(made, family, fmt, tmp_path):
    gen, _ = sampling.load(str(made[family]))
    path = export.export(str(made[family]), fmt, tmp_path / f"g{export.FORMATS[fmt]}", log_to_run=False)
    check_file(path, gen, tolerance=1e-5 if fmt == "torchscript" else 2e-4)


def test_bad_sampler_option_is_refused(made, tmp_path):
    with pytest.raises(ConfigError, match="solver"):
        export.export(str(made["cfm"]), "torchscript", tmp_path / "g.pt", sampler={"solver": "heun"},
                      log_to_run=False)
    with pytest.raises(ConfigError, match="format=keras"):
        export.export(str(made["cfm"]), "keras", tmp_path / "g.pt")


@pytest.mark.slow
def test_trained_two_stage_cfm_exports_by_run_id_and_is_logged(tmp_path):
    """The CLI: a run id source, ONNX with a fixed unrolled solve, the files logged to the run."""
    args = ["caloexp.train", "model=cfm", "data.n_showers=600", "data.batch_size=64", "data.eval_events=200",
            "model.net.width=24", "model.net.n_blocks=1", "model.energy_net.width=16", "model.energy_net.n_blocks=1",
            "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.plot_every=0",
            "trainer.log_every=1", "trainer.num_threads=1", f"hydra.run.dir={tmp_path}/run"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = checkpoint.load(tmp_path / "run/checkpoints/last.ckpt")["run_id"]
    sampler = {"steps": 1, "solver": "euler"}
    r = run_cli(["caloexp.export", f"source={run_id}", "format=onnx", "out=cfm.onnx",
                 "sampler={steps: 1, solver: euler}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max relative difference" in r.stdout + r.stderr
    gen, spec = sampling.load(str(tmp_path / "run"))
    assert gen.sampler.model.energy_dims == 5 and gen.sampler.noise_dim == 5 + N_VOX
    check_file(tmp_path / "cfm.onnx", gen, tolerance=2e-4, **sampler)
    meta = json.loads((tmp_path / "cfm.onnx.json").read_text())
    assert meta["sampler"] == sampler and meta["source"] == run_id and meta["check"]["max_rel_diff"] <= 1e-3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = {a.path for a in client.list_artifacts(run_id, "export")}
    assert logged == {"export/cfm.onnx", "export/cfm.onnx.json"}
    # TorchScript from the run directory, with the model's own sampler settings
    ts = export.export(str(tmp_path / "run"), "torchscript", tmp_path / "cfm.pt",
                       tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    check_file(ts, gen, tolerance=1e-5)
    assert math.isclose(json.loads((tmp_path / "cfm.pt.json").read_text())["check"]["max_rel_diff"], 0.0, abs_tol=1e-5)


def test_bad_source_is_one_line(tmp_path):
    r = run_cli(["caloexp.export", f"source={tmp_path}/nothing.ckpt", "format=onnx"], cwd=tmp_path)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "nothing.ckpt" in lines[0] and "Traceback" not in r.stderr, r.stderr
