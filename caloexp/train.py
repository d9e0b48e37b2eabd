"""Train a generative model: ``python -m caloexp.train [group=option] [key=value]``.

The loop, in the order it happens::

    runtime = device, precision, seeds, process group (torchrun)
    data    = DataModule(...).setup(rank, world_size)     # files -> split -> reference, conditions
    model   = family(data_shape, cond_dim)                # nets built from the data's shapes
    optim   = Optim(model, ...)                           # one optimiser (+ scheduler, EMA) per role
    for each step (one batch per rank):
        logs = model.training_step(batch, step, optim)    # the family's maths; optim.step does the rest
        every log_every        -> losses, learning rates, throughput
        every eval_every       -> generate at the reference conditions, physics metrics (+ plots)
        every checkpoint_every -> checkpoint
    at the end: evaluation with plots, checkpoints, the generator as an MLflow model

Rank 0 alone tracks, checkpoints and evaluates. The function returns the best value of
``trainer.monitor`` (lower is better) so that Hydra sweepers can optimise it.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from caloexp import checkpoint, runtime, sampling
from caloexp import config as schemas
from caloexp.build import check_stored_config, instantiate
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.data.base import DataModule
from caloexp.errors import ConfigError, InputError, Interrupted, TrainingDiverged
from caloexp.models.base import GenerativeModel
from caloexp.optim import Optim
from caloexp.tracking import NullTracker, Tracker

log = logging.getLogger("caloexp.train")


@dataclass
class State:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    evals: int = 0
    best: float = math.inf
    seconds: float = 0.0  # training wall time so far (for trainer.max_time)


# ---------------------------------------------------------------- resuming
def cli_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resumed_config(saved_yaml: str, cfg: DictConfig, source: Any = "checkpoint") -> DictConfig:
    """The interrupted run's config; the command line may change trainer/logger settings only.

    The text comes from a file (``source``): it is read as plain YAML and everything it would build
    must pass the allow-list (:func:`caloexp.build.check_stored_config`) before anything is built."""
    try:
        saved = OmegaConf.create(saved_yaml)
    except Exception as exc:  # noqa: BLE001 - yaml/OmegaConf raise many types; the file is simply bad
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{source}: stored config is not a plain YAML mapping ({first})") from None
    if not isinstance(saved, DictConfig):
        raise InputError(f"{source}: stored config is not a plain YAML mapping")
    check_stored_config(saved, source)
    plain = lambda v: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v  # noqa: E731
    for override in cli_overrides():
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("resume",) or key.startswith("hydra."):
            continue
        new = OmegaConf.select(cfg, key, default=None)
        if key.startswith(("trainer.", "logger.")) or key in ("trainer", "logger"):
            OmegaConf.update(saved, key, plain(new), force_add=True)
            continue
        old = OmegaConf.select(saved, key, default=None)
        if plain(new) != plain(old):
            raise ConfigError(f"cannot change '{key}' when resuming (was {plain(old)!r}); "
                              "only trainer.* and logger.* may change")
    saved.resume = cfg.resume
    return saved


# -------------------------------------------------------------- evaluation
def evaluate(cfg: DictConfig, gen: sampling.EventGenerator, data: DataModule, step: int,
             plots_dir: Path | None, tracker) -> dict[str, float]:
    """Generate at the reference conditions, compute the physics metrics of the data's kind, plot; log all."""
    from caloexp import metrics

    t0 = time.perf_counter()
    reference = data.reference()
    fake = sampling.generate(gen, reference.cond, seed=cfg.seed + step)
    try:
        sampling.check_finite(fake, f"step {step}")
    except InputError as exc:  # non-finite generated events: the model diverged
        raise TrainingDiverged(f"{exc} (training diverged: lower the learning rate)") from None
    tc = cfg.trainer
    classifier = OmegaConf.to_container(tc.classifier, resolve=True) if tc.classifier else None
    groups = list(tc.metrics) if tc.metrics is not None else None
    ev = metrics.evaluate(reference, fake, getattr(data, "geometry", None), groups=groups, classifier=classifier,
                          seed=cfg.seed, return_features=True)
    result = dict(ev.metrics)
    result["perf/eval_s"] = time.perf_counter() - t0
    tracker.log_metrics(result, step)
    if plots_dir is not None and reference.kind in ("calo", "tabular", "grid"):   # the kinds with plots
        from caloexp import plots
        from caloexp.metrics import tabular

        out = plots_dir / f"step_{step:07d}"
        if reference.kind == "calo":
            plots.plot_all(reference, fake, data.geometry, out, features=(ev.reference_features, ev.generated_features))
        elif reference.kind == "tabular":
            lab = lambda s: tabular._labels(s.cond, len(s))  # noqa: E731
            tabular.plot_tabular(reference.x, lab(reference), fake.x, lab(fake), out, getattr(data, "columns", None))
        else:
            plots.plot_grid(reference, fake, out)
        tracker.log_artifacts(out, f"plots/step_{step:07d}")
    return result


