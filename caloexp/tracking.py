"""MLflow bookkeeping for one training run: the only module that talks to MLflow while training.

What a run records: the resolved config (flattened params + ``config.yaml``), Hydra
overrides, git commit and output directory as tags, metrics per step, plots,
checkpoints and the final generator as an MLflow PyTorch model.

Resuming re-opens the same run. Metrics already recorded at a step are not logged
again (the resumed run recomputes bit-identical values for them on CPU), so a
metric's history has every step exactly once however often the run was interrupted.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from caloexp.config import run_name  # noqa: F401 - run names are composed with the config (re-exported)
from caloexp.errors import CaloexpError

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow < 3.17 only; kept for those UIs and the API

# MLflow 3.17's UI ignores the experiment-kind tag: the experiment page's kind comes from the
# ``workflowType`` URL parameter, else from the browser's localStorage key ``mlflow.workflowType``
# (default "genai", i.e. the GenAI Overview with its popup). ``?workflowType=machine_learning``
# opens the runs table. A shared view (experiment tag ``mlflow.sharedViewState.<key>``, a JSON
# of search facets and UI state, opened with ``?viewStateShareKey=<key>``) picks the columns.
UI_VIEW_KEY = "caloexp"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
#: Metric columns of the runs table's default view: the objective first (the table is sorted by it).
RUNS_VIEW_METRICS: tuple[str, ...] = ("monitor/score", "resp/max_mean_dev", "resp/max_width_ratio", "sep/mean",
                                      "sep/E_ratio")
_RUN_NAME_COLUMN = "attributes.`Run Name`"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD of the checkout; in an image without .git, the commit it was built from (CALOEXP_GIT_COMMIT)."""
    built = os.environ.get("CALOEXP_GIT_COMMIT", "")
    if built and built != "unknown":
        return built
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database (not into whatever the cwd is)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None  # a server (or other store) decides


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str = "") -> str:
    """Id of experiment ``name``, created when missing; makes sure it carries the runs-table view."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri),
                                            tags={EXPERIMENT_KIND_TAG: "custom_model_development",
                                                  SHARED_VIEW_TAG + UI_VIEW_KEY: json.dumps(runs_view_state())})
        except Exception:  # noqa: BLE001 - created meanwhile by a concurrent process (sweep workers)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    if exp.tags.get(SHARED_VIEW_TAG + UI_VIEW_KEY) is None:
        client.set_experiment_tag(exp.experiment_id, SHARED_VIEW_TAG + UI_VIEW_KEY, json.dumps(runs_view_state()))
    return exp.experiment_id


def start_side_run(client: MlflowClient, tracking_uri: str, experiment_name: str, of_run: str | None,
                   tag: str, prefix: str, name: str) -> str:
    """Create a run recording work done on a trained model (an evaluation, a generation timing); its id.

    With ``of_run`` (a training run id) the new run lies in that run's experiment as its child
    (``mlflow.parentRunId``) tagged ``<tag>=<id>`` and is named ``<prefix>-<run name>``; the training
    run itself is never reopened. Else it is ``<prefix>-<name>`` in experiment ``experiment_name``.
    """
    from mlflow.exceptions import MlflowException

    from caloexp.errors import InputError

    if of_run is None:
        exp = get_or_create_experiment(client, experiment_name, tracking_uri)
        return client.create_run(exp, run_name=f"{prefix}-{name}").info.run_id
    try:
        trained = client.get_run(str(of_run))
    except MlflowException as exc:
        raise InputError(f"mlflow_run={of_run}: no such run at {tracking_uri} "
                         f"({str(exc).splitlines()[0]})") from None
    tags = {"mlflow.parentRunId": trained.info.run_id, tag: trained.info.run_id}
    run_name = f"{prefix}-{trained.info.run_name or trained.info.run_id[:8]}"
    return client.create_run(trained.info.experiment_id, run_name=run_name, tags=tags).info.run_id


def _col(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def runs_view_state(metrics: Sequence[str] = RUNS_VIEW_METRICS, params: Sequence[str] = ()) -> dict[str, Any]:
    """The runs table's shared view: run names in full, then the given metric and param columns,
    sorted by the first metric (lower is better)."""
    cols = [_col("metrics", m) for m in metrics] + [_col("params", p) for p in params]
    state: dict[str, Any] = {"selectedColumns": cols, "columnOrder": [_RUN_NAME_COLUMN] + cols,
                             "columnWidths": {_RUN_NAME_COLUMN: 380}}
    if metrics:
        state.update(orderByKey=_col("metrics", metrics[0]), orderByAsc=True)
    return state


def set_runs_view(client: MlflowClient, experiment_id: str, metrics: Sequence[str] = RUNS_VIEW_METRICS,
                  params: Sequence[str] = (), key: str = UI_VIEW_KEY) -> None:
    """Store (or replace) the runs-table view ``key`` of an experiment, e.g. a sweep's swept params."""
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(runs_view_state(metrics, params)))


