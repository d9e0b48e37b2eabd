"""What every command-line entry point shares: one-line errors and a non-zero exit.

Hydra reports a bad override as a multi-line message with a hint about
HYDRA_FULL_ERROR; a physicist wants one line saying which override is wrong and
what would be right. :func:`run_hydra_app` composes the config once up front to
catch those, and :func:`report_errors` turns a :class:`CaloexpError` raised inside
a job into ``error: <message>`` on stderr and the error's exit code. In a multirun
the error is re-raised so that the sweeper can record the failed trial and go on.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from caloexp import config as _schemas  # noqa: F401 - typed schemas must be registered before composing
from caloexp.errors import CaloexpError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def remove_empty_run_dir() -> Path | None:
    """Delete the job's Hydra run directory if it holds nothing but ``.hydra/`` and the job's log.

    A command that fails before doing any work (a bad value found by the job, a missing dataset,
    Ctrl-C during set-up) would otherwise leave an empty ``outputs/<task>/<time>`` folder behind.
    Never touches the working directory or a folder without Hydra's ``.hydra/``.
    """
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN or not hc.output_subdir:
        return None
    run_dir = Path(hc.runtime.output_dir).resolve()
    if run_dir == Path.cwd().resolve() or run_dir == Path(hc.runtime.cwd).resolve():
        return None
    hydra_dir = run_dir / str(hc.output_subdir)
    try:
        entries = {p.name for p in run_dir.iterdir()}
        meta = {p.name for p in hydra_dir.iterdir()} if hydra_dir.is_dir() else None
    except OSError:
        return None
    if meta is None or not meta <= HYDRA_FILES or not entries <= {hydra_dir.name, f"{hc.job.name}.log"}:
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


@contextmanager
def report_errors() -> Iterator[None]:
    try:
        yield
    except CaloexpError as exc:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        if exc.exit_code in (2, 3):  # bad input or a missing dataset: found before any work, as a rule
            remove_empty_run_dir()
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the job could handle it itself (set-up, loading)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        remove_empty_run_dir()
        fail("interrupted (Ctrl-C); nothing new was saved", 130)
    except OSError as exc:
        line = disk_full_line(exc)
        if line is None or (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            raise
        fail(line)


def disk_full_line(exc: BaseException) -> str | None:
    """``<path>: no space left on device ...`` for a full disk or quota anywhere in ``exc``'s chain, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = exc.filename or _written_path(exc)
            if where is None and HydraConfig.initialized():
                where = HydraConfig.get().runtime.output_dir
            return (f"{where or 'output directory'}: no space left on device (while writing outputs); "
                    "free space and run again")
        exc = exc.__cause__ or exc.__context__
    return None


def _written_path(exc: BaseException) -> str | None:
    """The file being written when a write (not an open) failed: from the failing frames' locals
    (Hydra's ``_save_config(cfg, filename, output_dir)``), innermost first."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_locals)
        tb = tb.tb_next
    for local in reversed(frames):
        out = local.get("output_dir")
        if isinstance(out, (str, Path)):
            name = local.get("filename")
            return str(Path(out) / name) if isinstance(name, str) else str(out)
    return None


@contextmanager
def _outside_job_errors() -> Iterator[None]:
    """Hydra reports an error raised outside the job (writing ``.hydra/`` into a full output directory)
    as a traceback; let it reach us (HYDRA_FULL_ERROR) and print one line when it is a full disk, else
    give it back to Hydra's own report. Failed log writes (train.log on a full disk) are not reported
    line by line: the error itself is."""
    import logging

    logging.raiseExceptions = False
    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - classified here, otherwise reported exactly as Hydra would
        restore_env("HYDRA_FULL_ERROR", user_setting)
        line = disk_full_line(exc)
        if line is not None:
            fail(line)
        if user_setting is not None:
            raise
        from hydra._internal.utils import run_and_report

        error = exc
        tb = exc.__traceback__  # from Hydra's own run_and_report on, as Hydra would have shown it
        while tb is not None and tb.tb_frame.f_code.co_name != "run_and_report":
            tb = tb.tb_next

        def again() -> None:
            raise error.with_traceback(tb or error.__traceback__)

        run_and_report(again)  # Hydra's stripped traceback and exit 1
    finally:
        restore_env("HYDRA_FULL_ERROR", user_setting)


def restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def one_line(message: str) -> str:
    """Condense a Hydra/OmegaConf composition error into one readable line."""
    text = message.split("Config search path")[0]
    unknown = re.search(r"Could not override '([^']+)'.*?use \+(\S+)", text, re.S)
    if unknown:
        return (f"unknown config key '{unknown.group(1)}' (see `--cfg job` for the keys; "
                f"to add a new key write +{unknown.group(2)})")
    text = re.sub(r"\s*full_key:.*|\s*object_type=.*", "", text)
    parts = [p.strip() for p in text.strip().splitlines() if p.strip()]
    if "Available options" in text:
        head = [p for p in parts if not p.startswith("Available options")]
        i = next(k for k, p in enumerate(parts) if p.startswith("Available options"))
        return f"{head[0]} (available: {', '.join(parts[i + 1:])})"
    return "; ".join(parts)


def check_overrides(config_name: str, overrides: list[str]) -> str | None:
    """Compose the config with these overrides; return a one-line problem or None."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra raises several unrelated types here
        message = one_line(str(exc))
        if exc.__cause__ is not None and str(exc.__cause__).strip():
            message += ": " + one_line(str(exc.__cause__))
        return message
    return None


def run_hydra_app(app: Callable[[], object], config_name: str) -> None:
    """Run a ``@hydra.main`` app after checking plain ``key=value`` overrides up front."""
    args = sys.argv[1:]
    if args and not any(a.startswith("-") for a in args):
        problem = check_overrides(config_name, [a for a in args if not a.startswith("hydra.")])
        if problem:
            fail(problem)
    try:
        with _outside_job_errors():
            app()
    except KeyboardInterrupt:  # while Hydra composes the config or sets up logging
        fail("interrupted (Ctrl-C); nothing new was saved", 130)
