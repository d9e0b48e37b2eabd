"""Generate events with a trained model into the format of the data it learned.

``python -m caloexp.generate source=<MLflow run id | checkpoint | run dir> n_showers=10000``

CaloChallenge models write ``incident_energies`` (N, 1) and ``showers`` (N, n_voxels) in MeV, the
layout the official CaloChallenge ``evaluate.py`` reads; grid, image and tabular models write the
named datasets their data came from (e.g. ``ECAL``, ``energy``, ``theta``). The generator is rebuilt
from the checkpoint's plain spec and weights (:mod:`caloexp.sampling`): no file is unpickled.
Sampler options (``sampler='{...}'``) go to the model's sampler; a sampler with a ``report(sample, **options)``
(e.g. the CorrVAE's requested vs achieved properties) has it logged and written to ``<output>.report.json``.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from caloexp import runtime, sampling
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.data import calochallenge, formats
from caloexp.errors import ConfigError, InputError

log = logging.getLogger("caloexp.generate")

DATASET_1_ENERGIES = 2.0 ** np.arange(8, 23)  # 256 MeV ... 4.19 TeV


def incident_energies(spec: Any, n: int | None, seed: int) -> np.ndarray:
    """Energies (MeV) to generate at: ``dataset_1``, a list of values, or a CaloChallenge file to copy from."""
    rng = np.random.default_rng(seed)
    if isinstance(spec, (list, tuple, ListConfig)):
        values = np.asarray(list(spec), dtype=np.float64)
        if n is None or (values <= 0).any() or not np.isfinite(values).all():
            raise ConfigError(f"energies={list(spec)}: need positive finite MeV values and n_showers")
        return np.resize(values, n)
    if str(spec) == "dataset_1":
        if n is None:
            raise ConfigError("energies=dataset_1 needs n_showers")
        return rng.choice(DATASET_1_ENERGIES, size=n)
    path = Path(str(spec))
    if not path.exists():
        raise ConfigError(f"energies={spec}: not 'dataset_1', a list of MeV values, or an existing CaloChallenge file")
    e = np.concatenate([c.energies for c in calochallenge.iter_chunks(path, check=True)]).astype(np.float64)
    return e if n is None else e[:n]


def conditions_from_file(path: str, names: list[str], keys: dict[str, str], n: int | None) -> dict[str, np.ndarray]:
    """Conditions read from an HDF5/.npz file holding one dataset per condition (by name or data key)."""
    from caloexp.data.arrays import _open

    p = Path(path)
    with _open(p) as f:
        found = list(f.keys()) if hasattr(f, "keys") else list(f.files)
        out = {}
        for name in names:
            key = name if name in found else keys.get(name, name)
            if key not in found:
                raise InputError(f"{p}: no dataset for condition '{name}' (found {sorted(found)})")
            out[name] = np.asarray(f[key][:] if n is None else f[key][:n])
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        raise InputError(f"{p}: conditions have different lengths {sorted(lengths)}")
    return out


def class_labels(fractions: list[float], requested: Any, n: int, seed: int) -> np.ndarray:
    """``n`` class labels: in the training data's class fractions, or ``labels=`` (fractions or one class)."""
    frac = np.asarray(fractions if requested is None else
                      ([float(k == int(requested)) for k in range(len(fractions))]
                       if isinstance(requested, (int, float)) else list(requested)), dtype=np.float64)
    if len(frac) != len(fractions) or (frac < 0).any() or not frac.sum() > 0:
        raise ConfigError(f"labels={requested}: give a class 0..{len(fractions) - 1} or {len(fractions)} fractions")
    return np.random.default_rng(seed).choice(len(frac), size=n, p=frac / frac.sum()).astype(np.float32)