def physics_summary(result: dict[str, float], monitor: str) -> str:
    """One line a physicist reads at each evaluation."""
    keys = [monitor] + [k for k in ("resp/max_mean_dev", "resp/max_width_ratio", "sep/mean", "tab/sep_mean_class",
                                    "tab/corr_max_class", "tab/spearman_max_class", "tab/auc",
                                    "tab/class_fid/max_dev") if k != monitor]
    parts = [f"{k} = {result[k]:.4g}" for k in keys if k in result]
    seps = sorted(((v, k) for k, v in result.items() if k.startswith("sep/") and k != "sep/mean"), reverse=True)[:3]
    if seps:
        parts.append("worst: " + ", ".join(f"{k[4:]} {v:.3f}" for v, k in seps))
    from caloexp.metrics import REGISTRY

    headline = [k for g in REGISTRY.values() for k in g.headline if k in result and k not in keys]
    parts += [f"{k} = {result[k]:.4g}" for k in headline]
    return "; ".join(parts)


# ------------------------------------------------------------------ training
class _StopFlag:
    """Ctrl-C asks the job to stop at its next safe point (a second Ctrl-C stops at once).

    In the loop that is the end of the current step (a checkpoint is written); during set-up it is
    each :meth:`check`, before anything is recorded. Set-up runs library code (imports, database
    migrations) that can swallow a KeyboardInterrupt raised at an arbitrary instruction, so the
    request is kept here rather than raised where the signal happens to land."""

    def __init__(self) -> None:
        self.requested = False
        self._installed, self._previous = False, None

    def __enter__(self) -> "_StopFlag":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. a joblib worker): leave signals alone
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """A safe point of set-up: stop here if Ctrl-C was pressed (nothing recorded yet)."""
        if self.requested:
            raise KeyboardInterrupt

    def release(self) -> None:
        """Back to the previous Ctrl-C handling (after the loop: KeyboardInterrupt at once)."""
        self.__exit__()
        self.check()

    def __exit__(self, *exc) -> None:
        if self._installed:   # None: a handler set outside Python, which Python cannot reinstall; use the default
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False


def train(cfg: DictConfig) -> float:
    """Train one model as configured; return the best ``trainer.monitor`` value (lower is better)."""
    with _StopFlag() as stop:
        return _train(cfg, stop)


