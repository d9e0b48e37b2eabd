"""ZDC responses: properties and channel sums on hand-made images, the readers and their one-line errors,
the toy simulator, the CorrVAE's KL/TC and mask terms on toy inputs, and a few-step train -> resume
(bit-exact) -> generate-with-targets run."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from caloexp.data import zdc, zdc_sim
from caloexp.errors import ConfigError, InputError
from caloexp.metrics import zdc as zm
from caloexp.models import corrvae as cv

from conftest import run_cli, train_twice_and_resume


# ------------------------------------------------------------------ properties
def test_properties_of_hand_made_images():
    x = np.zeros((3, 1, 44, 44))
    x[1, 0, 5, 30] = 100.0                       # one bright pixel at row 5, column 30
    x[2, 0, 10, 10] = np.e - 1                   # log(1 + x) = 1 there ...
    x[2, 0, 10, 20] = np.e ** 2 - 1              # ... and 2 here (the maximum)
    x[2, 0, 40, 0] = 0.4                         # less than half a photon: not "non-zero"
    p = dict(zip(zdc.PROPERTIES, zdc.properties_of_counts(x).T))
    np.testing.assert_array_equal(p["max_x"], [0, 30, 20])
    np.testing.assert_array_equal(p["max_y"], [0, 5, 10])
    v04 = np.log1p(0.4)
    np.testing.assert_allclose(p["com_x"], [21.5, 30, (10 * 1 + 20 * 2 + 0 * v04) / (3 + v04)])
    np.testing.assert_allclose(p["com_y"], [21.5, 5, (10 * 3 + 40 * v04) / (3 + v04)])
    np.testing.assert_array_equal(p["nonzero"], [0, 1, 2])
    np.testing.assert_array_equal(p["nonzero_class"], [0, 1, 1])
    np.testing.assert_array_equal(p["above_1"], [0, 1, 1])   # log(1 + e - 1) = 1 is not above 1
    np.testing.assert_allclose(p["sum"], [0, np.log(101), 3 + v04])
    np.testing.assert_allclose(p["max"], [0, np.log(101), 2])
    big = np.zeros((1, 44, 44))
    big[0].flat[:150] = 1.0
    assert zdc.properties_of_counts(big)[0, zdc.PROPERTIES.index("nonzero_class")] == 4


def test_property_scaling_round_trip():
    p = torch.tensor([[0.0, 10.0], [4.0, 30.0], [2.0, 10.0]], dtype=torch.float64)
    s = zdc.PropertyScaling.fit(p)
    np.testing.assert_allclose(s.forward(p).numpy(), [[0, 0], [1, 1], [0.5, 0]])
    torch.testing.assert_close(s.inverse(s.forward(p)), p)


def test_channel_sums_follow_the_fibre_checkerboard():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0] = np.arange(16).reshape(4, 4)
    # (row + col) even -> the tower of its quadrant, odd -> the common channel 5
    np.testing.assert_array_equal(zm.channel_sums(x)[0], [0 + 5, 2 + 7, 8 + 13, 10 + 15, 120 - 60])


# ------------------------------------------------------------------ readers
def _write_h5(path, x, p):
    with h5py.File(path, "w") as f:
        f["responses"], f["particles"] = x, p


def test_readers_accept_hdf5_npz_and_npz_pairs(tmp_path):
    s = zdc_sim.simulate(30, 3)
    x3, p = s.x[:, 0], s.cond["particle"]
    _write_h5(tmp_path / "a.h5", x3, p)
    np.savez(tmp_path / "b.npz", responses=s.x, particles=p)
    np.savez(tmp_path / "resp.npz", x3)
    np.savez(tmp_path / "part.npz", p)
    files = zdc.ZDCFiles([tmp_path / "a.h5", tmp_path / "b.npz", [tmp_path / "resp.npz", tmp_path / "part.npz"]])
    assert len(files) == 90 and files.event_shape == (1, 44, 44)
    got = files.read(20, 70)
    np.testing.assert_array_equal(got.x, np.concatenate([s.x[20:], s.x, s.x[:10]]))
    np.testing.assert_array_equal(got.cond["particle"], np.concatenate([p[20:], p, p[:10]]))
    out = zdc.write(tmp_path / "w.h5", got)
    np.testing.assert_array_equal(zdc.ZDCFiles([out]).read(0, 50).x, got.x)


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("no_key", "missing dataset 'particles'"),
    ("bad_particles", "particles have shape (5, 8); expected (N, 9)"),
    ("rows", "4 particles for 5 responses"),
    ("channels", "responses have shape (5, 2, 44, 44)"),
    ("negative", "'responses' has negative photon counts (first at row 3)"),
    ("nan", "'particles' contains NaN/inf (first at row 2)"),
    ("pair", "expected one array of particles"),
])
def test_reader_errors_are_one_line_naming_the_file(tmp_path, case, message):
    x, p = np.ones((5, 44, 44), np.float32), np.ones((5, 9), np.float32)
    path = tmp_path / "f.h5"
    entry = path
    if case == "no_key":
        with h5py.File(path, "w") as f:
            f["responses"] = x
    elif case == "bad_particles":
        _write_h5(path, x, p[:, :8])
    elif case == "rows":
        _write_h5(path, x, p[:4])
    elif case == "channels":
        _write_h5(path, np.ones((5, 2, 44, 44)), p)
    elif case == "negative":
        x[3, 2, 2] = -1
        _write_h5(path, x, p)
    elif case == "nan":
        p[2, 4] = np.nan
        _write_h5(path, x, p)
    elif case == "pair":
        np.savez(tmp_path / "r.npz", x)
        np.savez(tmp_path / "p.npz", a=p, b=p)
        entry, path = [tmp_path / "r.npz", tmp_path / "p.npz"], tmp_path / "p.npz"
    with pytest.raises(InputError) as e:
        zdc.ZDCFiles([entry]).read(0, 5)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and message in msg


def test_simulator_is_deterministic_sparse_and_follows_the_particle():
    a, b = zdc_sim.simulate(2500, 11), zdc_sim.simulate(2500, 11)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, zdc_sim.simulate(2500, 12).x)
    assert (a.x >= 0).all() and (a.x == np.round(a.x)).all()
    empty = (a.x.reshape(len(a.x), -1).sum(1) == 0)
    assert 0.2 < empty.mean() < 0.8                      # many empty responses, many hits
    p = a.cond["particle"]
    depth = zdc_sim.FACE_Z_CM - p[:, 3]
    hit_y = (p[:, 2] + p[:, 5] / p[:, 6] * depth) / zdc_sim.PIXEL_CM + 21.5
    com_y = zdc.properties_of_counts(a.x)[:, zdc.PROPERTIES.index("com_y")]
    inside = ~empty & (np.abs(hit_y - 21.5) < 15) & (p[:, 0] > 500)
    assert np.abs(com_y[inside] - hit_y[inside]).mean() < 1.0   # the spot sits where the particle hits
    ntot = a.x.reshape(len(a.x), -1).sum(1)
    assert np.corrcoef(p[inside, 0], ntot[inside])[0, 1] > 0.5  # the energy sets the light


# ------------------------------------------------------------------ losses
def test_kl_of_known_gaussians():
    mu, logvar = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])
    expect = [0.0, 0.5 * 1 + 0.5 * (4 - 1 - math.log(4))]
    torch.testing.assert_close(cv.kl_normal(mu, logvar), torch.tensor(expect))


def test_total_correlation_zero_for_factorised_and_large_for_coupled_latents():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, generator=g, dtype=torch.float64)
    same = cv.total_correlation(w, torch.zeros_like(w), torch.zeros_like(w), 10_000)
    assert abs(float(same)) < 1e-9   # one posterior for every event: q(w) factorises exactly
    lv = math.log(0.1 ** 2)   # posteriors of width 0.1 around each event's sample
    t = torch.randn(64, 1, generator=g, dtype=torch.float64)
    coupled = torch.cat([t, t, t], 1)   # three copies of one variable: strongly dependent dims
    indep = torch.randn(64, 3, generator=g, dtype=torch.float64)
    tc = cv.total_correlation(coupled, coupled, torch.full_like(coupled, lv), 10_000)
    tc_indep = cv.total_correlation(indep, indep, torch.full_like(indep, lv), 10_000)
    assert tc > 3.0 and abs(float(tc_indep)) < 0.5
    gc = cv.group_correlation((t, t, torch.full_like(t, lv)), (t, t, torch.full_like(t, lv)), 10_000)
    gc_indep = cv.group_correlation((t, t, torch.full_like(t, lv)), (indep[:, :1],) * 2 + (torch.full_like(t, lv),),
                                    10_000)
    assert gc > 1.5 and abs(float(gc_indep)) < 0.5


def test_gumbel_mask_is_binary_follows_its_probabilities_and_passes_gradients():
    logits = torch.zeros(2, 3, 2)
    logits[0, :, 1], logits[1, :, 0] = 3.0, 3.0     # property 0 likely uses w, property 1 likely not
    logits.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    masks = cv.gumbel_mask(logits.expand(4000, 2, 3, 2), 0.5, g)   # 4000 draws at once
    assert set(masks.detach().unique().tolist()) <= {0.0, 1.0}
    p = cv.mask_probabilities(logits).detach()
    torch.testing.assert_close(masks.detach().mean(0), p, atol=0.03, rtol=0)
    masks.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_mask_terms_on_toy_inputs():
    y = torch.rand(100, 1, generator=torch.Generator().manual_seed(2))
    same = torch.cat([y, 2 * y], 1)          # |rho| = 1: the properties should share their w dims
    shared = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(cv.mask_correlation(shared, same)) == pytest.approx(0.0, abs=1e-6)
    assert float(cv.mask_correlation(apart, same)) == pytest.approx(1.0, abs=1e-6)
    assert float(cv.mask_sparsity(apart)) == pytest.approx(0.5)


def test_corrvae_refuses_bad_settings():
    sampler = cv.CorrVAE((1, 44, 44), 9, channels=4, hidden=8).sampler()
    with pytest.raises(ConfigError, match=r"unknown propert.*\['size'\]; this model controls \['max_x'"):
        sampler.sample(torch.zeros(2, 9), targets={"size": 0.3})
    with pytest.raises(ConfigError, match="must be a number"):
        sampler.sample(torch.zeros(2, 9), targets={"com_x": "left"})
    with pytest.raises(ConfigError, match="unknown term"):
        cv.CorrVAE((1, 44, 44), 9, weights={"recon": 1.0})
    with pytest.raises(ConfigError, match="unknown"):
        cv.CorrVAE((1, 44, 44), 9, properties=["size"])
    with pytest.raises(ConfigError, match="single-channel"):
        cv.CorrVAE((44, 44), 9)


# ------------------------------------------------------------------ end to end
SMALL = ["model=corrvae", "data=zdc_embedded", "data.n_events=500", "data.batch_size=32", "data.eval_events=64",
         "model.channels=8", "model.hidden=32", "model.cond_hidden=16", "model.latent_dim=4",
         "trainer.log_every=2", "trainer.eval_every=6", "trainer.checkpoint_every=3", "trainer.num_threads=1",
         "trainer.plot_every=0"]


@pytest.mark.slow
def test_corrvae_trains_resumes_bit_exactly_and_generates_with_targets(tmp_path):
    sa, _ = train_twice_and_resume(["caloexp.train", *SMALL, f"paths.data_dir={tmp_path}/data"], tmp_path, 6)
    assert sa["spec"]["kind"] == "image" and sa["spec"]["writer"]["format"] == "zdc"
    lo, hi = sa["model"]["prop_lo"], sa["model"]["prop_hi"]
    assert (hi > lo).all() and float(hi[zdc.PROPERTIES.index("max_x")]) <= 43

    conds = tmp_path / "particles.h5"
    _write_h5(conds, np.zeros((20, 44, 44), np.float32), zdc_sim.simulate(20, 5).cond["particle"])
    out = tmp_path / "gen.h5"
    g = run_cli(["caloexp.generate", f"source={tmp_path}/A", f"conditions={conds}", "n_showers=null",
                 f"output={out}", "sampler={targets: {com_x: 10, com_y: 30}, steps: 20}"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    with h5py.File(out) as f:
        x = f["responses"][:]
        assert x.shape == (20, 1, 44, 44) and (x >= 0).all()
        np.testing.assert_array_equal(f["particles"][:], zdc_sim.simulate(20, 5).cond["particle"])
    report = json.loads((tmp_path / "gen.h5.report.json").read_text())
    assert report["control/com_x/requested"] == 10 and report["control/com_y/requested"] == 30
    achieved = zdc.properties_of_counts(x)[:, zdc.PROPERTIES.index("com_x")]
    assert report["control/com_x/achieved_mean"] == pytest.approx(achieved.mean())
    assert "control/com_x/achieved_mean" in g.stdout + g.stderr


def test_zdc_configs_compose(tmp_path):
    from test_configs import compose_cfg

    from caloexp.build import instantiate
    from caloexp.data.base import DataModule

    emb = instantiate(compose_cfg(["model=corrvae", "data=zdc_embedded"], tmp_path).data, "data", DataModule)
    assert emb.source_kind == "embedded" and emb.kind == "image"
    files = compose_cfg(["data=zdc", "data.files=[[r.npz, p.npz], z.h5]"], tmp_path)
    dm = instantiate(files.data, "data", DataModule)
    assert dm.entries == [[tmp_path / "data" / "r.npz", tmp_path / "data" / "p.npz"], tmp_path / "data" / "z.h5"]
    base = compose_cfg(["+experiment=zdc_wgangp"], tmp_path)
    assert base.data.name == "zdc_embedded" and list(base.trainer.metrics) == ["cells", "zdc"]
    assert base.model.generator.dims == 2


def test_corrvae_sweep_parses_and_its_keys_exist(tmp_path):
    from hydra_plugins.caloexp_optuna_sweeper._search_space import parse_search_space
    from omegaconf import OmegaConf
    from test_configs import compose_cfg

    cfg = compose_cfg(["sweeps=corrvae"], tmp_path)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    specs, _ = parse_search_space(params, [], "sweeps/corrvae.yaml")
    assert len(specs) == len(params) == 9 and cfg.optimized_metric == "zdc/ws_channels"
    for key in params:   # every searched key is a setting of the composed run
        assert OmegaConf.select(cfg, key) is not None, key


def test_corrvae_fits_property_scaling_and_refuses_other_network_spaces(tmp_path):
    def data(steps):
        dm = zdc.ZDCDataModule("zdc_embedded", data_dir=str(tmp_path), source="embedded", n_events=300,
                               batch_size=32, eval_events=20, transform={"steps": steps,
                                                                         "conditions": {"particle": "standardise"}})
        dm.prepare_data()
        dm.setup()
        dm.fit_transform()
        return dm

    dm = data([{"step": "log", "eps": 1.0}])
    m = cv.CorrVAE(dm.data_shape, dm.cond_dim, channels=4, hidden=8, cond_hidden=8)
    m.prepare(dm)
    seen = dm.train_rows[np.sort(dm.epoch_order(0, 0)[: dm.steps_per_epoch * 32])]   # the rows of epoch 0
    props = zdc.properties_of_counts(dm.source.take(seen).x)
    assert float(m.n_train) == len(dm.train_rows)
    np.testing.assert_allclose(m.prop_lo.numpy(), props.min(0), atol=1e-4)
    hi = np.where(props.max(0) > props.min(0), props.max(0), props.min(0) + 1)   # a constant property: width 1
    np.testing.assert_allclose(m.prop_hi.numpy(), hi, atol=1e-4)
    np.testing.assert_allclose(m.scale(torch.as_tensor(props, dtype=torch.float32)).numpy().min(0), 0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"log\(1 \+ counts\)"):
        cv.CorrVAE(dm.data_shape, dm.cond_dim, channels=4, hidden=8).prepare(data([{"step": "normalise"}]))


def test_zdc_metric_group_zero_for_identical_samples_and_grows_with_a_change():
    from caloexp import metrics
    from caloexp.data.sample import Sample

    s = zdc_sim.simulate(400, 21)
    ref = Sample(s.x, s.cond, "image")
    same = metrics.evaluate(ref, ref, groups=["zdc"])
    assert same["zdc/ws_channels"] == 0 and same["zdc/ws_props_mean"] == 0 and same["zdc/ssim_avg"] == 1
    brighter = metrics.evaluate(ref, Sample(s.x * 2, s.cond, "image"), groups=["zdc"])
    tot = zm.channel_sums(s.x)
    np.testing.assert_allclose(brighter["zdc/ws_channels"], tot.mean(), rtol=1e-6)   # every sum doubles
    assert brighter["zdc/ws_sum"] > 0 and brighter["zdc/ws_max_x"] == brighter["zdc/ws_max_y"] == 0   # same argmax


def test_traversal_gif_shows_each_value_back_and_forth(tmp_path):
    from PIL import Image

    strips = np.random.default_rng(0).poisson(2.0, (3, 5, 44, 44)).astype(float)
    with Image.open(zm.traversal_gif(strips, tmp_path / "t.gif", scale=1)) as im:
        assert im.n_frames == 5 + 3 and im.size == (3 * 44, 44)
