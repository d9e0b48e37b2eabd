"""The team tracking stack, bare metal (docker/bare_metal.sh): a real PostgreSQL server, an MLflow
server on it with proxied artifacts, and a two-worker Optuna sweep stored in the same PostgreSQL;
plus the compose file's consistency with that recipe (this machine has no Docker)."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "bare_metal.sh"
COMPOSE = REPO / "docker" / "docker-compose.yml"
STUDY = "stack_e2e"
TINY = ["trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=2", "trainer.checkpoint_every=4",
        "trainer.num_threads=1", "trainer.plot_every=0", "data.n_showers=600", "data.eval_events=200",
        "data.batch_size=64", "model.generator.width=16", "model.critic.width=16", "model.latent_dim=8",
        "model.critic_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_missing() -> str | None:
    if not (shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")):
        return "PostgreSQL server binaries not installed (apt install postgresql)"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "running as root without a 'postgres' user for the server"
    return None


@pytest.fixture(scope="module")
def stack():
    reason = _postgres_missing()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="caloexp-stack-"))  # not under pytest's 0700 tmp: postgres reads it
    root.chmod(0o755)
    env = dict(os.environ, PG_PORT=str(_free_port()), MLFLOW_PORT=str(_free_port()), PYTHON=sys.executable)
    try:
        r = subprocess.run([str(SCRIPT), "start", str(root / "stack")], env=env, capture_output=True, text=True,
                           timeout=240)
        server_log = root / "stack" / "mlflow.log"
        assert r.returncode == 0, r.stdout + r.stderr + (server_log.read_text()[-2000:] if server_log.exists() else "")
        exports = dict(line.split(" ", 1)[1].split("=", 1) for line in r.stdout.splitlines()
                       if line.startswith("export "))
        yield root, exports
    finally:
        subprocess.run([str(SCRIPT), "stop", str(root / "stack")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_worker_sweep_on_postgres_tracked_through_the_server(stack):
    import optuna
    import sqlalchemy
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from caloexp import sampling

    root, exports = stack
    url, storage = exports["MLFLOW_TRACKING_URI"], exports["OPTUNA_STORAGE"]
    assert url.startswith("http://127.0.0.1:") and storage.startswith("postgresql://")
    env = dict(os.environ, MLFLOW_TRACKING_URI=url, CALOEXP_ROOT=str(root),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "caloexp.train", "--multirun", "sweeps=wgangp_lr", "hydra.sweeper.n_trials=2",
           f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={STUDY}",
           f"hydra.sweeper.best_config_dir={root / 'best'}", "logger.experiment_name=stack",
           "logger.log_model=true", *TINY]
    workers = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n\n".join(o[-3000:] for o in outs)

    study = optuna.load_study(study_name=STUDY, storage=storage)   # the study lives in PostgreSQL
    trials = study.trials
    assert [t.number for t in trials] == [0, 1] and all(t.state == TrialState.COMPLETE for t in trials)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("stack")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("caloexp.sweep_role") != "parent"]
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["monitor/score"] > 0
        assert len(client.get_metric_history(run.info.run_id, "loss/critic")) == 2   # steps 2 and 4
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "generator"} <= arts, arts
        # proxied: the client sees mlflow-artifacts:/ and the files sit in the server's volume
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert list((root / "stack" / "mlartifacts").glob(f"**/{run.info.run_id}/artifacts/config.yaml"))
        gen, spec = sampling.load(run.info.run_id, url)   # the generator, downloaded through the server
        assert spec["kind"] == "calo" and gen(np.full(3, 1024.0)).shape == (3, 368)
    # MLflow's runs are rows of the PostgreSQL database `mlflow`
    engine = sqlalchemy.create_engine(storage.rsplit("/", 1)[0] + "/mlflow")
    with engine.connect() as conn:
        n = conn.execute(sqlalchemy.text("SELECT count(*) FROM runs WHERE experiment_id = :e"),
                         {"e": int(exp.experiment_id)}).scalar()
    engine.dispose()
    assert n == 3   # the sweep's parent run and its two trials


def test_compose_file_matches_the_bare_metal_recipe():
    compose = yaml.safe_load(COMPOSE.read_text())
    script = SCRIPT.read_text()
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "train"}
    pg, ml, train = services["postgres"], services["mlflow"], services["train"]
    # PostgreSQL: a persistent volume, a readiness check, the two databases of the recipe
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    init = [v for v in pg["volumes"] if "docker-entrypoint-initdb.d" in v][0].split(":")[0]
    init_sql = (COMPOSE.parent / init).read_text() if (COMPOSE.parent / init).is_file() else \
        "".join(p.read_text() for p in (COMPOSE.parent / init).glob("*.sql"))
    for db in ("mlflow", "optuna"):
        assert "for db in mlflow optuna" in script and (db in init_sql or pg["environment"]["POSTGRES_DB"] == db)
    # MLflow: the recipe's flags, on PostgreSQL, artifacts proxied onto a volume, Host header allowed
    command = " ".join(ml["command"]) if isinstance(ml["command"], list) else ml["command"]
    for flag in ("--serve-artifacts", "--artifacts-destination", "--allowed-hosts", "--workers 1",
                 "--backend-store-uri"):
        assert flag in command and flag.split()[0] in script, flag
    assert "postgresql://" in command and "@postgres:5432/mlflow" in command
    dest = command.split("--artifacts-destination")[1].split()[0]
    assert any(v.split(":")[1] == dest for v in ml["volumes"]), (dest, ml["volumes"])
    allowed = command.split("--allowed-hosts")[1].split()[0].strip("'\"").split(",")
    assert "mlflow:5000" in allowed   # what the train service sends as Host
    assert ml["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert ml["ports"] == ["5000:5000"] and "/health" in " ".join(ml["healthcheck"]["test"])
    assert ml["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    # the trainer: tracks to the server by its service name, Optuna on the same PostgreSQL
    assert train["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert train["environment"]["OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")
    assert train["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert set(compose["volumes"]) >= {v.split(":")[0] for s in (pg, ml) for v in s["volumes"] if not v.startswith(".")}
    # build context: no data, runs or outputs (~250 MB) sent to the Docker daemon
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", "mlruns", "outputs", "multirun"} <= {p.strip("/*") for p in ignored}
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX" in dockerfile and "ARG GIT_COMMIT" in dockerfile
