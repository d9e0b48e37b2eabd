"""Exported generators against caloexp's own: export time and generation throughput (showers/s, MFU).

    python benchmarks/bench_export.py <run id | checkpoint | run dir> [--batch 1000] [--threads 2]

Exports the run's generator to ONNX and TorchScript (``caloexp.export``), then times one batch of
showers at dataset-1 energies with caloexp (PyTorch), ONNX Runtime and TorchScript. MFU: the
generator's FLOPs (``torch.utils.flop_counter``, the same graph for all three) per second over this
machine's measured dense fp32 matmul FLOP/s (bench_model.py's helpers).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import count_flops, matmul_flops, mfu, timed  # noqa: E402

from caloexp import export, sampling  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    out = Path(tempfile.mkdtemp(prefix="caloexp-bench-export-"))
    paths = {}
    for fmt in ("onnx", "torchscript"):
        t0 = time.perf_counter()
        paths[fmt] = export.export(args.source, fmt, out / f"g{export.FORMATS[fmt]}", args.tracking_uri,
                                   log_to_run=False)
        size = paths[fmt].stat().st_size / 2**20
        print(f"export {fmt}: {time.perf_counter() - t0:.1f} s, {size:.1f} MiB")

    gen, _ = sampling.load(args.source, args.tracking_uri)
    wrapper = export.ExportedGenerator(gen).eval()
    n = args.batch
    energies = np.resize(2.0 ** np.arange(8, 23), n).astype(np.float32)
    noise = gen.sampler.draw_noise(n, torch.Generator().manual_seed(0), cpu, torch.float32)
    cond = torch.from_numpy(energies[:, None])
    with torch.no_grad():
        flops = count_flops(lambda: wrapper(noise, cond))
    peak = matmul_flops(cpu)
    print(f"batch {n}, {args.threads} threads; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"{(flops or 0) / n / 1e6:.1f} MFLOP/shower")

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(paths["onnx"]), opts, providers=["CPUExecutionProvider"])
    ts = torch.jit.load(str(paths["torchscript"]))
    runs = {
        "caloexp (PyTorch)": lambda: sampling.generate(gen, {"energy": energies}, seed=0, batch_size=n),
        "ONNX Runtime": lambda: sess.run(["events"], {"noise": noise.numpy(), "conditions": cond.numpy()}),
        "TorchScript": lambda: ts(noise, cond),
    }
    for name, fn in runs.items():
        with torch.no_grad():
            s = timed(fn, cpu)
        print(f"{name:18s} {n / s:10,.0f} showers/s  {s / n * 1e3:.3f} ms/shower  MFU {mfu(flops, s, peak)}")


if __name__ == "__main__":
    main()
