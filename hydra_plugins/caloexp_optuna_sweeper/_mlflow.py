"""MLflow side of a study: one parent run per study, trials as its nested child runs.

The training task creates each child run itself (``logger.parent_run_id`` + ``logger.tags``);
this module creates/reuses the parent run, links children back to Optuna trials, and logs the
study's best value, plots, trial table and best config to the parent.

Each trial's run also gets the swept values as params ``sweep.<name>`` (apart from the hundreds
of flattened config params) and the objective under ``optimized_metric``; the experiment's
runs-table view ``sweep`` (``viewStateShareKey=sweep`` in the UI link) shows exactly those.
"""
from __future__ import annotations

import csv
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from caloexp.tracking import get_or_create_experiment, set_runs_view

from ._coordination import outcome_counts

log = logging.getLogger(__name__)

ROLE_TAG = "caloexp.sweep_role"
SWEEP_PARAM_PREFIX = "sweep."
VIEW_KEY = "sweep"


class StudyTracker:
    """Parent run of ``study_name`` (identified by its ``sweep_id``) in ``experiment_name``."""

    def __init__(self, tracking_uri: str, experiment_name: str, study_name: str, sweep_id: str,
                 metric: str, swept: Optional[List[str]] = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri, self.study_name, self.sweep_id, self.metric = tracking_uri, study_name, sweep_id, metric
        self.experiment_id = get_or_create_experiment(self.client, experiment_name, tracking_uri)
        self.parent_run_id: Optional[str] = None
        self.swept: List[str] = list(swept or [])
        self._set_view()

    def _set_view(self) -> None:
        """Runs-table view ``sweep``: the objective and the swept parameters as columns, best first."""
        try:
            set_runs_view(self.client, self.experiment_id, [self.metric],
                          [SWEEP_PARAM_PREFIX + p for p in self.swept], key=VIEW_KEY)
        except Exception as e:  # tracking trouble must not stop the study
            log.warning("MLflow: could not store the runs view '%s': %s", VIEW_KEY, e)

    def open_parent(self, params: Dict[str, Any]) -> str:
        """Reuse the study's parent run (found by tags) or create it; call under the study lock."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.sweep_id = '{self.sweep_id}' and tags.`{ROLE_TAG}` = 'parent'",
            max_results=1)
        if runs:
            self.parent_run_id = runs[0].info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            log.info("MLflow: continuing parent run %s of study %s", self.parent_run_id, self.study_name)
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"optuna-{self.study_name}", tags={
                "optuna_study": self.study_name, "sweep_id": self.sweep_id, ROLE_TAG: "parent",
                "optimized_metric": self.metric})
            self.parent_run_id = run.info.run_id
            for k, v in params.items():
                self.client.log_param(self.parent_run_id, k, str(v)[:6000])
            log.info("MLflow: created parent run %s for study %s", self.parent_run_id, self.study_name)
        return self.parent_run_id

    def trial_overrides(self, number: int) -> List[str]:
        """Overrides that make the trial's training run a tagged, named child of the parent run."""
        return [f"++logger.parent_run_id={self.parent_run_id}",
                f"++logger.run_name='{self.study_name}-trial{number}'",
                f"++logger.tags.optuna_study='{self.study_name}'",
                f"++logger.tags.optuna_trial='{number}'",
                f"++logger.tags.sweep_id='{self.sweep_id}'"]

    def find_child(self, number: int) -> Optional[str]:
        """Run id of trial ``number``'s training run, if the task created one."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.sweep_id = '{self.sweep_id}' and tags.optuna_trial = '{number}'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def close_abandoned(self, number: int, reason: str) -> Optional[str]:
        """Close the child run of abandoned trial ``number`` as KILLED (tag ``optuna_state=ABANDONED``).

        A killed worker cannot end its own run, which would otherwise stay RUNNING forever."""
        try:
            run_id = self.find_child(number)
            if run_id is None:
                return None
            self.client.set_tag(run_id, "optuna_state", "ABANDONED")
            self.client.set_tag(run_id, "optuna_fail_reason", reason[:5000])
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
            log.info("MLflow: closed run %s of abandoned trial %d as KILLED", run_id, number)
            return run_id
        except Exception as e:  # tracking trouble must not stop the study
            log.warning("MLflow: could not close run of abandoned trial %d: %s", number, e)
            return None

    def after_trial(self, trial: FrozenTrial, run_id: Optional[str], params: Dict[str, Any]) -> None:
        """Mark the child with the trial's outcome; add the searched params/objective if the task did not."""
        if run_id is not None:
            try:
                self.client.set_tag(run_id, "optuna_state", trial.state.name)
                if trial.user_attrs.get("fail_reason"):
                    self.client.set_tag(run_id, "optuna_fail_reason", str(trial.user_attrs["fail_reason"])[:5000])
                if "retry_of" in trial.user_attrs:
                    self.client.set_tag(run_id, "optuna_retry_of", str(trial.user_attrs["retry_of"]))
                run = self.client.get_run(run_id)
                for k, v in params.items():
                    if k not in run.data.params:
                        self.client.log_param(run_id, k, str(v))
                    if SWEEP_PARAM_PREFIX + k not in run.data.params:
                        self.client.log_param(run_id, SWEEP_PARAM_PREFIX + k, str(v))
                if any(k not in self.swept for k in params):  # custom_search_space added some
                    self.swept += [k for k in params if k not in self.swept]
                    self._set_view()
                if trial.state == TrialState.COMPLETE and self.metric not in run.data.metrics:
                    self.client.log_metric(run_id, self.metric, float(trial.value))
            except Exception as e:  # tracking trouble must not stop the study
                log.warning("MLflow: could not annotate run %s of trial %d: %s", run_id, trial.number, e)
        self._log_progress(trial)

    def _log_progress(self, trial: FrozenTrial) -> None:
        try:
            if trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
                self.client.log_metric(self.parent_run_id, "trial_value", float(trial.value), step=trial.number)
        except Exception as e:
            log.warning("MLflow: could not log progress of trial %d: %s", trial.number, e)

    def finalize(self, study: optuna.Study, best_config: Optional[Path], finished: bool) -> None:
        """Log best value, counts, plots, trial table and best config to the parent run."""
        trials = study.get_trials(deepcopy=False)
        counts = outcome_counts(trials)
        # n_fail: trials that ran and failed; abandoned (killed/interrupted worker) ones are apart
        metrics = {"n_complete": counts["complete"], "n_pruned": counts["pruned"], "n_fail": counts["failed"],
                   "n_abandoned": counts["abandoned"], "n_retried": counts["retried"]}
        metrics = {k: float(v) for k, v in metrics.items()}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            metrics.update({self.metric: float(best.value), "best_value": float(best.value),
                            "best_trial": float(best.number)})
            self.client.set_tag(self.parent_run_id, "best_trial", str(best.number))
            self.client.set_tag(self.parent_run_id, "best_params",
                                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in best.params.items())[:5000])
            child = best.user_attrs.get("mlflow_run_id")
            if child:
                self.client.set_tag(self.parent_run_id, "best_run_id", str(child))
        for k, v in metrics.items():
            self.client.log_metric(self.parent_run_id, k, v)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            write_trials_csv(trials, out / "trials.csv")
            self.client.log_artifact(self.parent_run_id, str(out / "trials.csv"), "optuna")
            for png in save_plots(study, out):
                self.client.log_artifact(self.parent_run_id, str(png), "optuna")
            if best_config is not None and best_config.exists():
                self.client.log_artifact(self.parent_run_id, str(best_config), "best_config")
        self.client.set_terminated(self.parent_run_id, "FINISHED" if finished else "KILLED")


