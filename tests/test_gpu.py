"""CUDA paths: bf16 autocast with TF32, torch.compile, pinned-memory streaming. Skipped without a GPU
(run on a GPU node: ``python -m pytest -m gpu``)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["caloexp.train", "+experiment=smoke", "data.n_showers=1200", "trainer.max_steps=20", "trainer.plot_every=0",
        "trainer.device=cuda"]


def test_runtime_enables_tf32_and_bf16_autocast_on_cuda():
    from caloexp import runtime

    rt = runtime.setup("cuda", "bf16", tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    lin = torch.nn.Linear(64, 64).to(rt.device)
    with rt.autocast():
        y = lin(torch.randn(8, 64, device=rt.device))
    assert y.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["trainer.precision=bf16"], ["trainer.compile=true"]])
def test_training_on_cuda(tmp_path, extra):
    r = run_cli(TINY + extra + [f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert state["state"]["step"] == 20 and math.isfinite(state["state"]["best"])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_streamed_batches_on_cuda_equal_those_on_cpu(tmp_path):
    """Pinned, non-blocking copies of prefetched buffers give exactly the CPU batches."""
    import h5py

    from caloexp.data.datamodule import ShowerDataModule
    from conftest import random_showers

    e, s = random_showers(1000)
    path = tmp_path / "showers.hdf5"
    with h5py.File(path, "w") as f:
        f["incident_energies"] = e[:, None]
        f["showers"] = s
    batches = {}
    for device in ("cpu", "cuda"):
        dm = ShowerDataModule(name="t", source="files", files=[str(path)], geometry="dataset_1_photons",
                              data_dir=str(tmp_path), download=False,
                              batch_size=50, eval_events=100, streaming=True, buffer_mb=0.2, block_events=32)
        dm.setup(0, 1)
        dm.fit_transform(None, device)
        batches[device] = [b.x.cpu().numpy() for b in dm.train_batches(0, 0, seed=1)]
    assert len(batches["cpu"]) == len(batches["cuda"]) > 3
    for a, b in zip(batches["cpu"], batches["cuda"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
