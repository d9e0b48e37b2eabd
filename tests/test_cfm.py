"""Conditional flow matching: the density it learns, its solvers' orders, two-stage chaining, the
layer-energy transform it relies on, and a train -> resume -> generate run."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from torch import nn

from caloexp.data.sample import Batch
from caloexp.errors import ConfigError
from caloexp.data.transforms import Transform
from caloexp.models.cfm import CFM, Reflow, TransformerVelocityNet, VelocityNet, integrate
from caloexp.optim import Optim
from caloexp.runtime import Runtime

from conftest import random_showers, run_cli, train_twice_and_resume


def mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two well separated 2D Gaussians, weights 0.3 / 0.7."""
    k = rng.random(n) < 0.3
    centres = np.where(k[:, None], [-2.0, 0.0], [2.0, 1.0])
    return (centres + 0.3 * rng.normal(size=(n, 2))).astype(np.float32)


def fit_mixture(net, sampler_steps: int, train_steps: int, batch: int) -> CFM:
    """A CFM with ``net`` trained on the mixture with Adam(3e-3), seeded."""
    torch.manual_seed(0)
    model = CFM((2,), 0, net=net, steps=sampler_steps)
    model.rng = torch.Generator().manual_seed(0)
    opt = Optim(model, {"_target_": "torch.optim.Adam", "lr": 3e-3}, None, Runtime(torch.device("cpu")))
    rng = np.random.default_rng(0)
    for step in range(train_steps):
        model.training_step(Batch(torch.as_tensor(mixture(batch, rng)), torch.zeros(batch, 0)), step, opt)
    return model


def test_flow_matching_recovers_a_gaussian_mixture():
    model = fit_mixture(functools.partial(VelocityNet, width=64, n_blocks=2, emb=32), 20, 1500, 256)
    with torch.no_grad():
        gen = model.sampler().sample(torch.zeros(4000, 0), torch.Generator().manual_seed(1)).numpy()
    ref = mixture(4000, np.random.default_rng(1))
    left = gen[:, 0] < 0
    assert abs(left.mean() - 0.3) < 0.05                       # component weights
    np.testing.assert_allclose(gen[left].mean(0), [-2.0, 0.0], atol=0.15)
    np.testing.assert_allclose(gen[~left].mean(0), [2.0, 1.0], atol=0.15)
    # sliced 1D Wasserstein distances against a fresh sample of the target, and of the prior for scale
    prior = np.random.default_rng(2).normal(size=ref.shape)
    dirs = np.random.default_rng(3).normal(size=(16, 2))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    w = lambda a, b: np.mean([np.abs(np.sort(a @ d) - np.sort(b @ d)).mean() for d in dirs])  # noqa: E731
    assert w(gen, ref) < 0.15 and w(gen, ref) < 0.1 * w(prior, ref)


def test_cell_head_learns_independent_bimodal_cells_a_narrow_mlp_cannot():
    """48 cells, each empty (-2) with its own probability or a narrow peak at its own value, independent of
    each other, as a calorimeter's cells are given the shower: a 32-wide MLP only contracts the noise; with
    the per-cell head the generated marginals match."""
    d = 48
    layout = np.random.default_rng(7)
    p_empty, mu = layout.uniform(0.1, 0.5, d), layout.uniform(0.0, 1.5, d)

    def cells(n: int, rng: np.random.Generator) -> np.ndarray:
        empty = rng.random((n, d)) < p_empty
        return np.where(empty, -2.0, mu) + 0.1 * rng.normal(size=(n, d)).astype(np.float32)

    def fit(cell_head: int) -> np.ndarray:
        torch.manual_seed(0)
        model = CFM((d,), 0, net=functools.partial(VelocityNet, width=32, n_blocks=2, emb=32, cell_head=cell_head),
                    steps=10)
        model.rng = torch.Generator().manual_seed(0)
        opt = Optim(model, {"_target_": "torch.optim.Adam", "lr": 3e-3}, None, Runtime(torch.device("cpu")))
        rng = np.random.default_rng(0)
        for step in range(500):
            model.training_step(Batch(torch.as_tensor(cells(128, rng), dtype=torch.float32), torch.zeros(128, 0)),
                                step, opt)
        with torch.no_grad():
            return model.sampler().sample(torch.zeros(3000, 0), torch.Generator().manual_seed(1)).numpy()

    ref = cells(3000, np.random.default_rng(1))
    w = {k: np.mean(np.abs(np.sort(fit(k), 0) - np.sort(ref, 0))) for k in (0, 16)}   # mean 1D Wasserstein
    assert w[16] < 0.15 and w[16] < 0.3 * w[0], w
    with pytest.raises(ConfigError, match="cell_head"):
        VelocityNet(8, 0, cell_head=-1)
    with pytest.raises(ConfigError, match="cell_mix"):
        VelocityNet(8, 0, cell_head=4, cell_mix=-1)
    plain = VelocityNet(8, 0, width=8, cell_head=0, cell_mix=2)   # cell_head=0 turns the head off, with its mix
    assert plain.cell_mix == 0 and not any("mix" in name for name, _ in plain.named_parameters())


