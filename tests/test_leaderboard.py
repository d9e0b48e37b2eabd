"""The leaderboard: runs of a small MLflow store next to the published CaloChallenge figures."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from caloexp import leaderboard as lb
from tests.conftest import SHARED, run_cli

HDF = SHARED / "calochallenge_results" / "CaloChallenge_results_ds1_photons.hdf"
#: The official features of ``sep/mean`` (caloexp.metrics.separation.is_official) as the results table names them:
#: E_tot/E_inc, E per layer, centres of energy in eta/phi and their widths.
OFFICIAL_SEP = ("sep E total", "sep E layer", "sep EC eta", "sep EC phi", "sep EC eta std", "sep EC phi std")


def published_from_hdf(path: Path) -> list[dict]:
    """The shipped file's rows computed from the official results table (pandas + tables: the `results` extra)."""
    import pandas as pd

    df = pd.read_hdf(path)

    def num(v) -> float | None:
        return None if v is None or not np.isfinite(v) else float(v)

    rows = []
    for sid, r in df.iterrows():
        # GEANT4 vs GEANT4 holds 10 repetitions (rows) of every separation: their mean
        seps = np.concatenate([np.atleast_2d(np.asarray(r[c], dtype=float)).mean(axis=0) for c in OFFICIAL_SEP])
        rows.append({"id": int(sid), "model": str(r["submission name"]),
                     "auc_low": num(r["binary cls low"]), "auc_low_std": num(r["binary cls low std"]),
                     "auc_high": num(r["binary cls high"]), "auc_high_std": num(r["binary cls high std"]),
                     "fpd_x1e3": num(r["FPD * 1e3"]), "kpd_x1e3": num(r["KPD * 1e3"]),
                     "sep_mean": num(float(np.mean(seps))), "sep_n_features": len(seps),
                     "cpu_ms_per_shower": num(r["time CPU 10000"]), "gpu_ms_per_shower": num(r["time GPU 10000"]),
                     "params_generation": num(r["Parameters generation"])})
    return rows


def test_shipped_published_figures_equal_the_official_results_table():
    pytest.importorskip("tables", reason="needs the `results` extra (pandas, tables)")
    if not HDF.is_file():
        pytest.skip(f"{HDF} not found (it lies beside the checkout in CI)")
    expected = published_from_hdf(HDF)
    shipped_text = (Path(lb.__file__).parent / "data" / lb.PUBLISHED_FILE).read_text()
    assert "arXiv:2410.21611" in shipped_text.split("\n", 1)[0]
    shipped = list(csv.DictReader(ln for ln in shipped_text.splitlines() if ln and not ln.startswith("#")))
    assert [int(r["id"]) for r in shipped] == [e["id"] for e in expected]
    for s, e in zip(shipped, expected):
        assert s["model"] == e["model"]
        assert e["sep_n_features"] == 14  # 1 + 5 layers + 4 x 2 alpha-binned layers, as caloexp's sep/mean
        for k, v in e.items():
            if k in ("id", "model", "sep_n_features"):
                continue
            assert (s[k] == "") == (v is None), (e["model"], k)
            if v is not None:
                assert float(s[k]) == pytest.approx(v, rel=1e-5), (e["model"], k)
    # the published rows as the leaderboard reads them (no pandas at run time)
    rows = {r["run"]: r for r in lb.published()}
    assert rows["CaloDiffusion"]["auc_low"] == pytest.approx(0.63459)
    assert rows["CaloDiffusion"]["cpu_ms_per_shower"] == pytest.approx(4500.2, rel=1e-4)
    assert rows["GEANT4"]["cpu_ms_per_shower"] is None


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A SQLite store with two training runs, an evaluation and a generation timing of one, a sweep parent."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("caloexp", artifact_location=(tmp_path / "mlruns").as_uri())
    other = c.create_experiment("elsewhere", artifact_location=(tmp_path / "mlruns").as_uri())
    now = int(time.time() * 1000)

    def new(name, tags, metrics=(), params=(), experiment=exp):
        rid = c.create_run(experiment, run_name=name, tags=tags).info.run_id
        c.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in metrics],
                    params=[Param(k, str(v)) for k, v in params])
        c.set_terminated(rid, "FINISHED")
        time.sleep(0.01)
        return rid

    ids = {}
    ids["cfm"] = new("cfm-photons-1", {"caloexp.model": "caloexp.models.cfm.CFM", "caloexp.dataset": "embedded_photons"},
                     [("cls/auc_low", 0.97), ("cls/auc_high", 0.95), ("sep/mean", 0.2), ("fpd", 0.1), ("kpd", 0.002)])
    # its protocol evaluation (wins over the training run's own values) and its generation timings
    new("evaluate-cfm", {"caloexp.evaluates": ids["cfm"], "mlflow.parentRunId": ids["cfm"]},
        [("cls/auc_low", 0.62), ("cls/auc_high", 0.58), ("fpd", 0.0031)])
    new("generate-cfm", {"caloexp.generates": ids["cfm"], "mlflow.parentRunId": ids["cfm"]},
        [("gen/ms_per_shower", 0.25)], [("gen.device", "cpu"), ("gen.batch_size", 10000), ("gen.sampler.steps", 5)])
    ids["gan"] = new("wgangp-ds1-2", {"caloexp.model": "caloexp.models.wgangp.WGANGP",
                                      "caloexp.dataset": "dataset_1_photons"},
                     [("cls/auc_low", 0.999), ("sep/mean", 0.3)])
    new("sweep-parent", {})  # neither a training run nor an evaluation: not a row
    new("foreign", {"caloexp.model": "caloexp.models.cfm.CFM"}, [("cls/auc_low", 0.51)], experiment=other)
    return uri, ids


