"""Benchmark of the validation suite on 2 x N dataset-1 photon showers (default N = 121,000).

    python benchmarks/bench_metrics.py [--n 121000] [--source embedded|random] [--threads 2]

Prints the wall time of: high-level features + histograms + separation powers (the
``separation`` group, incl. the voxel histogram), the other fast groups, FPD/KPD, the fast
classifier (low + high inputs) and the compact plots. Showers come from the embedded
simulator (``caloexp.data.embedded.simulate``, two seeds) or, with ``--source random``, from
sparse random arrays. Targets (issue 3): separation a few s, FPD/KPD < 1 min, fast classifier < 2 min.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def sample(n: int, seed: int, source: str):
    from caloexp.data.calochallenge import Showers

    if source == "embedded":
        from caloexp.data import embedded

        return embedded.simulate(n, seed=seed)
    rng = np.random.default_rng(seed)
    e = rng.choice(2.0 ** np.arange(8, 23), n)
    x = (rng.exponential(1.0, (n, 368)) * (rng.random((n, 368)) < 0.3) * e[:, None] / 100).astype(np.float32)
    return Showers(e.astype(np.float32), x)


def timed(label: str, fn):
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    print(f"{label:<58s} {dt:8.2f} s", flush=True)
    return out, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=121_000, help="showers per sample")
    ap.add_argument("--source", choices=["embedded", "random"], default="embedded")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the classifier")
    args = ap.parse_args()

    import torch

    from caloexp import metrics, plots
    from caloexp.geometry import builtin
    from caloexp.metrics import features

    if args.threads:
        torch.set_num_threads(args.threads)
    g = builtin("dataset_1_photons")
    print(f"caloexp metrics benchmark: 2 x {args.n:,} dataset-1 photon showers ({args.source}), "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    (ref, gen), _ = timed("synthesise samples", lambda: (sample(args.n, 1, args.source), sample(args.n, 2, args.source)))

    timed("high-level features only (both samples)", lambda: (
        features.compute(ref.energies, ref.showers, g), features.compute(gen.energies, gen.showers, g)))
    r, _ = timed("separation: features + histograms + separation powers",
                 lambda: metrics.evaluate(ref, gen, g, groups=["separation"]))
    print(f"    sep/mean = {r['sep/mean']:.4f} over {sum(k.startswith('sep/') for k in r)} values; "
          f"monitor/score = {r['monitor/score']:.4f}")
    timed("images (average-image MSE/SSIM, per energy)", lambda: metrics.evaluate(ref, gen, g, groups=["images"]))
    timed("wasserstein (1D W1 of every feature)", lambda: metrics.evaluate(ref, gen, g, groups=["wasserstein"]))
    timed("FAST groups together (what the trainer runs)", lambda: metrics.evaluate(ref, gen, g))
    r, _ = timed("fpd_kpd (official: 30 features, FPD 10k-50k x 20 x 10, KPD 10 x 10k)",
                 lambda: metrics.evaluate(ref, gen, g, groups=["fpd_kpd"]))
    print(f"    fpd = {r['fpd']:.2e} +- {r['fpd_err']:.1e}, kpd = {r['kpd']:.2e} +- {r['kpd_err']:.1e}")
    r, _ = timed("classifier, fast setting (low + high, 3 x 256, 10 epochs, 50k)",
                 lambda: metrics.evaluate(ref, gen, g, groups=["classifier"]))
    print(f"    AUC low {r['cls/auc_low']:.3f}, high {r['cls/auc_high']:.3f}")
    timed("shapes3d", lambda: metrics.evaluate(ref, gen, g, groups=["shapes3d"]))
    with tempfile.TemporaryDirectory() as d:
        n5 = min(5000, args.n)
        timed(f"compact plots on {n5:,} showers (plot_all, as in training)",
              lambda: plots.plot_all(ref.subset(slice(0, n5)), gen.subset(slice(0, n5)), g, d))
        timed(f"full plots on {args.n:,} showers (the evaluator's set)",
              lambda: plots.plot_all(ref, gen, g, d, full=True))


if __name__ == "__main__":
    main()
