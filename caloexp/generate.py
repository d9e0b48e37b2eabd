"""Generate showers with a trained model into a CaloChallenge-format HDF5 file.

``python -m caloexp.generate source=<MLflow run id | checkpoint | run dir> n_showers=10000``

The file holds ``incident_energies`` (N, 1) and ``showers`` (N, n_voxels) in MeV, the
layout the official CaloChallenge ``evaluate.py`` reads unchanged.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from caloexp import checkpoint
from caloexp import geometry as geo
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.data import calochallenge
from caloexp.data.transforms import ShowerTransform
from caloexp.errors import ConfigError, InputError
from caloexp.models.base import ShowerGenerator

log = logging.getLogger("caloexp.generate")

DATASET_1_ENERGIES = 2.0 ** np.arange(8, 23)  # 256 MeV ... 4.19 TeV


def generator_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ShowerGenerator, geo.Geometry]:
    """Rebuild the generator (network + fitted transform) from a training checkpoint."""
    state = checkpoint.load(path)
    cfg = OmegaConf.create(state["config_yaml"])
    geometry = geo.load(cfg.data.geometry)
    model = instantiate(cfg.model, data_shape=(geometry.n_voxels,), cond_dim=1)
    model.load_state_dict(state["model"])
    transform = ShowerTransform(geometry.n_voxels, output_range=model.output_range,
                                **OmegaConf.to_container(cfg.data.transform, resolve=True))
    transform.load_state_dict(state["transform"])
    return ShowerGenerator(model.sampler(), transform).to(device).eval(), geometry


def generator_from_mlflow(run_or_uri: str, tracking_uri: str, device: str | torch.device = "cpu") -> tuple[ShowerGenerator, geo.Geometry]:
    """Load the MLflow model logged by a training run (run id, runs:/ or models:/ URI)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.tracking.MlflowClient(tracking_uri)
    uri, run_id = run_or_uri, None
    if "://" not in run_or_uri and ":/" not in run_or_uri:
        run_id = run_or_uri
    elif run_or_uri.startswith("runs:/"):
        run_id = run_or_uri.split("/")[1]
    try:
        if run_id:
            run = client.get_run(run_id)
            uri = run.data.tags.get("caloexp.model_uri") or f"runs:/{run_id}/generator"
        gen = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
        if run_id is None:
            run_id = mlflow.models.get_model_info(uri).run_id
        geometry = geo.load(client.get_run(run_id).data.params["data.geometry"])
    except MlflowException as exc:
        raise InputError(f"{run_or_uri}: no generator model found at {tracking_uri} ({str(exc).splitlines()[0]})") from None
    return gen.to(device).eval(), geometry


def load_generator(source: str, tracking_uri: str, device: str | torch.device = "cpu") -> tuple[ShowerGenerator, geo.Geometry]:
    p = Path(source).expanduser()
    if p.exists():
        return generator_from_checkpoint(checkpoint.find(str(p), "."), device)
    return generator_from_mlflow(source, tracking_uri, device)


def incident_energies(spec, n: int | None, seed: int) -> np.ndarray:
    """Energies (MeV) to generate at: ``dataset_1``, a list of values, or a file to copy from."""
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


def generate(cfg: DictConfig) -> Path:
    from caloexp.train import generate_like, pick_device

    device = pick_device(str(cfg.device))
    gen, geometry = load_generator(str(cfg.source), cfg.tracking_uri, device)
    n = None if cfg.n_showers is None else int(cfg.n_showers)
    if n is not None and n < 1:
        raise ConfigError(f"n_showers={n}: must be >= 1")
    energies = incident_energies(cfg.energies, n, int(cfg.seed))
    out = Path(str(cfg.output))
    t0 = time.perf_counter()
    with calochallenge.ShowerWriter(out, geometry.n_voxels) as writer:
        bs = int(cfg.batch_size)
        for i in range(0, len(energies), bs):
            e = energies[i:i + bs]
            writer.append(e, generate_like(gen, e, seed=int(cfg.seed) * 7919 + i, batch_size=bs))
    dt = time.perf_counter() - t0
    log.info("wrote %d showers (%s, %d voxels) to %s in %.1f s (%.0f showers/s)",
             len(energies), geometry.name, geometry.n_voxels, out, dt, len(energies) / max(dt, 1e-9))
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        generate(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="generate")


if __name__ == "__main__":
    main()
