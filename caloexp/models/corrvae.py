"""CorrVAE: a conditional VAE whose property latent ``w`` gives control over properties of the output.

After Wang et al., "Multi-objective Deep Data Generation with Correlated Property Control"
(arXiv:2210.01796), as adapted to ALICE ZDC responses (karolrogozinski/cern_alice_fast_sim_corrvae).
Network images are ``v = log(1 + counts)`` (the ``zdc`` data preset); the properties ``y`` (P of
:data:`caloexp.data.zdc.PROPERTIES`) are computed from ``v`` and min/max-scaled onto [0, 1] with the
training split's range (buffers ``prop_lo``/``prop_hi``, fitted in :meth:`CorrVAE.prepare`).

* encoder q(z, w | v): convs -> MLP -> means and log-variances of ``z`` (free) and ``w`` (property latent);
* condition encoder q(c | particle): a spectrally normalised MLP (as the seed);
* decoder: (z, w, c) -> MLP -> transposed convs -> ``v``; (c) -> the condition vector (SN MLP);
* property heads: a learnable binary mask M (P x W) links property k to the ``w`` dimensions it may use,
  sampled with the straight-through Gumbel-softmax (temperature ``tau``) from logits ``mask_logits``
  (P, W, 2); y_k = a_k + sigmoid(h_k(a_k)) with a_k = g_k(w * M_k) and h_k spectrally normalised
  (the seed's invertible residual head).

Loss per event (batch mean; weights ``weights.<name>``)::

    rec   * sum_pixels (v_hat - v)^2 + cond * sum (c_hat - c)^2 + prop * sum_k (y_hat_k - y_k)^2
  + kl    * [KL(q(z)||N) + KL(q(w)||N) + KL(q(c)||N)]
  + tc    * TC(w)  = E[log q(w) - sum_j log q(w_j)]          (pairwise; minibatch-stratified sampling)
  + group * [E log q(z, w) - log q(z) q(w)] + [E log q(c, w) - log q(c) q(w)]   (groupwise)
  + mask_l1 * mean_kj P(M_kj = 1)                             (sparsity of the mask)
  + mask_corr * mean_{k<l} (cos(P(M_k), P(M_l)) - |rho_kl|)^2  (correlated properties share w dims)

Generation with control: ``sample(cond, targets={com_x: 10, com_y: 30})`` (property units; ``scaled:
true`` for [0, 1]) finds, per event, the ``w`` whose predicted properties hit the targets (Adam on
``sum_k (y_hat_k(w) - t_k)^2 + prior * |w|^2 / 2``, ``steps`` steps from a prior draw) and decodes it;
:meth:`ControlSampler.report` measures the properties actually achieved.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from caloexp.data import zdc
from caloexp.errors import ConfigError
from caloexp.models.base import GenerativeModel

LOSS_TERMS = ("rec", "cond", "prop", "kl", "tc", "group", "mask_l1", "mask_corr")
DEFAULT_WEIGHTS = {"rec": 1.0, "cond": 1.0, "prop": 100.0, "kl": 1.0, "tc": 1.0, "group": 1.0, "mask_l1": 1.0,
                   "mask_corr": 1.0}
LOG2PI = math.log(2 * math.pi)


def _mlp(sizes: Sequence[int], sn: bool = False, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        layers.append(spectral_norm(lin) if sn else lin)
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ losses
def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per event, summed over dimensions."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)


def log_density(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar))


def _pair_logq(sample: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B, B, D): log q(sample_i | event j) per dimension."""
    return log_density(sample[:, None], mu[None], logvar[None])


def log_importance_weights(b: int, n_data: float, device=None) -> torch.Tensor:
    """(B, B) log weights of minibatch-stratified sampling (Chen et al. 2018): the event itself 1/N, one
    other (the next) (N - M)/(N M), the rest 1/M with M = B - 1; each row sums to exactly 1."""
    n = max(float(n_data), float(b))
    m = b - 1
    w = torch.full((b, b), 1.0 / m, dtype=torch.float64, device=device)
    i = torch.arange(b, device=device)
    w[i, i] = 1.0 / n
    w[i, (i + 1) % b] = (n - m) / (n * m)
    return w.log()


