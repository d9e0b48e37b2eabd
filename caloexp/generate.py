"""Generate events with a trained model into the format of the data it learned.

``python -m caloexp.generate source=<MLflow run id | checkpoint | run dir> n_showers=10000``

CaloChallenge models write ``incident_energies`` (N, 1) and ``showers`` (N, n_voxels) in MeV, the
layout the official CaloChallenge ``evaluate.py`` reads; grid, image and tabular models write the
named datasets their data came from (e.g. ``ECAL``, ``energy``, ``theta``). The generator is rebuilt
from the checkpoint's plain spec and weights (:mod:`caloexp.sampling`): no file is unpickled.
"""
from __future__ import annotations

import logging
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
    t0 = time.perf_counter()
    sample = sampling.generate(gen, cond, seed=int(cfg.seed), batch_size=int(cfg.batch_size), **options)
    dt = time.perf_counter() - t0
    formats.write(out, sample, spec["writer"])
    log.info("wrote %d events (%s, shape %s) to %s in %.1f s (%.0f events/s)", len(sample), spec["kind"],
             tuple(sample.event_shape), out, dt, len(sample) / max(dt, 1e-9))
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        generate(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="generate")


if __name__ == "__main__":
    main()