def generate(cfg: DictConfig) -> Path:
    device = runtime.pick_device(str(cfg.device))
    cast = runtime.Runtime(device, runtime.check_precision(cfg.get("precision", "32"), device, "precision")).autocast
    gen, spec = sampling.load(str(cfg.source), cfg.tracking_uri, device)
    n = None if cfg.n_showers is None else int(cfg.n_showers)
    if n is not None and n < 1:
        raise ConfigError(f"n_showers={n}: must be >= 1")
    if cfg.conditions is not None:
        cond = conditions_from_file(str(cfg.conditions), gen.cond_names, spec["writer"].get("conditions") or {}, n)
    elif gen.cond_names == ["label"] and spec["writer"].get("class_fractions") and n is not None:
        cond = {"label": class_labels(spec["writer"]["class_fractions"], cfg.get("labels"), n, int(cfg.seed))}
    elif gen.cond_names == ["energy"]:
        cond = {"energy": incident_energies(cfg.energies, n, int(cfg.seed))}
    else:
        raise ConfigError(f"this model needs conditions {gen.cond_names}: give conditions=<file with those datasets>")
    options = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else {}
    out = Path(str(cfg.output))
    client = run_id = None
    if cfg.get("mlflow") or cfg.get("mlflow_run") is not None:  # opened first: a bad run id fails before the work
        from mlflow.tracking import MlflowClient

        from caloexp.tracking import start_side_run

        client = MlflowClient(str(cfg.tracking_uri))
        run_id = start_side_run(client, str(cfg.tracking_uri), str(cfg.experiment_name), cfg.mlflow_run,
                                "caloexp.generates", "generate", out.stem)
    status = "FAILED"
    try:
        if run_id:  # one small batch first, so that the timing leaves out one-off start-up costs
            with cast():
                sampling.generate(gen, {k: v[:100] for k, v in cond.items()}, seed=int(cfg.seed) + 1, **options)
        t0 = time.perf_counter()
        with cast():
            sample = sampling.generate(gen, cond, seed=int(cfg.seed), batch_size=int(cfg.batch_size), **options)
        dt = time.perf_counter() - t0
        formats.write(out, sample, spec["writer"])
        report = getattr(gen.sampler, "report", None)  # e.g. requested vs achieved properties of controlled generation
        summary = report(sample, **options) if callable(report) else {}
        if summary:
            path = out.with_name(out.name + ".report.json")
            path.write_text(json.dumps(summary, indent=1, sort_keys=True))
            log.info("sampler report (%s): %s", path,
                     ", ".join(f"{k} = {v:.4g}" for k, v in sorted(summary.items())))
        log.info("wrote %d events (%s, shape %s) to %s in %.1f s (%.0f events/s, %.4g ms/event at batch %d)",
                 len(sample), spec["kind"], tuple(sample.event_shape), out, dt, len(sample) / max(dt, 1e-9),
                 1e3 * dt / max(len(sample), 1), int(cfg.batch_size))
        if run_id:
            log_timing(client, run_id, cfg, gen, spec, options, len(sample), dt, device)
        status = "FINISHED"
    finally:
        if run_id:
            client.set_terminated(run_id, status)
    return out


def sampler_settings(gen: sampling.EventGenerator, spec: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The sampler options a generation used: given ones, else the generator's, else the model config's.

    Named from the signature of the sampler's ``decode`` (else ``sample``), e.g. ``steps``, ``solver``;
    a sampler without named options (a GAN's generator) is one network pass, recorded as ``steps: 1``.
    """
    params = inspect.signature(getattr(gen.sampler, "decode", gen.sampler.sample)).parameters
    names = [n for n, p in params.items() if n not in ("cond", "rng", "noise") and p.kind is not p.VAR_KEYWORD]
    if not names:
        return {"steps": 1}
    model_cfg = spec.get("model") or {}
    out = {}
    for n in names:
        value = options.get(n, gen.options.get(n, model_cfg.get(n, params[n].default)))
        if value is not None and value is not inspect.Parameter.empty:
            out[n] = value
    return out


def log_timing(client: Any, run_id: str, cfg: DictConfig, gen: sampling.EventGenerator, spec: dict[str, Any],
               options: dict[str, Any], n: int, seconds: float, device: Any) -> None:
    """Log the generation time (``gen/ms_per_shower``, ``gen/showers_per_s``) with the batch size, device
    and sampler settings as params to MLflow run ``run_id`` (a child of ``mlflow_run``, tag ``caloexp.generates``)."""
    import torch
    from mlflow.entities import Metric, Param

    settings = sampler_settings(gen, spec, options)
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type}, {os.cpu_count()} CPU cores"
    params = {"gen.batch_size": int(cfg.batch_size), "gen.n_showers": n, "gen.device": str(dev), "gen.device_name": name,
              "gen.precision": str(cfg.get("precision", "32")),
              "gen.threads": torch.get_num_threads(), "gen.source": str(cfg.source),
              **{f"gen.sampler.{k}": v for k, v in settings.items()}}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("gen/ms_per_shower", 1e3 * seconds / max(n, 1), now, 0),
                                      Metric("gen/showers_per_s", n / max(seconds, 1e-12), now, 0)],
                     params=[Param(k, str(v)) for k, v in params.items()])
    log.info("logged the generation time to MLflow run %s%s", run_id,
             f" (generates with run {cfg.mlflow_run})" if cfg.mlflow_run else "")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        generate(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="generate")


if __name__ == "__main__":
    main()
