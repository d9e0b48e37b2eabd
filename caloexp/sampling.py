"""Generation in one place: the exported generator, batched generation, and rebuilding from a checkpoint.

:class:`EventGenerator` bundles a model's sampler with the fitted transform: physical conditions in
(a dict such as ``{"energy": MeV}``, or a tensor of energies as the calorimeter shorthand), physical
events out. Training's evaluation, ``caloexp.generate``, ``caloexp.evaluate`` and the logged MLflow
model all go through :func:`generate`.

A checkpoint alone rebuilds it: it stores a plain ``spec`` (model config, data shape, condition
names, transform spec, output format) and the weights. The model config is built through the
allow-list of :mod:`caloexp.build`, so nothing read from the file can run code.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from caloexp.data.sample import Sample
from caloexp.data.transforms import Transform
from caloexp.errors import ConfigError, InputError


class EventGenerator(nn.Module):
    """Self-contained generator: physical conditions -> physical events (e.g. MeV showers)."""

    def __init__(self, sampler: nn.Module, transform: Transform, kind: str = "calo",
                 options: Mapping[str, Any] | None = None):
        super().__init__()
        self.sampler = sampler
        self.transform = transform
        self.kind = kind
        self.options = dict(options or {})

    @property
    def cond_names(self) -> list[str]:
        return self.transform.cond_names

    def _as_dict(self, cond: Mapping[str, Any] | torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        if not isinstance(cond, Mapping):
            if self.cond_names != ["energy"]:
                raise ConfigError(f"this generator needs conditions {self.cond_names}; pass a dict")
            cond = {"energy": cond}
        device = self.transform.device
        out = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(device)
               for k, v in cond.items()}
        return {k: (v.reshape(-1) if k == "energy" else v) for k, v in out.items()}

    @torch.no_grad()
    def forward(self, cond: Mapping[str, Any] | torch.Tensor, rng: torch.Generator | None = None,
                **options: Any) -> torch.Tensor:
        c = self._as_dict(cond)
        dtype = next(self.sampler.parameters()).dtype
        if not hasattr(self.sampler, "draw_noise"):  # a sampler without the noise-explicit split
            x = self.sampler.sample(self.transform.condition(c).to(dtype), rng, **{**self.options, **options})
            return self.transform.inverse(x, c).to(torch.float32)
        n = next(iter(c.values())).shape[0] if c else 0
        return self.decode(self.sampler.draw_noise(n, rng, self.transform.device, dtype), c, **options)

    def decode(self, noise: torch.Tensor, cond: Mapping[str, torch.Tensor], **options: Any) -> torch.Tensor:
        """Physical events from given noise (the sampler's ``draw_noise``) and physical conditions.

        The deterministic part of :meth:`forward`: what an exported generator computes
        (:mod:`caloexp.export`)."""
        dtype = noise.dtype
        x = self.sampler.decode(noise, self.transform.condition(cond).to(dtype), **{**self.options, **options})
        return self.transform.inverse(x, cond).to(torch.float32)


@torch.no_grad()
def generate(gen: EventGenerator, cond: Mapping[str, np.ndarray], seed: int, batch_size: int = 10_000,
             **options: Any) -> Sample:
    """Events at the given conditions, in batches, with their own RNG (reproducible for a seed)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    cond = {k: np.asarray(v) for k, v in cond.items()}
    n = len(next(iter(cond.values()))) if cond else 0
    device = gen.transform.device
    rng = torch.Generator(device).manual_seed(int(seed))
    parts = [gen({k: v[i:i + batch_size] for k, v in cond.items()}, rng, **options).cpu().numpy()
             for i in range(0, n, batch_size)]
    x = np.concatenate(parts) if parts else np.zeros((0, *gen.transform.event_shape), np.float32)
    return Sample(x, cond, gen.kind)


def check_finite(sample: Sample, what: str) -> None:
    bad = ~np.isfinite(sample.x.reshape(len(sample), -1)).all(axis=1)
    if bad.any():
        raise InputError(f"{what}: {int(bad.sum())} of {len(bad)} generated events contain NaN/inf")


# ------------------------------------------------------------ from checkpoints
def spec_of(model_cfg: Mapping[str, Any], data_shape, cond_dim: int, transform: Transform, kind: str,
            writer: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The plain description stored in every checkpoint (no code, only names and numbers)."""
    return {"model": dict(model_cfg), "data_shape": list(data_shape), "cond_dim": int(cond_dim),
            "transform": transform.spec(), "kind": kind, "writer": dict(writer), "data": dict(data)}


def build_model(model_cfg: Mapping[str, Any], data_shape, cond_dim: int):
    from caloexp.build import instantiate
    from caloexp.models.base import GenerativeModel

    return instantiate(model_cfg, "model", GenerativeModel, data_shape=tuple(data_shape), cond_dim=int(cond_dim))


def from_state(state: Mapping[str, Any], device: str | torch.device = "cpu", ema: bool = True,
               origin: str | Path = "checkpoint") -> tuple[EventGenerator, dict[str, Any]]:
    """Rebuild the generator from a checkpoint's ``spec`` and weights (EMA weights when stored).

    ``origin`` (the file the state was read from) starts every error line."""
    spec = state.get("spec") if isinstance(state, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("model"), Mapping):
        raise InputError(f"{origin}: no generator spec (written by an older caloexp?)")
    try:
        model = build_model(spec["model"], spec.get("data_shape"), spec.get("cond_dim"))
    except ConfigError as exc:  # a foreign _target_ is refused: say which file it came from
        raise InputError(f"{origin}: generator spec: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{origin}: generator spec is malformed ({str(exc).splitlines()[0][:160]})") from None
    try:
        transform = Transform.from_spec(spec["transform"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:   # e.g. a setting this version does not know
        raise InputError(f"{origin}: its data transform spec does not build here "
                         f"({str(exc).splitlines()[0][:200]}; written by another caloexp version?)") from None
    try:
        model.load_state_dict(state["model"])
        transform.load_state_dict(state["transform"])
    except (RuntimeError, KeyError, TypeError, ValueError, ConfigError) as exc:
        raise InputError(f"{origin}: weights do not fit its spec ({str(exc).splitlines()[0][:200]})") from None
    shadows = (state.get("optim") or {}).get("ema") or {}
    if ema:
        for role, ema_state in shadows.items():
            with torch.no_grad():
                for p, s in zip(model.module_for(role).parameters(), ema_state["shadow"]):
                    p.copy_(s)
    gen = EventGenerator(model.sampler(), transform, spec.get("kind", "calo"))
    return gen.to(device).eval(), dict(spec)


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar on stderr: an error stays the one line the user reads."""
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


def _load_state(source: str, tracking_uri: str | None = None) -> tuple[dict[str, Any], Path | str]:
    """The state and the file it was read from."""
    p = Path(source).expanduser()
    from caloexp import checkpoint

    if p.exists():
        path = checkpoint.find(str(p), ".")
        return checkpoint.load(path), path
    if source.startswith("runs:/") or (len(source) == 32 and all(c in "0123456789abcdef" for c in source)):
        run_id = source.split("/")[1] if source.startswith("runs:/") else source
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        try:
            client.get_run(run_id)
            with _quiet_downloads():
                local = client.download_artifacts(run_id, "generator/generator.pt")
        except (MlflowException, OSError) as exc:
            try:  # an unfinished run has checkpoints but no logged generator yet
                path = checkpoint.find(run_id, ".", tracking_uri)
                return checkpoint.load(path), path
            except InputError:
                raise InputError(f"{source}: no generator found at {tracking_uri} "
                                 f"({str(exc).splitlines()[0][:160]})") from None
        origin = f"runs:/{run_id}/generator/generator.pt"
        try:
            return torch.load(local, map_location="cpu", weights_only=True), origin
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise InputError(f"{origin}: not a readable caloexp generator ({exc.__class__.__name__}; "
                             "loaded weights-only, nothing in it was run)") from None
    raise InputError(f"{source}: neither a checkpoint file, a run directory nor an MLflow run id")


def load(source: str, tracking_uri: str | None = None, device: str | torch.device = "cpu",
         ema: bool = True) -> tuple[EventGenerator, dict[str, Any]]:
    """The generator of a run id (``runs:/<id>``), a checkpoint or a run directory, ready to sample.

    ``tracking_uri`` is the MLflow store the run lives in (e.g. ``sqlite:///<project>/mlflow.db``).
    """
    state, origin = _load_state(source, tracking_uri)
    return from_state(state, device, ema, origin=origin)