def _cfg(uri: str, out: Path, **kw):
    cfg = OmegaConf.load(lb.CONF_DIR / "leaderboard.yaml")
    cfg.pop("defaults")
    cfg.pop("hydra")
    cfg.tracking_uri, cfg.out = uri, str(out)
    for k, v in kw.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_leaderboard_rows_order_missing_figures_and_files(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "lb"
    table = lb.run(_cfg(uri, out))
    mine = [r for r in table if r["benchmark"] != lb.PUBLISHED_BENCHMARK]
    assert [r["run_id"] for r in mine] == [ids["cfm"], ids["gan"]]  # AUC low 0.62 before 0.999
    cfm, gan = mine
    # newest evaluation first, the training run's own value where the evaluation lacks one
    assert cfm["auc_low"] == 0.62 and cfm["auc_high"] == 0.58 and cfm["fpd_x1e3"] == pytest.approx(3.1)
    assert cfm["sep_mean"] == 0.2 and cfm["kpd_x1e3"] == pytest.approx(2.0)
    assert cfm["metrics_from"].startswith("evaluate ") and cfm["metrics_from"].endswith(", training")
    assert (cfm["cpu_ms_per_shower"], cfm["gpu_ms_per_shower"], cfm["gen_batch"], cfm["steps"]) == (0.25, None, 10000, "5")
    assert (cfm["family"], cfm["benchmark"]) == ("CFM", "embedded (caloexp simulator)")
    assert (gan["family"], gan["benchmark"]) == ("WGANGP", "real: dataset_1_photons")
    assert gan["auc_high"] is None and gan["cpu_ms_per_shower"] is None and gan["fpd_x1e3"] is None
    published = [r for r in table if r["benchmark"] == lb.PUBLISHED_BENCHMARK]
    assert table[len(mine):] == published and len(published) == 16
    assert published[0]["run"] == "GEANT4"  # AUC 0.499: the closest to 0.5

    printed = capsys.readouterr().out
    gan_line = next(ln for ln in printed.splitlines() if "wgangp-ds1-2" in ln)
    assert gan_line.count(lb.MISSING) >= 4  # AUC high, FPD, KPD, times: shown as missing, not as 0
    assert "No generation time for 1 of 2 runs" in printed and "No classifier AUC" not in printed
    assert "Benchmarks differ" in printed and "CaloDiffusion" in printed

    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows[:2]] == ["cfm-photons-1", "wgangp-ds1-2"] and len(rows) == 18
    assert rows[1]["auc_high"] == "" and float(rows[0]["auc_low"]) == 0.62
    assert {r["benchmark"] for r in rows[2:]} == {lb.PUBLISHED_BENCHMARK}
    md = (out / "leaderboard.md").read_text()
    assert "Benchmarks differ" in md and md.count("\n| ") == 19
    png = (out / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_filters_and_sort_keys(store):
    uri, ids = store

    def names(rows):
        return [r["run"] for r in rows]

    assert [r["run_id"] for r in lb.collect(uri, ["caloexp"], "tags.`caloexp.dataset` = 'dataset_1_photons'")] \
        == [ids["gan"]]
    assert names(lb.collect(uri, ["caloexp"], family="cfm")) == ["cfm-photons-1"]
    assert names(lb.collect(uri, ["caloexp"], dataset="embedded_photons")) == ["cfm-photons-1"]
    both = lb.collect(uri, ["caloexp", "elsewhere"])
    assert sorted(names(both)) == ["cfm-photons-1", "foreign", "wgangp-ds1-2"]
    assert names(lb.sort_rows(both, "auc_low")) == ["foreign", "cfm-photons-1", "wgangp-ds1-2"]
    assert names(lb.sort_rows(both, "sep_mean")) == ["cfm-photons-1", "wgangp-ds1-2", "foreign"]  # missing last
    assert names(lb.sort_rows(both, "run")) == ["cfm-photons-1", "foreign", "wgangp-ds1-2"]
    with pytest.raises(lb.ConfigError, match="sort=speed: not one of"):
        lb.sort_rows(both, "speed")


def test_bad_filter_and_missing_store_are_one_line_errors(store, tmp_path):
    uri, _ = store
    with pytest.raises(lb.InputError, match=r"^filter='tags.nonsense ~~ 1': ") as e:
        lb.collect(uri, ["caloexp"], "tags.nonsense ~~ 1")
    assert "\n" not in str(e.value)
    with pytest.raises(lb.InputError, match="none.db: no MLflow store"):
        lb.collect(f"sqlite:///{tmp_path}/none.db", ["caloexp"])
    assert not (tmp_path / "none.db").exists()  # reading never creates a store
    from mlflow.tracking import MlflowClient

    from caloexp.tracking import start_side_run

    with pytest.raises(lb.InputError, match=r"^mlflow_run=0123: no such run at sqlite:///"):  # generate/evaluate
        start_side_run(MlflowClient(uri), uri, "caloexp-generate", "0123", "caloexp.generates", "generate", "x")


@pytest.mark.slow
def test_cli_one_line_errors_and_output(store, tmp_path):
    uri, _ = store
    env = {"MLFLOW_TRACKING_URI": uri}
    r = run_cli(["caloexp.leaderboard", "experiment_name=nosuch"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: experiment_name=nosuch: no such MLflow experiment") and "caloexp, elsewhere" in r.stderr
    r = run_cli(["caloexp.leaderboard", "out=board", "family=CFM"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "cfm-photons-1" in r.stdout and "wgangp" not in r.stdout and (tmp_path / "board" / "leaderboard.png").is_file()


def test_sampler_settings_of_a_single_pass_and_a_multi_step_sampler():
    from types import SimpleNamespace

    from torch import nn

    from caloexp.generate import sampler_settings
    from caloexp.models.base import LatentSampler

    gan = SimpleNamespace(sampler=LatentSampler(nn.Linear(5, 3), 4, True), options={})
    assert sampler_settings(gan, {"model": {}}, {}) == {"steps": 1}

    class Flow(nn.Module):
        def sample(self, cond, rng=None, steps=None, solver=None, order=2):
            return cond

    flow = SimpleNamespace(sampler=Flow(), options={"solver": "rk4"})
    spec = {"model": {"steps": 5, "solver": "midpoint"}}
    assert sampler_settings(flow, spec, {}) == {"steps": 5, "solver": "rk4", "order": 2}  # config < generator
    assert sampler_settings(flow, spec, {"steps": 2, "solver": "euler"}) == {"steps": 2, "solver": "euler", "order": 2}


@pytest.mark.slow
def test_train_generate_timing_and_leaderboard_end_to_end(tmp_path):
    """A tiny CFM run, its generation timed into MLflow, and the leaderboard row that shows both."""
    import torch

    r = run_cli(["caloexp.train", "data.n_showers=600", "data.eval_events=200", "data.batch_size=64",
                 "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=2", "trainer.checkpoint_every=4",
                 "trainer.plot_every=0", "trainer.num_threads=1", "model.net.width=32", "model.net.n_blocks=1",
                 "model.energy_net.width=32", "model.energy_net.n_blocks=1", f"hydra.run.dir={tmp_path}/run"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["run_id"]
    r = run_cli(["caloexp.generate", f"source={tmp_path}/run/checkpoints/last.ckpt", f"mlflow_run={run_id}",
                 "n_showers=2000", "batch_size=1000", "sampler={steps: 3}", "device=cpu"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = lb.collect(f"sqlite:///{tmp_path}/mlflow.db", ["caloexp"])
    assert (row["run_id"], row["family"], row["benchmark"]) == (run_id, "CFM", "embedded (caloexp simulator)")
    assert 0 < row["cpu_ms_per_shower"] < 1000 and row["gpu_ms_per_shower"] is None
    assert (row["gen_batch"], row["steps"]) == (1000, "3")
    assert row["sep_mean"] is not None and row["auc_low"] is None  # training evaluates the fast groups only
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (timing,) = c.search_runs([c.get_run(run_id).info.experiment_id], f"tags.`caloexp.generates` = '{run_id}'")
    p = timing.data.params
    assert (p["gen.n_showers"], p["gen.sampler.solver"], p["gen.device"]) == ("2000", "midpoint", "cpu")
    assert timing.data.metrics["gen/showers_per_s"] == pytest.approx(1e3 / row["cpu_ms_per_shower"])
