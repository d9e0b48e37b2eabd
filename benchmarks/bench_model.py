"""Throughput of a model family on embedded data (photons by default; any data=): generation and training.

    python benchmarks/bench_model.py [--device cpu|cuda] [--batch 10000] [overrides, e.g. model=wgangp]
    python benchmarks/bench_model.py --batch 100 --n-showers 200 model=gan3d data=ecal_embedded   (3DGAN grid)

Prints showers/s and ms per shower for generation (batch 10,000, the CaloChallenge
timing batch) and for training steps, peak memory, and each figure as a fraction of
this machine's measured dense matmul FLOP/s ("MFU", as in nanoGPT), with the model
FLOPs counted by ``torch.utils.flop_counter`` rather than estimated by hand, so that
figures compare across machines of different speed.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

import caloexp.config  # noqa: F401
from caloexp.build import instantiate
from caloexp.cli import CONF_DIR
from caloexp.data.base import DataModule
from caloexp.models.base import GenerativeModel
from caloexp.optim import Optim
from caloexp.runtime import Runtime, check_precision
from caloexp.sampling import EventGenerator


def matmul_flops(device: torch.device, n: int = 2048, dtype=torch.float32, seconds: float = 2.0) -> float:
    """Sustained dense matmul FLOP/s of this machine (the MFU denominator)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn) -> int | None:
    """FLOPs of one call, or None where the counter cannot follow it (e.g. the double backward of a
    gradient penalty under ``autograd.grad`` in torch 2.13): MFU is then reported as n/a."""
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except RuntimeError as exc:
        print(f"  (FLOP counter: {str(exc).splitlines()[0][:90]}; MFU n/a)")
        return None
    return counter.get_total_flops()


def mfu(flops: int | None, seconds: float, peak: float) -> str:
    return f"{flops / seconds / peak:.1%}" if flops else "n/a"


def timed(fn, device, min_seconds: float = 3.0, min_reps: int = 3) -> float:
    fn()  # warm-up
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_seconds:
        fn()
        reps += 1
    sync(device)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=10_000, help="generation batch size")
    ap.add_argument("--n-showers", type=int, default=15_000, help="embedded training sample size")
    ap.add_argument("--precision", default="32", help="32 | bf16 (autocast; fast on CPUs with AMX) | 16 (CUDA)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.generator.width=512")
    args = ap.parse_args()
    device = torch.device(args.device)

    tmp = tempfile.mkdtemp(prefix="caloexp-bench-")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp}", f"data.n_showers={args.n_showers}", *args.overrides])
    data = instantiate(cfg.data, "data", DataModule).setup()
    model = instantiate(cfg.model, "model", GenerativeModel, data_shape=data.data_shape, cond_dim=data.cond_dim)
    transform = data.fit_transform(model.output_range, device)
    model.to(device)
    model.rng = torch.Generator(device).manual_seed(0)
    rt = Runtime(device, check_precision(args.precision, device))
    opts = Optim(model, cfg.optimizer, cfg.scheduler, rt)
    gen = EventGenerator(model.sampler(), transform).eval()

    mm_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(rt.precision, torch.float32)   # MFU against its peak
    peak_flops = matmul_flops(device, dtype=mm_dtype)
    print(f"device: {device} ({torch.get_num_threads()} threads); precision {rt.precision}; "
          f"matmul peak ({mm_dtype}): {peak_flops / 1e9:.1f} GFLOP/s")
    roles = ", ".join(f"{r} {sum(p.numel() for p in model.parameters_for(r)):,}" for r in model.roles)
    steps = getattr(model, "steps", None)
    print(f"model: {cfg.model._target_}; parameters: {roles}; event shape {data.event_shape}"
          + (f"; sampler: {steps} {model.solver} steps" if steps else ""))

    # --- generation at batch 10,000 (physical units out, transform included), at the reference's conditions
    ref = data.reference()
    rows = np.arange(args.batch) % len(ref)
    cond = {k: torch.as_tensor(np.asarray(v)[rows], device=device) for k, v in ref.cond.items()}
    def generate() -> None:
        with rt.autocast():
            gen(cond)

    gen_flops = count_flops(generate)
    t = timed(generate, device)
    rate = args.batch / t
    print(f"generation: batch {args.batch}: {rate:,.0f} showers/s = {1e3 / rate:.4f} ms/shower; "
          f"MFU {mfu(gen_flops, t, peak_flops)}")

    # --- training steps (one batch each; the generator steps every critic_steps)
    batches = iter(())
    state = {"step": 0, "epoch": 0}

    def step() -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = data.train_batches(state["epoch"])
            state["epoch"] += 1
            batch = next(batches)
        model.training_step(batch, state["step"], opts)
        state["step"] += 1

    n_cycle = getattr(model, "critic_steps", 1)
    cycle = lambda: [step() for _ in range(n_cycle)]  # noqa: E731 - a full critic+generator cycle
    train_flops = count_flops(cycle)
    t = timed(cycle, device)
    rate = n_cycle * data.batch_size / t
    print(f"training: batch {data.batch_size}, {n_cycle} steps/cycle: {rate:,.0f} showers/s, "
          f"{1e3 * t / n_cycle:.2f} ms/step; MFU {mfu(train_flops, t, peak_flops)}")

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = f"peak memory: {rss:,.0f} MiB host RSS"
    if device.type == "cuda":
        line += f", {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB GPU"
    print(line)
    print("reference: fastest CaloChallenge ds1-photon GANs ~0.5 ms/shower on CPU at batch 10,000; "
          "CaloINN 2.9 ms, CaloFlow student 6.1 ms, CaloDiffusion 4,500 ms")


if __name__ == "__main__":
    main()
