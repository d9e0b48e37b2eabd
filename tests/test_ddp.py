"""Two-process training with torchrun on CPU (gloo), isolated in its own network namespace.

torchrun's store listens on all interfaces, so the test runs inside ``unshare --net`` with only
``lo`` up (nothing can talk off the machine). Both ranks must end with identical weights, rank 0
alone writes one MLflow run and the checkpoints, and a resumed two-process run matches an
uninterrupted one bit for bit.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ARGS = ["+experiment=smoke", "trainer=ddp", "data.n_showers=1200", "data.batch_size=32", "data.eval_events=200",
        "trainer.eval_every=10", "trainer.checkpoint_every=5", "trainer.log_every=5", "trainer.num_threads=1",
        "trainer.plot_every=0"]


def netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    r = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    return r.returncode == 0


# A rank has, rarely (twice in about 30 CI runs; never in 60 runs of this test's three torchrun calls
# repeated under a load average of 13), died with a C++ std::terminate inside torch's c10d/gloo; the
# cause is not found yet. Since then every rank waits for the others before tearing the process
# group down. On an abort the run is repeated once, with a warning carrying each thread's Python
# stack, so the test still checks sync, one MLflow run and bit-exact resume; any other failure, or a
# second abort, fails the test.
ABORT = "terminate called without an active exception"


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db")
    cmd = (f"ip link set lo up && exec {sys.executable} -m torch.distributed.run --nproc_per_node=2 "
           f"--master_addr=127.0.0.1 --master_port=29512 -m caloexp.train " + " ".join(f"'{a}'" for a in args))
    for attempt in (1, 2):
        proc = subprocess.run(["unshare", "--net", "bash", "-c", cmd], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900)
        if proc.returncode == 0 or ABORT not in proc.stderr or attempt == 2:
            return proc
        # (PYTHONFAULTHANDLER prints every thread's Python stack at the abort: where it happened)
        i = proc.stderr.find(ABORT)
        warnings.warn(f"torchrun rank aborted ({ABORT}); repeating once:\n{proc.stderr[max(0, i - 1500):i + 3000]}")
    return proc


@pytest.mark.skipif(not netns_available(), reason="needs unshare --net (root or user namespaces) to isolate torchrun")
def test_two_processes_train_in_sync_and_resume_bit_exactly(tmp_path):
    a = torchrun(ARGS + ["trainer.max_steps=20", f"hydra.run.dir={tmp_path}/A"], tmp_path)
    assert a.returncode == 0, a.stderr[-4000:]
    b = torchrun(ARGS + ["trainer.max_steps=10", f"hydra.run.dir={tmp_path}/B"], tmp_path)
    assert b.returncode == 0, b.stderr[-4000:]
    b2 = torchrun([f"resume={tmp_path}/B", "trainer.max_steps=20"], tmp_path)
    assert b2.returncode == 0, b2.stderr[-4000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("caloexp").experiment_id])
    # an aborted attempt that was repeated leaves its run unfinished (rank 0 was killed by torchrun)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    assert len(runs) == 2                                   # one run per training, written by rank 0 only
    for run in runs:
        assert run.data.tags["caloexp.world_size"] == "2"
        assert run.data.tags["caloexp.ranks_identical"] == "true"   # both ranks hold the same weights
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/critic")]
        assert steps == sorted(set(steps)) == [5, 10, 15, 20]       # no step lost or logged twice
    sa = torch.load(tmp_path / "A/checkpoints/last.ckpt", weights_only=True)
    sb = torch.load(tmp_path / "B/checkpoints/last.ckpt", weights_only=True)
    assert sa["state"]["step"] == sb["state"]["step"] == 20 and len(sa["rng_ranks"]) == 2
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    # each rank saw its own shard: 20 steps x 2 ranks x 32 = 1280 events > one epoch of 960 training events
    assert sa["state"]["epoch"] == 1
