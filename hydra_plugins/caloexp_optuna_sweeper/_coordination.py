"""Cross-process coordination of one study: a study lock, trial heartbeats, abandoned-trial policy.

Several sweeper processes (workers) may share one study. Reserving trials (count + ``ask``) is
done under a lock so that together they create exactly ``n_trials`` trials:

* SQLite: an ``fcntl`` lock on ``<db>.lock`` next to the database (processes of one machine or
  of a file system with working POSIX locks);
* PostgreSQL: ``pg_advisory_lock``; MySQL/MariaDB: ``GET_LOCK``;
* anything else: no lock (a warning; concurrent workers may then overshoot ``n_trials``).

While a trial runs, its worker stores a heartbeat (user attr ``heartbeat``, epoch seconds) every
``heartbeat_interval`` s. A RUNNING trial is *abandoned* when its worker process is gone (same
host, pid not alive) or its heartbeat is older than ``grace_period`` s; it is then told FAIL with
user attrs ``abandoned``/``fail_reason``, does not count toward ``n_trials``, and its parameters
are enqueued once more so the study re-runs that point.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, List, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

HOST = socket.gethostname()
WORKER = f"{HOST}:{os.getpid()}"


@contextlib.contextmanager
def study_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Hold an exclusive, cross-process lock for ``study_name`` in ``storage_url``."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(storage_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            yield
            return
        path = Path(url.database + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    key = zlib.crc32(f"caloexp-optuna:{study_name}".encode())
    if backend in ("postgresql", "mysql", "mariadb"):
        engine = create_engine(storage_url)
        with engine.connect() as conn:
            if backend == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                unlock = ("SELECT pg_advisory_unlock(:k)", {"k": key})
            else:
                conn.execute(text("SELECT GET_LOCK(:k, 600)"), {"k": f"caloexp-optuna-{key}"})
                unlock = ("SELECT RELEASE_LOCK(:k)", {"k": f"caloexp-optuna-{key}"})
            try:
                yield
            finally:
                conn.execute(text(unlock[0]), unlock[1])
        engine.dispose()
        return
    log.warning("No study lock for a %s storage: concurrent workers may run more than n_trials trials.", backend)
    yield


class Heartbeat:
    """Background thread marking this worker's in-flight trials as alive."""

    def __init__(self, storage: Any, interval: float) -> None:
        self.storage, self.interval = storage, interval
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self._thread.start()

    def beat(self, trial_id: int) -> None:
        """Record a heartbeat for one trial now (also called at reservation)."""
        try:
            self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
        except Exception as e:  # finished meanwhile, or a transient lock: the next beat retries
            log.debug("heartbeat of trial id %s skipped: %s", trial_id, e)

    def add(self, trial_ids: List[int]) -> None:
        with self._lock:
            self._ids.update(trial_ids)

    def remove(self, trial_ids: List[int]) -> None:
        with self._lock:
            self._ids.difference_update(trial_ids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._ids)
            for tid in ids:
                self.beat(tid)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (returns early once stopped)."""
        self._stop.wait(seconds)

    def stop(self) -> None:
        self._stop.set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandon_reason(trial: FrozenTrial, grace_period: float, now: Optional[float] = None) -> Optional[str]:
    """Why a RUNNING trial of another (or a dead) worker is abandoned, or None if it may be alive."""
    worker = str(trial.user_attrs.get("worker", ""))
    host, _, pid = worker.rpartition(":")
    if host == HOST and pid.isdigit() and worker != WORKER and not _pid_alive(int(pid)):
        return f"abandoned: worker {worker} is no longer running"
    now = time.time() if now is None else now
    last = trial.user_attrs.get("heartbeat")
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    if last is not None and now - float(last) > grace_period:
        return f"abandoned: no heartbeat from worker {worker or '?'} for {now - float(last):.0f} s"
    return None


def mark_abandoned(study: optuna.Study, storage: Any, trial: FrozenTrial, reason: str, retry: bool) -> bool:
    """Tell an abandoned trial FAIL (not counted toward n_trials); enqueue its params once if ``retry``."""
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), trial.number)
        storage.set_trial_user_attr(trial_id, "abandoned", True)
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        study.tell(trial.number, state=TrialState.FAIL)
    except Exception as e:  # finished by its worker in the meantime
        log.info("Trial %d not abandoned (%s)", trial.number, e)
        return False
    log.warning("Trial %d %s", trial.number, reason)
    if retry and trial.params and "retry_of" not in trial.user_attrs:
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        log.info("Trial %d's parameters are queued to run again", trial.number)
    return True


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished (COMPLETE/PRUNED/FAIL, not abandoned) or reserved (RUNNING) trials use up n_trials."""
    if trial.state == TrialState.RUNNING:
        return True
    return trial.state.is_finished() and not trial.user_attrs.get("abandoned", False)


def outcome_counts(trials: List[FrozenTrial]) -> "dict[str, int]":
    """Trials by outcome, abandoned ones apart from real failures.

    ``failed``: FAIL trials whose job ran and failed; ``abandoned``: FAIL trials of a killed or
    interrupted worker (not counted toward n_trials); ``retried``: abandoned trials whose parameters
    were queued again (a later trial carries ``retry_of`` = their number); ``running``/``waiting``:
    not finished yet."""
    retried_numbers = {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}
    abandoned = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("abandoned")]
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get("abandoned") for t in trials),
        "abandoned": len(abandoned),
        "retried": sum(t.number in retried_numbers for t in abandoned),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "waiting": sum(t.state == TrialState.WAITING for t in trials),
    }
