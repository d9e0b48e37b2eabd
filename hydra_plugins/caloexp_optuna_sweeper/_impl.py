"""The study loop: reserve trials under the study lock, launch them through Hydra's launcher, tell results."""
from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState

from . import _coordination as co
from ._best_config import render_best_config, write_best_config
from ._search_space import SweepConfigError, format_value, parse_search_space
from .searchpath import EXPERIMENTS_DIR

log = logging.getLogger(__name__)

# exceptions (by qualified class name, anywhere in the MRO) that mark a trial PRUNED instead of FAIL:
# a diverged trial tells the sampler "bad region", a FAIL trial is ignored by it.
PRUNING_EXCEPTIONS = ("caloexp.errors.TrainingDiverged", "optuna.exceptions.TrialPruned")


def _qualnames(exc: BaseException) -> List[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__]


def classify_failure(exc: BaseException) -> Tuple[TrialState, str]:
    """State and one-line reason for a trial whose job raised ``exc``."""
    kind = type(exc).__name__
    text = " ".join(str(exc).split())[:500]
    if any(n in PRUNING_EXCEPTIONS for n in _qualnames(exc)):
        return TrialState.PRUNED, f"{kind}: {text}"
    if "out of memory" in text.lower() or isinstance(exc, MemoryError):
        return TrialState.FAIL, f"out of memory ({kind}: {text})"
    return TrialState.FAIL, f"{kind}: {text}"


def job_outcome(ret: JobReturn) -> Tuple[TrialState, Optional[float], Optional[str]]:
    """(state, value, fail reason) of one launched trial."""
    if ret.status != JobStatus.COMPLETED:
        exc = ret._return_value  # the exception the task raised (JobReturn keeps it here)
        if not isinstance(exc, BaseException):
            return TrialState.FAIL, None, f"job failed with status {ret.status.name}"
        state, reason = classify_failure(exc)
        return state, None, reason
    value = ret.return_value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None, f"task returned {value!r}, not a float (is optimized_metric set?)"
    if not math.isfinite(value):
        return TrialState.FAIL, None, f"objective is {value}"
    return TrialState.COMPLETE, value, None