def total_correlation(sample: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, n_data: float) -> torch.Tensor:
    """E[log q(w) - sum_j log q(w_j)] (minibatch-stratified sampling), batch mean; 0 for a factorised q."""
    lw = log_importance_weights(len(sample), n_data, sample.device).to(sample.dtype)[:, :, None]
    mat = _pair_logq(sample, mu, logvar) + lw
    return (torch.logsumexp(mat.sum(2) - (mat.shape[2] - 1) * lw[:, :, 0], 1)
            - torch.logsumexp(mat, 1).sum(1)).mean()


def group_correlation(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], n_data: float) -> torch.Tensor:
    """E[log q(a, b) - log q(a) - log q(b)] for two groups of latents (sample, mu, logvar), batch mean."""
    lw = log_importance_weights(len(a[0]), n_data, a[0].device).to(a[0].dtype)
    ma, mb = _pair_logq(*a).sum(2), _pair_logq(*b).sum(2)
    return (torch.logsumexp(ma + mb + lw, 1) - torch.logsumexp(ma + lw, 1) - torch.logsumexp(mb + lw, 1)).mean()


def mask_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(M_kj = 1) from logits (P, W, 2)."""
    return torch.softmax(logits, -1)[..., 1]


def gumbel_mask(logits: torch.Tensor, tau: float, rng: torch.Generator | None) -> torch.Tensor:
    """A hard 0/1 mask (P, W) with straight-through Gumbel-softmax gradients (noise from ``rng``)."""
    u = torch.rand(logits.shape, generator=rng, device=logits.device, dtype=logits.dtype).clamp(1e-10, 1 - 1e-7)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, -1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 1]


def mask_sparsity(probs: torch.Tensor) -> torch.Tensor:
    return probs.mean()


def mask_correlation(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over property pairs of (cosine overlap of their mask rows - |Pearson rho| of the properties)^2."""
    k = probs.shape[0]
    if k < 2:
        return probs.sum() * 0
    pn = probs / probs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    overlap = pn @ pn.T
    yc = y - y.mean(0)
    sd = yc.pow(2).mean(0).sqrt()
    rho = (yc.T @ yc) / len(y) / (sd[:, None] * sd[None]).clamp_min(1e-8)
    rho = torch.where((sd[:, None] > 1e-8) & (sd[None] > 1e-8), rho, torch.zeros_like(rho))
    iu = torch.triu_indices(k, k, 1, device=probs.device)
    return ((overlap - rho.abs().detach()) ** 2)[iu[0], iu[1]].mean()


# ------------------------------------------------------------------ nets
class Encoder(nn.Module):
    """Image (1, H, W) -> convs (stride 2, 2, 3 as the seed) -> MLP -> (mu, logvar) of [z, w]."""

    def __init__(self, shape: tuple[int, ...], out: int, channels: int, hidden: int):
        super().__init__()
        c = shape[0]
        self.convs = nn.Sequential(nn.Conv2d(c, channels, 4, 2, 1), nn.LeakyReLU(0.1),
                                   nn.Conv2d(channels, channels, 4, 2, 1), nn.LeakyReLU(0.1),
                                   nn.Conv2d(channels, channels, 4, 3, 1), nn.LeakyReLU(0.1))
        with torch.no_grad():
            self.grid = tuple(self.convs(torch.zeros(1, *shape)).shape[1:])
        self.mlp = _mlp([math.prod(self.grid), hidden, hidden, 2 * out])

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp(self.convs(v).reshape(len(v), -1)).chunk(2, 1)