def write_trials_csv(trials: List[FrozenTrial], path: Path) -> None:
    """One row per trial: number, state, value, params, reason, MLflow run."""
    names = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", "value", *names, "fail_reason", "abandoned", "retry_of", "mlflow_run_id",
                    "worker", "output_dir"])
        for t in trials:
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                        *[t.params.get(n, "") for n in names], t.user_attrs.get("fail_reason", ""),
                        "yes" if t.user_attrs.get("abandoned") else "", t.user_attrs.get("retry_of", ""),
                        t.user_attrs.get("mlflow_run_id", ""), t.user_attrs.get("worker", ""),
                        t.user_attrs.get("output_dir", "")])


def save_plots(study: optuna.Study, out: Path) -> List[Path]:
    """Optuna's matplotlib plots that the study's trials allow; a plot that fails is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    n_complete = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    plots = {"optimization_history": (ovm.plot_optimization_history, 1),
             "param_importances": (ovm.plot_param_importances, 2),
             "slice": (ovm.plot_slice, 1),
             "parallel_coordinate": (ovm.plot_parallel_coordinate, 2)}
    written = []
    for name, (fn, min_complete) in plots.items():
        if n_complete < min_complete:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as e:  # e.g. importances of a single distinct value
            log.warning("Optuna plot %s skipped: %s", name, e)
    return written
