"""GAN_602 on the 2D view: the image view of the voxels is an exact inverse, generated padding matches real
padding, the seed's (layer, r) projections are what they say, and `+experiment=gan602` on CSVs the embedded
simulator wrote trains, resumes bit-exactly, generates CaloChallenge files and is evaluated."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from caloexp import geometry as geo
from caloexp.data.transforms import CaloImage, Transform, calo_image_layout
from caloexp.errors import ConfigError
from caloexp.metrics.projections import projections

from conftest import random_showers, run_cli, train_twice_and_resume

PHOTONS = geo.builtin("dataset_1_photons")


def layers(g: geo.Geometry) -> list[list[int]]:
    return [[layer.n_alpha, layer.n_r] for layer in g.layers]


@pytest.mark.parametrize("name, shape", [("dataset_1_photons", (23, 19)), ("dataset_1_pions", (43, 16)),
                                         ("dataset_2", (720, 9))])
def test_image_view_is_an_exact_inverse(name, shape):
    g = geo.builtin(name)
    _, x = random_showers(20, g.n_voxels, seed=1)
    step = CaloImage((g.n_voxels,), layers(g), fill=-0.5)
    img = step(torch.as_tensor(x), {})
    assert tuple(img.shape) == (20, *shape) and step.out_shape == shape
    assert torch.equal(step.inverse(img, {}), torch.as_tensor(x))           # bit for bit
    assert int(step.mask.sum()) == g.n_voxels and torch.all(img[:, step.mask == 0] == -0.5)
    # a voxel lands where the layout says: layer l, alpha a, radial bin j -> row (rows before l) + a, column j
    layer = 1 if name != "dataset_2" else 3
    a, j = 4, 2
    k = int(g.layer_offsets[layer]) + a * g.layers[layer].n_r + j
    row = sum(g.layers[i].n_alpha for i in range(layer)) + a
    assert img[:, row, j].tolist() == x[:, k].tolist()


def test_view_in_a_transform_chain_round_trips_and_rebuilds_from_its_spec():
    e, x = random_showers(40, 368, seed=3)
    steps = [{"step": "energy_fraction"}, {"step": "log", "eps": 1e-7}, {"step": "normalise", "mode": "minmax"},
             {"step": "calo_image", "layers": layers(PHOTONS)}]
    t = Transform((368,), steps, {"energy": {"step": "log_scale"}}).use_output_range((-1.0, 1.0))
    t.fit(x, {"energy": e})
    assert t.net_shape == (23, 19)
    net = t.to_network(x, {"energy": e})
    assert net.shape == (40, 23, 19) and net.min() >= -1 - 1e-6 and net.max() <= 1 + 1e-6
    np.testing.assert_allclose(t.to_physical(net, {"energy": e}), x, rtol=1e-4, atol=1e-4)
    again = Transform.from_spec(t.spec())
    again.load_state_dict(t.state_dict())
    np.testing.assert_array_equal(again.to_network(x, {"energy": e}), net)


def test_view_settings_are_checked():
    with pytest.raises(ConfigError, match="must hold exactly the event's \\(368,\\) voxels"):
        CaloImage((368,), [[10, 16], [10, 19]])
    with pytest.raises(ConfigError, match="layers='geometry' is filled in only for CaloChallenge data"):
        CaloImage((368,), "geometry")
    with pytest.raises(ConfigError, match="must be \\[n_alpha, n_r\\] pairs"):
        CaloImage((368,), [[1, 2, 3]])


def test_generated_padding_is_the_fill_and_shapes_are_checked():
    from functools import partial

    from caloexp.models.gan2d import GAN2D
    from caloexp.models.nets import ConvCritic, ConvGenerator

    nets = dict(generator=partial(ConvGenerator, channels=[8, 4], out_activation="tanh"),
                critic=partial(ConvCritic, channels=[4, 8], head_width=8))
    model = GAN2D((23, 19), 1, geometry="dataset_1_photons", fill=0.0, latent_dim=8, **nets)
    out = model.generator.sample(torch.rand(5, 1), torch.Generator().manual_seed(0))
    _, pixel = calo_image_layout(layers(PHOTONS))
    pad = np.setdiff1d(np.arange(23 * 19), pixel)
    assert torch.all(out.reshape(5, -1)[:, pad] == 0) and torch.all(out.reshape(5, -1)[:, pixel] != 0)
    assert model.output_range == (-1.0, 1.0)
    with pytest.raises(ConfigError, match="model=gan2d needs 2D events, got event shape \\(368,\\)"):
        GAN2D((368,), 1, **nets)
    with pytest.raises(ConfigError, match="model.geometry=dataset_1_pions: its image view is \\(43, 16\\)"):
        GAN2D((23, 19), 1, geometry="dataset_1_pions", **nets)


def test_total_head_sets_each_showers_total_in_data_units_exactly_and_trains():
    from functools import partial
    from types import SimpleNamespace

    from caloexp.models.gan2d import GAN2D
    from caloexp.models.nets import ConvCritic, ConvGenerator

    nets = dict(generator=partial(ConvGenerator, channels=[8, 4], out_activation="relu"),
                critic=partial(ConvCritic, channels=[4, 8], head_width=8))
    torch.manual_seed(0)
    model = GAN2D((23, 19), 1, geometry="dataset_1_photons", latent_dim=8, total_head=16, power=0.5, scale=2.0,
                  total_weight=1.0, **nets)
    # prepare: the head starts at the mean of sum((x / scale)^(1 / power)) over the training batches
    x = torch.rand(6, 23, 19) * model.generator.net.mask
    data = SimpleNamespace(train_batches=lambda epoch, start, seed: iter([SimpleNamespace(x=x[:4]),
                                                                           SimpleNamespace(x=x[4:])]))
    model.prepare(data)
    net = model.generator.net
    assert float(net.total0) == pytest.approx(float(((x / 2.0) ** 2).sum(dim=(1, 2)).mean()), rel=1e-6)
    with torch.no_grad():
        net.total[-1].bias.fill_(0.3)      # log(total / total0) = 0.3 for every shower
    cond = torch.rand(5, 1)
    out = model.generator.sample(cond, torch.Generator().manual_seed(0))
    total = ((out / 2.0) ** 2).sum(dim=(1, 2))
    torch.testing.assert_close(total, net.total0 * torch.exp(torch.tensor(0.3)).expand(5), rtol=1e-5, atol=0)
    _, pixel = calo_image_layout(layers(PHOTONS))
    assert torch.all(out.reshape(5, -1)[:, np.setdiff1d(np.arange(23 * 19), pixel)] == 0) and out.min() >= 0
    # differentiable: the shape reaches the convs, the total the head (its last layer gets a gradient)
    out.sum().backward()          # the sum of sqrt pixels is not fixed by the total: both parts get a gradient
    assert net.total[-1].weight.grad.abs().sum() > 0 and net.net.fc.weight.grad.abs().sum() > 0
    # the total term: relative squared error of generated totals; the rescale leaves it to the head alone
    model.zero_grad()
    fake = model.generator.sample(cond, torch.Generator().manual_seed(1))
    loss, logs = model.aux_loss(None, SimpleNamespace(x=x[:5]), fake, real=False)
    t_fake, t_real = ((fake / 2.0) ** 2).sum(dim=(1, 2)), ((x[:5] / 2.0) ** 2).sum(dim=(1, 2))
    want = ((t_fake - t_real) ** 2).mean() / t_real.mean() ** 2
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logs["aux/total"], want)
    loss.backward()
    head = net.total[-1].bias.grad.abs()
    assert head > 0 and net.net.fc.weight.grad.abs().max() < 1e-5 * head
    assert model.aux_loss(None, SimpleNamespace(x=x[:5]), fake, real=True)[0] == 0.0
    # threshold (MeV): a pixel counts where its voxel c x E_inc reaches it, as the evaluation cuts voxels
    model.threshold = 1.0
    e, c = torch.full((5,), 40.0), (x[:5] / 2.0) ** 2
    torch.testing.assert_close(model.total(x[:5], e), (c * (c * 40.0 >= 1.0)).sum(dim=(1, 2)))
    assert torch.all(model.total(x[:5], e) < model.total(x[:5]))
    # total_gaussian: log(total / total0) = mean + std x (first latent component), mean and log std from the energy
    g = GAN2D((23, 19), 1, geometry="dataset_1_photons", latent_dim=8, total_head=16, power=0.5, scale=2.0,
              total_gaussian=True, **nets)
    head = g.generator.net.total
    assert head[0].in_features == 1                                     # the energy only
    with torch.no_grad():
        head[-1].bias.copy_(torch.tensor([0.3, np.log(0.2)]))
    z = torch.randn(5, 8)
    total = ((g.generator(z, cond) / 2.0) ** 2).sum(dim=(1, 2))
    torch.testing.assert_close(torch.log(total), 0.3 + 0.2 * z[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="model.total_gaussian=true: needs model.total_head > 0"):
        GAN2D((23, 19), 1, total_gaussian=True, **nets)
    with pytest.raises(ConfigError, match="the total head needs padding at 0"):
        GAN2D((23, 19), 1, geometry="dataset_1_photons", fill=-1.0, total_head=4, **nets)
    with pytest.raises(ConfigError, match="model.total_weight=1.0: needs >= 0 and model.total_head > 0"):
        GAN2D((23, 19), 1, total_weight=1.0, **nets)
    with pytest.raises(ConfigError, match="model.total_head=4, model.power=0.0"):
        GAN2D((23, 19), 1, total_head=4, power=0.0, **nets)


def test_critic_features_and_grouped_total_term_are_what_they_say():
    from functools import partial
    from types import SimpleNamespace

    from caloexp.models.gan2d import FEATURE_EPS, GAN2D
    from caloexp.models.nets import ConvCritic, ConvGenerator

    nets = dict(generator=partial(ConvGenerator, channels=[8, 4], out_activation="relu"),
                critic=partial(ConvCritic, channels=[4, 8], head_width=8))
    torch.manual_seed(0)
    model = GAN2D((23, 19), 1, geometry="dataset_1_photons", latent_dim=8, total_head=4, power=0.5, scale=2.0,
                  total_weight=1.0, total_group=2, critic_features=["total", "layers", "minibatch_std"], **nets)
    # 1 total + 5 layers + the batch std of the pixels and of those 6: 13 inputs after the energy at the head
    assert model.n_features == 13 and model.critic.head[0].in_features == 8 * 6 * 5 + 1 + 13
    x = (torch.rand(3, 23, 19) * model.generator.net.mask).requires_grad_()
    f = model.shower_features(x)
    c = ((x / 2.0) ** 2).detach().numpy().astype(np.float64)          # data units: (pixel / scale)^(1 / power)
    # layers 0, 1, 2, 3, 12 of dataset-1 photons have 1, 10, 10, 1, 1 alpha bins: image rows 0, 1-10, 11-20, 21, 22
    by_layer = np.stack([c[:, 0].sum(1), c[:, 1:11].sum((1, 2)), c[:, 11:21].sum((1, 2)), c[:, 21].sum(1),
                         c[:, 22].sum(1)], axis=1)
    own = np.concatenate([np.log(c.sum((1, 2)) + FEATURE_EPS)[:, None], np.log(by_layer + FEATURE_EPS)], axis=1)
    np.testing.assert_allclose(f[:, :6].detach().numpy(), own, rtol=1e-5)
    spread = np.concatenate([[x.detach().numpy().reshape(3, -1).std(0).mean()], own.std(0)])
    np.testing.assert_allclose(f[:, 6:].detach().numpy(), np.broadcast_to(spread, (3, 7)), rtol=1e-4, atol=1e-6)
    f.sum().backward()                                                 # the generator learns through them
    assert x.grad.abs().sum() > 0
    assert model.criticise(x.detach(), torch.rand(3, 1)).shape == (3, 1)
    # total_group=2: mean totals of pairs in energy order (conditions 1, 2, 0.5, 1.5 -> pairs {2, 0}, {3, 1})
    real = torch.rand(4, 23, 19) * model.generator.net.mask
    fake = torch.rand(4, 23, 19) * model.generator.net.mask
    cond = torch.tensor([[1.0], [2.0], [0.5], [1.5]])
    loss, _ = model.aux_loss(None, SimpleNamespace(x=real, cond=cond), fake, real=False)
    t_r, t_f = ((real / 2.0) ** 2).sum(dim=(1, 2)), ((fake / 2.0) ** 2).sum(dim=(1, 2))
    pairs = [[2, 0], [3, 1]]
    want = sum((t_f[p].mean() - t_r[p].mean()) ** 2 for p in pairs) / 2 / t_r.mean() ** 2
    torch.testing.assert_close(loss, want)
    # spread_weight: + the squared difference of the pairs' std of log(total), generated vs real
    model.spread_weight = 0.5
    loss, logs = model.aux_loss(None, SimpleNamespace(x=real, cond=cond), fake, real=False)
    sd = [[torch.log(t[p]).std(unbiased=False) for t in (t_f, t_r)] for p in pairs]
    spread = sum((a - b) ** 2 for a, b in sd) / 2
    torch.testing.assert_close(logs["aux/total_spread"], spread)
    torch.testing.assert_close(loss, want + 0.5 * spread)
    model.spread_weight, model.total_group = 0.0, 1                    # each shower's total against its own
    torch.testing.assert_close(model.aux_loss(None, SimpleNamespace(x=real, cond=cond), fake, real=False)[0],
                               ((t_f - t_r) ** 2).mean() / t_r.mean() ** 2)
    with pytest.raises(ConfigError, match="model.critic_features=\\['total', 'hits'\\]: choose each at most once"):
        GAN2D((23, 19), 1, geometry="dataset_1_photons", critic_features=["total", "hits"], **nets)
    with pytest.raises(ConfigError, match="has 'layers': needs model.geometry"):
        GAN2D((23, 19), 1, critic_features=["layers"], **nets)
    with pytest.raises(ConfigError, match="model.total_group=0: must be >= 1"):
        GAN2D((23, 19), 1, total_group=0, **nets)
    with pytest.raises(ConfigError, match="model.spread_weight=1.0: needs >= 0 and model.total_group > 1"):
        GAN2D((23, 19), 1, total_group=1, spread_weight=1.0, **nets)


def test_projections_are_sums_over_alpha_and_compare_honestly():
    from caloexp import metrics

    e, x = random_showers(300, 368, seed=4)
    p = projections(x, PHOTONS)
    x64 = x.astype(np.float64)
    assert p.shape == (300, 5, 19)
    # layer 2 (10 alpha x 19 r), radial bin 3, by hand; layer 0 has 8 radial bins, the rest is padding
    by_hand = x64[:, 168:358].reshape(300, 10, 19)[:, :, 3].sum(1)
    np.testing.assert_allclose(p[:, 2, 3], by_hand, rtol=1e-12)
    np.testing.assert_allclose(p[:, 0, :8], x[:, :8], rtol=1e-12)
    assert np.all(p[:, 0, 8:] == 0) and np.allclose(p.sum((1, 2)), x64.sum(1), rtol=1e-12)
    from caloexp.data.sample import Sample

    ref = Sample(x, {"energy": e})
    same = metrics.evaluate(ref, ref, PHOTONS, groups=["projections"])
    assert same["proj/mse"] == 0 and same["proj/ssim"] == 1 and same["proj/wd"] == 0
    wider = Sample(np.roll(x, 1, axis=1), {"energy": e})                    # energy moved one voxel out
    diff = metrics.evaluate(ref, wider, PHOTONS, groups=["projections"])
    assert diff["proj/mse"] > 0 and diff["proj/ssim"] < 1 and diff["proj/wd"] > 0
    assert set(diff) >= {"proj/rel_mse", "proj/mse_per_energy", "proj/ssim_per_energy"}


@pytest.mark.slow
def test_gan602_on_simulator_csvs_trains_resumes_generates_and_evaluates(tmp_path):
    from caloexp.data import atlas_csv

    tgz = atlas_csv.write_embedded(tmp_path / "photon_samples.tgz", n_showers=450, seed=11)
    small = ["model.latent_dim=16", "model.generator.channels=[8,4]", "model.critic.channels=[4,8]",
             "model.critic.head_width=16", "data.batch_size=32", "data.eval_events=60", "trainer.log_every=2",
             "trainer.eval_every=6", "trainer.checkpoint_every=3", "trainer.num_threads=1", "trainer.plot_every=0"]
    args = ["caloexp.train", "+experiment=gan602", "data=atlas_csv", f"data.path={tgz}", *small]
    sa, _ = train_twice_and_resume(args, tmp_path, 6)
    assert sa["spec"]["kind"] == "calo" and sa["spec"]["data_shape"] == [23, 19]

    out = tmp_path / "gen.hdf5"
    g = run_cli(["caloexp.generate", f"source={tmp_path}/A", "n_showers=150", f"output={out}"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    with h5py.File(out) as f:
        assert f["showers"].shape == (150, 368) and np.isfinite(f["showers"][:]).all() and f["showers"][:].min() >= 0
    ref = atlas_csv.convert(tgz, tmp_path / "ref.hdf5")
    ev = run_cli(["caloexp.evaluate", f"generated={out}", f"reference={ref}", f"out={tmp_path}/eval", "plots=false",
                  "metrics=fast", "metrics.groups=[separation,images,projections]"], cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    m = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert all(np.isfinite(m[k]) for k in ("sep/mean", "images/ssim", "proj/ssim", "proj/wd", "monitor/score"))
