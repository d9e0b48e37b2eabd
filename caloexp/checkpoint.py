"""Training checkpoints: atomic, checksummed save; verified safe load; finding and resuming them.

A checkpoint holds everything needed to continue a run bit-for-bit: model, optimizer
and scheduler states, the data transform, the step/epoch/batch counters, every RNG
state, the MLflow run id and the resolved config.

File layout: the ``torch.save`` payload (a zip archive, so ``torch.load`` still reads
the file), then a trailer::

    <JSON header> <8-byte little-endian header length> b"CALOEXP-CKPT-V1\\n"

The header holds the payload's size and SHA-256, the run id and the step. :func:`load`
recomputes the hash before unpickling (``weights_only=True``), so a flipped byte or a
truncated copy is reported as one line naming the file instead of training on from a
corrupt optimizer state. :func:`info` reads only the trailer (cheap ownership checks).

Writing goes to ``<name>.tmp``, is fsynced and renamed: a ``kill -9`` during a save
leaves the previous checkpoint intact, and a full disk removes the partial temp file
and raises :class:`CheckpointWriteError` (one line) with the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch

from caloexp.errors import CaloexpError, InputError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
BEST = "best.ckpt"
MAGIC = b"CALOEXP-CKPT-V1\n"
_LEN = struct.Struct("<Q")
_TAIL = _LEN.size + len(MAGIC)
_MAX_HEADER = 1 << 16
_CHUNK = 1 << 20
_RUN_ID_CHARS = set("0123456789abcdef")


class CheckpointWriteError(CaloexpError):
    """A checkpoint could not be written (full disk, quota, permissions); the previous one is intact."""


# ------------------------------------------------------------------ saving
def _header(state: dict[str, Any], payload: bytes) -> dict[str, Any]:
    step = (state.get("state") or {}).get("step") if isinstance(state.get("state"), dict) else None
    return {"format": 1, "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
            "run_id": state.get("run_id"), "step": step}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:_CHUNK])
        view = view[n:]


def _write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on device"
    elif exc.errno == errno.EFBIG:
        why = "file too large (file-size limit of this process or file system)"
    else:
        why = f"cannot write ({exc.strerror or exc})"
    return CheckpointWriteError(f"{path}: {why} while saving the checkpoint; nothing was replaced "
                                f"(the previous checkpoint, if any, is intact)")


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``path`` with a SHA-256 trailer; returns ``path``.

    Raises :class:`CheckpointWriteError` (one line naming ``path``) when the file system refuses
    the write (e.g. ENOSPC); the temporary file is removed and an existing ``path`` is untouched.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = json.dumps(_header(state, payload), sort_keys=True).encode()
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, payload)
            _write_all(fd, header + _LEN.pack(len(header)) + MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _write_error(path, exc) from None
    try:  # make the rename itself durable; not fatal where directories cannot be fsynced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


# ----------------------------------------------------------------- reading
def info(path: str | Path) -> dict[str, Any] | None:
    """The trailer header of a checkpoint (``run_id``, ``step``, ``sha256``, ``payload_bytes``) without
    reading the payload; None for a plain ``torch.save`` file written before checksums. A damaged
    trailer raises :class:`InputError` (so cutting it off cannot skip the check)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size < _TAIL:
                return None
            fh.seek(size - _TAIL)
            tail = fh.read(_TAIL)
            if tail[_LEN.size:] != MAGIC:
                fh.seek(max(0, size - 22))
                if fh.read(22).startswith(b"PK\x05\x06"):  # a plain torch.save file (before checksums)
                    return None
                raise InputError(f"{path}: corrupt checkpoint (its checksum trailer is missing or damaged)")
            (n,) = _LEN.unpack(tail[:_LEN.size])
            if n > min(_MAX_HEADER, size - _TAIL):
                raise InputError(f"{path}: corrupt checkpoint trailer (header length {n})")
            fh.seek(size - _TAIL - n)
            header = json.loads(fh.read(n).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: corrupt checkpoint trailer ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("sha256"), str) \
            or not isinstance(header.get("payload_bytes"), int) \
            or header["payload_bytes"] != size - _TAIL - n:
        raise InputError(f"{path}: corrupt checkpoint trailer (file truncated or extended)")
    header["header_bytes"] = n
    return header