@pytest.mark.parametrize("cell_mix", [0, 3])
def test_cell_head_inference_path_computes_the_training_form(cell_mix):
    """Without autograd the head runs in chunks, in place; it must be the same function as the
    differentiable form the net is trained with (batches that do and do not fill the last chunk)."""
    torch.manual_seed(0)
    net = VelocityNet(40, 3, width=32, n_blocks=2, emb=16, cell_head=8, cell_emb=4, context=6, cell_mix=cell_mix)
    with torch.no_grad():
        for p in net.parameters():          # the zero-initialised output layers would hide a wrong head
            p.add_(0.3 * torch.randn_like(p))
    for n in (1, 31, 70):
        x, t, c = torch.randn(n, 40), torch.rand(n), torch.randn(n, 3)
        trained_form = net(x, t, c)
        assert trained_form.requires_grad
        with torch.no_grad():
            fast = net(x, t, c)
        torch.testing.assert_close(fast, trained_form.detach(), rtol=1e-5, atol=1e-5)
        # under bf16 autocast (generate precision=bf16) the head runs in float32 on CPUs: the same function
        # to bf16 accuracy of the trunk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trained_bf16 = net(x, t, c).float()
            with torch.no_grad():
                fast_bf16 = net(x, t, c)
        assert fast_bf16.dtype == torch.float32
        err_fast, err_trained = ((y - trained_form).abs().max().item() for y in (fast_bf16, trained_bf16))
        assert err_fast <= err_trained and err_fast < 0.05 * trained_form.abs().max(), (err_fast, err_trained)


def test_transformer_velocity_net_learns_the_mixture():
    net = functools.partial(TransformerVelocityNet, patch=1, width=32, depth=2, heads=2, emb=32)   # 2 tokens
    model = fit_mixture(net, 10, 600, 128)
    with torch.no_grad():
        gen = model.sampler().sample(torch.zeros(4000, 0), torch.Generator().manual_seed(1)).numpy()
    left = gen[:, 0] < 0
    assert abs(left.mean() - 0.3) < 0.05
    np.testing.assert_allclose(gen[left].mean(0), [-2.0, 0.0], atol=0.2)
    np.testing.assert_allclose(gen[~left].mean(0), [2.0, 1.0], atol=0.2)
    np.testing.assert_allclose(np.r_[gen[left].std(0), gen[~left].std(0)], 0.3, atol=0.1)
    with pytest.raises(Exception, match="divisible by heads"):
        TransformerVelocityNet(368, 1, width=30, heads=4)


def test_reflow_student_does_in_one_step_what_its_teacher_needs_many_for():
    teacher = fit_mixture(functools.partial(VelocityNet, width=64, n_blocks=2, emb=32), 6, 400, 128)
    student = Reflow((2,), 0, teacher=teacher, steps=1, ema={"flow": 0.99})
    assert student.teacher_sampler == {"steps": 6, "solver": "midpoint", "rho": 1.0}
    for a, b in zip(student.parameters(), teacher.parameters()):   # starts from the teacher
        assert torch.equal(a, b) and a is not b
    assert not any(k.startswith("teacher") for k in student.state_dict())
    student.rng = torch.Generator().manual_seed(1)
    opt = Optim(student, {"_target_": "torch.optim.Adam", "lr": 1e-3}, None, Runtime(torch.device("cpu")))
    for step in range(150):
        student.training_step(Batch(torch.zeros(128, 2), torch.zeros(128, 0)), step, opt)
    z, c = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5)), torch.zeros(4000, 0)
    target = integrate(teacher.flow, z, c, 6, "midpoint")
    err_teacher = ((integrate(teacher.flow, z, c, 1, "euler") - target) ** 2).mean().item()
    err_student = ((integrate(student.flow, z, c, 1, "euler") - target) ** 2).mean().item()
    assert err_student < 0.2 * err_teacher, (err_student, err_teacher)


