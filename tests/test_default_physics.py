"""The first result a new user sees is physically credible: the default configuration (two-stage CFM on
the embedded photons), trained for a shortened run with a fixed seed, keeps the mean response
E_tot/E_inc within 5 % of the reference at every incident energy and the resolution within a factor
1.5 (the bounds of the full default run, which reaches them with margin; README "Physics of the models")."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_default_model_response_and_resolution_on_a_shortened_run(tmp_path):
    r = run_cli(["caloexp.train", "trainer.max_steps=1200", "trainer.eval_every=1200", "trainer.plot_every=0",
                 "trainer.checkpoint_every=1200", "logger.log_model=false", "seed=42"], cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("caloexp").experiment_id])
    m = run.data.metrics
    assert run.data.params["model._target_"] == "caloexp.models.cfm.CFM"
    per_energy = [k for k in m if k.startswith("resp/mean_ratio_")]
    assert len(per_energy) == 15                                     # every incident energy is checked
    assert m["resp/max_mean_dev"] <= 0.05, m["resp/max_mean_dev"]
    assert m["resp/max_width_ratio"] <= 1.5, m["resp/max_width_ratio"]
