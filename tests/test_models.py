"""Model maths: the adversarial template, WGAN-GP and BCE GAN hooks, nets of every shape, the generator."""
import functools

import pytest
import torch
from torch import nn

from caloexp.data.sample import Batch
from caloexp.data.transforms import CALO_CONDITIONS, CALO_STEPS, Transform
from caloexp.errors import ConfigError
from caloexp.models.gan import GAN
from caloexp.models.nets import MLP, ConvCritic, ConvGenerator
from caloexp.models.wgangp import WGANGP
from caloexp.optim import EMA, Optim
from caloexp.runtime import Runtime
from caloexp.sampling import EventGenerator

from conftest import random_showers


def mlp(**kw):
    return functools.partial(MLP, **{"depth": 2, "width": 32, **kw})


def make(cls, data_dim=4, cond_dim=1, **kw):
    model = cls((data_dim,), cond_dim, generator=mlp(out_activation=kw.pop("out", "none")), critic=mlp(),
                latent_dim=8, **kw)
    model.rng = torch.Generator().manual_seed(0)
    return model


def optim(model, lr=1e-3, **kw):
    cfg = {"_target_": "torch.optim.Adam", "lr": lr, "betas": [0.5, 0.9]}
    return Optim(model, cfg, None, Runtime(torch.device("cpu")), **kw)


def test_generator_updates_every_critic_steps():
    model = make(WGANGP, critic_steps=3)
    opt = optim(model)
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
    model.critic = MLP(4, 1, cond_dim=1, depth=1, width=1, activation="none")
    with torch.no_grad():  # C(x, c) = 1 * (w.x + 7c + b) + 0 with |w| = 5 (cond weight excluded)
        model.critic.net[0].weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0, 7.0]]))
        model.critic.net[-2].weight.fill_(1.0)
    gp = model.gradient_penalty(torch.randn(8, 4), torch.randn(8, 4), torch.rand(8, 1))
    assert gp.item() == pytest.approx(16.0, rel=1e-5)


@pytest.mark.parametrize("cls, steps, lr, kw", [(WGANGP, 2000, 5e-4, {"critic_steps": 5}), (GAN, 600, 1e-3, {})])
def test_models_learn_a_simple_distribution(cls, steps, lr, kw):
    """Training moves the generated mean from the prior's onto a shifted Gaussian target."""
    torch.manual_seed(0)
    model = make(cls, data_dim=2, **kw)
    opt = optim(model, lr=lr)
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


def test_trainer_step_clips_gradients_and_keeps_ema():
    model = make(GAN, ema={"generator": 0.9})
    opt = optim(model, lr=1e-2, clip_grad_norm=1e-3)
    before = [p.clone() for p in model.generator.parameters()]
    loss = sum((p ** 2).sum() * 1e6 for p in model.generator.parameters())
    opt.step("generator", loss)
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.generator.parameters()))
    assert grad_norm.item() == pytest.approx(1e-3, rel=1e-3)
    shadow = opt.ema["generator"].shadow
    for s, b, p in zip(shadow, before, model.generator.parameters()):   # first update: warm-up decay 1/10
        torch.testing.assert_close(s, 0.1 * b + 0.9 * p.detach())
    with opt.ema_weights():
        assert all(torch.equal(s, p) for s, p in zip(shadow, model.generator.parameters()))
    assert not all(torch.equal(s, p) for s, p in zip(shadow, model.generator.parameters()))


def test_ema_of_a_constant_sequence():
    """Decays min(0.5, (1+n)/(10+n)) = 0.1, 0.18, 0.25, 0.31, 0.36, 0.4, 0.44, 0.47, 0.5, 0.5, ..."""
    lin = nn.Linear(1, 1, bias=False)
    ema = EMA(lin, 0.5)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    w0 = ema.shadow[0].item()
    for _ in range(12):
        ema.update(lin)
    factor = 1.0
    for n in range(12):
        factor *= min(0.5, (1 + n) / (10 + n))
    assert ema.shadow[0].item() == pytest.approx(2.0 + (w0 - 2.0) * factor)


def test_optimizer_sections_must_name_roles():
    model = make(GAN)
    cfg = {"_target_": "torch.optim.Adam", "lr": 1e-3, "flow": {"lr": 1e-2}}
    with pytest.raises(ConfigError, match="no role 'flow'"):
        Optim(model, cfg, None, Runtime(torch.device("cpu")))
    with pytest.raises(ConfigError, match="torch.optim"):
        Optim(model, {"_target_": "os.system", "lr": 1e-3}, None, Runtime(torch.device("cpu")))


def test_unconditional_generator_ignores_condition():
    model = make(GAN, conditional=False)
    assert model.generator.net.net[0].in_features == 8   # latent only
    assert model.critic.net[0].in_features == 4
    rng = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = model.generator.sample(torch.zeros(5, 1), rng())
    b = model.generator.sample(torch.ones(5, 1), rng())
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape, dims", [((25, 11, 13), None), ((12, 10), None), ((1, 12, 10), 2)])
def test_conv_nets_fit_grids_and_images(shape, dims):
    g = ConvGenerator((16,), shape, cond_dim=2, channels=(8, 4), dims=dims)
    c = ConvCritic(shape, (3,), cond_dim=2, channels=(4, 8), dims=dims)
    z, cond = torch.randn(5, 16), torch.rand(5, 2)
    x = g(z, cond)
    assert x.shape == (5, *shape)
    assert c(x, cond).shape == (5, 3)
    model = WGANGP(shape, 2, generator=functools.partial(ConvGenerator, channels=(8, 4), dims=dims),
                   critic=functools.partial(ConvCritic, channels=(4, 8), dims=dims), latent_dim=16, n_aux=2)
    model.rng = torch.Generator().manual_seed(0)
    out = model.training_step(Batch(torch.randn(6, *shape), torch.rand(6, 2)), 0, optim(model))
    assert torch.isfinite(out["loss/critic"])


def test_gan_output_range_follows_tanh():
    assert make(GAN, out="tanh").output_range == (-1.0, 1.0)
    assert make(WGANGP).output_range is None


def test_event_generator_gives_physical_showers():
    e, s = random_showers(300)
    t = Transform((368,), CALO_STEPS, CALO_CONDITIONS).fit_conditions({"energy": e}).fit(s, {"energy": e})
    model = WGANGP((368,), 1, generator=mlp(), critic=mlp(), latent_dim=8)
    gen = EventGenerator(model.sampler(), t)
    out = gen(torch.tensor([1024.0, 65536.0, 2.0**22]), torch.Generator().manual_seed(0))
    assert out.shape == (3, 368) and out.dtype == torch.float32
    assert (out >= 0).all() and torch.isfinite(out).all()
    same = gen({"energy": torch.tensor([1024.0, 65536.0, 2.0**22])}, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_bad_architecture_settings():
    with pytest.raises(ConfigError, match="activation"):
        MLP(3, 3, activation="relu6")
    with pytest.raises(ConfigError, match="depth"):
        MLP(3, 3, depth=0)
    with pytest.raises(ConfigError, match="latent_dim"):
        WGANGP((4,), 1, generator=mlp(), critic=mlp(), latent_dim=0)
    with pytest.raises(ConfigError, match="critic_steps"):
        WGANGP((4,), 1, generator=mlp(), critic=mlp(), critic_steps=0)
    with pytest.raises(ConfigError, match="conv"):
        ConvCritic((7,), (1,))