class Linear(nn.Module):
    """dx/dt = a x: x(1) = x(0) e^a exactly."""

    def forward(self, x, t, c):
        return 0.8 * x


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_solver_error_falls_with_its_order(solver, order):
    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = np.exp(0.8)
    err = [abs(integrate(Linear(), x0, x0[:, :0], n, solver).item() - exact) for n in (8, 16)]
    assert err[0] / err[1] == pytest.approx(2 ** order, rel=0.15)


class Stiffening(nn.Module):
    """dx/dt = -2 x / (1.05 - t): stiffens towards t = 1 like a flow's field near a narrow data mode."""

    def forward(self, x, t, c):
        return -2 * x / (1.05 - t)[:, None]


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_a_time_grid_graded_towards_the_data_cuts_the_error_where_the_field_stiffens(solver):
    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = (0.05 / 1.05) ** 2                          # x(1) = x0 ((1.05 - 1) / 1.05)^2
    err = {rho: abs(integrate(Stiffening(), x0, x0[:, :0], 5, solver, rho=rho).item() - exact) for rho in (1, 2)}
    assert err[2] < err[1] / 4                          # the same 5 steps, finer where the field changes fast
    uniform = integrate(Linear(), x0, x0[:, :0], 5, solver)
    assert torch.equal(integrate(Linear(), x0, x0[:, :0], 5, solver, rho=1.0), uniform)
    with pytest.raises(ConfigError, match="rho=0"):
        integrate(Linear(), x0, x0[:, :0], 5, solver, rho=0)


def test_the_model_and_the_sampler_options_set_the_time_grid():
    net = functools.partial(VelocityNet, width=16, n_blocks=1, emb=8)
    torch.manual_seed(0)
    uniform = CFM((3,), 1, net=net, steps=3)
    torch.manual_seed(0)
    graded = CFM((3,), 1, net=net, steps=3, rho=2.0)
    noise, cond = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(5, 1)
    a, b = uniform.sampler().decode(noise, cond), graded.sampler().decode(noise, cond)
    assert not torch.equal(a, b)                                       # model.rho is used ...
    assert torch.equal(uniform.sampler().decode(noise, cond, rho=2.0), b)   # ... and a sampler option overrides it
    assert torch.equal(graded.sampler().decode(noise, cond, rho=1.0), a)
    with pytest.raises(ConfigError, match="model.rho"):
        CFM((3,), 1, net=net, rho=0)