def _train(cfg: DictConfig, stop: _StopFlag) -> float:
    ckpt, ckpt_path = None, None
    if str(cfg.get("resume")) == "auto":  # a requeued cluster job: continue its own run directory if it has begun
        own = Path(cfg.paths.output_dir) / "checkpoints" / checkpoint.LAST
        cfg.resume = str(Path(cfg.paths.output_dir)) if own.is_file() else None
    if cfg.get("resume"):
        ckpt_path, ckpt = checkpoint.load_for_resume(str(cfg.resume), Path(cfg.paths.root_dir) / "outputs",
                                                     cfg.logger.tracking_uri)
        cfg = resumed_config(ckpt["config_yaml"], cfg, ckpt_path)
        log.info("resuming from %s at step %d", ckpt_path, ckpt["state"]["step"])
    tc = cfg.trainer
    schemas.validate_trainer(tc)
    rt = runtime.setup(str(tc.device), str(tc.precision), str(tc.strategy), tc.num_threads, bool(tc.deterministic),
                       int(cfg.seed))

    data: DataModule = instantiate(cfg.data, "data", DataModule)
    if rt.is_main:
        data.prepare_data()      # download / generate once, before any rank reads
    rt.barrier()
    data.setup(rt.rank, rt.world_size)
    stop.check()
    model: GenerativeModel = instantiate(cfg.model, "model", GenerativeModel, data_shape=data.data_shape,
                                         cond_dim=data.cond_dim)
    transform = data.fit_transform(model.output_range, rt.device)
    model.to(rt.device)
    model.prepare(data)
    if tc.get("compile"):  # in place: parameter names (checkpoints, EMA, exports) stay as they are
        for role in model.roles:
            model.module_for(role).compile()
    rt.broadcast_module(model)
    model.rng = torch.Generator(rt.device).manual_seed(runtime.rank_seed(cfg.seed, rt.rank))
    optim = Optim(model, cfg.optimizer, cfg.scheduler, rt, tc.gradient_clip_val)
    gen = sampling.EventGenerator(model.sampler(), transform, data.kind)
    monitor = str(tc.monitor)
    if rt.is_main:
        check_monitor(cfg, gen, data, monitor)
    model_cfg = model.spec_config(OmegaConf.to_container(cfg.model, resolve=True))
    spec = sampling.spec_of(model_cfg, data.data_shape, data.cond_dim, transform, data.kind, data.writer_spec(),
                            data.describe())
    state = State()
    stop.check()   # the last point before the run is recorded; from here on Ctrl-C stops at a checkpoint

    run_dir = Path(ckpt["run_dir"]) if ckpt else Path(cfg.paths.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    tracker = Tracker(cfg.logger.tracking_uri, cfg.logger.experiment_name, cfg.logger.run_name,
                      cfg.logger.parent_run_id, cfg.logger.tags, cfg.logger.log_model) if rt.is_main else NullTracker()
    tracker.start(cfg, run_id=ckpt["run_id"] if ckpt else None,
                  extra_tags={"caloexp.output_dir": run_dir, "caloexp.checkpoint_dir": ckpt_dir,
                              "caloexp.overrides": " ".join(cli_overrides()), "caloexp.model": cfg.model._target_,
                              "caloexp.dataset": cfg.data.name, "caloexp.kind": data.kind,
                              "caloexp.world_size": rt.world_size})
    if not ckpt:
        tracker.log_dataset(data.describe())

    def save(name: str) -> Path | None:
        rngs = rt.gather_object({"model": model.rng.get_state(), "torch": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        if not rt.is_main:
            return None
        path = checkpoint.save(ckpt_dir / name, {
            "model": model.state_dict(), "transform": transform.state_dict(), "optim": optim.state_dict(),
            "rng": rngs[0], "rng_ranks": rngs, "state": asdict(state), "run_id": tracker.run_id,
            "run_dir": str(run_dir), "config_yaml": OmegaConf.to_yaml(cfg, resolve=True), "spec": spec})
        if cfg.logger.log_checkpoints:
            tracker.log_artifact(path, "checkpoints")
        return path

    plots_dir = run_dir / "plots"

    def done() -> bool:
        return (tc.max_steps is not None and state.step >= tc.max_steps) or \
               (tc.max_epochs is not None and state.epoch >= tc.max_epochs) or \
               (tc.get("max_time") is not None and state.seconds >= 60 * tc.max_time)

    def run_evaluation(final: bool) -> float | None:
        state.evals += 1
        value = None
        if rt.is_main:
            with_plots = bool(tc.plot_every) and (final or state.evals % int(tc.plot_every) == 0)
            model.eval()
            with optim.ema_weights():
                result = evaluate(cfg, gen, data, state.step, plots_dir if with_plots else None, tracker)
            model.train()
            value = result[monitor]
            log.info("step %d: %s", state.step, physics_summary(result, monitor))
        value = rt.broadcast_object(value)
        optim.scheduler_step(metric=value)
        if math.isfinite(value) and value < state.best:
            state.best = value
            save(checkpoint.BEST)
            tracker.log_metrics({f"best/{monitor}": value}, state.step)
        return value

    status = "FAILED"
    try:
        if ckpt:
            restore(ckpt, model, transform, optim, rt)
            state = State(**ckpt["state"])
        model.train()
        from caloexp.progress import Progress

        progress = Progress(total=tc.max_steps, start=state.step, enabled=rt.is_main)
        t_last, steps_last = time.perf_counter(), state.step
        t_start, seconds0 = t_last, state.seconds
        last_eval_step, last_ckpt_step = -1, state.step if ckpt else -1
        with progress:
            while not done():
                for batch in data.train_batches(state.epoch, state.batch, seed=cfg.seed):
                    logs = model.training_step(batch, state.step, optim)
                    optim.scheduler_step()
                    state.step += 1
                    state.seconds = rt.broadcast_object(seconds0 + time.perf_counter() - t_start) \
                        if tc.get("max_time") is not None else seconds0 + time.perf_counter() - t_start
                    state.batch += 1
                    if state.batch >= data.steps_per_epoch:
                        state.epoch, state.batch = state.epoch + 1, 0

                    if state.step % tc.log_every == 0:
                        values = {k: float(v) for k, v in logs.items()}
                        bad = [k for k, v in values.items() if not math.isfinite(v)]
                        if bad:
                            raise TrainingDiverged(f"step {state.step}: {', '.join(bad)} = "
                                                   f"{', '.join(str(values[k]) for k in bad)} (training diverged; "
                                                   "lower the learning rate or check the data)")
                        now = time.perf_counter()
                        rate = (state.step - steps_last) * data.global_batch / max(now - t_last, 1e-9)
                        t_last, steps_last = now, state.step
                        values.update(optim.learning_rates())
                        values.update({"perf/events_per_s": rate, "epoch": state.epoch})
                        tracker.log_metrics(values, state.step)
                        progress.update(state.step, state.epoch, values)
                    if state.step % tc.eval_every == 0:
                        run_evaluation(final=done())
                        last_eval_step = state.step
                    if state.step % tc.checkpoint_every == 0:
                        save(checkpoint.LAST)
                        last_ckpt_step = state.step
                    if rt.broadcast_object(stop.requested):
                        save(checkpoint.LAST)
                        raise Interrupted(f"interrupted at step {state.step}; checkpoint saved at step {state.step} "
                                          f"in {ckpt_dir}; continue with: python -m caloexp.train resume={run_dir}")
                    if done():
                        break
        stop.release()
        if last_eval_step != state.step:
            run_evaluation(final=True)
        save(checkpoint.LAST)
        digests = rt.gather_object(weights_digest(model))
        tracker.set_tags({"caloexp.final_step": state.step, "caloexp.weights_sha256": digests[0],
                          "caloexp.ranks_identical": str(len(set(digests)) == 1).lower()})
        if rt.is_main:
            with optim.ema_weights():
                tracker.log_generator(state_for_export(model, transform, optim, spec))
        status = "FINISHED"
        rt.barrier()   # every rank leaves together: none tears the process group down under another's feet
        if rt.is_main:
            log.info("finished at step %d; best %s = %.4g; run %s in %s\n  open: mlflow ui --backend-store-uri %s"
                     "  then %s\n  generate: python -m caloexp.generate source=%s", state.step, monitor, state.best,
                     tracker.run_id, run_dir, cfg.logger.tracking_uri, tracker.ui_link(), tracker.run_id)
        return float(state.best)
    except Interrupted:
        status = "KILLED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise Interrupted(f"interrupted at step {state.step}; last checkpoint at step {last_ckpt_step} in "
                          f"{ckpt_dir}; continue with: python -m caloexp.train resume={run_dir}") from None
    finally:
        tracker.end(status)
        runtime.teardown()


def check_monitor(cfg: DictConfig, gen: sampling.EventGenerator, data: DataModule, monitor: str) -> None:
    """Catch a monitor that the chosen metric groups never compute before any training (a tiny dry run)."""
    from caloexp import metrics

    tc = cfg.trainer
    groups = list(tc.metrics) if tc.metrics is not None else None
    ref = data.reference()
    small = ref.subset(slice(0, min(len(ref), 64)))
    cheap = None if groups is None else [g for g in groups if g not in ("classifier", "fpd_kpd")]
    names = set(metrics.evaluate(small, small, getattr(data, "geometry", None), groups=cheap or None)) if cheap != [] \
        else set()
    if groups and "fpd_kpd" in groups:
        names |= {"fpd", "fpd_err", "kpd", "kpd_err"}
    if groups and "classifier" in groups:
        names |= {f"cls/{p}_{i}" for p in ("auc", "jsd") for i in ("low", "low_normed", "high")}
    if monitor not in names:
        raise ConfigError(f"trainer.monitor={monitor!r} is not computed by trainer.metrics={groups} "
                          f"(available: {', '.join(sorted(names)[:15])}, ...)")


def restore(ckpt: dict[str, Any], model: GenerativeModel, transform, optim: Optim, rt: runtime.Runtime) -> None:
    model.load_state_dict(ckpt["model"])
    transform.load_state_dict(ckpt["transform"])
    optim.load_state_dict(ckpt["optim"])
    rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(rngs) != rt.world_size:
        log.warning("checkpoint was written by %d process(es), resuming with %d: noise streams are reseeded",
                    len(rngs), rt.world_size)
        return
    mine = rngs[rt.rank]
    model.rng.set_state(mine["model"].to(model.rng.get_state().device))
    torch.set_rng_state(mine["torch"])
    if torch.cuda.is_available() and mine.get("cuda") is not None:
        torch.cuda.set_rng_state_all(list(mine["cuda"]))


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: equal on all ranks when DDP kept them in sync."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_for_export(model: GenerativeModel, transform, optim: Optim, spec: dict[str, Any]) -> dict[str, Any]:
    """What the logged generator is rebuilt from: weights (EMA in place) and the plain spec."""
    return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "transform": {k: v.detach().cpu().clone() for k, v in transform.state_dict().items()}, "spec": spec}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    with report_errors():
        from caloexp import launch

        if launch.wants_torchrun(cfg):  # trainer.nproc_per_node > 1: one process per GPU, started here
            return launch.torchrun(cfg)
        return train(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="train")


if __name__ == "__main__":
    main()