def _read_payload(path: Path) -> bytes:
    """The verified payload bytes (legacy files without a trailer are returned whole, with a warning)."""
    header = info(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if header is None:
        log.warning("%s: checkpoint has no checksum (written before checksummed checkpoints); "
                    "its integrity cannot be verified", path)
        return data
    payload = data[:header["payload_bytes"]]
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise InputError(f"{path}: checkpoint is corrupt (SHA-256 of its contents does not match the "
                         "checksum stored when it was saved)")
    return payload


def load(path: str | Path, map_location: str | torch.device = "cpu", *,
         run_id: str | None = None) -> dict[str, Any]:
    """Verify the checksum, then load with ``weights_only=True`` (no code runs); return the state dict.

    ``run_id``: also require that the checkpoint belongs to this MLflow run. Every problem is an
    :class:`InputError` whose one-line message starts with the file's path.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = _read_payload(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(f"{path}: not a readable caloexp checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config_yaml" not in state:
        raise InputError(f"{path}: not a caloexp checkpoint (missing model/config)")
    header = info(path)
    if header is not None and header.get("run_id") != state.get("run_id"):
        raise InputError(f"{path}: checkpoint trailer names run {header.get('run_id')} but its contents "
                         f"run {state.get('run_id')} (edited or mixed-up file)")
    if run_id is not None and state.get("run_id") != run_id:
        raise InputError(f"{path}: checkpoint belongs to MLflow run {state.get('run_id')}, not {run_id}")
    return state


def _owner(path: Path) -> str | None:
    """Run id recorded in a checkpoint (from the trailer; legacy files are loaded)."""
    header = info(path)
    if header is not None:
        return header.get("run_id")
    return load(path).get("run_id")


# ----------------------------------------------------------------- finding
def _is_run_id(spec: str) -> bool:
    return len(spec) == 32 and set(spec) <= _RUN_ID_CHARS


def find(spec: str, outputs_root: str | Path, tracking_uri: str | None = None) -> Path:
    """Resolve a resume/generate source to a checkpoint file.

    ``spec`` may be a checkpoint file, a run directory (``<dir>/checkpoints/last.ckpt``),
    ``last`` (the newest run under ``outputs_root``), or an MLflow run id (its local
    output directory if still there *and* its checkpoint belongs to that run, else the
    checkpoint artifact is downloaded and checked the same way).
    """
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for cand in (p / "checkpoints" / LAST, p / LAST):
            if cand.is_file():
                return cand
        raise InputError(f"{p}: no checkpoints/{LAST} in this run directory")
    if spec == "last":
        cands = sorted(Path(outputs_root).glob(f"**/checkpoints/{LAST}"), key=lambda q: q.stat().st_mtime)
        if not cands:
            raise InputError(f"{outputs_root}: no run with a checkpoint to resume ('resume=last')")
        return cands[-1]
    if _is_run_id(spec):
        return _from_mlflow(spec, tracking_uri)
    raise InputError(f"{spec}: neither a checkpoint file, a run directory, 'last' nor an MLflow run id")


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _local_dir(run_id: str, tracking_uri: str | None) -> Path | None:
    from mlflow.exceptions import MlflowException

    try:
        run = _client(tracking_uri).get_run(run_id)
    except MlflowException:
        raise InputError(f"MLflow run {run_id} not found at {tracking_uri}") from None
    local = run.data.tags.get("caloexp.checkpoint_dir")
    return Path(local) if local else None


def _download(run_id: str, name: str, tracking_uri: str | None) -> Path | None:
    from mlflow.exceptions import MlflowException

    try:
        return Path(_client(tracking_uri).download_artifacts(run_id, f"checkpoints/{name}"))
    except (MlflowException, OSError):
        return None


def _from_mlflow(run_id: str, tracking_uri: str | None) -> Path:
    local_dir = _local_dir(run_id, tracking_uri)
    problems = []
    if local_dir is not None and (local_dir / LAST).is_file():
        local = local_dir / LAST
        owner = _owner(local)
        if owner == run_id:
            return local
        problems.append(f"{local} belongs to run {owner}")
        log.warning("%s: checkpoint belongs to MLflow run %s, not %s (shared output directory?); "
                    "using the run's checkpoint artifact", local, owner, run_id)
    art = _download(run_id, LAST, tracking_uri)
    if art is None:
        raise InputError(f"MLflow run {run_id} has no checkpoints/{LAST}"
                         + (f" ({'; '.join(problems)})" if problems else ""))
    owner = _owner(art)
    if owner != run_id:
        raise InputError(f"{art}: checkpoint artifact of MLflow run {run_id} belongs to run {owner}")
    return art


# ---------------------------------------------------------------- resuming
def _candidates(spec: str, outputs_root: str | Path, tracking_uri: str | None
                ) -> tuple[list[tuple[str, Any]], str | None]:
    """Ordered (label, path-or-artifact-name) candidates for ``spec`` and the run id they must belong to."""
    p = Path(spec).expanduser()
    run_id: str | None = None
    local_dir: Path | None = None
    first: Path | None = None
    if _is_run_id(spec) and not p.exists():
        run_id = spec
        local_dir = _local_dir(spec, tracking_uri)
    elif p.is_file():
        first, local_dir = p, p.parent
    elif p.is_dir():
        local_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    else:
        first = find(spec, outputs_root, tracking_uri)  # 'last' or an error line
        local_dir = first.parent
    if run_id is None:  # whose run is it? from any trailer that says so
        for cand in ([first] if first else []) + ([local_dir / LAST, local_dir / BEST] if local_dir else []):
            try:
                header = info(cand) if cand.is_file() else None
            except InputError:
                continue
            if header and header.get("run_id"):
                run_id = header["run_id"]
                break
    cands: list[tuple[str, Any]] = []
    if first is not None and first.name != LAST:  # an explicitly named file (e.g. best.ckpt or a copy)
        cands.append(("file", first))
        if first.name == BEST and run_id is not None:
            cands.append(("artifact", BEST))
        return cands, run_id
    if first is not None or local_dir is not None:
        cands.append(("local", first if first is not None else local_dir / LAST))
    if run_id is not None:
        cands.append(("artifact", LAST))
    if local_dir is not None:
        cands.append(("local", local_dir / BEST))
    if run_id is not None:
        cands.append(("artifact", BEST))
    return cands, run_id


def load_for_resume(spec: str, outputs_root: str | Path, tracking_uri: str | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint to resume ``spec`` from, as ``(path, state)``.

    Tries, in order: the named file / local ``last.ckpt``, the MLflow artifact copy of
    ``last.ckpt``, then ``best.ckpt`` (local, then artifact). A candidate is skipped (one
    warning line naming it and why) when it is missing, fails its checksum, cannot be
    unpickled, or belongs to another run. Resuming from ``best`` logs a warning with the
    step it resumes from. Raises :class:`InputError` (one line listing what was tried)
    when no candidate is intact.
    """
    cands, run_id = _candidates(spec, outputs_root, tracking_uri)
    tried: list[str] = []
    for kind, where in cands:
        if kind == "artifact":
            path = _download(run_id, where, tracking_uri)
            if path is None:
                tried.append(f"MLflow artifact checkpoints/{where}: not logged")
                continue
        else:
            path = Path(where)
            if not path.is_file():
                tried.append(f"{path}: not found")
                continue
        try:
            state = load(path, map_location, run_id=run_id)
        except InputError as exc:
            tried.append(str(exc))
            log.warning("%s; trying the next copy", exc)
            continue
        step = (state.get("state") or {}).get("step")
        if path.name == BEST and tried:
            log.warning("resuming from %s at step %s: no intact %s (%s); training after step %s is redone",
                        path, step, LAST, "; ".join(tried) or "none found", step)
        elif tried:
            log.warning("resuming from %s at step %s (%s)", path, step, "; ".join(tried))
        return path, state
    raise InputError(f"{spec}: no intact checkpoint to resume from ({'; '.join(tried) or 'no candidates'})")