class StudyRunner:
    """Runs one worker's share of a study; created by ``CaloexpOptunaSweeper.sweep``."""

    def __init__(self, sweeper: Any, arguments: List[str]) -> None:
        self.s = sweeper
        cfg: DictConfig = sweeper.config
        choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
        self.groups = set(choices.keys())
        sweep_name = choices.get("sweeps")
        sweep_file = f"sweeps/{sweep_name}.yaml" if sweep_name else None
        where = sweep_file or "hydra.sweeper"
        params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.params else {}
        self.specs, self.fixed = parse_search_space(params or {}, arguments, sweep_file)
        if not self.specs and not sweeper.custom_search_space:
            raise SweepConfigError(f"{where}: hydra.sweeper.params: no searched parameter "
                                   f"(use choice/range/interval values)")
        if sweeper.direction not in ("minimize", "maximize"):
            raise SweepConfigError(f"{where}: hydra.sweeper.direction: must be minimize or maximize, "
                                   f"got {sweeper.direction!r}")
        if sweeper.n_trials is None or int(sweeper.n_trials) < 1:
            raise SweepConfigError(f"{where}: hydra.sweeper.n_trials: must be >= 1, got {sweeper.n_trials!r}")
        self.where = where
        self.n_trials = int(sweeper.n_trials)
        n_jobs = sweeper.n_jobs if sweeper.n_jobs is not None else OmegaConf.select(cfg, "hydra.launcher.n_jobs")
        # joblib's n_jobs=-1 means "all cores"
        self.n_jobs = 1 if n_jobs is None else int(n_jobs) if int(n_jobs) >= 1 else (os.cpu_count() or 1)
        self.study_name = sweeper.study_name or sweep_name or str(cfg.hydra.job.name)
        root = OmegaConf.select(cfg, "paths.root_dir", default=None) or os.getcwd()
        self.storage_url = sweeper.storage or f"sqlite:///{Path(root).resolve()}/optuna.db"
        self.metric = str(OmegaConf.select(cfg, "optimized_metric", default=None) or "objective")
        self.extender = get_method(sweeper.custom_search_space) if sweeper.custom_search_space else None
        tracking_uri = OmegaConf.select(cfg, "logger.tracking_uri", default=None)
        self.use_mlflow = bool(tracking_uri) if sweeper.mlflow is None else bool(sweeper.mlflow)
        if self.use_mlflow and not tracking_uri:
            raise SweepConfigError(f"{where}: hydra.sweeper.mlflow is true but logger.tracking_uri is not set")
        self.tracking_uri = str(tracking_uri) if tracking_uri else None
        self.experiment_name = str(OmegaConf.select(cfg, "logger.experiment_name", default=None) or "Default")
        # outside the source tree: <paths.root_dir>/experiments, served as group `experiment` by searchpath.py
        best_dir = Path(sweeper.best_config_dir) if sweeper.best_config_dir else Path(root).resolve() / EXPERIMENTS_DIR
        self.best_config_path = best_dir / f"{self.study_name}_best.yaml"
        self.tracker: Any = None
        self.sampler_ready = False

    # -- storage ----------------------------------------------------------------------------
    def _open_study(self) -> Tuple[optuna.Study, Any]:
        url = self.storage_url
        engine_kwargs: Dict[str, Any] = {}
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"connect_args": {"timeout": self.s.sqlite_timeout}}
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        study = optuna.create_study(study_name=self.study_name, storage=storage,
                                    direction=self.s.direction, load_if_exists=True)
        if study.direction.name.lower() != self.s.direction:
            raise SweepConfigError(f"{self.where}: hydra.sweeper.direction: study '{self.study_name}' in {url} "
                                   f"was created with direction {study.direction.name.lower()}")
        return study, storage

    def _make_sampler(self, n_existing: int) -> optuna.samplers.BaseSampler:
        """Sampler from ``hydra.sweeper.sampler``; the seed is offset by the trials already in the study
        so that a resumed study, or a second worker, does not repeat the first one's startup trials."""
        conf = OmegaConf.create(OmegaConf.to_container(self.s.sampler, resolve=True)) if self.s.sampler else None
        if conf is None:
            return optuna.samplers.TPESampler()
        kwargs = {}
        if conf.get("seed") is not None:
            kwargs["seed"] = int(conf.seed) + n_existing
        try:
            return instantiate(conf, **kwargs)
        except Exception as e:
            raise SweepConfigError(f"{self.where}: hydra.sweeper.sampler: cannot instantiate "
                                   f"{conf.get('_target_')}: {e}") from None

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Optional[FrozenTrial]:
        """Reserve/launch/tell until the study holds n_trials counted trials; returns the best trial."""
        with co.study_lock(self.storage_url, self.study_name):
            study, storage = self._open_study()
            self.study_id = storage.get_study_id_from_name(self.study_name)
            sweep_id = study.user_attrs.get("sweep_id")
            if sweep_id is None:
                sweep_id = f"{self.study_name}-{uuid.uuid4().hex[:8]}"
                study.set_user_attr("sweep_id", sweep_id)
            self.sweep_id = str(sweep_id)
            if self.use_mlflow:
                from ._mlflow import StudyTracker

                self.tracker = StudyTracker(self.tracking_uri, self.experiment_name, self.study_name,
                                            sweep_id, self.metric, [spec.name for spec in self.specs])
                self.tracker.open_parent(self._parent_params())
        log.info("Study '%s' (sweep id %s) in %s: %d trials in total, %d per batch, %s %s",
                 self.study_name, sweep_id, self.storage_url, self.n_trials, self.n_jobs,
                 self.s.direction, self.metric)
        heartbeat = co.Heartbeat(storage, self.s.heartbeat_interval)
        job_idx, finished = 0, False
        try:
            while True:
                batch = self._reserve(study, storage, heartbeat)
                if batch is None:
                    finished = True
                    break
                if not batch:  # budget taken by running trials of other workers: wait for them
                    heartbeat.sleep(min(self.s.heartbeat_interval, 10))
                    continue
                trials, overrides = zip(*batch)
                ids = [self._tid(storage, t) for t in trials]
                heartbeat.add(ids)
                try:
                    returns = self.s.launcher.launch(list(overrides), initial_job_idx=job_idx)
                except BaseException as e:  # Ctrl-C, launcher failure: free these trials for a rerun
                    with co.study_lock(self.storage_url, self.study_name):
                        for tid in ids:
                            self._abandon(study, storage, storage.get_trial(tid),
                                          f"abandoned: sweep interrupted ({type(e).__name__})")
                    raise
                finally:
                    heartbeat.remove(ids)
                job_idx += len(returns)
                for trial, ret in zip(trials, returns):
                    self._tell(study, trial, ret)
        finally:
            heartbeat.stop()
            self._finalize(study, finished)
        return self._best(study)

    def _reserve(self, study: optuna.Study, storage: Any, heartbeat: co.Heartbeat
                 ) -> Optional[List[Tuple[Trial, Tuple[str, ...]]]]:
        """Under the lock: fail abandoned trials, count the budget, ask up to n_jobs new trials.
        Returns None when the study is done, [] when only other workers' trials are left."""
        with co.study_lock(self.storage_url, self.study_name):
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("worker") == co.WORKER:
                    continue
                reason = co.abandon_reason(t, self.s.grace_period)
                if reason:
                    self._abandon(study, storage, t, reason)
            trials = study.get_trials(deepcopy=False)
            used = sum(co.counts_toward_budget(t) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            remaining = self.n_trials - used
            if remaining <= 0:
                return [] if running else None
            if not self.sampler_ready:  # first reservation of this worker: seed from the study's size
                study.sampler = self._make_sampler(len(trials))
                self.sampler_ready = True
            batch = []
            for _ in range(min(self.n_jobs, remaining)):
                trial = study.ask()
                trial.set_user_attr("worker", co.WORKER)
                heartbeat.beat(self._tid(storage, trial))
                batch.append((trial, self._overrides(trial)))
            log.info("Reserved trial(s) %s (%d of %d used)", [t.number for t, _ in batch],
                     used + len(batch), self.n_trials)
            return batch

    def _abandon(self, study: optuna.Study, storage: Any, trial: FrozenTrial, reason: str) -> None:
        """Fail an abandoned trial (re-queued once) and close its MLflow child run as KILLED."""
        if co.mark_abandoned(study, storage, trial, reason, self.s.retry_abandoned) and self.tracker is not None:
            self.tracker.close_abandoned(trial.number, reason)

    def trial_subdir(self, number: int) -> str:
        """Output directory of trial ``number`` below ``hydra.sweep.dir``: unique per study and trial.

        Hydra's default ``${hydra.job.num}`` restarts at 0 in every worker process, so two workers that
        resolve the same ``${now:...}`` sweep dir (or a resumed study) would share folders."""
        return f"{self.sweep_id}/trial_{number:04d}"

    def _tid(self, storage: Any, trial: Trial) -> int:
        return storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def _overrides(self, trial: Trial) -> Tuple[str, ...]:
        for spec in self.specs:
            spec.suggest(trial)
        if self.extender is not None:
            self.extender(self.s.config, trial)
        out = [ov.input_line or f"{ov.get_key_element()}={ov.get_value_element_as_str()}"
               for k, ov in self.fixed.items() if k not in trial.params]
        out += [f"{k}={format_value(v)}" for k, v in trial.params.items()]
        out.append(f"hydra.sweep.subdir={format_value(self.trial_subdir(trial.number))}")
        if self.tracker is not None:
            out += self.tracker.trial_overrides(trial.number)
        return tuple(out)

    def _tell(self, study: optuna.Study, trial: Trial, ret: JobReturn) -> None:
        state, value, reason = job_outcome(ret)
        try:
            if reason:
                trial.set_user_attr("fail_reason", reason)
            if ret.hydra_cfg is not None:
                out_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None)
                if out_dir:
                    trial.set_user_attr("output_dir", str(out_dir))
            run_id = self.tracker.find_child(trial.number) if self.tracker is not None else None
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
        except Exception as e:
            log.warning("Trial %d: could not record attributes: %s", trial.number, e)
            run_id = None
        frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state,
                            skip_if_finished=True)
        if state == TrialState.COMPLETE:
            log.info("Trial %d finished: %s = %.6g  %s", trial.number, self.metric, value, trial.params)
        else:
            log.warning("Trial %d %s: %s", trial.number, state.name, reason)
        if self.tracker is not None:
            self.tracker.after_trial(frozen, run_id, dict(trial.params))

    # -- results ----------------------------------------------------------------------------
    @staticmethod
    def _best(study: optuna.Study) -> Optional[FrozenTrial]:
        try:
            return study.best_trial
        except ValueError:
            return None

    def _parent_params(self) -> Dict[str, Any]:
        space = {f"space.{s.name}": (f"choice{s.choices}" if s.kind == "categorical" else
                                     f"{s.kind}[{s.low}, {s.high}]" + (" log" if s.log else "") +
                                     (f" step {s.step}" if s.step else "")) for s in self.specs}
        sampler = OmegaConf.to_container(self.s.sampler, resolve=True) if self.s.sampler else {}
        return {"study_name": self.study_name, "n_trials": self.n_trials, "direction": self.s.direction,
                "optimized_metric": self.metric, "sampler": (sampler or {}).get("_target_", "TPESampler"),
                "sampler_seed": (sampler or {}).get("seed"), **space}

    def _finalize(self, study: optuna.Study, finished: bool) -> None:
        counts = co.outcome_counts(study.get_trials(deepcopy=False))
        log.info("Study '%s': %s", self.study_name, ", ".join(f"{n} {k}" for k, n in counts.items()))
        best = self._best(study)
        if best is None:
            log.warning("Study '%s': no trial has completed yet; see each trial's fail_reason "
                        "(optuna.load_study(...).trials or the trials.csv artifact)", self.study_name)
        path = None
        if best is not None and self.best_config_path is not None:
            try:
                text = render_best_config(
                    study_name=self.study_name, trial_number=best.number, value=float(best.value),
                    metric=self.metric, direction=self.s.direction, params=dict(best.params),
                    fixed=self.fixed, groups=self.groups)
                path = write_best_config(self.best_config_path, text)
                log.info("Best trial %d (%s = %.6g): %s -> %s", best.number, self.metric, best.value,
                         best.params, path)
            except Exception as e:
                log.warning("Could not write the best config to %s: %s", self.best_config_path, e)
        if self.tracker is not None:
            try:
                self.tracker.finalize(study, path, finished)
            except Exception as e:
                log.warning("MLflow: could not finalize parent run %s: %s", self.tracker.parent_run_id, e)