def ui_url(server: str, experiment_id: str, view: str | None = UI_VIEW_KEY) -> str:
    """Link that opens an experiment on its runs table (not MLflow 3.17's GenAI overview).

    ``server``: the UI's address (``http://127.0.0.1:5000`` for ``mlflow ui``); a non-HTTP tracking
    URI (``sqlite:///...``, a path) means the default ``mlflow ui`` address.
    """
    base = server.rstrip("/") if server.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"



# ------------------------------------------------------------ store errors
class TrackingError(CaloexpError):
    """The MLflow store cannot be written (full disk, quota, database error): one line, run marked FAILED
    when the store still takes that."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def store_path(tracking_uri: str) -> str:
    """The file behind a ``sqlite:///`` store (what fills up), else the URI itself."""
    return tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else tracking_uri


def store_error(exc: BaseException, what: str, where: str) -> TrackingError | None:
    """One line for a failure of the MLflow store, or None when ``exc`` is not one (a bug keeps its traceback).

    ``where``: the file or URI being written (the database, the run's artifact directory)."""
    for e in _chain(exc):
        text = str(e).lower()
        if (isinstance(e, OSError) and e.errno in _FULL_ERRNOS) or any(t in text for t in _FULL_TEXT):
            path = getattr(e, "filename", None) if isinstance(e, OSError) else None
            return TrackingError(f"{path or where}: no space left on device while {what} (MLflow store); "
                                 "free space and run again")
    from mlflow.exceptions import MlflowException

    if any(isinstance(e, (OSError, MlflowException)) or type(e).__module__.startswith("sqlalchemy")
           for e in _chain(exc)):
        first = next((ln for ln in str(exc).strip().splitlines() if ln.strip()), type(exc).__name__)
        return TrackingError(f"{where}: cannot write to the MLflow store while {what} ({first.strip()[:200]})")
    return None


class _DropCaughtDbErrors(logging.Filter):
    """MLflow logs a database error with its traceback before raising it; the raised error becomes one
    line (:func:`store_error`), so the logged copy is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


logging.getLogger("mlflow.store.db.utils").addFilter(_DropCaughtDbErrors())


def _guarded(what: str, artifacts: bool = False):
    """Method decorator: a store failure becomes a :class:`TrackingError` naming the file."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except CaloexpError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified by store_error; others re-raised as they are
                err = store_error(exc, what, self._artifact_dir() if artifacts else store_path(self.tracking_uri))
                if err is None:
                    raise
                raise err from None
        return inner
    return wrap


