"""Conditional flow matching (rectified flow / optimal-transport path), one- or two-stage.

Objective: with data x, noise z ~ N(0, I) and t ~ U(0, 1), x_t = (1 - t) z + t x and the net
regresses the constant velocity of the straight path: L = E |v(x_t, t, c) - (x - z)|^2
(Lipman et al. 2023; Liu et al. 2023). Sampling integrates dx/dt = v from t = 0 (noise) to 1 (data)
with a fixed-step solver (``euler``, ``midpoint``, ``rk4``; ``steps`` per solve, on a time grid graded
towards the data end with ``rho`` > 1) or the adaptive Dormand-Prince solver of torchdiffeq
(``dopri5``; tolerances ``rtol``/``atol``) on EMA weights.

Few-step generation (:class:`Reflow`): a student initialised from a trained CFM learns the straight
map from each noise draw to the teacher's sample of it (reflow, Liu et al. 2023), so one or two
Euler steps give what the teacher needs ten evaluations for; its checkpoint is a plain CFM.

Two-stage (CaloDREAM-style, ``energy_dims: L``): the first L network features (the layer-energy
features of the ``layer_energies`` transform) get their own small flow conditioned on the incident
energy; the shape flow learns the rest conditioned on the energy and those L features. Generation
chains both. Each stage is a role with its own optimiser and EMA, so they train (and can be tuned)
separately in one run.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from caloexp.errors import ConfigError
from caloexp.models.base import GenerativeModel

SOLVERS = ("euler", "midpoint", "rk4", "dopri5")


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1]."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(1000.0), dim // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.reshape(-1, 1) * self.freq * (2 * math.pi / 10)
        return torch.cat([a.sin(), a.cos()], 1)


class ResBlock(nn.Module):
    """LayerNorm -> FiLM(time, condition) -> Linear-SiLU-Linear, added to the input (zero-initialised)."""

    def __init__(self, width: int, emb: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(emb, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.act, self.drop = nn.SiLU(), nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, 1)
        u = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.drop(self.act(self.fc1(self.act(u)))))


class VelocityNet(nn.Module):
    """v(x, t, c): a residual MLP whose blocks are modulated by an embedding of (t, c).

    ``cell_head`` > 0 adds a per-cell head: one small MLP shared by all D cells maps each cell's own
    x_t, the MLP's output for it, a learned cell embedding and a summary of the shower to a correction
    of that cell's velocity. Given the shower, cells fluctuate nearly independently (sampling and spot
    noise), so the exact velocity is D separate non-linear functions of each cell's own x_t; a
    512-wide MLP over 368 cells cannot hold them all and learns only a linear contraction of the noise
    (generated cells then look Gaussian where the data are a narrow peak plus empty cells).

    ``cell_mix`` = r > 0 adds to the head's first layer a rank-r product of cell factors and shower
    context, so each cell's pre-activations can shift by its own function of the shower (the context
    alone shifts every cell alike; with ``cell_head: 0`` there is nothing to shift and it is off).
    Why: where a cell's value crosses the readout threshold depends on its layer's energy, which
    differs per layer and per shower. Measured effect: README, "The voxel-dependent shift".
    """

    def __init__(self, dim: int, cond_dim: int, width: int = 512, n_blocks: int = 4, emb: int = 128,
                 dropout: float = 0.0, cell_head: int = 0, cell_emb: int = 16, context: int = 32, cell_mix: int = 0):
        super().__init__()
        if min(dim, width, n_blocks, emb) < 1 or min(cell_head, cell_emb, context, cell_mix) < 0 or \
                (cell_head and min(cell_emb, context) < 1):
            raise ConfigError(f"VelocityNet needs dim, width, n_blocks, emb >= 1 and cell_head, cell_mix >= 0 (with "
                              f"cell_emb, context >= 1) (got {dim}, {width}, {n_blocks}, {emb}, {cell_head}, {cell_emb}, "
                              f"{context}, {cell_mix})")
        self.temb = TimeEmbedding(64)
        self.emb = nn.Sequential(nn.Linear(64 + cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Linear(dim + cond_dim, width)
        self.blocks = nn.ModuleList([ResBlock(width, emb, dropout) for _ in range(n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        self.cell_head = int(cell_head)
        if self.cell_head:
            k = self.cell_head
            self.cell = nn.Parameter(torch.randn(dim, cell_emb) * 0.1)       # learned embedding of each cell
            self.context = nn.Linear(width + emb, context)                   # summary of the shower and (t, c)
            # first layer of the per-cell MLP on [x_t, v_mlp, cell embedding, context], split by input
            self.head_x = nn.Parameter(torch.randn(2, k) * 0.5)
            self.head_cell = nn.Linear(cell_emb, k)
            self.head_ctx = nn.Linear(context, k, bias=False)
            self.head = nn.Sequential(nn.SiLU(), nn.Linear(k, k), nn.SiLU(), nn.Linear(k, 1))
            nn.init.zeros_(self.head[-1].weight)    # starts as the plain MLP
            nn.init.zeros_(self.head[-1].bias)
        self.cell_mix = int(cell_mix) if self.cell_head else 0     # it modulates the head: none without one
        if self.cell_mix:
            self.mix_cell = nn.Linear(cell_emb, self.cell_mix)                 # (D, r) cell factors
            self.mix_ctx = nn.Linear(context, self.cell_mix * self.cell_head)  # (N, r, k) shower factors
            nn.init.zeros_(self.mix_ctx.weight)     # starts as the head without it
            nn.init.zeros_(self.mix_ctx.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        emb = self.emb(torch.cat([self.temb(t), c], 1))
        h = self.inp(torch.cat([x, c], 1))
        for block in self.blocks:
            h = block(h, emb)
        v = self.out(h)
        if not self.cell_head:
            return v
        summary = self.context(torch.cat([h, emb], 1))
        ctx = self.head_ctx(summary)                                              # (N, k)
        mix = self.mix_ctx(summary).unflatten(1, (self.cell_mix, -1)) if self.cell_mix else None   # (N, r, k)
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling() \
                or torch.compiler.is_exporting():
            # first layer on (N, D, k) without building the (N, D, inputs) tensor: [x_t, v] @ W + cell + context
            pre = torch.stack([x, v], -1) @ self.head_x + (self.head_cell(self.cell) + ctx.unsqueeze(1))
            if mix is not None:
                pre = pre + self.mix_cell(self.cell) @ mix                        # (D, r) @ (N, r, k)
            return v + self.head(pre).squeeze(-1)
        return self._head_inference(x, v, ctx, mix)

    def _head_inference(self, x: torch.Tensor, v: torch.Tensor, ctx: torch.Tensor, mix: torch.Tensor | None = None,
                        chunk: int = 32) -> torch.Tensor:
        """The per-cell head without autograd, the same maths in chunks of showers, in place: the
        (chunk, D, k) activations stay in cache (at batch 10,000 the whole-batch form streams ~0.5 GB
        per operation through memory and took 5x longer). Exported and traced graphs use the plain form."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # float32 on CPUs: the head is element-wise work over (chunk, D, k), which bfloat16 slows there
            # (no native bf16 vector arithmetic): 1.4x faster per evaluation at batch 10,000 than the head in bf16
            with torch.autocast("cpu", enabled=False):
                return self._head_inference(x.float(), v.float(), ctx.float(),
                                            None if mix is None else mix.float(), chunk)
        k = self.cell_head
        cell = self.head_cell(self.cell)                                          # (D, k)
        w_x, w_v = self.head_x[0], self.head_x[1]
        hidden, last = self.head[1], self.head[3]
        w_h = hidden.weight.t()
        w_out = last.weight.reshape(k, 1)
        out = v + last.bias
        if mix is not None:   # context and mix as one product: [factors, 1] @ [mix; ctx] (a third of the cost)
            factors = torch.cat([self.mix_cell(self.cell), torch.ones_like(cell[:, :1])], 1)    # (D, r + 1)
            rows = torch.cat([mix, ctx[:, None, :]], 1)                                       # (N, r + 1, k)
        for i in range(0, x.shape[0], chunk):
            if mix is None:
                pre = cell + ctx[i:i + chunk, None, :]
            else:
                pre = torch.matmul(factors, rows[i:i + chunk]).add_(cell)
            pre.addcmul_(x[i:i + chunk, :, None], w_x).addcmul_(v[i:i + chunk, :, None], w_v)
            a = torch.addmm(hidden.bias, nn.functional.silu(pre, inplace=True).view(-1, k), w_h)
            out[i:i + chunk] += (nn.functional.silu(a, inplace=True) @ w_out).view(-1, x.shape[1])
        return out


