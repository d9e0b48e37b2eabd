import functools

import pytest
import torch
from torch import nn

from caloexp.data.transforms import ShowerTransform
from caloexp.errors import ConfigError
from caloexp.models.base import Batch, ShowerGenerator
from caloexp.models.gan import GAN
from caloexp.models.nets import MLP
from caloexp.models.wgangp import WGANGP

from conftest import random_showers


def mlp(**kw):
    return functools.partial(MLP, **{"depth": 2, "width": 32, **kw})


def make(cls, data_dim=4, cond_dim=1, **kw):
    model = cls((data_dim,), cond_dim, generator=mlp(out_activation=kw.pop("out", "none")), critic=mlp(), latent_dim=8, **kw)
    model.rng = torch.Generator().manual_seed(0)
    return model


def optimizers(model, lr=1e-3):
    return {r: torch.optim.Adam(model.parameters_for(r), lr=lr, betas=(0.5, 0.9)) for r in model.roles}


def test_generator_updates_every_n_critic_steps():
    model = make(WGANGP, n_critic=3)
    opt = optimizers(model)
    batch = Batch(torch.randn(16, 4), torch.rand(16, 1))
    g0 = [p.clone() for p in model.generator.parameters()]
    for step in range(2):
        out = model.training_step(batch, step, opt)
        assert "loss/generator" not in out and set(out) >= {"loss/critic", "gradient_penalty", "wasserstein"}
    assert all(torch.equal(a, b) for a, b in zip(g0, model.generator.parameters()))
    out = model.training_step(batch, 2, opt)
    assert "loss/generator" in out
    assert not all(torch.equal(a, b) for a, b in zip(g0, model.generator.parameters()))
    assert all(p.requires_grad for p in model.critic.parameters())  # unfrozen again


def test_gradient_penalty_of_a_linear_critic():
    """For C(x) = w.x the gradient is w everywhere: GP = (|w| - 1)^2."""
    model = make(WGANGP)
    lin = nn.Linear(5, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0, 7.0]]))  # |w_x| = 5 (cond weight excluded)
    model.critic = lin
    gp = model.gradient_penalty(torch.randn(8, 4), torch.randn(8, 4), torch.rand(8, 1))
    assert gp.item() == pytest.approx(16.0, rel=1e-5)


@pytest.mark.parametrize("cls, steps, lr, kw", [(WGANGP, 2000, 5e-4, {"n_critic": 5}), (GAN, 600, 1e-3, {})])
def test_models_learn_a_simple_distribution(cls, steps, lr, kw):
    """Training moves the generated mean from the prior's onto a shifted Gaussian target."""
    torch.manual_seed(0)
    model = make(cls, data_dim=2, **kw)
    opt = optimizers(model, lr=lr)
    target = torch.tensor([2.0, -1.0])

    def distance():
        with torch.no_grad():
            fake = model.generator.sample(torch.zeros(2000, 1), torch.Generator().manual_seed(1))
        return (fake.mean(0) - target).norm().item()

    before = distance()
    for step in range(steps):
        x = target + 0.3 * torch.randn(64, 2)
        model.training_step(Batch(x, torch.zeros(64, 1)), step, opt)
    assert distance() < 0.3 * before


def test_unconditional_generator_ignores_condition():
    model = make(GAN, conditional=False)
    assert model.generator.net.net[0].in_features == 8   # latent only
    assert model.critic.net[0].in_features == 4
    rng = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = model.generator.sample(torch.zeros(5, 1), rng())
    b = model.generator.sample(torch.ones(5, 1), rng())
    assert torch.equal(a, b)


def test_gan_output_range_follows_tanh():
    assert make(GAN, out="tanh").output_range == (-1.0, 1.0)
    assert make(WGANGP).output_range is None


def test_shower_generator_gives_physical_showers():
    e, s = random_showers(300)
    t = ShowerTransform(368).fit(s, e)
    model = WGANGP((368,), 1, generator=mlp(), critic=mlp(), latent_dim=8)
    gen = ShowerGenerator(model.sampler(), t)
    out = gen(torch.tensor([1024.0, 65536.0, 2.0**22]), torch.Generator().manual_seed(0))
    assert out.shape == (3, 368) and out.dtype == torch.float32
    assert (out >= 0).all() and torch.isfinite(out).all()


def test_bad_architecture_settings():
    with pytest.raises(ConfigError, match="activation"):
        MLP(3, 3, activation="relu6")
    with pytest.raises(ConfigError, match="depth"):
        MLP(3, 3, depth=0)
    with pytest.raises(ConfigError, match="latent_dim"):
        WGANGP((4,), 1, generator=mlp(), critic=mlp(), latent_dim=0)