class Tracker:
    """Opens (or re-opens) one MLflow run and logs into it; closes it with the right status.

    Every call that writes to the store turns a store failure (ENOSPC in an artifact copy, SQLite's
    "database or disk is full", ...) into one :class:`TrackingError` line naming the file."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                 log_model: bool = True):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.log_model_enabled = log_model
        self.run_id: str | None = None
        self._logged_up_to: dict[str, int] = {}

    def _artifact_dir(self) -> str:
        try:
            uri = mlflow.get_artifact_uri() if mlflow.active_run() is not None else None
        except Exception:  # noqa: BLE001 - only used to name the place in an error line
            uri = None
        if uri and uri.startswith("file://"):
            return uri[len("file://"):]
        return uri or store_path(self.tracking_uri)

    # ---------------------------------------------------------------- open
    @_guarded("opening the run")
    def start(self, config: DictConfig, run_id: str | None = None, extra_tags: Mapping[str, str] | None = None) -> str:
        """Start a new run (logging the config), or re-open ``run_id`` when resuming."""
        mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient(self.tracking_uri)
        if run_id is not None:
            mlflow.start_run(run_id=run_id)
            self.run_id = run_id
            mlflow.set_tags(process_tags())   # the process now owning the run
            self._logged_up_to = self._last_logged_steps(client, run_id)
            mlflow.set_tag("caloexp.resumed", "true")
            log.info("resumed MLflow run %s", run_id)
            return run_id
        exp_id = get_or_create_experiment(client, self.experiment_name, self.tracking_uri)
        close_dead_runs(client, exp_id)
        tags = dict(self.tags, **{k: str(v) for k, v in (extra_tags or {}).items()}, **process_tags())
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = mlflow.start_run(experiment_id=exp_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        resolved = OmegaConf.to_container(config, resolve=True)
        params = {k: str(v)[:6000] for k, v in flatten(resolved).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        log.info("MLflow run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self.tracking_uri)
        return self.run_id

    def ui_link(self) -> str | None:
        """The link that opens this run's experiment on its runs table (see :func:`ui_url`)."""
        run = mlflow.active_run()
        return ui_url(self.tracking_uri, run.info.experiment_id) if run else None

    @staticmethod
    def _last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
        run = client.get_run(run_id)
        return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}

    # ----------------------------------------------------------------- log
    @_guarded("logging metrics")
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in metrics.items() if step > self._logged_up_to.get(k, -1)}
        if fresh:
            mlflow.log_metrics(fresh, step=step)

    @_guarded("logging artifacts", artifacts=True)
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifacts(str(local_dir), artifact_path)

    @_guarded("logging an artifact", artifacts=True)
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._log_file(Path(local_path), artifact_path)

    def _log_file(self, local: Path, artifact_path: str | None) -> None:
        """``mlflow.log_artifact``; a copy that failed part-way (full disk) is removed, not left half-written."""
        try:
            mlflow.log_artifact(str(local), artifact_path)
        except OSError:
            dest = Path(self._artifact_dir()) / (artifact_path or "") / local.name
            try:
                if dest.is_file() and dest.stat().st_size != local.stat().st_size:
                    dest.unlink()
            except OSError:
                pass
            raise

    @_guarded("setting tags")
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @_guarded("logging the dataset", artifacts=True)
    def log_dataset(self, description: Mapping[str, Any]) -> None:
        """What the model was trained on, as an MLflow dataset input and as ``dataset.json``."""
        import json

        mlflow.log_text(json.dumps(dict(description), indent=1, default=str), "dataset.json")
        try:
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.data.sources import LocalArtifactDatasetSource

            files = description.get("files") or [description.get("name", "data")]
            source = LocalArtifactDatasetSource(str(files[0]))
            mlflow.log_input(MetaDataset(source, name=str(description.get("name")),
                                         digest=str(abs(hash(json.dumps(dict(description), default=str))))[:8]),
                             context="training")
        except Exception as exc:  # noqa: BLE001 - dataset lineage is a nicety, never a reason to fail a run
            log.debug("mlflow.log_input skipped: %s", exc)

    @_guarded("logging the generator", artifacts=True)
    def log_generator(self, state: Mapping[str, Any], name: str = "generator") -> None:
        """Log the generator as weights + a plain spec (``generator/generator.pt``), never as a pickle.

        ``caloexp.generate source=<run id>`` and :func:`caloexp.sampling.from_state` rebuild it with
        ``torch.load(weights_only=True)`` and caloexp's own classes, so loading a run cannot run code.
        """
        if not self.log_model_enabled:
            return
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "generator.pt"
            torch.save(dict(state), path)
            self._log_file(path, name)
        mlflow.set_tag("caloexp.model_uri", f"runs:/{self.run_id}/{name}")

    # ---------------------------------------------------------------- close
    def end(self, status: str = "FINISHED") -> None:
        """Close the run. When the store cannot take it: an unsuccessful run only warns (its own error is
        what the user must read); a successful one raises :class:`TrackingError`."""
        if mlflow.active_run() is None:
            return
        try:
            mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001 - classified below
            err = store_error(exc, f"marking the run {status}", store_path(self.tracking_uri))
            if err is None:
                raise
            if status == "FINISHED":
                raise err from None
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, status, err)



# ------------------------------------------------ runs whose process died
PID_TAG, HOST_TAG, PID_START_TAG = "caloexp.pid", "caloexp.host", "caloexp.pid_start"
END_REASON_TAG = "caloexp.end_reason"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    """Which process on which host writes the run (how a dead run is recognised later)."""
    pid = os.getpid()
    tags = {PID_TAG: str(pid), HOST_TAG: socket.gethostname()}
    start = _start_time(pid)
    if start:
        tags[PID_START_TAG] = start
    return tags


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return not (start and now and now != start)   # the pid was reused by a later process


def _has_checkpoint(client: MlflowClient, run) -> bool:
    local = run.data.tags.get("caloexp.checkpoint_dir")
    if local and any((Path(local) / n).is_file() for n in ("last.ckpt", "best.ckpt")):
        return True
    try:
        return bool(client.list_artifacts(run.info.run_id, "checkpoints"))
    except Exception:  # noqa: BLE001 - no artifact store reachable: count it as having one (left alone)
        return True


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose process (tags ``caloexp.pid``/``caloexp.host``)
    is dead on this host and that left no checkpoint: killed before their first save, they can neither
    finish nor be resumed. Runs of other hosts, live processes and runs with a checkpoint (resumable)
    are left alone. Returns the ids closed."""
    host = socket.gethostname()
    closed = []
    try:
        runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                  f"tags.`{HOST_TAG}` = '{host}'", max_results=1000)
    except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a new run
        log.debug("looking for dead runs failed: %s", exc)
        return closed
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if pid == os.getpid() or process_alive(pid, tags.get(PID_START_TAG)) or _has_checkpoint(client, run):
            continue
        reason = f"process {pid} on {host} died before its first checkpoint; closed when a new run started"
        try:
            client.set_tag(run.info.run_id, END_REASON_TAG, reason)
            client.set_terminated(run.info.run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a new run
            log.debug("closing dead run %s failed: %s", run.info.run_id, exc)
            continue
        closed.append(run.info.run_id)
        log.warning("MLflow run %s marked KILLED: %s", run.info.run_id, reason)
    return closed


class NullTracker:
    """What ranks other than 0 use: every call does nothing (one MLflow run per training)."""

    def ui_link(self) -> None:
        return None

    run_id: str | None = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