class TransformerVelocityNet(nn.Module):
    """v(x, t, c) as a transformer over patch tokens (the vision-transformer approach of CaloDREAM):
    the D features are cut into ceil(D / patch) patches (zero-padded), each embedded with a learned
    position, modulated by the (t, c) embedding, and mixed by ``depth`` pre-norm self-attention
    blocks; a linear head maps each token back to its patch."""

    def __init__(self, dim: int, cond_dim: int, patch: int = 16, width: int = 128, depth: int = 4, heads: int = 4,
                 emb: int = 128, dropout: float = 0.0):
        super().__init__()
        if min(dim, patch, width, depth, heads, emb) < 1 or width % heads:
            raise ConfigError(f"TransformerVelocityNet needs dim, patch, width, depth, heads, emb >= 1 and width "
                              f"divisible by heads (got {dim}, {patch}, {width}, {depth}, {heads}, {emb})")
        self.dim, self.patch = int(dim), int(patch)
        self.tokens = -(-self.dim // self.patch)
        self.temb = TimeEmbedding(64)
        self.emb = nn.Sequential(nn.Linear(64 + cond_dim, emb), nn.SiLU(), nn.Linear(emb, 2 * width))
        self.inp = nn.Linear(self.patch, width)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, self.patch))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xp = nn.functional.pad(x, (0, self.tokens * self.patch - self.dim)).reshape(n, self.tokens, self.patch)
        scale, shift = self.emb(torch.cat([self.temb(t), c], 1)).unsqueeze(1).chunk(2, 2)
        h = self.encoder((self.inp(xp) + self.pos) * (1 + scale) + shift)
        return self.out(h).reshape(n, -1)[:, :self.dim]