class Decoder(nn.Module):
    """(z, w, c) -> MLP -> (channels, grid) -> transposed convs (stride 3, 2, 2) -> image."""

    def __init__(self, shape: tuple[int, ...], latent: int, grid: tuple[int, ...], channels: int, hidden: int):
        super().__init__()
        self.shape, self.grid = tuple(shape), grid
        self.mlp = _mlp([latent, hidden, hidden, math.prod(grid)], last_act=True)
        self.convs = nn.Sequential(nn.ConvTranspose2d(channels, channels, 4, 3, 1), nn.LeakyReLU(0.1),
                                   nn.ConvTranspose2d(channels, channels, 4, 2, 1), nn.LeakyReLU(0.1),
                                   nn.ConvTranspose2d(channels, shape[0], 4, 2, 1), nn.LeakyReLU(0.1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.convs(self.mlp(h).reshape(len(h), *self.grid))
        if tuple(y.shape[1:]) != self.shape:
            y = F.interpolate(y, size=self.shape[1:], mode="bilinear", align_corners=False)
        return y


class PropertyHeads(nn.Module):
    """y_k = a_k + sigmoid(h_k(a_k)), a_k = g_k(w * M_k): one small head per property."""

    def __init__(self, n_props: int, w_dim: int, width: int = 16):
        super().__init__()
        self.g = nn.ModuleList([_mlp([w_dim, width, 1]) for _ in range(n_props)])
        self.h = nn.ModuleList([_mlp([1, width, 1], sn=True) for _ in range(n_props)])

    def forward(self, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = []
        for k, (g, h) in enumerate(zip(self.g, self.h)):
            a = g(w * mask[k])
            out.append(a + torch.sigmoid(h(a)))
        return torch.cat(out, 1)


class CorrVAENet(nn.Module):
    """All of the CorrVAE's weights (one optimiser role, ``vae``)."""

    def __init__(self, shape, cond_dim, z_dim, w_dim, c_dim, n_props, channels, hidden, cond_hidden):
        super().__init__()
        self.encoder = Encoder(shape, z_dim + w_dim, channels, hidden)
        self.cond_encoder = _mlp([max(cond_dim, 1), cond_hidden, cond_hidden, 2 * c_dim], sn=True)
        self.decoder = Decoder(shape, z_dim + w_dim + c_dim, self.encoder.grid, channels, hidden)
        self.cond_decoder = _mlp([c_dim, cond_hidden, max(cond_dim, 1)], sn=True)
        self.props = PropertyHeads(n_props, w_dim)
        self.mask_logits = nn.Parameter(torch.randn(n_props, w_dim, 2))


# ------------------------------------------------------------------ model
class CorrVAE(GenerativeModel):
    roles = ("vae",)

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int, latent_dim: int = 16, prop_latent_dim: int = 9,
                 cond_latent_dim: int = 8, properties: Sequence[str] | None = None, channels: int = 32,
                 hidden: int = 256, cond_hidden: int = 64, tau: float = 0.5,
                 weights: Mapping[str, float] | None = None, target_steps: int = 200, target_lr: float = 0.05,
                 target_prior: float = 0.01, ema: dict[str, float] | None = None):
        super().__init__(data_shape, cond_dim, ema)
        if len(self.data_shape) != 3 or self.data_shape[0] != 1:
            raise ConfigError(f"model=corrvae needs single-channel images (1, H, W); the data has {self.data_shape}")
        if min(latent_dim, prop_latent_dim, cond_latent_dim, channels, hidden, cond_hidden) < 1:
            raise ConfigError("model=corrvae: latent sizes, channels and widths must be >= 1")
        if not tau > 0:
            raise ConfigError(f"model.tau={tau}: must be > 0")
        self.prop_names = list(properties) if properties else list(zdc.PROPERTIES)
        unknown = [p for p in self.prop_names if p not in zdc.PROPERTIES]
        if unknown or not self.prop_names:
            raise ConfigError(f"model.properties: unknown {unknown}; choose from {list(zdc.PROPERTIES)}")
        bad = sorted(set(weights or {}) - set(LOSS_TERMS))
        if bad:
            raise ConfigError(f"model.weights: unknown term(s) {bad}; the terms are {list(LOSS_TERMS)}")
        self.weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in (weights or {}).items()}}
        self.z_dim, self.w_dim, self.c_dim = int(latent_dim), int(prop_latent_dim), int(cond_latent_dim)
        self.tau = float(tau)
        self.target_steps, self.target_lr, self.target_prior = int(target_steps), float(target_lr), float(target_prior)
        self.prop_index = [zdc.PROPERTIES.index(p) for p in self.prop_names]
        self.vae = CorrVAENet(self.data_shape, self.cond_dim, self.z_dim, self.w_dim, self.c_dim,
                              len(self.prop_names), int(channels), int(hidden), int(cond_hidden))
        self.register_buffer("prop_lo", torch.zeros(len(self.prop_names)))
        self.register_buffer("prop_hi", torch.ones(len(self.prop_names)))
        self.register_buffer("n_train", torch.tensor(1.0))

    # -------------------------------------------------------------- data
    def prepare(self, data) -> None:
        """The properties' [0, 1] scaling from the training split (network images must be log(1 + counts))."""
        steps = data.transform.spec()["steps"]
        if steps != [{"step": "log", "eps": 1.0}]:
            raise ConfigError(f"model=corrvae computes the properties on log(1 + counts): set data.transform.steps="
                              f"[{{step: log, eps: 1.0}}] (got {steps})")
        props = torch.cat([self.raw_properties(b.x) for b in data.train_batches(0, 0, seed=0)])
        scale = zdc.PropertyScaling.fit(props)
        self.prop_lo.copy_(scale.lo)
        self.prop_hi.copy_(scale.hi)
        self.n_train.fill_(float(len(data.train_rows)))

    def raw_properties(self, v: torch.Tensor) -> torch.Tensor:
        """Properties (N, P) in their own units of network images v = log(1 + counts)."""
        return zdc.properties(v.detach())[:, self.prop_index].to(v.dtype)

    def scale(self, p: torch.Tensor) -> torch.Tensor:
        return (p - self.prop_lo) / (self.prop_hi - self.prop_lo)

    def unscale(self, s: torch.Tensor) -> torch.Tensor:
        return s * (self.prop_hi - self.prop_lo) + self.prop_lo

    # ---------------------------------------------------------- forward
    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.rng, device=like.device, dtype=like.dtype)

    def encode_cond(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = cond if cond.shape[1] else torch.zeros(len(cond), 1, device=cond.device, dtype=cond.dtype)
        return self.vae.cond_encoder(c).chunk(2, 1)

    def decode(self, z: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.vae.decoder(torch.cat([z, w, c], 1))

    def losses(self, batch, step: int):
        v, cond = batch.x, batch.cond
        y = self.scale(self.raw_properties(v))
        mu, logvar = self.vae.encoder(v)
        mu_c, logvar_c = self.encode_cond(cond)
        zw = mu + (0.5 * logvar).exp() * self._noise(mu)
        c = mu_c + (0.5 * logvar_c).exp() * self._noise(mu_c)
        z, w = zw[:, :self.z_dim], zw[:, self.z_dim:]
        mask = gumbel_mask(self.vae.mask_logits, self.tau, self.rng)
        v_hat = self.decode(z, w, c)
        y_hat = self.vae.props(w, mask)
        c_target = cond if cond.shape[1] else torch.zeros(len(cond), 1, device=cond.device, dtype=cond.dtype)
        probs = mask_probabilities(self.vae.mask_logits)
        n = float(self.n_train)
        zs = (z, mu[:, :self.z_dim], logvar[:, :self.z_dim])
        ws = (w, mu[:, self.z_dim:], logvar[:, self.z_dim:])
        terms = {
            "rec": ((v_hat - v) ** 2).reshape(len(v), -1).sum(1).mean(),
            "cond": ((self.vae.cond_decoder(c) - c_target) ** 2).sum(1).mean(),
            "prop": ((y_hat - y) ** 2).sum(1).mean(),
            "kl": (kl_normal(mu, logvar) + kl_normal(mu_c, logvar_c)).mean(),
            "tc": total_correlation(*ws, n),
            "group": group_correlation(zs, ws, n) + group_correlation((c, mu_c, logvar_c), ws, n),
            "mask_l1": mask_sparsity(probs),
            "mask_corr": mask_correlation(probs, y),
        }
        loss = sum(self.weights[k] * t for k, t in terms.items())
        return {"vae": loss}, {f"corrvae/{k}": t.detach() for k, t in terms.items()}

    # ---------------------------------------------------------- sampling
    def mask(self) -> torch.Tensor:
        """The most probable mask (P, W) (used for generation)."""
        return (mask_probabilities(self.vae.mask_logits) > 0.5).to(self.vae.mask_logits.dtype)

    def sampler(self) -> nn.Module:
        return ControlSampler(self)


class ControlSampler(nn.Module):
    """Conditions (+ optional property targets) -> network-space images."""

    def __init__(self, model: CorrVAE):
        super().__init__()
        self.model = model

    def targets_scaled(self, targets: Mapping[str, Any], scaled: bool) -> dict[int, float]:
        m = self.model
        bad = [k for k in targets if k not in m.prop_names]
        if bad:
            raise ConfigError(f"sampler targets: unknown propert(y/ies) {bad}; this model controls {m.prop_names}")
        out = {}
        for k, val in targets.items():
            try:
                val = float(val)
            except (TypeError, ValueError):
                raise ConfigError(f"sampler targets.{k}={val!r}: must be a number") from None
            i = m.prop_names.index(k)
            out[i] = val if scaled else float((val - m.prop_lo[i]) / (m.prop_hi[i] - m.prop_lo[i]))
        return out

    def find_w(self, w0: torch.Tensor, targets: Mapping[int, float], steps: int, lr: float, prior: float) -> torch.Tensor:
        """Per event, the w whose predicted properties match ``targets`` (index -> scaled value)."""
        m = self.model
        idx = torch.tensor(list(targets), device=w0.device)
        t = torch.tensor(list(targets.values()), device=w0.device, dtype=w0.dtype)
        mask = m.mask()
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        with torch.enable_grad():
            for _ in range(int(steps)):
                err = ((m.vae.props(w, mask)[:, idx] - t) ** 2).sum(1)
                (w.grad,) = torch.autograd.grad(err.sum() + prior * 0.5 * (w ** 2).sum(), w)  # w only
                opt.step()
        return w.detach()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, rng: torch.Generator | None = None, targets: Mapping[str, Any] | None = None,
               scaled: bool = False, steps: int | None = None, lr: float | None = None,
               prior: float | None = None, w: Sequence[float] | None = None) -> torch.Tensor:
        m = self.model
        n = len(cond)

        def noise(d: int) -> torch.Tensor:
            return torch.randn(n, d, generator=rng, device=cond.device, dtype=cond.dtype)

        z, w0, eps_c = noise(m.z_dim), noise(m.w_dim), noise(m.c_dim)
        mu_c, logvar_c = m.encode_cond(cond)
        c = mu_c + (0.5 * logvar_c).exp() * eps_c
        if w is not None:  # a fixed property latent (latent traversals)
            w0 = torch.as_tensor(np.asarray(w, np.float32), device=cond.device).reshape(-1, m.w_dim).expand(n, -1)
        if targets:
            w0 = self.find_w(w0, self.targets_scaled(targets, scaled), steps or m.target_steps, lr or m.target_lr,
                             m.target_prior if prior is None else prior)
        return m.decode(z, w0, c)

    @torch.no_grad()
    def traverse(self, cond: torch.Tensor, values: Sequence[float], rng: torch.Generator | None = None) -> torch.Tensor:
        """Latent traversals for one event's condition (1, cond_dim): network images (W, K, *shape) where row j
        sets ``w_j`` to each of the K ``values`` (other w dims 0) with one draw of z and of the condition latent."""
        m = self.model
        z = torch.randn(1, m.z_dim, generator=rng, device=cond.device, dtype=cond.dtype)
        mu_c, logvar_c = m.encode_cond(cond[:1])
        c = mu_c + (0.5 * logvar_c).exp() * torch.randn(1, m.c_dim, generator=rng, device=cond.device, dtype=cond.dtype)
        vals = torch.as_tensor(list(values), dtype=cond.dtype, device=cond.device)
        w = torch.zeros(m.w_dim, len(vals), m.w_dim, dtype=cond.dtype, device=cond.device)
        idx = torch.arange(m.w_dim, device=cond.device)
        w[idx, :, idx] = vals
        n = m.w_dim * len(vals)
        x = m.decode(z.expand(n, -1), w.reshape(n, -1), c.expand(n, -1))
        return x.reshape(m.w_dim, len(vals), *m.data_shape)

    def report(self, sample, targets: Mapping[str, Any] | None = None, scaled: bool = False,
               **_: Any) -> dict[str, float]:
        """Requested vs achieved properties of the generated events (their photon counts)."""
        if not targets:
            return {}
        from caloexp.metrics.zdc import control_error

        m = self.model
        lo, hi = m.prop_lo.double().cpu().numpy(), m.prop_hi.double().cpu().numpy()
        want = {}
        for i, s in self.targets_scaled(targets, scaled).items():
            name = m.prop_names[i]
            want[name] = float(targets[name]) if not scaled else float(s * (hi[i] - lo[i]) + lo[i])
        full_lo, full_hi = np.zeros(len(zdc.PROPERTIES)), np.ones(len(zdc.PROPERTIES))
        full_lo[m.prop_index], full_hi[m.prop_index] = lo, hi
        out = control_error(sample.x, want, full_lo, full_hi)
        out.update({f"control/{k}/requested": v for k, v in want.items()})
        return out
