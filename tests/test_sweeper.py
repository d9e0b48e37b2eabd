"""The caloexp_optuna sweeper on a tiny Hydra app (tests/sweeper_toy_app, no torch): schema,
optimisation, failures, resume, abandoned trials, concurrent workers, joblib, MLflow grouping."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.caloexp_optuna_sweeper._search_space import SweepConfigError, format_value, parse_search_space

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "sweeper_toy_app" / "toy_app.py"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def toy_cmd(tmp: Path, *overrides: str, sweep: str = "toy_x", multirun: bool = True) -> list[str]:
    base = [sys.executable, str(TOY)] + (["-m", f"sweeps={sweep}"] if multirun else [])
    common = [f"record_file={tmp / 'record.jsonl'}", f"hydra.sweep.dir={tmp / 'multirun'}",
              f"hydra.run.dir={tmp / 'run'}"]
    if multirun:
        common += [f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
                   f"hydra.sweeper.best_config_dir={tmp / 'cfg' / 'experiment'}"]
    return base + common + list(overrides)


def toy_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_toy(tmp: Path, *overrides: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(toy_cmd(tmp, *overrides, **kw), cwd=tmp, env=toy_env(), capture_output=True,
                          text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"toy app failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load(tmp: Path, name: str = "toy_x") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'optuna.db'}")


def records(tmp: Path) -> list[dict]:
    path = tmp / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- schema ------------------------------------------------------------------------------------

def test_schema_parses_every_distribution_kind():
    specs, fixed = parse_search_space(
        {"a": "choice(wgangp, gan, 3)", "b": "range(2, 6)", "c": "tag(log, interval(1e-5, 1e-2))",
         "d": "interval(0.0, 1.0)", "e": "tag(log, int, interval(32, 512))", "f": "range(0.1, 0.5, 0.1)",
         "fixed": 7}, ["b=range(2, 10, 2)", "trainer.max_steps=5"], "sweeps/x.yaml")
    got = {s.name: s for s in specs}
    assert got["a"].kind == "categorical" and got["a"].choices == ("wgangp", "gan", 3)
    assert (got["b"].kind, got["b"].low, got["b"].high, got["b"].step) == ("int", 2, 8, 2)  # CLI wins, stop excluded
    assert (got["c"].kind, got["c"].log, got["c"].low, got["c"].high) == ("float", True, 1e-5, 1e-2)
    assert (got["d"].kind, got["d"].log) == ("float", False)
    assert (got["e"].kind, got["e"].log, got["e"].low, got["e"].high) == ("int", True, 32, 512)
    assert got["f"].kind == "float" and got["f"].step == pytest.approx(0.1) and got["f"].high == pytest.approx(0.4)
    assert set(fixed) == {"fixed", "trainer.max_steps"} and fixed["fixed"].value() == 7
    # sampled values render as overrides that parse back to the same value and type
    from hydra.core.override_parser.overrides_parser import OverridesParser
    for v in (1e-5, 0.00031, 3, True, "wgangp", "a b", "1e-3", "null"):
        (ov,) = OverridesParser.create().parse_overrides([f"k={format_value(v)}"])
        assert ov.value() == v and type(ov.value()) is type(v)


@pytest.mark.parametrize("value,message", [
    ("loguniform(1e-5, 1e-2)", "Unknown function 'loguniform'"),
    ("interval(3, 1)", "interval low must be < high"),
    ("tag(log, interval(0, 1))", "log-scale interval needs low > 0"),
    ("tag(lg, interval(1, 2))", "unknown tag(s) ['lg']"),
    ("range(5, 1)", "range needs start < stop"),
])
def test_schema_errors_name_file_and_key(value, message):
    with pytest.raises(SweepConfigError) as e:
        parse_search_space({"optimizer.lr": value}, [], "sweeps/wgangp_lr.yaml")
    text = str(e.value)
    assert text.startswith("sweeps/wgangp_lr.yaml: hydra.sweeper.params.optimizer.lr: ") and message in text
    assert "\n" not in text


def test_bad_sweep_file_fails_before_any_trial(tmp_path):
    proc = run_toy(tmp_path, "hydra.sweeper.params.x='interval(3.0, 1.0)'", check=False)
    assert proc.returncode != 0
    assert "sweeps/toy_x.yaml: hydra.sweeper.params.x: interval low must be < high" in proc.stderr
    assert records(tmp_path) == []


# -- optimisation, failures, best config ---------------------------------------------------------

def test_minimises_quadratic_and_writes_reproducible_best_config(tmp_path):
    run_toy(tmp_path, "hydra.sweeper.n_trials=20")
    study = load(tmp_path)
    assert len(study.trials) == 20 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert abs(study.best_params["x"] - 2.0) < 0.5, study.best_params
    assert study.best_value == pytest.approx((study.best_params["x"] - 2) ** 2 + 0.01)
    best = tmp_path / "cfg" / "experiment" / "toy_x_best.yaml"
    text = best.read_text()
    assert text.startswith("# @package _global_") and "override /sweeps: toy_x" in text
    # `experiment=toy_x_best` reproduces the best trial
    n_before = len(records(tmp_path))
    run_toy(tmp_path, "experiment=toy_x_best", f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", multirun=False)
    rerun = records(tmp_path)[n_before:]
    assert len(rerun) == 1 and rerun[0]["x"] == study.best_params["x"]


def test_best_config_goes_to_the_project_root_and_is_an_experiment_option(tmp_path):
    """Default location <root>/experiments (never the source tree); `experiment=<study>_best` and --help find it."""
    cmd = [a for a in toy_cmd(tmp_path, "hydra.sweeper.n_trials=4") if not a.startswith("hydra.sweeper.best_config_dir")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=toy_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "experiments" / "toy_x_best.yaml").is_file()
    assert not (TOY.parent / "conf" / "experiment").exists()
    study = load(tmp_path)
    n_before = len(records(tmp_path))
    run_toy(tmp_path, "experiment=toy_x_best", multirun=False)  # no hydra.searchpath needed
    assert [r["x"] for r in records(tmp_path)[n_before:]] == [study.best_params["x"]]
    # it is an option of the existing group, and no other group appears
    helped = subprocess.run([sys.executable, str(TOY), "--help"], cwd=tmp_path, env=toy_env(), capture_output=True,
                            text=True, timeout=240)
    section = helped.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert re.search(r"^experiment: toy_x_best$", section, re.M), section
    assert {m.group(1) for m in re.finditer(r"^(\S+): ", section, re.M)} == {"experiment", "sweeps"}
    # elsewhere (another root without experiments/) the option does not exist
    other = tmp_path / "other"
    other.mkdir()
    proc = subprocess.run([sys.executable, str(TOY), "experiment=toy_x_best"], cwd=other, env=toy_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "experiment" in proc.stderr, proc.stderr


def test_failed_and_diverged_trials_are_recorded_and_the_study_goes_on(tmp_path):
    run_toy(tmp_path, "hydra.sweeper.n_trials=12", "fail_when_x_above=2.5", "diverge_when_x_below=-2.5",
            "hydra.sweeper.sampler.n_startup_trials=12")
    trials = load(tmp_path).trials
    assert len(trials) == 12 and len(records(tmp_path)) == 12
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert by_state[TrialState.FAIL] and by_state[TrialState.PRUNED] and by_state[TrialState.COMPLETE]
    for t in by_state[TrialState.FAIL]:
        assert t.params["x"] > 2.5 and t.user_attrs["fail_reason"].startswith("RuntimeError: toy crash at x=")
    for t in by_state[TrialState.PRUNED]:
        assert t.params["x"] < -2.5 and t.user_attrs["fail_reason"].startswith("TrainingDiverged: loss is nan")
    for t in by_state[TrialState.COMPLETE]:
        assert -2.5 <= t.params["x"] <= 2.5 and "fail_reason" not in t.user_attrs


# -- persistence -------------------------------------------------------------------------------

def test_resume_skips_finished_trials_and_does_not_repeat_the_seeded_startup(tmp_path):
    run_toy(tmp_path, "hydra.sweeper.n_trials=4")
    assert len(records(tmp_path)) == 4
    run_toy(tmp_path, "hydra.sweeper.n_trials=4")          # same study, same budget: nothing to do
    assert len(records(tmp_path)) == 4 and len(load(tmp_path).trials) == 4
    run_toy(tmp_path, "hydra.sweeper.n_trials=7")          # a larger budget continues the study
    trials = load(tmp_path).trials
    assert [t.number for t in trials] == list(range(7)) and len(records(tmp_path)) == 7
    xs = [t.params["x"] for t in trials]
    assert len(set(xs)) == 7, f"a resumed seeded sampler repeated startup points: {xs}"


def kill_worker_in_first_trial(tmp_path, timeout: float, *args: str) -> None:
    """Start a toy sweep worker, wait until its first trial runs, then kill -9 it."""
    proc = subprocess.Popen(toy_cmd(tmp_path, *args), cwd=tmp_path, env=toy_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not records(tmp_path) and time.time() < deadline:
            time.sleep(0.2)
        assert records(tmp_path), "the first trial never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_trial_of_a_killed_worker_is_abandoned_and_rerun(tmp_path):
    kill_worker_in_first_trial(tmp_path, 60, "hydra.sweeper.n_trials=3", "sleep=30")
    killed_x = records(tmp_path)[0]["x"]
    assert [t.state for t in load(tmp_path).trials] == [TrialState.RUNNING]
    run_toy(tmp_path, "hydra.sweeper.n_trials=3")
    trials = load(tmp_path).trials
    t0 = trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["abandoned"] is True
    assert "is no longer running" in t0.user_attrs["fail_reason"]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and len(trials) == 4           # abandoned trials do not use up n_trials
    retry = [t for t in done if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params["x"] == killed_x


def test_stale_trial_policy_by_pid_and_heartbeat():
    from datetime import datetime

    from hydra_plugins.caloexp_optuna_sweeper import _coordination as co

    def running(worker: str, heartbeat=None) -> optuna.trial.FrozenTrial:
        attrs = {"worker": worker} if heartbeat is None else {"worker": worker, "heartbeat": heartbeat}
        return optuna.trial.FrozenTrial(number=0, state=TrialState.RUNNING, value=None, values=None,
                                        datetime_start=datetime.now(), datetime_complete=None, params={},
                                        distributions={}, user_attrs=attrs, system_attrs={},
                                        intermediate_values={}, trial_id=0)

    now = time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "no longer running" in co.abandon_reason(running(f"{co.HOST}:{dead.pid}", now), 600, now)
    assert co.abandon_reason(running(f"{co.HOST}:{os.getppid()}", now - 10), 600, now) is None   # alive
    assert co.abandon_reason(running("otherhost:1", now - 10), 600, now) is None                  # fresh beat
    assert "no heartbeat" in co.abandon_reason(running("otherhost:1", now - 700), 600, now)        # stale beat


def test_two_workers_on_one_sqlite_study_run_exactly_n_trials(tmp_path):
    """Both workers resolve the same sweep dir (as two starts within one `${now:...}` second do):
    every trial still gets its own output folder, named by study and trial number."""
    args = toy_cmd(tmp_path, "hydra.sweeper.n_trials=10", "sleep=0.6")   # one hydra.sweep.dir for both
    procs = [subprocess.Popen(args, cwd=tmp_path, env=toy_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = load(tmp_path)
    trials = study.trials
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.number for t in trials] == list(range(10))
    assert len({t.params["x"] for t in trials}) == 10, "duplicate parameter sets"
    rec = records(tmp_path)
    assert len(rec) == 10 and len({r["x"] for r in rec}) == 10, "a trial ran twice or was lost"
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, f"both workers should have run trials: {workers}"
    sweep_id = study.user_attrs["sweep_id"]
    for t in trials:  # one folder per trial, tied to the study and the trial number, holding only that trial
        out = Path(t.user_attrs["output_dir"])
        assert out == tmp_path / "multirun" / sweep_id / f"trial_{t.number:04d}"
        assert (out / "trial.log").read_text().splitlines() == [f"pid={next(r['pid'] for r in rec if r['x'] == t.params['x'])} x={t.params['x']}"]
    assert len({r["out_dir"] for r in rec}) == 10


def test_joblib_launcher_runs_two_trials_in_parallel(tmp_path):
    proc = run_toy(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=4",
                   "sleep=0.5")
    trials = load(tmp_path).trials
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert "Reserved trial(s) [0, 1]" in proc.stderr + proc.stdout   # n_jobs follows hydra.launcher.n_jobs
    pids = {r["pid"] for r in records(tmp_path)}
    assert len(pids) == 2, f"trials should run in 2 joblib worker processes, got pids {pids}"


# -- MLflow grouping -------------------------------------------------------------------------------

def test_mlflow_parent_run_children_and_resume_reuses_parent(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_toy(tmp_path, "hydra.sweeper.n_trials=3", f"logger.tracking_uri={uri}", "logger.experiment_name=toy_exp")
    run_toy(tmp_path, "hydra.sweeper.n_trials=4", f"logger.tracking_uri={uri}", "logger.experiment_name=toy_exp")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("toy_exp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("caloexp.sweep_role") == "parent"]
    assert len(parents) == 1, "a resumed study must reuse its parent run"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2, 3]
    study = load(tmp_path)
    sweep_id = study.user_attrs["sweep_id"]
    for r in children:
        assert r.data.tags["optuna_study"] == "toy_x" and r.data.tags["sweep_id"] == sweep_id
        assert r.data.tags["optuna_state"] == "COMPLETE" and "x" in r.data.params
        trial = study.trials[int(r.data.tags["optuna_trial"])]
        assert r.data.metrics["toy/objective"] == pytest.approx(trial.value)
        assert trial.user_attrs["mlflow_run_id"] == r.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["toy/objective"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    arts = {a.path for d in ("optuna", "best_config") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png", "optuna/trials.csv",
            "best_config/toy_x_best.yaml"} <= arts, arts
    # swept values under their own prefix, and the experiment's `sweep` view shows them with the objective
    for r in children:
        trial = study.trials[int(r.data.tags["optuna_trial"])]
        assert r.data.params["sweep.x"] == str(trial.params["x"])
        assert not [k for k in r.data.params if k.startswith("sweep.") and k != "sweep.x"]
    view = json.loads(client.get_experiment(exp.experiment_id).tags["mlflow.sharedViewState.sweep"])
    assert view["selectedColumns"] == ["metrics.`toy/objective`", "params.`sweep.x`"]
    assert view["orderByKey"] == "metrics.`toy/objective`" and view["orderByAsc"] is True


# -- search path: only the `sweeps` group is added ---------------------------------------------------

REAL_GROUPS = {"data", "debug", "experiment", "logger", "metrics", "model", "optimizer", "paths", "scheduler", "sweeps",
               "trainer"}


def test_help_lists_only_real_groups_in_a_project_full_of_yaml(tmp_path):
    """A clone where runs happened (mlruns/, outputs/, multirun/ hold YAML) shows only the real groups."""
    import re
    import shutil

    for name in ("caloexp", "conf", "sweeps", "hydra_plugins", "tests/sweeper_toy_app"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for junk in ("mlruns/1/0123abcd/meta.yaml", "outputs/train/2024-01-01/.hydra/config.yaml",
                 "multirun/2024-01-01/0/.hydra/overrides.yaml", "mlruns/models/m/version-1/meta.yaml"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("a: 1\n")
    (tmp_path / "experiments").mkdir()  # where sweeps write <study>_best.yaml
    (tmp_path / "experiments" / "wgangp_lr_best.yaml").write_text("# @package _global_\ntrainer: {max_steps: 77}\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # this copy's caloexp and plugin, as a user's clone
    proc = subprocess.run([sys.executable, "-m", "caloexp.train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = {m.group(1) for m in re.finditer(r"^(\S+): ", section, re.M)}
    assert groups == REAL_GROUPS, sorted(groups ^ REAL_GROUPS)
    assert re.search(r"^sweeps: .*wgangp_lr", section, re.M)
    experiments = sorted([p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")] + ["wgangp_lr_best"])
    assert re.search(rf"^experiment: {', '.join(experiments)}$", section, re.M), section
    # the sweeps group still selects the project's sweep files
    proc = subprocess.run([sys.executable, "-m", "caloexp.train", "sweeps=wgangp_lr", "--cfg", "job"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_steps: 1500" in proc.stdout and "optimized_metric: monitor/score" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "caloexp.train", "+experiment=wgangp_lr_best", "--cfg", "job"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "max_steps: 77" in proc.stdout, proc.stderr[-3000:]


def test_killed_workers_mlflow_run_is_closed_and_retries_are_reported_apart(tmp_path):
    """kill -9 of a worker mid-trial: the next worker fails the trial as abandoned, closes its RUNNING
    child run as KILLED (optuna_state=ABANDONED), re-runs its point, and the parent counts it apart."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_args = (f"logger.tracking_uri={uri}", "logger.experiment_name=toy_kill")
    kill_worker_in_first_trial(tmp_path, 120, "hydra.sweeper.n_trials=2", "sleep=60", *mlflow_args)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("toy_kill")
    (orphan,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("optuna_trial") == "0"]
    assert orphan.info.status == "RUNNING"                          # what a killed worker leaves behind

    run_toy(tmp_path, "hydra.sweeper.n_trials=2", *mlflow_args)
    killed = client.get_run(orphan.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["optuna_state"] == "ABANDONED"
    assert "is no longer running" in killed.data.tags["optuna_fail_reason"]
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("caloexp.sweep_role") == "parent"]
    m = parent.data.metrics
    assert (m["n_complete"], m["n_fail"], m["n_abandoned"], m["n_retried"]) == (2, 0, 1, 1), m
    retry = [r for r in runs if r.data.tags.get("optuna_retry_of") == "0"]
    assert len(retry) == 1 and retry[0].info.status == "FINISHED"
    assert float(retry[0].data.params["x"]) == records(tmp_path)[0]["x"]