class Counting(nn.Module):
    """dx/dt = 0.8 x + sin(6 t), counting its evaluations."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, c):
        self.calls += 1
        return 0.8 * x + torch.sin(6 * t)[:, None]


def test_adaptive_solver_meets_its_tolerance_with_more_evaluations_when_tighter():
    x0 = torch.ones(3, 1, dtype=torch.float64)
    fine = integrate(Counting(), x0, x0[:, :0], 4000, "rk4")          # reference solution
    calls = []
    for tol in (1e-3, 1e-7):
        net = Counting()
        out = integrate(net, x0, x0[:, :0], 1, "dopri5", rtol=tol, atol=tol)
        assert (out - fine).abs().max().item() < 20 * tol
        calls.append(net.calls)
    assert calls[1] > 2 * calls[0]
    with pytest.raises(Exception, match="rtol=0"):
        integrate(Counting(), x0, x0[:, :0], 1, "dopri5", rtol=0)


class Const(nn.Module):
    def forward(self, x, t, c):
        return torch.full_like(x, 3.0)


class MeanOfLast(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t, c):
        return c[:, -self.k:].mean(1, keepdim=True).expand_as(x)


def test_two_stage_sampler_chains_energy_into_shape():
    model = CFM((2 + 3,), 1, net=functools.partial(VelocityNet, width=8, n_blocks=1, emb=8), energy_dims=2,
                steps=4, solver="euler")
    assert model.roles == ("energy", "shape")
    model.energy, model.shape = Const(), MeanOfLast(2)
    cond = torch.rand(6, 1)
    out = model.sampler().sample(cond, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    z_e, z_s = torch.randn(6, 2, generator=g), torch.randn(6, 3, generator=g)
    f = z_e + 3.0                                        # constant velocity 3 over t in [0, 1]
    torch.testing.assert_close(out[:, :2], f)
    torch.testing.assert_close(out[:, 2:], z_s + f.mean(1, keepdim=True))   # shape stage saw f


def test_layer_energies_round_trip_and_conserve_layer_energies():
    e, s = random_showers(500)
    layers = [8, 160, 190, 5, 5]
    t = Transform((368,), [{"step": "layer_energies", "layers": layers}, "normalise"], {"energy": "log_scale"})
    t.fit_conditions({"energy": e}).fit(s, {"energy": e})
    assert t.net_shape == (373,)
    y = t.to_network(s, {"energy": e})
    back = t.to_physical(y, {"energy": e})
    np.testing.assert_allclose(back, s, rtol=1e-3, atol=1e-4 * s.max())
    # noise on the shape features moves voxels but not the total or the layer energies
    noisy = y.copy()
    noisy[:, 5:] += np.random.default_rng(0).normal(0, 0.5, noisy[:, 5:].shape)
    moved = t.to_physical(noisy, {"energy": e})
    offsets = np.cumsum([0] + layers)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        np.testing.assert_allclose(moved[:, lo:hi].sum(1), back[:, lo:hi].sum(1), rtol=1e-3, atol=1e-3)
    assert np.abs(moved - back).max() > 1e-2 * s.max()


def test_threshold_aware_layer_energies_keep_visible_layer_energies():
    e, s = random_showers(400)
    layers, thr = [8, 160, 190, 5, 5], 5.0
    t = Transform((368,), [{"step": "layer_energies", "layers": layers, "threshold": thr}], {"energy": "log_scale"})
    cut = np.where(s < thr, 0, s)
    back = t.to_physical(t.to_network(s, {"energy": e}), {"energy": e})
    np.testing.assert_allclose(back, cut, rtol=1e-4, atol=1e-4 * s.max())     # exact on thresholded showers
    y = t.to_network(s, {"energy": e})
    y[:, 5:] += np.random.default_rng(0).normal(0, 1.0, y[:, 5:].shape)        # diffuse generated shapes
    gen = t.to_physical(y, {"energy": e})
    offsets = np.cumsum([0] + layers)
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        # layer energies kept (an empty layer may get a sliver far below the threshold: logit(alpha_e))
        np.testing.assert_allclose(gen[:, lo:hi].sum(1), cut[:, lo:hi].sum(1), rtol=1e-3, atol=thr / 10)
        visible = cut[:, lo:hi].sum(1) >= thr               # a layer with visible energy shows no voxel below it
        block = gen[visible, lo:hi]
        assert ((block == 0) | (block >= thr * (1 - 1e-5))).all()


# the configs' default; the one until 2026-11-25; the widest gap measured; one per layer
@pytest.mark.parametrize("dq, delta", [(0.2, 0.04), (0.5, 0.1), (0.05, 0.01),
                                       ([0.2, 0.5, 0.5, 0.2, 0.2], [0.04, 0.1, 0.1, 0.04, 0.04])])
def test_dequantised_layer_energies_spread_empty_voxels_and_invert_exactly(dq, delta):
    e, s = random_showers(300)
    layers, thr = [8, 160, 190, 5, 5], 5.0
    step = {"step": "layer_energies", "layers": layers, "threshold": thr, "dequantise": dq, "delta": delta}
    t = Transform((368,), [step], {"energy": "log_scale"})
    cut = np.where(s < thr, 0, s)
    y = t.to_network(s, {"energy": e})
    np.testing.assert_allclose(t.to_physical(y, {"energy": e}), cut, rtol=1e-5, atol=1e-6 * s.max())
    # empty voxels are no longer one spike: spread over log((U(0, dq thr) + delta thr) / max(E_l, thr))
    layer_e = np.add.reduceat(cut, np.cumsum([0] + layers[:-1]), axis=1)
    den = np.maximum(np.repeat(layer_e, layers, axis=1), thr)
    dq_v, delta_v = (np.repeat(np.broadcast_to(v, len(layers)), layers)[None] * np.ones_like(cut) for v in (dq, delta))
    empty = cut == 0
    u = (np.exp(y[:, 5:]) * den - delta_v * thr)[empty] / (dq_v * thr)[empty]
    assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6 and abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12 ** -0.5) < 0.01
    assert len(np.unique(np.round(u, 6))) > 0.9 * empty.sum()
    # ... a band log((1 + delta) / (dq + delta)) (of the voxel's layer) below the lowest visible value of the
    # same shower and layer
    floor = np.log(thr * (1 + delta_v) / den)
    assert (y[:, 5:][empty] <= (floor - np.log((1 + delta_v) / (dq_v + delta_v)))[empty] + 1e-5).all()
    assert (y[:, 5:][~empty] >= floor[~empty] - 1e-5).all()
    # the noise belongs to the shower: the same in any chunking and order
    part = t.to_network(s[::-1][:100].copy(), {"energy": e[::-1][:100].copy()})
    np.testing.assert_array_equal(part, y[::-1][:100])
    with pytest.raises(Exception, match=re.escape(f"dequantise={dq}") + " .* needs threshold > 0"):
        Transform((368,), [dict(step, threshold=0.0)], {"energy": "log_scale"})


def test_per_layer_gaps_equal_the_scalar_where_they_agree_and_wrong_lists_are_one_line_errors():
    e, s = random_showers(200)
    layers = [8, 160, 190, 5, 5]
    step = {"step": "layer_energies", "layers": layers, "threshold": 1.0, "dequantise": 0.5, "delta": 0.1}
    one = Transform((368,), [step], {"energy": "log_scale"}).to_network(s, {"energy": e})
    each = Transform((368,), [dict(step, dequantise=[0.5] * 5, delta=[0.1] * 5)], {"energy": "log_scale"})
    np.testing.assert_array_equal(each.to_network(s, {"energy": e}), one)
    # a layer's own gap changes only that layer's empty voxels
    wide = Transform((368,), [dict(step, dequantise=[0.2, 0.5, 0.5, 0.5, 0.5], delta=[0.04, 0.1, 0.1, 0.1, 0.1])],
                     {"energy": "log_scale"}).to_network(s, {"energy": e})
    changed = np.flatnonzero((wide != one).any(0))
    assert changed.size and changed.min() >= 5 and changed.max() < 5 + 8
    for bad, why in [({"dequantise": [0.5] * 4}, "one number per layer .5 layers"),
                     ({"delta": [0.1, 0.1, "x", 0.1, 0.1]}, "one number per layer"),
                     ({"dequantise": [0.5, 0.5, 0.0, 0.5, 0.5]}, "> 0 for every layer or 0 for all"),
                     ({"delta": [0.1, 0.1, 0.1, 0.1, 0.0]}, "must be > 0"),
                     ({"dequantise": [0.5, 0.5, 1.5, 0.5, 0.5]}, r"must be in \[0, 1\)")]:
        with pytest.raises(ConfigError, match="transform step layer_energies: " + ".*" + why) as info:
            Transform((368,), [dict(step, **bad)], {"energy": "log_scale"})
        assert "\n" not in str(info.value)


def test_dequantised_layers_turn_the_empty_layer_spikes_into_a_band_below_threshold_and_invert_exactly():
    e, s = random_showers(400)
    layers, thr = [8, 160, 190, 5, 5], 5.0
    s[:150, :8] = 0           # layer 0 empty
    s[100:250, 358:363] = 0   # layer 3 empty (with layer 0 in 100..149)
    s[200:300, 363:] = 0      # layer 12 empty (with layer 3 in 200..249: both sparse layers empty)
    cut = np.where(s < thr, 0, s)
    step = {"step": "layer_energies", "layers": layers, "threshold": thr, "dequantise": 0.5}
    plain = Transform((368,), [step], {"energy": "log_scale"}).to_network(s, {"energy": e})
    t = Transform((368,), [dict(step, dequantise_layers=0.5, alpha_e=1e-9)], {"energy": "log_scale"})
    y = t.to_network(s, {"energy": e})
    # without: each empty layer puts a share of showers on one value of a layer-fraction logit; with: none
    assert max(len(plain) - len(np.unique(plain[:, j])) for j in range(1, 5)) >= 99
    assert all(len(np.unique(y[:, j])) == len(y) for j in range(1, 5))
    np.testing.assert_allclose(t.to_physical(y, {"energy": e}), cut, rtol=1e-5, atol=1e-6 * s.max())
    # an empty layer carries a pseudo-energy in thr * [0.25, 0.5): read back from r_3 = E_3 / (E_3 + E_12)
    only3 = (cut[:, 358:363].sum(1) == 0) & (cut[:, 363:].sum(1) > 0)
    r3 = 1 / (1 + np.exp(-y[only3, 4].astype(np.float64)))
    pseudo = r3 / (1 - r3) * cut[only3, 363:].sum(1)
    assert only3.sum() >= 50 and pseudo.min() >= 0.25 * thr * (1 - 1e-3) and pseudo.max() < 0.5 * thr * (1 + 1e-3)
    assert pseudo.std() > 0.05 * thr
    # the same for a shower whichever chunk or order it arrives in
    np.testing.assert_array_equal(t.to_network(s[::-1][:120].copy(), {"energy": e[::-1][:120].copy()}), y[::-1][:120])
    with pytest.raises(Exception, match="dequantise_layers=0.5 .* needs threshold > 0"):
        Transform((368,), [dict(step, threshold=0.0, dequantise=0.0, dequantise_layers=0.5)], {"energy": "log_scale"})


def test_hit_counts_are_features_the_inverse_keeps_exactly():
    e, s = random_showers(300)
    layers, thr = [8, 160, 190, 5, 5], 5.0
    s[:60, 358:363] = 0                       # an empty layer (3) in some showers
    cut = np.where(s < thr, 0, s)
    step = {"step": "layer_energies", "layers": layers, "threshold": thr, "dequantise": 0.5,
            "dequantise_layers": 0.5, "alpha_e": 1e-9, "hit_counts": True}
    t = Transform((368,), [step], {"energy": "log_scale"})
    assert t.net_shape == (5 + 5 + 368,)
    y = t.to_network(s, {"energy": e})
    offsets = np.cumsum([0] + layers)
    hits = np.stack([(cut[:, lo:hi] > 0).sum(1) for lo, hi in zip(offsets[:-1], offsets[1:])], 1)
    # features 5..9: log(1 + n + u), u in [0.05, 0.95): the count is their floor
    u = np.expm1(y[:, 5:10].astype(np.float64)) - hits
    assert u.min() >= 0.05 - 1e-5 and u.max() < 0.95 + 1e-5 and u.std() > 0.2
    np.testing.assert_allclose(t.to_physical(y, {"energy": e}), cut, rtol=1e-5, atol=1e-6 * s.max())

    # noisy shapes: the layer energies and the hit counts stay exactly those of the energy features
    noisy = y.copy()
    noisy[:, 10:] += np.random.default_rng(1).normal(0, 1.0, noisy[:, 10:].shape)
    gen = t.to_physical(noisy, {"energy": e})
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        block = gen[:, lo:hi]
        np.testing.assert_array_equal((block > 0).sum(1), hits[:, i])
        np.testing.assert_allclose(block.sum(1), cut[:, lo:hi].sum(1), rtol=1e-4, atol=1e-3)
        assert block[block > 0].min() >= thr * (1 - 1e-6)
    # the shape features alone cross the threshold elsewhere (decoded without the counts) ...
    plain = Transform((368,), [dict(step, hit_counts=False)], {"energy": "log_scale"})
    own = plain.to_physical(np.concatenate([noisy[:, :5], noisy[:, 10:]], 1), {"energy": e})
    assert ((own > 0).sum(1) != (cut > 0).sum(1)).mean() > 0.5
    # ... yet the voxels the counts promoted from below the threshold land above it, not on a spike at thr
    assert (gen == thr).sum() == 0 and ((gen >= thr) & (gen < 1.001 * thr)).sum() < 0.01 * (gen > 0).sum()

    # a generated count decides the hits: 10 more in layer 1, a single hit in layer 2
    more = y.copy()
    more[:, 6] = np.log1p(hits[:, 1] + 10.5)
    more[:, 7] = np.log1p(1.5)
    gen = t.to_physical(more, {"energy": e})
    e1, e2 = cut[:, 8:168].sum(1), cut[:, 168:358].sum(1)
    np.testing.assert_array_equal((gen[:, 8:168] > 0).sum(1),
                                  np.minimum(np.minimum(hits[:, 1] + 10, np.floor(e1 / thr)), 160))
    np.testing.assert_array_equal((gen[:, 168:358] > 0).sum(1), 1)
    np.testing.assert_allclose(gen[:, 168:358].max(1), e2, rtol=1e-5)
    # voxels promoted from far below the threshold (shape values under the offset: negative) are visible too
    deep = more.copy()
    deep[:, 10 + 8:10 + 168] -= 6.0
    low = t.to_physical(deep, {"energy": e})[:, 8:168]
    np.testing.assert_array_equal((low > 0).sum(1), (gen[:, 8:168] > 0).sum(1))
    assert low[low > 0].min() >= thr * (1 - 1e-6)
    # an empty layer has no hits whatever its count feature says
    more[:60, 8] = np.log1p(3.5)
    assert (t.to_physical(more, {"energy": e})[:60, 358:363] == 0).all()
    with pytest.raises(Exception, match="hit_counts=true needs dequantise > 0"):
        Transform((368,), [dict(step, dequantise=0.0)], {"energy": "log_scale"})


def test_two_stage_cfm_refuses_an_energy_split_that_is_not_the_transforms():
    from types import SimpleNamespace
    step = {"step": "layer_energies", "layers": [8, 160, 190, 5, 5], "threshold": 1.0, "dequantise": 0.5}
    net = functools.partial(VelocityNet, width=8, n_blocks=1, emb=8)
    for counts, right in ((False, 5), (True, 10)):
        data = SimpleNamespace(transform=Transform((368,), [dict(step, hit_counts=counts)], {"energy": "log_scale"}))
        CFM(data.transform.net_shape, 1, net=net, energy_dims=right).prepare(data)
        with pytest.raises(ConfigError, match=f"model.energy_dims={15 - right}: .* leads with {right} energy "
                                              f"features .*; set model.energy_dims={right}"):
            CFM(data.transform.net_shape, 1, net=net, energy_dims=15 - right).prepare(data)


def test_a_generated_layer_with_no_voxel_above_threshold_gives_its_energy_to_its_hottest_voxel():
    e, s = random_showers(200)
    layers, thr = [8, 160, 190, 5, 5], 5.0
    t = Transform((368,), [{"step": "layer_energies", "layers": layers, "threshold": thr, "dequantise": 0.5}],
                  {"energy": "log_scale"})
    y = t.to_network(s, {"energy": e})
    y[:, 5 + 8:5 + 168] = -16.0                 # layer 1: every voxel far below the threshold ...
    y[:, 5 + 8 + 7] = -15.0                     # ... voxel 7 of it the least so
    gen = t.to_physical(y, {"energy": e})
    want = t.to_physical(t.to_network(s, {"energy": e}), {"energy": e})
    layer1 = gen[:, 8:168]
    visible = want[:, 8:168].sum(1) > 0
    np.testing.assert_allclose(layer1[visible, 7], want[visible, 8:168].sum(1), rtol=1e-5)
    assert (np.delete(layer1, 7, axis=1) == 0).all()
    np.testing.assert_allclose(gen[:, 168:], want[:, 168:], rtol=1e-5, atol=1e-6 * s.max())   # other layers untouched


@pytest.mark.slow
def test_cfm_trains_resumes_and_generates_with_sampler_options(tmp_path):
    args = ["caloexp.train", "model=cfm", "data.n_showers=1500", "data.batch_size=64", "data.eval_events=300",
            "model.net.width=32", "model.net.n_blocks=1",
            "model.energy_net.width=16", "model.energy_net.n_blocks=1", "model.steps=4", "trainer.eval_every=6",
            "trainer.checkpoint_every=3", "trainer.log_every=3", "trainer.plot_every=0", "trainer.num_threads=1"]
    sa, sb = train_twice_and_resume(args, tmp_path, 6)
    assert set(sa["optim"]["ema"]) == {"energy", "shape"}
    for role in ("energy", "shape"):
        for x, y in zip(sa["optim"]["ema"][role]["shadow"], sb["optim"]["ema"][role]["shadow"]):
            assert torch.equal(x, y)
    outs = {}
    for name, opts in (("mid", "{steps: 4}"), ("adaptive", "{solver: dopri5, rtol: 0.01, atol: 0.01}")):
        out = tmp_path / f"gen_{name}.hdf5"
        g = run_cli(["caloexp.generate", f"source={tmp_path}/A", "n_showers=200", f"output={out}",
                     f"sampler={opts}"], cwd=tmp_path)
        assert g.returncode == 0, g.stderr[-3000:]
        from caloexp.data import calochallenge
        outs[name] = calochallenge.read(out)
        assert outs[name].showers.shape == (200, 368) and (outs[name].showers >= 0).all()
    assert not np.array_equal(outs["mid"].showers, outs["adaptive"].showers)   # the options reached the sampler
    # bf16 matmuls: the same noise gives nearly the same showers (total energy per shower within 2 %)
    g = run_cli(["caloexp.generate", f"source={tmp_path}/A", "n_showers=200", f"output={tmp_path}/gen_bf16.hdf5",
                 "sampler={steps: 4}", "precision=bf16"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    bf16 = calochallenge.read(tmp_path / "gen_bf16.hdf5").showers
    assert not np.array_equal(bf16, outs["mid"].showers)
    np.testing.assert_allclose(bf16.sum(1), outs["mid"].showers.sum(1), rtol=0.02)
    bad = run_cli(["caloexp.generate", f"source={tmp_path}/A", "n_showers=10", "precision=fp8"], cwd=tmp_path)
    assert bad.returncode == 2 and "precision=fp8" in bad.stderr
    bad = run_cli(["caloexp.generate", f"source={tmp_path}/A", "n_showers=10", "sampler={solver: heun}"],
                  cwd=tmp_path)
    assert bad.returncode == 2 and "solver='heun'" in bad.stderr

    # a one-step reflow student of run A; its generator is a plain CFM that no longer needs A
    r = run_cli(["caloexp.train", "model=reflow", f"model.teacher={tmp_path}/A", "model.teacher_sampler={steps: 2}",
                 "data.n_showers=1500", "data.batch_size=64", "data.eval_events=300", "trainer.max_steps=3",
                 "trainer.eval_every=3", "trainer.plot_every=0", "trainer.num_threads=1", f"hydra.run.dir={tmp_path}/R"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    spec = torch.load(tmp_path / "R/checkpoints/last.ckpt", weights_only=True)["spec"]["model"]
    assert spec["_target_"] == "caloexp.models.cfm.CFM" and spec["steps"] == 1 and spec["solver"] == "euler"
    # a student whose data transform is not its teacher's would decode the teacher's samples wrongly
    bad = run_cli(["caloexp.train", "model=reflow", f"model.teacher={tmp_path}/A", "data.n_showers=1500",
                   "data.transform.steps.0.dequantise_layers=0.0", "trainer.max_steps=3", "trainer.num_threads=1"],
                  cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-3000:]
    assert "data.transform.steps[0] differs from the teacher's" in bad.stderr and "dequantise_layers" in bad.stderr
    import shutil
    shutil.rmtree(tmp_path / "A")
    out = tmp_path / "gen_reflow.hdf5"
    g = run_cli(["caloexp.generate", f"source={tmp_path}/R", "n_showers=100", f"output={out}"], cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-3000:]
    assert calochallenge.read(out).showers.shape == (100, 368)
    bad = run_cli(["caloexp.train", "model=reflow", f"model.teacher={tmp_path}/A", "trainer.max_steps=3"],
                  cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "model.teacher" in bad.stderr
