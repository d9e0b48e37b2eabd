"""Checkpoints prove their integrity (SHA-256 trailer), belong to the run asked for, survive a full
disk, and resume from the newest intact copy (local last -> MLflow artifact -> best)."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from caloexp import checkpoint
from caloexp.errors import CaloexpError, InputError

REPO = Path(__file__).resolve().parents[1]


def make_state(run_id: str = "a" * 32, step: int = 10, seed: int = 0) -> dict:
    """A checkpoint dict shaped like train.py's: model, Adam state after real steps, RNG, counters."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    return {"model": model.state_dict(), "transform": {"shift": torch.zeros(16)},
            "optimizers": {"generator": opt.state_dict()}, "schedulers": {},
            "rng": {"model": torch.Generator().manual_seed(1).get_state(), "torch": torch.get_rng_state(),
                    "cuda": None},
            "state": {"step": step, "epoch": 0, "batch": step, "evals": 1, "best": 0.5},
            "run_id": run_id, "run_dir": "/tmp/run", "config_yaml": "seed: 42\n"}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["state"] == b["state"]


def flip(path: Path, offset: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line_about(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg[len(f"{path}: "):]  # what is said about the file (the tmp path itself may hold any word)


# ------------------------------------------------------------------ integrity
def test_roundtrip_trailer_and_plain_torch_load(tmp_path):
    state = make_state(step=7)
    path = checkpoint.save(tmp_path / "last.ckpt", state)
    assert not (tmp_path / "last.ckpt.tmp").exists()
    back = checkpoint.load(path)
    assert same(state, back) and back["run_id"] == "a" * 32
    head = checkpoint.info(path)
    assert head["run_id"] == "a" * 32 and head["step"] == 7 and len(head["sha256"]) == 64
    assert same(state, torch.load(path, weights_only=True))   # still a torch file for other tools


def optimizer_offset(path: Path) -> int:
    """Offset of the first Adam moment tensor's bytes inside the zip payload."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = [i for i in z.infolist() if "/data/" in i.filename]
        # tensors are stored in pickling order: model weights, transform, then optimizer moments
        info = names[-2]
        with open(path, "rb") as fh:  # local header: 30 bytes + name + extra
            fh.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
        return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("where", ["optimizer_4096", "one_byte_middle", "header", "magic", "truncated"])
def test_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, where):
    path = checkpoint.save(tmp_path / "last.ckpt", make_state())
    size = path.stat().st_size
    if where == "optimizer_4096":  # the trial: 4,096 flipped bytes inside an optimizer state
        off = optimizer_offset(path)
        flip(path, off, min(4096, size // 4))
    elif where == "one_byte_middle":
        flip(path, size // 2)
    elif where == "header":
        data = path.read_bytes()
        flip(path, data.rindex(b'"sha256": "') + 12)
    elif where == "magic":
        flip(path, size - 3)
    else:
        path.write_bytes(path.read_bytes()[: size - 1000])
    with pytest.raises(InputError) as err:
        checkpoint.load(path)
    assert one_line_about(err.value, path).startswith("corrupt checkpoint") or \
        one_line_about(err.value, path).startswith("checkpoint is corrupt")


def test_checkpoint_without_checksum_still_loads_with_a_warning(tmp_path, caplog):
    legacy = tmp_path / "old.ckpt"
    torch.save(make_state(), legacy)
    with caplog.at_level(logging.WARNING, logger="caloexp.checkpoint"):
        assert same(make_state(), checkpoint.load(legacy))
    assert "no checksum" in caplog.text and str(legacy) in caplog.text


def test_load_checks_the_run_it_was_asked_for(tmp_path):
    path = checkpoint.save(tmp_path / "last.ckpt", make_state(run_id="b" * 32))
    with pytest.raises(InputError) as err:
        checkpoint.load(path, run_id="a" * 32)
    assert f"belongs to MLflow run {'b' * 32}, not {'a' * 32}" in one_line_about(err.value, path)


# ------------------------------------------------------------------ full disk
def test_full_disk_removes_the_temp_file_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "last.ckpt", make_state(step=10))
    good = path.read_bytes()
    real_write, written = os.write, []

    def full_disk_write(fd, data):  # the device fills up part-way through the new file
        if sum(written) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(real_write(fd, bytes(data[:2048])))
        return written[-1]

    monkeypatch.setattr(checkpoint.os, "write", full_disk_write)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.save(path, make_state(step=20))
    assert isinstance(err.value, CaloexpError) and sum(written) > 4096   # a partial temp file existed
    assert one_line_about(err.value, path).startswith("no space left on device")
    assert not (tmp_path / "last.ckpt.tmp").exists()
    monkeypatch.undo()
    assert path.read_bytes() == good and checkpoint.load(path)["state"]["step"] == 10


def test_file_size_limit_in_a_real_process(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG): same contract as a full disk."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import make_state
        from caloexp import checkpoint
        from caloexp.errors import CaloexpError
        p = checkpoint.save({str(tmp_path / 'last.ckpt')!r}, make_state(step=10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = p.stat().st_size + 100
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        big = make_state(step=20); big["transform"]["pad"] = __import__("torch").zeros(100_000)
        try:
            checkpoint.save(p, big)
        except CaloexpError as e:
            print("error:", e); sys.exit(e.exit_code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'last.ckpt'}: file too large (file-size limit of this process or "
                     "file system) while saving the checkpoint; nothing was replaced (the previous "
                     "checkpoint, if any, is intact)"]
    assert not (tmp_path / "last.ckpt.tmp").exists()
    assert checkpoint.load(tmp_path / "last.ckpt")["state"]["step"] == 10


# --------------------------------------------------- MLflow: ownership, resume
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store with runs A and B; the tag of A points at a directory holding B's checkpoint
    (what two sweep workers sharing one output folder produced)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ckpt", artifact_location=(root / "artifacts").as_uri())
    a, b = (client.create_run(exp).info.run_id for _ in range(2))
    return root, uri, client, a, b


def log_ckpt(client, run_id: str, path: Path) -> None:
    client.log_artifact(run_id, str(path), "checkpoints")


def test_find_by_run_id_refuses_another_runs_checkpoint(store, tmp_path):
    root, uri, client, a, b = store
    shared = tmp_path / "multirun" / "0" / "checkpoints"
    checkpoint.save(shared / "last.ckpt", make_state(run_id=b, step=30))      # trial B overwrote A's file
    client.set_tag(a, "caloexp.checkpoint_dir", str(shared))
    client.set_tag(b, "caloexp.checkpoint_dir", str(shared))
    assert checkpoint.find(b, tmp_path, uri) == shared / "last.ckpt"
    with pytest.raises(InputError, match=f"has no checkpoints/last.ckpt .*belongs to run {b}"):
        checkpoint.find(a, tmp_path, uri)                                       # A has no artifact copy
    own = checkpoint.save(tmp_path / "a_copy" / "last.ckpt", make_state(run_id=a, step=20))
    log_ckpt(client, a, own)
    found = checkpoint.find(a, tmp_path, uri)
    assert found != shared / "last.ckpt" and checkpoint.load(found, run_id=a)["state"]["step"] == 20


def test_resume_falls_back_to_the_artifact_then_best(store, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    root, uri, client, _, _ = store
    run = MlflowClient(uri).create_run(client.get_experiment_by_name("ckpt").experiment_id).info.run_id
    ckdir = tmp_path / "run" / "checkpoints"
    client.set_tag(run, "caloexp.checkpoint_dir", str(ckdir))
    best = checkpoint.save(ckdir / "best.ckpt", make_state(run_id=run, step=40))
    last = checkpoint.save(ckdir / "last.ckpt", make_state(run_id=run, step=60))

    path, state = checkpoint.load_for_resume(run, tmp_path, uri)          # all intact: local last
    assert path == last and state["state"]["step"] == 60

    flip(last, last.stat().st_size // 2, 64)                              # corrupt local, no artifact yet
    with caplog.at_level(logging.WARNING, logger="caloexp.checkpoint"):
        path, state = checkpoint.load_for_resume(run, tmp_path, uri)
    assert path == best and state["state"]["step"] == 40
    assert f"{last}: checkpoint is corrupt" in caplog.text
    assert f"resuming from {best} at step 40" in caplog.text

    art = checkpoint.save(tmp_path / "upload" / "last.ckpt", make_state(run_id=run, step=60))
    log_ckpt(client, run, art)                                           # the MLflow copy is intact
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="caloexp.checkpoint"):
        for spec in (run, str(tmp_path / "run"), str(last)):            # run id, run dir, file: same chain
            path, state = checkpoint.load_for_resume(spec, tmp_path, uri)
            assert path.name == "last.ckpt" and path != last and state["state"]["step"] == 60
    assert "resuming from" in caplog.text and "best" not in caplog.text



def test_resume_with_nothing_intact_is_one_line(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    for name, step in (("best.ckpt", 5), ("last.ckpt", 9)):
        p = checkpoint.save(ckdir / name, make_state(run_id=None, step=step))
        flip(p, p.stat().st_size // 3, 16)
    with pytest.raises(InputError) as err:
        checkpoint.load_for_resume(str(tmp_path / "run"), tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'run'}: no intact checkpoint to resume from") and "\n" not in msg
    assert f"{ckdir / 'last.ckpt'}: checkpoint is corrupt" in msg and f"{ckdir / 'best.ckpt'}: checkpoint is corrupt" in msg
