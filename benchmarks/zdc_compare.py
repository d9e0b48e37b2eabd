"""CorrVAE vs the conv WGAN-GP on the embedded ZDC data, and the CorrVAE's property control.

    python benchmarks/zdc_compare.py [--root DIR]                          # trains both (defaults), then compares
    python benchmarks/zdc_compare.py --root DIR --corrvae RUN --wgangp RUN # compares two finished runs

Trains ``model=corrvae data=zdc_embedded`` and ``+experiment=zdc_wgangp`` at their default lengths (chosen
for equal training time) unless run directories / ids are given, then, for each, generates responses at
the particles of the same held-out reference (seed 0) and prints the ZDC metrics (``zdc/ws_channels``
first) with each run's training time. For the CorrVAE it requests property values (the 10 %..90 %
quantiles of the reference's hit responses, one property at a time, and the joint request com = (10, 30))
at 100 hit particles and reports |requested - achieved|. Metrics and figures (real vs generated, latent
traversals, requested vs achieved) are logged to each run in MLflow (``<root>/mlflow.db``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONTROLLED = ("com_x", "com_y", "sum", "nonzero")
JOINT = {"com_x": 10.0, "com_y": 30.0}
HEADLINE = ("zdc/ws_channels", "zdc/ws_props_mean", "zdc/mse_avg", "zdc/ssim_avg", "monitor/score")


def train(root: Path, name: str, args: list[str]) -> Path:
    out = root / name
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "caloexp.train", *args, f"paths.root_dir={root}", f"hydra.run.dir={out}"],
                   check=True, cwd=root, env=env)
    print(f"{name}: trained in {time.perf_counter() - t0:.0f} s")
    return out


def run_of(client, source: str) -> tuple[str, float]:
    """MLflow run id and training wall time (s) of a run directory or id."""
    from caloexp import checkpoint

    state = checkpoint.load(checkpoint.find(source, "."))
    info = client.get_run(state["run_id"]).info
    return state["run_id"], (info.end_time - info.start_time) / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="project directory (mlflow.db, outputs); default: a temp dir")
    ap.add_argument("--corrvae", default=None, help="a finished CorrVAE run (directory or checkpoint)")
    ap.add_argument("--wgangp", default=None, help="a finished WGAN-GP run (directory or checkpoint)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training run")
    ap.add_argument("--n-control", type=int, default=100, help="particles per controlled request")
    a = ap.parse_args()
    root = Path(a.root or tempfile.mkdtemp(prefix="zdc_compare_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    threads = f"trainer.num_threads={a.threads}"
    corr = a.corrvae or train(root, "corrvae", ["model=corrvae", "data=zdc_embedded", threads])
    wgan = a.wgangp or train(root, "wgangp", ["+experiment=zdc_wgangp", threads])

    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from caloexp import checkpoint, metrics, sampling
    from caloexp.build import instantiate
    from caloexp.data.base import DataModule
    from caloexp.data.zdc import PROPERTIES, properties_of_counts
    from caloexp.metrics import zdc as zm

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    state = checkpoint.load(checkpoint.find(str(corr), "."))
    data = instantiate(OmegaConf.create(state["config_yaml"]).data, "data", DataModule)
    data.prepare_data()
    ref = data.setup().reference()
    figs = root / "figures"
    rows = {}
    for name, source in (("corrvae", corr), ("wgangp", wgan)):
        run_id, seconds = run_of(client, str(source))
        gen, _ = sampling.load(str(source))
        t0 = time.perf_counter()
        fake = sampling.generate(gen, ref.cond, seed=0)
        gen_s = time.perf_counter() - t0
        m = metrics.evaluate(ref, fake, groups=["cells", "zdc"])
        m.update({"compare/train_s": seconds, "compare/generate_ms_per_event": 1e3 * gen_s / len(fake)})
        rows[name] = m
        client.log_batch(run_id, metrics=[_metric(f"compare/{k}" if not k.startswith("compare/") else k, v)
                                          for k, v in m.items() if np.isfinite(v)])
        p = zm.plot_real_vs_generated(ref.x, fake.x, ref.cond["particle"][:, 0], figs / f"{name}_real_vs_generated.png")
        client.log_artifact(run_id, str(p), "zdc")
        if name == "corrvae":
            control = controlled(gen, ref, a.n_control, figs, client, run_id, properties_of_counts, PROPERTIES, zm)
            rows[name].update(control)

    print(f"\nZDC embedded data ({len(ref)} reference responses, same particles; lower is better, SSIM: 1)")
    print(f"{'metric':28s} {'corrvae':>12s} {'wgangp':>12s}")
    for k in HEADLINE + ("compare/train_s", "compare/generate_ms_per_event"):
        print(f"{k:28s} {rows['corrvae'].get(k, np.nan):12.4g} {rows['wgangp'].get(k, np.nan):12.4g}")
    better = rows["corrvae"]["zdc/ws_channels"] < rows["wgangp"]["zdc/ws_channels"]
    print(f"CorrVAE beats the WGAN-GP on zdc/ws_channels: {better}")
    print("\nproperty control (CorrVAE): |requested - achieved|, mean over requests")
    for k, v in sorted(rows["corrvae"].items()):
        if k.startswith("control/"):
            print(f"  {k:40s} {v:.4g}")
    print(f"figures: {figs}; MLflow: mlflow ui --backend-store-uri {uri}")


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def controlled(gen, ref, n, figs, client, run_id, props_of, names, zm) -> dict[str, float]:
    """Requests of single properties (reference quantiles) and of com = (10, 30) at ``n`` hit particles."""
    from caloexp import sampling

    ref_props = props_of(ref.x)
    hit = np.flatnonzero((ref_props[:, names.index("nonzero")] > 0) & (ref.cond["particle"][:, 0] > 500))[:n]
    cond = {"particle": ref.cond["particle"][hit]}
    model = gen.sampler.model
    lo, hi = model.prop_lo.double().cpu().numpy(), model.prop_hi.double().cpu().numpy()
    full_lo, full_hi = np.zeros(len(names)), np.ones(len(names))
    full_lo[model.prop_index], full_hi[model.prop_index] = lo, hi
    out: dict[str, float] = {}
    scaled = []
    for prop in CONTROLLED:
        k = names.index(prop)
        requested = np.quantile(ref_props[hit, k], [0.1, 0.3, 0.5, 0.7, 0.9])
        achieved = []
        for i, value in enumerate(requested):
            fake = sampling.generate(gen, cond, seed=100 + i, targets={prop: float(value)})
            achieved.append(props_of(fake.x)[:, k])
        achieved = np.stack(achieved)
        err = float(np.abs(achieved - requested[:, None]).mean())
        out[f"control/{prop}/abs_err"] = err
        scaled.append(err / (full_hi[k] - full_lo[k]))
        # without a target: how far the same particles' generated responses are from the requests
        free = props_of(sampling.generate(gen, cond, seed=99).x)[:, k]
        out[f"control/{prop}/abs_err_untargeted"] = float(np.abs(free[None] - requested[:, None]).mean())
        p = zm.plot_control(requested, achieved, prop, figs / f"control_{prop}.png")
        client.log_artifact(run_id, str(p), "zdc")
    out["control/abs_err_scaled_mean"] = float(np.mean(scaled))
    fake = sampling.generate(gen, cond, seed=200, targets=JOINT)
    joint = zm.control_error(fake.x, JOINT, full_lo, full_hi)
    out.update({k.replace("control/", "control/joint_"): v for k, v in joint.items() if "n_events" not in k})
    strips = gen.transform.inverse(
        gen.sampler.traverse(torch.as_tensor(gen.transform.condition(
            {"particle": torch.as_tensor(cond["particle"][:1])})), np.linspace(-2.5, 2.5, 7),
            torch.Generator().manual_seed(0)).reshape(-1, *gen.transform.net_shape),
        {}).reshape(model.w_dim, 7, *gen.transform.event_shape)[:, :, 0].numpy()
    for p in (zm.plot_traversals(strips, np.linspace(-2.5, 2.5, 7), figs / "corrvae_traversals.png"),
              zm.traversal_gif(strips, figs / "corrvae_traversals.gif")):
        client.log_artifact(run_id, str(p), "zdc")
    client.log_batch(run_id, metrics=[_metric(k, v) for k, v in out.items() if np.isfinite(v)])
    return out


if __name__ == "__main__":
    main()
