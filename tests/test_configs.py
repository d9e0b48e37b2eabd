"""Every config group option composes and builds (lightning-hydra-template style)."""
import itertools
import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

import caloexp.config  # noqa: F401 - registers schemas
from caloexp.cli import CONF_DIR
from caloexp.build import instantiate as safe_instantiate
from caloexp.data.base import DataModule
from caloexp.models.base import GenerativeModel
from caloexp.optim import build_optimizer, build_scheduler


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_cfg(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in a real run
        with open_dict(cfg):
            cfg.paths.root_dir = str(tmp_path)
            cfg.paths.output_dir = str(tmp_path / "out")
        return cfg


def test_groups_have_the_expected_options():
    assert {"wgangp", "gan"} <= set(options("model"))
    assert {"adam", "adamw", "rmsprop", "sgd"} <= set(options("optimizer"))
    assert {"none", "step", "cosine", "plateau"} <= set(options("scheduler"))
    assert {"embedded", "photons", "pions", "dataset2", "dataset3"} <= set(options("data"))


@pytest.mark.parametrize("model, optimizer, scheduler",
                         list(itertools.product([m for m in options("model") if m != "reflow"],  # needs a teacher
                                                options("optimizer"), options("scheduler"))))   # run: test_cfm
def test_model_optimizer_scheduler_build(model, optimizer, scheduler, tmp_path):
    cfg = compose_cfg([f"model={model}", f"optimizer={optimizer}", f"scheduler={scheduler}"], tmp_path)
    # conv: a grid; gan2d: the ds1-photon image view; cfm: layer features; corrvae: ZDC images
    shape = {"wgangp_conv": (6, 12, 12), "gan2d": (23, 19), "cfm": (373,), "corrvae": (1, 44, 44),
             "gan3d": (12, 12, 6)}.get(model, (368,))
    net = instantiate(cfg.model, data_shape=shape, cond_dim=1)
    for role in net.roles:
        opt = build_optimizer(cfg.optimizer, role, net.roles, net.parameters_for(role))
        assert opt.param_groups[0]["lr"] == cfg.optimizer.get(role, cfg.optimizer).lr
        sched = build_scheduler(cfg.scheduler, opt)
        assert (sched is None) == (scheduler == "none")


@pytest.mark.parametrize("data", [d for d in options("data")   # the CaloChallenge ones; others test their own
                                  if "ShowerDataModule" in (CONF_DIR / "data" / f"{d}.yaml").read_text()])
def test_data_configs_compose(data, tmp_path):
    cfg = compose_cfg([f"data={data}"], tmp_path)
    dm = safe_instantiate(cfg.data, "data", DataModule)
    assert dm.geometry.n_voxels in (368, 533, 6480, 40500)
    assert (dm.source_kind == "embedded") == (data == "embedded")
    assert dm.streaming == (data == "dataset3")   # 8 GB files are streamed


def test_arrays_config_needs_files(tmp_path):
    cfg = compose_cfg(["data=arrays", "data.files=[a.h5]", "data.kind=tabular"], tmp_path)
    dm = safe_instantiate(cfg.data, "data", DataModule)
    assert dm.kind == "tabular" and dm.files == [tmp_path / "data" / "a.h5"]


def test_configs_naming_foreign_code_are_refused(tmp_path):
    cfg = compose_cfg(["model=wgangp"], tmp_path)
    from caloexp.errors import ConfigError
    from omegaconf import OmegaConf
    bad = OmegaConf.merge(cfg.model, {"generator": {"_target_": "pathlib.Path.write_text"}})
    with pytest.raises(ConfigError, match=r"model.generator._target_='pathlib.Path.write_text': refused"):
        safe_instantiate(bad, "model", GenerativeModel, data_shape=(368,), cond_dim=1)
    bad = OmegaConf.merge(cfg.model, {"_target_": "caloexp.data.calochallenge.write"})
    with pytest.raises(ConfigError, match="refused"):
        safe_instantiate(bad, "model", GenerativeModel, data_shape=(368,), cond_dim=1)
    bad = OmegaConf.merge(cfg.data, {"_target_": "caloexp.models.wgangp.WGANGP"})
    with pytest.raises(ConfigError, match="not a DataModule"):
        safe_instantiate(bad, "data", DataModule)


def test_cli_style_overrides(tmp_path):
    cfg = compose_cfg(["model=wgangp", "optimizer.lr=3e-4", "optimizer.critic.lr=1e-4", "trainer.max_steps=200",
                       "model.latent_dim=64", "seed=3"], tmp_path)
    assert cfg.optimizer.generator.lr == 3e-4 and cfg.optimizer.critic.lr == 1e-4
    assert cfg.trainer.max_steps == 200 and cfg.model.latent_dim == 64 and cfg.seed == 3
    # distinguishable at a glance: family, data, the key overrides (last key component), a time stamp
    assert re.fullmatch(r"wgangp-photons-lr=3e-4,lr=1e-4,max_steps=200,\.\.\.-\d{4}-\d{6}", cfg.logger.run_name), \
        cfg.logger.run_name
    first = cfg.logger.run_name
    time.sleep(1.1)
    assert cfg.logger.run_name == first  # one name per composed config: the time stamp is cached


def test_gan602_experiment_has_the_seed_settings(tmp_path):
    cfg = compose_cfg(["+experiment=gan602"], tmp_path)
    assert cfg.model._target_.endswith("GAN2D") and cfg.model.latent_dim == 256
    assert cfg.data.transform.steps[-1].step == "calo_image" and "projections" in cfg.trainer.metrics
    net = instantiate(cfg.model, data_shape=(23, 19), cond_dim=1)   # the image view of the ds1 photons
    assert isinstance(net.generator.net.net, torch.nn.Module) and net.generator.net.mask.sum() == 368
    g = build_optimizer(cfg.optimizer, "generator", net.roles, net.parameters_for("generator"))
    d = build_optimizer(cfg.optimizer, "critic", net.roles, net.parameters_for("critic"))
    assert isinstance(g, torch.optim.Adam) and g.param_groups[0]["betas"] == (0.5, 0.999)
    assert g.param_groups[0]["lr"] == 1.5e-4 and d.param_groups[0]["lr"] == 1e-4
    # the total head rescales in the data's units: model.power/scale are the transform's, pixels >= 0, padding 0
    steps = {s.step: s for s in cfg.data.transform.steps}
    assert cfg.model.total_head > 0 and net.generator.net.total is not None and net.output_range is None
    assert net.total_weight == cfg.model.total_weight > 0 and net.threshold == 1.0 and "energy_fraction" in steps
    assert "normalise" not in steps and "log" not in steps and steps["calo_image"].fill == cfg.model.fill == 0
    assert cfg.model.power == steps["power"].p and cfg.model.scale == steps.get("scale", {"factor": 1.0})["factor"]


def test_cfm_30min_experiment_trains_the_default_cfm_on_more_showers_within_30_minutes(tmp_path):
    default = compose_cfg([], tmp_path)
    cfg = compose_cfg(["+experiment=cfm_30min"], tmp_path)
    # the default model, unchanged but for its sampler (more steps, finer towards the data)
    sampler = ("steps", "rho")
    assert {k: v for k, v in cfg.model.items() if k not in sampler} == \
        {k: v for k, v in default.model.items() if k not in sampler} and cfg.model.net.cell_head > 0
    assert cfg.model.steps > default.model.steps and cfg.model.rho > 1
    assert cfg.trainer.max_time == 30 and cfg.trainer.precision == "bf16"
    # the cosine schedule decays over exactly the run's steps
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR") and cfg.scheduler.T_max == cfg.trainer.max_steps > 0
    assert cfg.data.n_showers > default.data.n_showers
    caloexp.config.validate_trainer(cfg.trainer)


def test_the_flow_matching_models_share_one_data_transform(tmp_path):
    """A reflow student must see its teacher's features, and cfm_vit is cfm with another shape net."""
    cfms = [compose_cfg([f"model={m}", "model.teacher=x"] if m == "reflow" else [f"model={m}"], tmp_path)
            for m in ("cfm", "cfm_vit", "reflow")]
    assert cfms[0].data.transform == cfms[1].data.transform == cfms[2].data.transform
    step = cfms[0].data.transform.steps[0]
    assert step.step == "layer_energies" and 0 < step.dequantise < 1 and step.delta > 0


def test_tracking_uri_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert compose_cfg([], tmp_path).logger.tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose_cfg([], tmp_path).logger.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
