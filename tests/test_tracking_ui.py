"""Run names and the MLflow UI link / runs-table view that caloexp.tracking writes."""
from __future__ import annotations

import json
from datetime import datetime

from mlflow.tracking import MlflowClient

from caloexp import tracking


def test_run_name_is_short_and_distinguishable():
    when = datetime(2025, 3, 7, 14, 5, 9)
    name = tracking.run_name("wgangp", "embedded_photons", ["optimizer.generator.lr=1e-4", "data=embedded",
                                                            "paths.root_dir=/x", "+trainer.max_steps=500"], when)
    assert name == "wgangp-photons-lr=1e-4,max_steps=500-0307-140509"
    assert tracking.run_name("flow", "dataset_2", [], when) == "flow-ds2-0307-140509"
    long = tracking.run_name("wgangp", "photons", [f"a.k{i}=1" for i in range(9)], when)
    assert len(long) <= 60 and long.endswith("-0307-140509") and "k0=1,k1=1,k2=1,..." in long


def test_ui_url_opens_the_runs_table():
    assert (tracking.ui_url("http://127.0.0.1:5001/", "7")
            == "http://127.0.0.1:5001/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=caloexp")
    assert tracking.ui_url("sqlite:///x/mlflow.db", "1", view=None).startswith("http://127.0.0.1:5000/#/experiments/1/runs?")


def test_new_experiment_gets_the_runs_view(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = tracking.get_or_create_experiment(client, "e", uri)
    state = json.loads(client.get_experiment(exp_id).tags[tracking.SHARED_VIEW_TAG + tracking.UI_VIEW_KEY])
    assert state["selectedColumns"][0] == "metrics.`monitor/score`" and state["orderByAsc"] is True
    tracking.set_runs_view(client, exp_id, ["sep/mean"], ["optimizer.generator.lr"], key="sweep")
    sweep = json.loads(client.get_experiment(exp_id).tags[tracking.SHARED_VIEW_TAG + "sweep"])
    assert sweep["selectedColumns"] == ["metrics.`sep/mean`", "params.`optimizer.generator.lr`"]
    # a view the user changed is left alone
    client.set_experiment_tag(exp_id, tracking.SHARED_VIEW_TAG + tracking.UI_VIEW_KEY, "{}")
    tracking.get_or_create_experiment(client, "e", uri)
    assert client.get_experiment(exp_id).tags[tracking.SHARED_VIEW_TAG + tracking.UI_VIEW_KEY] == "{}"