def flow_matching_loss(net: nn.Module, x: torch.Tensor, c: torch.Tensor, rng: torch.Generator | None,
                       z: torch.Tensor | None = None) -> torch.Tensor:
    """The rectified-flow regression; ``z`` pairs each x with its own noise (reflow), else fresh noise."""
    if z is None:
        z = torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)
    t = torch.rand(len(x), generator=rng, device=x.device, dtype=x.dtype)
    xt = (1 - t[:, None]) * z + t[:, None] * x
    return ((net(xt, t, c) - (x - z)) ** 2).mean()


@torch.no_grad()
def integrate(net: nn.Module, x: torch.Tensor, c: torch.Tensor, steps: int, solver: str,
              rtol: float = 1e-4, atol: float = 1e-4, rho: float = 1.0) -> torch.Tensor:
    """Solve dx/dt = net(x, t, c) from t = 0 to 1: ``steps`` fixed steps, or adaptively (``dopri5``)
    to the tolerances ``rtol``/``atol`` (``steps`` is then ignored).

    The fixed steps lie on the grid t_i = 1 - (1 - i / steps) ** rho: uniform for ``rho`` = 1, finer
    towards the data end for ``rho`` > 1, where the learned field stiffens (the exact field of a
    narrow data mode varies like 1 / (1 - t)); the same number of evaluations."""
    if solver not in SOLVERS:
        raise ConfigError(f"sampler solver={solver!r}: choose one of {list(SOLVERS)}")
    if int(steps) < 1:
        raise ConfigError(f"sampler steps={steps}: must be >= 1")
    if not float(rho) > 0:
        raise ConfigError(f"sampler rho={rho}: must be > 0 (1: uniform time steps; > 1: finer towards the data)")
    if solver == "dopri5":
        if not (rtol > 0 and atol > 0):
            raise ConfigError(f"sampler rtol={rtol}, atol={atol}: must be > 0")
        import torchdiffeq

        def velocity(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return net(y, t.expand(len(y)), c)

        t = torch.tensor([0.0, 1.0], device=x.device, dtype=x.dtype)
        return torchdiffeq.odeint(velocity, x, t, rtol=float(rtol), atol=float(atol), method="dopri5")[-1]
    n, rho = int(steps), float(rho)
    grid = [i / n if rho == 1 else 1.0 - (1.0 - i / n) ** rho for i in range(n + 1)]   # rho 1: the plain grid
    for i in range(n):
        h = grid[i + 1] - grid[i]
        t = torch.full_like(x[:, 0], grid[i])   # follows x's batch size and device when traced
        if solver == "euler":
            x = x + h * net(x, t, c)
        elif solver == "midpoint":
            x = x + h * net(x + 0.5 * h * net(x, t, c), t + 0.5 * h, c)
        else:
            k1 = net(x, t, c)
            k2 = net(x + 0.5 * h * k1, t + 0.5 * h, c)
            k3 = net(x + 0.5 * h * k2, t + 0.5 * h, c)
            k4 = net(x + h * k3, t + h, c)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


class FlowSampler(nn.Module):
    """Noise -> network-space events by ODE solves (the energy stage first when there is one).

    The noise is (N, data_dim): the energy stage's L columns first, then the shape stage's."""

    def __init__(self, model: "CFM"):
        super().__init__()
        self.model = model

    @property
    def noise_dim(self) -> int:
        return self.model.data_dim

    def draw_noise(self, n: int, rng: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        m = self.model
        parts = [m.energy_dims, m.data_dim - m.energy_dims] if m.energy_dims else [m.data_dim]
        return torch.cat([torch.randn(n, d, generator=rng, device=device, dtype=dtype) for d in parts], 1)

    def decode(self, noise: torch.Tensor, cond: torch.Tensor, steps: int | None = None, solver: str | None = None,
               energy_steps: int | None = None, rtol: float = 1e-4, atol: float = 1e-4,
               rho: float | None = None) -> torch.Tensor:
        """Events from given noise: a fixed number of solver steps on the ``rho`` time grid (an
        exported graph unrolls them) or the adaptive ``dopri5`` to ``rtol``/``atol``."""
        m = self.model
        steps, solver = int(steps or m.steps), str(solver or m.solver)
        solve = functools.partial(integrate, solver=solver, rtol=rtol, atol=atol, rho=m.rho if rho is None else rho)
        n, L = noise.shape[0], m.energy_dims
        if not L:
            return solve(m.flow, noise, cond, steps).reshape(n, *m.data_shape)
        f = solve(m.energy, noise[:, :L], cond, int(energy_steps or steps))
        g = solve(m.shape, noise[:, L:], torch.cat([cond, f], 1), steps)
        return torch.cat([f, g], 1).reshape(n, *m.data_shape)

    def sample(self, cond: torch.Tensor, rng: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        return self.decode(self.draw_noise(cond.shape[0], rng, cond.device, cond.dtype), cond, **options)


class CFM(GenerativeModel):
    """Conditional flow matching; ``energy_dims > 0`` splits it into an energy and a shape stage."""

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, net: Any, energy_net: Any = None,
                 energy_dims: int = 0, steps: int = 20, solver: str = "midpoint", rho: float = 1.0,
                 ema: dict[str, float] | None = None):
        super().__init__(data_shape, cond_dim, ema)
        if solver not in SOLVERS or steps < 1 or not float(rho) > 0:
            raise ConfigError(f"model.solver={solver!r}, model.steps={steps}, model.rho={rho}: choose {list(SOLVERS)}, "
                              "steps >= 1 and rho > 0")
        if not 0 <= energy_dims < self.data_dim:
            raise ConfigError(f"model.energy_dims={energy_dims}: must be in [0, {self.data_dim}) "
                              "(0: one stage; otherwise the energy features of the layer_energies transform)")
        self.energy_dims, self.steps, self.solver, self.rho = int(energy_dims), int(steps), str(solver), float(rho)
        if self.energy_dims:
            self.roles = ("energy", "shape")
            self.energy = (energy_net or net)(dim=self.energy_dims, cond_dim=self.cond_dim)
            self.shape = net(dim=self.data_dim - self.energy_dims, cond_dim=self.cond_dim + self.energy_dims)
        else:
            self.roles = ("flow",)
            self.flow = net(dim=self.data_dim, cond_dim=self.cond_dim)
        unknown = set(self.ema) - set(self.roles)
        if unknown:
            raise ConfigError(f"model.ema names {sorted(unknown)}; this model's roles are {list(self.roles)}")

    def prepare(self, data) -> None:
        """Two stages split the features where the data transform's energy features end: check it."""
        steps = [s for s in getattr(getattr(data, "transform", None), "steps", []) if s.name == "layer_energies"]
        if self.energy_dims and len(steps) == 1 and self.energy_dims != steps[0].energy_features:
            want = steps[0].energy_features
            raise ConfigError(f"model.energy_dims={self.energy_dims}: this data's layer_energies step leads with {want} "
                              f"energy features ({len(steps[0].layers)} layers"
                              f"{', x 2 with hit_counts' if steps[0].hit_counts else ''}); set model.energy_dims={want}")

    def losses(self, batch, step: int):
        x = batch.x.reshape(len(batch.x), -1)
        if not self.energy_dims:
            return {"flow": flow_matching_loss(self.flow, x, batch.cond, self.rng)}, {}
        f, g = x[:, :self.energy_dims], x[:, self.energy_dims:]
        return {"energy": flow_matching_loss(self.energy, f, batch.cond, self.rng),
                "shape": flow_matching_loss(self.shape, g, torch.cat([batch.cond, f], 1), self.rng)}, {}

    def sampler(self) -> nn.Module:
        return FlowSampler(self)


class Reflow(CFM):
    """Few-step student of a trained CFM (reflow / rectified-flow distillation).

    ``teacher``: a run id, checkpoint or run directory of a ``CFM`` run (or a CFM object). The student
    gets the teacher's architecture and (EMA) weights, then regresses the straight path from noise z to
    the teacher's sample x(z) at the batch's conditions: L = E |v(x_t, t, c) - (x(z) - z)|^2. Both stages
    are distilled; the shape stage sees the teacher's generated energy features, as at sampling. The
    data config must be the teacher's (the conditions are checked at the first step). The checkpoint's
    spec is the teacher's CFM with this model's ``steps``/``solver``: generation does not need the teacher.
    """

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, teacher: Any, teacher_sampler: dict | None = None,
                 tracking_uri: str | None = None, steps: int = 1, solver: str = "euler", rho: float = 1.0,
                 ema: dict[str, float] | None = None):
        import copy

        if isinstance(teacher, CFM):
            t_model, t_cfg, t_transform = teacher, None, None
        else:
            from caloexp import sampling
            from caloexp.errors import InputError

            try:
                gen, spec = sampling.load(str(teacher), tracking_uri)
            except InputError as exc:
                raise ConfigError(f"model.teacher: {exc}") from None
            t_model, t_cfg, t_transform = gen.sampler.model, dict(spec["model"]), gen.transform
            if not isinstance(t_model, CFM) or tuple(spec["data_shape"]) != tuple(data_shape) or \
                    int(spec["cond_dim"]) != int(cond_dim):
                raise ConfigError(f"model.teacher={teacher}: a {type(t_model).__name__} for data {spec['data_shape']} "
                                  f"with {spec['cond_dim']} condition inputs; this data is {list(data_shape)} with "
                                  f"{cond_dim} (distil a CFM with the teacher's data config)")
        nets = {"energy": getattr(t_model, "energy", None), "shape": getattr(t_model, "shape", None),
                "flow": getattr(t_model, "flow", None)}
        shape_net = nets["shape"] if t_model.energy_dims else nets["flow"]
        super().__init__(data_shape, cond_dim, net=lambda **_: copy.deepcopy(shape_net),
                         energy_net=(lambda **_: copy.deepcopy(nets["energy"])) if t_model.energy_dims else None,
                         energy_dims=t_model.energy_dims, steps=steps, solver=solver, rho=rho, ema=ema)
        t_model = copy.deepcopy(t_model).eval().requires_grad_(False)
        self.__dict__["teacher"] = t_model            # not a submodule: never saved, never optimised
        self.__dict__["teacher_transform"] = t_transform
        self.teacher_sampler = {"steps": t_model.steps, "solver": t_model.solver, "rho": t_model.rho,
                                **(teacher_sampler or {})}
        self._teacher_cfg = t_cfg

    def spec_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if self._teacher_cfg is None:
            raise ConfigError("model.teacher: give a run id, checkpoint or run directory to store a rebuildable spec")
        return {**self._teacher_cfg, "steps": self.steps, "solver": self.solver, "rho": self.rho, "ema": dict(self.ema)}

    def prepare(self, data) -> None:
        """The student's samples are decoded by this data's transform: its steps must be the teacher's."""
        super().prepare(data)
        tt = self.teacher_transform
        if tt is None:
            return
        theirs, ours = tt.spec()["steps"], data.transform.spec()["steps"]
        if len(theirs) != len(ours):
            raise ConfigError(f"model.teacher: the teacher's transform has {len(theirs)} steps, this data's "
                              f"{len(ours)} (distil with the teacher's data config)")
        for i, (t, d) in enumerate(zip(theirs, ours)):
            if t != d:
                diff = {k: (t.get(k), d.get(k)) for k in sorted(set(t) | set(d)) if t.get(k) != d.get(k)}
                raise ConfigError(f"model.teacher: data.transform.steps[{i}] differs from the teacher's "
                                  f"(setting: (teacher, here) {diff}); distil with the teacher's data config")

    def _check_conditions(self, batch) -> None:
        """The teacher must see the conditions encoded as it was trained (same data config)."""
        tt, self.__dict__["teacher_transform"] = self.teacher_transform, None
        if tt is None or not batch.raw:
            return
        want = tt.to(batch.cond.device).condition(batch.raw).to(batch.cond.dtype)
        if want.shape != batch.cond.shape or not torch.allclose(want, batch.cond, atol=1e-5):
            raise ConfigError("model.teacher: this data encodes its conditions differently from the teacher's run "
                              "(distil with the teacher's data config)")

    def losses(self, batch, step: int):
        self._check_conditions(batch)
        t = self.teacher.to(batch.cond.device)
        n, L, c = len(batch.cond), self.energy_dims, batch.cond
        opts = dict(self.teacher_sampler)
        steps, solver = int(opts.pop("steps")), str(opts.pop("solver"))

        def pair(net: nn.Module, teacher_net: nn.Module, d: int, cond: torch.Tensor):
            z = torch.randn(n, d, generator=self.rng, device=c.device, dtype=c.dtype)
            x = integrate(teacher_net, z, cond, steps, solver, **opts)
            return flow_matching_loss(net, x, cond, self.rng, z=z), x

        if not L:
            return {"flow": pair(self.flow, t.flow, self.data_dim, c)[0]}, {}
        loss_e, f = pair(self.energy, t.energy, L, c)
        loss_s, _ = pair(self.shape, t.shape, self.data_dim - L, torch.cat([c, f], 1))
        return {"energy": loss_e, "shape": loss_s}, {}
