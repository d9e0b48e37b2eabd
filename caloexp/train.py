"""Train a generative calorimeter model: ``python -m caloexp.train [group=option] [key=value]``.

The loop, in the order it happens::

    data   = ShowerDataModule(...)                # files -> validated split -> transform
    model  = WGANGP / GAN / ...(data_shape, cond_dim)
    optims = one optimizer (and scheduler) per model role (generator, critic)
    for each step (one batch):
        losses = model.training_step(batch, step, optims)   # the family's own update order
        every log_every        -> losses, learning rates, throughput to MLflow
        every eval_every       -> generate at the reference energies, physics metrics (+ plots)
        every checkpoint_every -> checkpoint (and MLflow artifact)
    at the end: evaluation with plots, checkpoints, the generator as an MLflow model

The function returns the best value of ``optimized_metric`` (lower is better) so that
Hydra sweepers can optimise it.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from caloexp import checkpoint
from caloexp import config as _schemas  # noqa: F401 - registers typed config schemas
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.data.calochallenge import Showers
from caloexp.errors import ConfigError, TrainingDiverged
from caloexp.models.base import GenerativeModel, ShowerGenerator
from caloexp.tracking import Tracker

log = logging.getLogger("caloexp.train")


@dataclass
class State:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    evals: int = 0
    best: float = math.inf


# ----------------------------------------------------------------- building
def build(cfg: DictConfig, group: str, **kwargs):
    """Instantiate one config group; a bad value becomes one line naming the group."""
    try:
        return instantiate(cfg[group], **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"cannot build '{group}' ({cfg[group].get('_target_')}): {msg}") from None


def build_optimizer(cfg: DictConfig, role: str, params) -> torch.optim.Optimizer:
    """Shared optimizer settings, overridden by the role's own (``optimizer.<role>.*``)."""
    shared = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("generator", "critic")}
    settings = dict(shared, **OmegaConf.to_container(cfg.get(role) or {}, resolve=True))
    try:
        return hydra.utils.get_class(settings.pop("_target_"))(params, **settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer for {role}: {exc}") from None


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    settings = OmegaConf.to_container(cfg, resolve=True)
    target = settings.pop("_target_", None)
    settings.pop("monitor", None)
    if not target:
        return None
    try:
        return hydra.utils.get_class(target)(optimizer, **settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler {target}: {exc}") from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name}: CUDA is not available on this machine (use trainer.device=cpu)")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if str(precision) in ("32", "fp32", "32-true"):
        return nullcontext()
    if str(precision) in ("bf16", "bf16-mixed"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"trainer.precision={precision}: choose 32 or bf16")


# ---------------------------------------------------------------- resuming
def cli_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resumed_config(saved_yaml: str, cfg: DictConfig) -> DictConfig:
    """The interrupted run's config; the command line may change trainer/logger settings only."""
    saved = OmegaConf.create(saved_yaml)
    for override in cli_overrides():
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("resume",) or key.startswith("hydra."):
            continue
        new = OmegaConf.select(cfg, key, default=None)
        if key.startswith(("trainer.", "logger.")) or key in ("trainer", "logger"):
            OmegaConf.update(saved, key, OmegaConf.to_container(new, resolve=True) if isinstance(new, DictConfig) else new,
                             force_add=True)
            continue
        old = OmegaConf.select(saved, key, default=None)
        as_plain = lambda v: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v  # noqa: E731
        if as_plain(new) != as_plain(old):
            raise ConfigError(f"cannot change '{key}' when resuming (was {as_plain(old)!r}); "
                              "only trainer.* and logger.* may change")
    saved.resume = cfg.resume
    return saved


def configure_torch(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


# -------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_like(gen: ShowerGenerator, energies: np.ndarray, seed: int, batch_size: int = 10_000) -> np.ndarray:
    """Showers (MeV) at the given incident energies, in batches, with their own RNG."""
    device = gen.transform.shift.device
    rng = torch.Generator(device).manual_seed(int(seed))
    out = [gen(torch.as_tensor(energies[i:i + batch_size], device=device), rng).cpu().numpy()
           for i in range(0, len(energies), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, gen.transform.shift.numel()), np.float32)


def evaluate(cfg: DictConfig, model: GenerativeModel, gen: ShowerGenerator, reference: Showers, geometry,
             step: int, plots_dir: Path | None, tracker: Tracker) -> dict[str, float]:
    """Generate at the reference energies, compute physics metrics, optionally plot; log all."""
    from caloexp import metrics, plots

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    fake = Showers(reference.energies, generate_like(gen, reference.energies, seed=cfg.seed + step))
    bad = ~np.isfinite(fake.showers).all(axis=1)
    if bad.any():
        raise TrainingDiverged(f"step {step}: the generator produced NaN/inf showers ({int(bad.sum())} of "
                               f"{len(bad)}; training diverged: lower the learning rate)")
    groups = list(cfg.trainer.metrics)
    classifier = OmegaConf.to_container(cfg.trainer.classifier, resolve=True) if cfg.trainer.classifier else None
    result = metrics.evaluate(reference, fake, geometry, groups=groups, classifier=classifier, seed=cfg.seed)
    result["perf/eval_s"] = time.perf_counter() - t0
    tracker.log_metrics(result, step)
    if plots_dir is not None:
        out = plots_dir / f"step_{step:07d}"
        plots.plot_all(reference, fake, geometry, out)
        tracker.log_artifacts(out, f"plots/step_{step:07d}")
    model.train(was_training)
    return result


# ------------------------------------------------------------------ training
def train(cfg: DictConfig) -> float:
    """Train one model as configured; return the best ``trainer.monitor`` value (lower is better)."""
    ckpt = None
    if cfg.get("resume"):
        path = checkpoint.find(str(cfg.resume), Path(cfg.paths.root_dir) / "outputs", cfg.logger.tracking_uri)
        ckpt = checkpoint.load(path)
        cfg = resumed_config(ckpt["config_yaml"], cfg)
        log.info("resuming from %s at step %d", path, ckpt["state"]["step"])
    if cfg.trainer.max_steps is None and cfg.trainer.max_epochs is None:
        raise ConfigError("set trainer.max_steps or trainer.max_epochs: training needs an end")
    configure_torch(cfg)
    device = pick_device(str(cfg.trainer.device))

    data = build(cfg, "data").setup()
    model: GenerativeModel = build(cfg, "model", data_shape=data.data_shape, cond_dim=data.cond_dim)
    transform = data.fit_transform(model.output_range, device)
    model.to(device)
    model.rng = torch.Generator(device).manual_seed(cfg.seed)
    optimizers = {role: build_optimizer(cfg.optimizer, role, model.parameters_for(role)) for role in model.roles}
    schedulers = {role: s for role, opt in optimizers.items() if (s := build_scheduler(cfg.scheduler, opt))}
    plateau = any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in schedulers.values())
    state = State()

    run_dir = Path(ckpt["run_dir"]) if ckpt else Path(cfg.paths.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.logger.run_name,
                      cfg.logger.parent_run_id, cfg.logger.tags, cfg.logger.log_model)
    tracker.start(cfg, run_id=ckpt["run_id"] if ckpt else None,
                  extra_tags={"caloexp.output_dir": run_dir, "caloexp.checkpoint_dir": ckpt_dir,
                              "caloexp.overrides": " ".join(cli_overrides()), "caloexp.model": cfg.model._target_,
                              "caloexp.dataset": cfg.data.name})

    def save(name: str) -> Path:
        path = checkpoint.save(ckpt_dir / name, {
            "model": model.state_dict(), "transform": transform.state_dict(),
            "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
            "schedulers": {r: s.state_dict() for r, s in schedulers.items()},
            "rng": {"model": model.rng.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "state": asdict(state), "run_id": tracker.run_id, "run_dir": str(run_dir),
            "config_yaml": OmegaConf.to_yaml(cfg, resolve=True)})
        if cfg.logger.log_checkpoints:
            tracker.log_artifact(path, "checkpoints")
        return path

    tc = cfg.trainer
    monitor = str(tc.monitor)
    gen = ShowerGenerator(model.sampler(), transform)
    reference = data.reference()
    plots_dir = run_dir / "plots"
    amp = autocast(device, tc.precision)

    def done() -> bool:
        return (tc.max_steps is not None and state.step >= tc.max_steps) or \
               (tc.max_epochs is not None and state.epoch >= tc.max_epochs)

    def run_evaluation(final: bool) -> dict[str, float]:
        state.evals += 1
        with_plots = bool(tc.plot_every) and (final or state.evals % int(tc.plot_every) == 0)
        result = evaluate(cfg, model, gen, reference, data.geometry, state.step, plots_dir if with_plots else None, tracker)
        if monitor not in result:
            raise ConfigError(f"trainer.monitor={monitor!r} is not computed by trainer.metrics={list(tc.metrics)} "
                              f"(available: {', '.join(sorted(result)[:12])}, ...)")
        value = result[monitor]
        if plateau:
            for s in schedulers.values():
                s.step(value)
        if math.isfinite(value) and value < state.best:
            state.best = value
            save(checkpoint.BEST)
            tracker.log_metrics({f"best/{monitor}": value}, state.step)
        return result

    status = "FAILED"
    try:
        if ckpt:
            model.load_state_dict(ckpt["model"])
            transform.load_state_dict(ckpt["transform"])
            for role, opt in optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][role])
            for role, sched in schedulers.items():
                sched.load_state_dict(ckpt["schedulers"][role])
            model.rng.set_state(ckpt["rng"]["model"].to(model.rng.get_state().device))
            torch.set_rng_state(ckpt["rng"]["torch"])
            if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state_all(list(ckpt["rng"]["cuda"]))
            state = State(**ckpt["state"])
        model.train()
        t_last, steps_last = time.perf_counter(), state.step
        last_eval_step = -1
        while not done():
            for batch in data.train_batches(state.epoch, state.batch, seed=cfg.seed):
                with amp:
                    losses = model.training_step(batch, state.step, optimizers)
                if not plateau:
                    for s in schedulers.values():
                        s.step()
                state.step += 1
                state.batch += 1
                if state.batch >= data.steps_per_epoch:
                    state.epoch, state.batch = state.epoch + 1, 0

                if state.step % tc.log_every == 0:
                    values = {k: float(v) for k, v in losses.items()}
                    bad = [k for k, v in values.items() if not math.isfinite(v)]
                    if bad:
                        raise TrainingDiverged(f"step {state.step}: {', '.join(bad)} = "
                                               f"{', '.join(str(values[k]) for k in bad)} (training diverged; "
                                               "lower the learning rate or check the data)")
                    now = time.perf_counter()
                    rate = (state.step - steps_last) * data.batch_size / max(now - t_last, 1e-9)
                    t_last, steps_last = now, state.step
                    values.update({f"lr/{r}": o.param_groups[0]["lr"] for r, o in optimizers.items()})
                    values.update({"perf/showers_per_s": rate, "epoch": state.epoch})
                    tracker.log_metrics(values, state.step)
                if state.step % tc.eval_every == 0:
                    run_evaluation(final=done())
                    last_eval_step = state.step
                if state.step % tc.checkpoint_every == 0:
                    save(checkpoint.LAST)
                if done():
                    break
        if last_eval_step != state.step:
            run_evaluation(final=True)
        save(checkpoint.LAST)
        tracker.set_tags({"caloexp.final_step": state.step})
        tracker.log_generator(ShowerGenerator(model.sampler(), transform).to("cpu").eval())
        model.to(device)
        status = "FINISHED"
        log.info("finished at step %d; best %s = %.4g; run %s", state.step, monitor, state.best, tracker.run_id)
        return float(state.best)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    with report_errors():
        return train(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="train")


if __name__ == "__main__":
    main()
