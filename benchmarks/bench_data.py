"""Data path figures: streamed vs in-memory training on dataset-3-shaped showers, and DDP scaling.

    python benchmarks/bench_data.py streaming [--showers 50000] [--memory-showers 8000] [--steps 60]
    python benchmarks/bench_data.py ddp [--steps 60]

``streaming`` writes a synthetic file of dataset-3 geometry (40,500 voxels per shower; 50,000 showers
= 8.1 GB) once into --dir, then trains the default WGAN-GP for --steps steps twice, each in its own
process: streamed over the whole file, and in memory on a subset that fits. It prints peak RSS and
showers/s of each (targets: streamed < 4 GB peak RSS and within 1.5x of in-memory throughput).
``ddp`` trains the embedded photons with 1 and 2 processes (torchrun, gloo, inside ``unshare --net``
with only ``lo`` up) and prints showers/s of each. Figures, not pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

VOXELS = 40_500


def write_ds3_like(path: Path, n: int, chunk: int = 500) -> None:
    """Sparse positive showers in the dataset-3 layout, written chunk by chunk (never all in memory)."""
    if path.exists() and h5py.File(path, "r")["showers"].shape == (n, VOXELS):
        return
    tmp = path.with_suffix(".part")
    rng = np.random.default_rng(0)
    with h5py.File(tmp, "w") as f:
        e = f.create_dataset("incident_energies", (n, 1), "f4")
        s = f.create_dataset("showers", (n, VOXELS), "f4", chunks=(16, VOXELS))
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            ei = rng.uniform(1e3, 1e6, m).astype(np.float32)
            x = rng.exponential(1.0, (m, VOXELS)).astype(np.float32)
            x *= rng.random((m, VOXELS), dtype=np.float32) < 0.05
            e[lo:lo + m, 0] = ei
            s[lo:lo + m] = x * (ei[:, None] / 2000.0)
    tmp.replace(path)


def train_once(path: Path, steps: int, streaming: bool, max_events: int | None) -> dict:
    """One training in a child process: returns its showers/s and peak RSS."""
    code = f"""
import json, resource, time, torch
from hydra import compose, initialize_config_dir
from caloexp.build import instantiate
from caloexp.cli import CONF_DIR
from caloexp.data.base import DataModule
from caloexp.models.base import GenerativeModel
from caloexp.optim import Optim
from caloexp.runtime import Runtime
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("train", overrides=["model=wgangp", "data=dataset3", "data.files=[{path}]", "data.download=false",
                                      "data.streaming={str(streaming).lower()}", "data.max_events={max_events or 'null'}",
                                      "data.eval_events=200", "data.fit_events=2000", "paths.root_dir=/tmp",
                                      "model.generator.width=128", "model.critic.width=128"])
data = instantiate(cfg.data, "data", DataModule).setup()
model = instantiate(cfg.model, "model", GenerativeModel, data_shape=data.data_shape, cond_dim=data.cond_dim)
data.fit_transform(model.output_range, "cpu")
model.rng = torch.Generator().manual_seed(0)
opt = Optim(model, cfg.optimizer, cfg.scheduler, Runtime(torch.device("cpu")))
it = data.train_batches(0, 0, seed=0)
for s in range(5):
    model.training_step(next(it), s, opt)
t0 = time.perf_counter()
for s in range({steps}):
    model.training_step(next(it), s, opt)
dt = time.perf_counter() - t0
print(json.dumps({{"showers_per_s": {steps} * data.batch_size / dt,
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def streaming(args) -> None:
    path = Path(args.dir) / f"ds3_like_{args.showers}.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_ds3_like(path, args.showers)
    print(f"file: {path} ({path.stat().st_size / 2**30:.1f} GiB, {args.showers} x {VOXELS}; ready in "
          f"{time.perf_counter() - t0:.0f} s)")
    mem = train_once(path, args.steps, False, args.memory_showers)
    print(f"in memory ({args.memory_showers} showers): {mem['showers_per_s']:,.0f} showers/s, "
          f"peak RSS {mem['peak_rss_gib']:.2f} GiB")
    st = train_once(path, args.steps, True, None)
    print(f"streamed  ({args.showers} showers):  {st['showers_per_s']:,.0f} showers/s, "
          f"peak RSS {st['peak_rss_gib']:.2f} GiB")
    print(f"streamed/in-memory throughput: {st['showers_per_s'] / mem['showers_per_s']:.2f} "
          f"(target >= 0.67); streamed peak RSS target < 4 GiB")


def ddp(args) -> None:
    if not shutil.which("unshare"):
        sys.exit("needs unshare --net to isolate torchrun's store")
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(max(1, os.cpu_count() // n)),
                       MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
            cmd = (f"ip link set lo up && {sys.executable} -m torch.distributed.run --nproc_per_node={n} "
                   f"--master_addr=127.0.0.1 --master_port=29513 -m caloexp.train model=wgangp trainer=ddp "
                   f"trainer.max_steps={args.steps} trainer.eval_every={args.steps} trainer.log_every=10 "
                   f"trainer.plot_every=0 logger.log_model=false paths.root_dir={tmp}")
            t0 = time.perf_counter()
            r = subprocess.run(["unshare", "--net", "bash", "-c", cmd], env=env, capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            from mlflow.tracking import MlflowClient
            c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
            run = c.search_runs([c.get_experiment_by_name("caloexp").experiment_id])[0]
            hist = [m.value for m in c.get_metric_history(run.info.run_id, "perf/events_per_s")][1:]
            print(f"{n} process(es): {np.median(hist):,.0f} showers/s (median over logs; batch 256 per process), "
                  f"wall {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["streaming", "ddp"])
    ap.add_argument("--showers", type=int, default=50_000)
    ap.add_argument("--memory-showers", type=int, default=8_000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "caloexp-bench"))
    args = ap.parse_args()
    streaming(args) if args.what == "streaming" else ddp(args)
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
