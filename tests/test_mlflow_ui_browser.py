"""Headless Chromium opens the MLflow UI and sees the runs table: run names and physics metric columns.

MLflow 3.17 opens an experiment on the GenAI "Overview" unless the URL says
``workflowType=machine_learning`` (the ``mlflow.experimentKind`` tag is ignored); the documented
link (:func:`caloexp.tracking.ui_url`) carries it plus the caloexp shared view (metric columns).

Needs Debian's ``chromium`` (installed here with apt-get when missing and possible; skipped
with the reason otherwise). The screenshot is kept under the test's temp dir.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from caloexp import tracking
from sweeper_toy_app.mlflow_fixtures import STUDY, mlflow_server, real_sweep  # noqa: F401

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> str:
    """Path of chromium, installing Debian's package when missing; skips when that is impossible."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    why = "not root" if os.geteuid() != 0 else "no apt-get" if not shutil.which("apt-get") else ""
    if not why:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            r = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                               text=True, timeout=600)
            why = "" if Path(CHROMIUM).exists() else f"apt-get install chromium failed: {r.stderr.strip()[-300:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"apt-get install chromium failed: {e}"
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent and cannot be installed ({why})")
    return CHROMIUM


def chromium(url: str, *args: str, budget_ms: int = 8000) -> subprocess.CompletedProcess:
    cmd = [ensure_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--no-first-run", "--disable-extensions",
           f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_mlflow_ui_shows_the_study_runs_and_metric(real_sweep, tmp_path):
    client = MlflowClient(tracking_uri=real_sweep.server.url)
    exp_id = real_sweep.experiment_id
    runs = client.search_runs([exp_id])
    parent = next(r for r in runs if r.data.tags.get("caloexp.sweep_role") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    ids = [parent.info.run_id] + [r.info.run_id for r in children]

    # the compare view: every run of the study side by side with its params and metrics
    compare = (f"{real_sweep.server.url}/#/compare-runs?runs={json.dumps(ids, separators=(',', ':'))}"
               f"&experiments={json.dumps([exp_id], separators=(',', ':'))}")
    dom = chromium(compare, "--dump-dom").stdout
    (tmp_path / "compare_dom.html").write_text(dom)
    assert f"optuna-{STUDY}" in dom, "parent run name missing from the compare view"
    assert "monitor/score" in dom, "objective metric missing from the compare view"
    assert "optimizer.generator.lr" in dom, "searched parameter missing from the compare view"
    for child in children:
        assert child.info.run_name in dom

    # the experiment's runs page, as a user first sees it, saved as a screenshot
    page = f"{real_sweep.server.url}/#/experiments/{exp_id}/runs"
    dom = chromium(page, "--dump-dom").stdout
    (tmp_path / "runs_dom.html").write_text(dom)
    assert f"optuna-{STUDY}" in dom
    shot = tmp_path / "mlflow_ui.png"
    chromium(compare, f"--screenshot={shot}", "--window-size=1600,1000")
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"MLflow UI screenshot: {shot}")


def test_documented_link_opens_the_runs_table_with_physics_columns(mlflow_server, tmp_path):
    """The link caloexp prints shows the runs table: full run names and the physics columns, sorted by the monitor."""
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id = tracking.get_or_create_experiment(client, "ui_runs_table", mlflow_server.url)
    names = {tracking.run_name("wgangp", "embedded_photons", ["optimizer.generator.lr=1e-4"]): 0.31,
             tracking.run_name("flow", "embedded_photons", ["trainer.max_steps=500"]): 0.12}
    for name, value in names.items():
        run = client.create_run(exp_id, run_name=name)
        client.log_metric(run.info.run_id, "monitor/score", value)
        client.log_metric(run.info.run_id, "sep/mean", value / 2)
        client.log_metric(run.info.run_id, "resp/max_mean_dev", value / 10)
        client.log_param(run.info.run_id, "data._target_", "caloexp.data.datamodule.ShowerDataModule")
        client.set_terminated(run.info.run_id)

    bare = chromium(f"{mlflow_server.url}/#/experiments/{exp_id}", "--dump-dom").stdout
    (tmp_path / "bare_dom.html").write_text(bare)
    url = tracking.ui_url(mlflow_server.url, exp_id)
    dom = chromium(url, "--dump-dom").stdout
    (tmp_path / "runs_dom.html").write_text(dom)
    for name in names:
        assert f">{name}<" in dom, f"run name {name} missing from the runs table"
    assert "Token Usage" not in dom and "Detect Issues" not in dom, "the GenAI overview opened, not the runs table"
    assert "matching runs" in dom, "no runs table"
    for metric in ("monitor/score", "sep/mean", "resp/max_mean_dev"):
        assert f">{metric}<" in dom, f"metric column {metric} missing"
    # the best run (lowest monitor/score) is the first row
    best, worst = sorted(names, key=names.get)
    assert dom.index(f">{best}<") < dom.index(f">{worst}<")
    shot = tmp_path / "mlflow_ui.png"
    chromium(url, f"--screenshot={shot}", "--window-size=1600,900")
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"MLflow UI screenshot: {shot}\nbare experiment link shows the GenAI overview: {'Token Usage' in bare}")
