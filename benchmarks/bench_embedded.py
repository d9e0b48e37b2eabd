"""Speed and physics summary of the embedded photon simulator (a script, not a test).

    python benchmarks/bench_embedded.py [--n 15000] [--seed 1234] [--repeat 3] [--workers N]

Prints showers/s (best of ``--repeat``) and, per incident energy, the mean response
E_dep/E_inc, the relative resolution sigma/mean of E_dep, the fraction of empty voxels,
the energy fractions per layer and the correlation of the strip (1) and back (3) fractions.
These are the figures quoted in docs/embedded_dataset.md.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from caloexp.data import embedded
from caloexp.geometry import builtin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="threads (default: embedded.WORKERS)")
    args = ap.parse_args()
    if args.workers:
        embedded.WORKERS = args.workers
    g = builtin("dataset_1_photons")

    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        s = embedded.simulate(args.n, seed=args.seed)
        times.append(time.perf_counter() - t)
    best = min(times)
    print(f"{args.n} showers: best {best:.2f} s of {args.repeat} ({args.n / best:,.0f} showers/s), "
          f"{embedded.WORKERS} thread(s), {os.cpu_count()} cores visible")

    e_tot = s.showers.sum(1)
    print(f"mean response E_dep/E_inc = {np.mean(e_tot / s.energies):.3f}; "
          f"empty voxels overall {np.mean(s.showers == 0):.3f}")
    print(f"{'E_inc/GeV':>10} {'resp':>6} {'sigma/E':>8} {'empty':>6}  layer fractions (0,1,2,3,12)  corr(f1,f3)")
    for e in embedded.DEFAULT_ENERGIES:
        x = s.showers[s.energies == e]
        tot = x.sum(1)
        f = g.layer_energies(x) / tot[:, None]
        c13 = np.corrcoef(f[:, 1], f[:, 3])[0, 1]
        print(f"{e / 1000:10.3f} {tot.mean() / e:6.3f} {tot.std() / tot.mean():8.4f} {np.mean(x == 0):6.3f}  "
              f"{' '.join(f'{v:.3f}' for v in f.mean(0))}  {c13:+.2f}")


if __name__ == "__main__":
    main()
