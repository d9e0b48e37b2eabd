"""The frontier-fidelity targets, measured: the CFM after 10/20/30 minutes of training, its one-step
reflow student, and the WGAN-GP baseline, each judged the same way.

    python benchmarks/bench_frontier.py [--minutes 10 20 30] [--classifier protocol|full]
                                        [--classifier-precision 32|bf16] [--n-eval 121000]
                                        [--distill-steps 1000] [--workdir bench_frontier] [--skip-wgangp | --skip-cfm]
                                        [--cfm KEY=VALUE ...]   (overrides of the CFM run, e.g. data.n_showers=100000;
                                        --reflow ..., --wgangp ... likewise)

Every row runs the real command-line path: ``caloexp.train`` (the CFM with ``trainer.max_time``,
resumed from one mark to the next), ``caloexp.generate`` at the incident energies of a held-out
simulator sample (seed 99, never used in training), ``caloexp.evaluate`` with ``metrics=protocol``
(the CaloChallenge classifier: 3 x 2048, 50 epochs; ~45 min per row on one AMX CPU thread with
``--classifier-precision bf16``) or ``metrics=full`` (the fast
classifier), and the generation time per shower at batch 10,000 with the steps used. Prints the
table with the targets of the issue (AUC low <= 0.60, AUC high <= 0.55, <= 0.05 ms/shower on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

TARGETS = {"auc_low": 0.60, "auc_high": 0.55, "ms": 0.05}


def sh(args: list[str], log: Path) -> None:
    """Run ``python -m <args>``; stop with the log's tail if it fails."""
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(args)}\n" + log.read_text()[-2000:])


def ms_per_shower(source: str, batch: int = 10_000, sampler: dict | None = None) -> float:
    """Generation time per shower at ``batch`` (best of 3, after a warm-up), physical output included."""
    from caloexp import sampling

    gen, _ = sampling.load(source)
    e = torch.full((batch,), 65536.0)
    rng = torch.Generator().manual_seed(0)
    gen(e[:100], rng, **(sampler or {}))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        gen(e, rng, **(sampler or {}))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / batch


def judge(name: str, run: Path, work: Path, ref: Path, metrics: list[str], sampler: str | None = None) -> dict:
    """Generate at the reference energies, evaluate, time generation; one row of the table."""
    slug = "".join(ch if ch.isalnum() or ch in "@._-" else "_" for ch in name)   # a Hydra-safe file name
    gen_file = work / f"gen_{slug}.hdf5"
    args = ["caloexp.generate", f"source={run}", f"energies={ref}", "n_showers=null", f"output={gen_file}"]
    sh(args + ([f"sampler={sampler}"] if sampler else []), work / f"{slug}.log")
    out = work / f"eval_{slug}"
    sh(["caloexp.evaluate", f"generated={gen_file}", f"reference={ref}", f"out={out}", *metrics], work / f"{slug}.log")
    gen_file.unlink()
    m = json.loads((out / "metrics.json").read_text())
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    spec = state["spec"]["model"]
    steps = f"{spec.get('steps', '-')} {spec.get('solver', 'latent')}" if "steps" in spec else "1 (GAN)"
    if float(spec.get("rho", 1)) != 1 and int(spec.get("steps", 1)) > 1:
        steps += f" (rho {float(spec['rho']):g})"
    return {"model": name, "train_min": state["state"].get("seconds", float("nan")) / 60,
            "steps": state["state"]["step"], "auc_low": m.get("cls/auc_low", float("nan")),
            "auc_high": m.get("cls/auc_high", float("nan")), "sep_mean": m.get("sep/mean", float("nan")),
            "fpd": m.get("fpd", float("nan")), "ms": ms_per_shower(str(run)), "sampler": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[10, 20, 30])
    p.add_argument("--classifier", choices=["protocol", "full"], default="protocol",
                   help="protocol: CaloChallenge classifier (3x2048, 50 epochs); full: the fast one (3x256, 10 epochs)")
    p.add_argument("--classifier-precision", choices=["32", "bf16"], default="32",
                   help="bf16: the classifier's matmuls in bfloat16 (~3x faster on AMX CPUs; the official evaluator: 32)")
    p.add_argument("--n-eval", type=int, default=121_000, help="held-out showers (>= 100k for the protocol)")
    p.add_argument("--distill-steps", type=int, default=1000)
    p.add_argument("--workdir", default="bench_frontier")
    p.add_argument("--skip-wgangp", action="store_true")
    p.add_argument("--skip-cfm", action="store_true", help="only the WGAN-GP baseline row")
    p.add_argument("--cfm", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides of the CFM run")
    p.add_argument("--reflow", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides of the reflow run")
    p.add_argument("--wgangp", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides of the WGAN-GP run")
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    ref = work / "reference_seed99.hdf5"
    if not ref.exists():
        from caloexp.data import calochallenge
        from caloexp.data.embedded import simulate

        s = simulate(a.n_eval, seed=99)
        calochallenge.write(ref, s.energies, s.showers)
    common = [f"hydra.run.dir={work}/cfm", "trainer.plot_every=0"]
    metrics = [f"metrics={a.classifier}", f"metrics.classifier.precision={a.classifier_precision}"]
    rows = []
    for i, minutes in enumerate([] if a.skip_cfm else sorted(a.minutes)):
        own_steps = any(o.startswith("trainer.max_steps=") for o in a.cfm)   # e.g. the length of a cosine schedule
        start = ["caloexp.train", "model=cfm", *([] if own_steps else ["trainer.max_steps=null"]), *common, *a.cfm] \
            if i == 0 else \
            ["caloexp.train", f"resume={work}/cfm"]
        sh(start + [f"trainer.max_time={minutes}"], work / "cfm.log")
        rows.append(judge(f"cfm@{minutes:g}min", work / "cfm", work, ref, metrics))
        print(rows[-1], flush=True)
    if not a.skip_cfm:
        sh(["caloexp.train", "model=reflow", f"model.teacher={work}/cfm", f"trainer.max_steps={a.distill_steps}",
            f"hydra.run.dir={work}/reflow", "trainer.plot_every=0", *a.reflow], work / "reflow.log")
        rows.append(judge("cfm reflow (1 Euler step)", work / "reflow", work, ref, metrics))
        print(rows[-1], flush=True)
    if not a.skip_wgangp:
        sh(["caloexp.train", "model=wgangp", f"hydra.run.dir={work}/wgangp", "trainer.plot_every=0", *a.wgangp],
           work / "wgangp.log")
        rows.append(judge("wgangp (baseline)", work / "wgangp", work, ref, metrics))

    print(f"\nembedded photons, {a.n_eval} held-out showers (seed 99), classifier: {a.classifier} "
          f"({a.classifier_precision}); "
          f"{torch.get_num_threads()} CPU threads; targets: AUC low <= {TARGETS['auc_low']}, "
          f"high <= {TARGETS['auc_high']}, <= {TARGETS['ms']} ms/shower")
    print("| model | train min | steps | AUC low | AUC high | sep/mean | FPD | ms/shower (batch 10k) | sampler | targets |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = [r["auc_low"] <= TARGETS["auc_low"], r["auc_high"] <= TARGETS["auc_high"], r["ms"] <= TARGETS["ms"]]
        print(f"| {r['model']} | {r['train_min']:.1f} | {r['steps']} | {r['auc_low']:.3f} | {r['auc_high']:.3f} | "
              f"{r['sep_mean']:.3f} | {r['fpd']:.4f} | {r['ms']:.3f} | {r['sampler']} | "
              f"{''.join('✓' if o else '✗' for o in ok)} |")


if __name__ == "__main__":
    main()
