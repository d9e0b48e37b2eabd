"""Headless Chromium opens the MLflow UI of the sweep's server and sees the study's runs and metric.

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
    assert "sep/mean" in dom, "objective metric missing from the compare view"
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
