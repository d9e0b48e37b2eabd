"""3DGAN (Khattak et al., EPJC 82 (2022) 386; svalleco/3Dgan ``Anglegan``): an auxiliary-classifier GAN on 3D grids.

Generator: latent noise with the (energy, angle) condition vector -> a dense layer -> a coarse 3D
grid -> x2 stages (nearest upsampling + 3D conv as the original, or transposed 3D convs) -> ReLU
cells, centre-cropped to the event shape. With ``total_head`` (not in the original) a small MLP on the
same (condition, latent) input sets each shower's total in data units (sum / E with the default
transform) and the convs only shape it (:func:`rescale_total`): the ECAL-sum term then trains that
head, the adversarial loss the shape. Without it the sum was a side effect of every cell and in a
short run drifted 20-55 % low while the discriminator won.
Discriminator: strided 3D convolutions -> one linear layer with two outputs: the real/fake logit
and the primary-energy regression (the auxiliary head, ``n_aux = 1``). As in the original, the
other auxiliary quantities are *computed from the image* inside the discriminator, in physical
units (network cells undone: (x / scale)^(1 / power)):

* the measured incident angle (energy-weighted slope of the per-layer barycentre in y against the
  layer index, weighted by depth), compared with the requested angle (mean absolute error, rad);
* the ECAL sum, compared with the sum of the real shower of the same conditions (MAPE, %);
* (not in the original; weight 0 unless set) the longitudinal profile: the percent of the shower's
  energy in the wrong layer against the real shower of the same conditions
  (:func:`longitudinal_mismatch`);
* the counts of cells in 8 bins of cell energy (limits 0.05, 0.03, 0.02, 0.0125, 0.008, 0.003 GeV,
  > 0, = 0, applied to cells^power as the original), compared with the real shower's (MAPE, %). As in
  the original the counts are hard, so the term is monitored but gives no gradient;
  ``count_softness > 0`` smooths the bin edges with linear ramps so that it trains.

Losses with the original weights (``loss_weights``: real/fake 3, energy 0.1, angle 25, ECAL sum 0.1,
bin counts 0.1) and units (Keras' MAPE is in percent; energy targets E / 100 GeV). The discriminator
minimises 3 x BCE on real and generated showers (labels flipped with probability ``label_flip``,
the original's BitFlip) plus the energy regression on both; the generator minimises 3 x BCE(D(G), 1)
plus the auxiliary terms, ``generator_steps`` times per discriminator update (the original: 2;
default 1). Every term is logged (``aux/<term>/real|fake``).

``energy_fraction``, ``power`` and ``scale`` must be the data transform's (an ``energy_fraction`` step,
the ``power`` step's p, the ``scale`` factor): they undo it to get GeV cells. The default transform
divides by the primary energy first (the original fed E / 100 to a generator whose output had to
carry the energy scale itself; with cells as energy fractions the ECAL-sum term starts near its
target at every energy and a short run learns it).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from caloexp.errors import ConfigError
from caloexp.metrics.grid import measured_angle
from caloexp.models.base import AdversarialModel, Batch
from caloexp.models.nets import make_activation, mean_total, rescale_total, total_head as total_head_mlp

#: The original bin-count limits (GeV cells, before the power transform).
COUNT_LIMITS = (0.05, 0.03, 0.02, 0.0125, 0.008, 0.003)
#: The original's weights, plus ``profile`` (not in the original; 0 here, the config sets it).
LOSS_WEIGHTS = {"gan": 3.0, "energy": 0.1, "angle": 25.0, "ecal": 0.1, "counts": 0.1, "profile": 0.0}


def _grid_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ConfigError(f"gan3d needs 3D grid events (x, y, layer); got event shape {shape}")
    return shape  # type: ignore[return-value]


class Gan3DGenerator(nn.Module):
    """(latent, condition) -> dense -> (channels[0], coarse grid) -> transposed convs x2 -> (X, Y, Z) cells >= 0.

    ``total_head`` > 0: hidden units of the head that sets each event's total in data units (module doc);
    ``power``/``scale`` are the data's (Gan3D passes its own).
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: Sequence[int], cond_dim: int = 0,
                 channels: Sequence[int] = (16, 8, 4), kernels: Sequence[int] = (3, 3, 3),
                 activation: str = "leaky_relu", norm: bool = True, out_activation: str = "relu",
                 out_bias: float = -1.0, width: float = 1.0, total_head: int = 0,
                 power: float = 1.0, scale: float = 1.0):
        super().__init__()
        if total_head < 0:
            raise ConfigError(f"model.generator.total_head={total_head}: hidden units of the total head (0: off)")
        if not power > 0 or not scale > 0:
            raise ConfigError(f"gan3d generator: power={power}, scale={scale}: need power > 0 and scale > 0")
        self.size = _grid_shape(out_shape)
        chans = [max(1, round(float(c) * width)) for c in channels]  # width: one number for sweeps
        kernels = [int(k) for k in kernels]
        if not chans or min(chans) < 1:
            raise ConfigError(f"model.generator.channels={list(channels)}: need at least one channel count >= 1")
        if len(kernels) != len(chans) or any(k not in (2, 3, 4) for k in kernels):
            raise ConfigError(f"model.generator.kernels={kernels}: one kernel (2, 3 or 4) per entry of channels")
        k = len(chans)
        self.base = tuple(math.ceil(s / 2 ** k) for s in self.size)
        n_in = (int(in_shape) if isinstance(in_shape, int) else math.prod(in_shape)) + int(cond_dim)
        self.fc = nn.Linear(n_in, chans[0] * math.prod(self.base))
        layers: list[nn.Module] = [nn.BatchNorm3d(chans[0]) if norm else nn.Identity(), make_activation(activation)]
        for c_in, c_out, kern in zip(chans, chans[1:] + [1], kernels):  # each doubles the grid
            if kern == 3:  # nearest x2 then a 3^3 conv (as the original): no phase-dependent (periodic) artefacts
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(c_in, c_out, 3, padding=1)]
            else:          # transposed conv, kernel 2 or 4
                layers.append(nn.ConvTranspose3d(c_in, c_out, kern, stride=2, padding=(kern - 2) // 2))
            if c_out != 1:
                layers += [nn.BatchNorm3d(c_out) if norm else nn.Identity(), make_activation(activation)]
        # a negative initial bias: at the start only a few percent of the cells are on (a shower's
        # occupancy), not half of them, so the first sums are of the data's order, not 100x larger
        nn.init.constant_(layers[-1].bias, float(out_bias))
        layers.append(make_activation(out_activation))
        self.body = nn.Sequential(*layers)
        self.chans0 = chans[0]
        self.power, self.scale = float(power), float(scale)
        self.total = None
        if total_head:
            # the event's total in data units from (condition, latent): log(total / total0); zero-initialised,
            # so the first showers have the training data's mean total (``total0``, set by Gan3D.prepare)
            self.total = total_head_mlp(n_in, total_head, activation)
            self.register_buffer("total0", torch.ones(()))

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = z.reshape(len(z), -1)
        if cond is not None and cond.shape[1]:
            h = torch.cat([cond.to(h.dtype), h], dim=1)  # the original's (E, angle, noise) input
        y = self.body(self.fc(h).reshape(len(z), self.chans0, *self.base))[:, 0]
        lo = [(g - s) // 2 for g, s in zip(y.shape[1:], self.size)]
        y = y[:, lo[0]:lo[0] + self.size[0], lo[1]:lo[1] + self.size[1], lo[2]:lo[2] + self.size[2]]
        if self.total is None:
            return y
        return rescale_total(y, self.total0 * torch.exp(self.total(h)[:, 0]), self.power, self.scale)


class Gan3DDiscriminator(nn.Module):
    """(X, Y, Z) cells -> strided 3D convs -> linear -> (real/fake logit, auxiliary regressions)."""

    def __init__(self, in_shape: Sequence[int], out_shape: int | Sequence[int], cond_dim: int = 0,
                 channels: Sequence[int] = (4, 8, 16), kernels: Sequence[int] = (4, 4, 4),
                 activation: str = "leaky_relu", dropout: float = 0.2, use_condition: bool = False,
                 width: float = 1.0):
        super().__init__()
        channels = [max(1, round(float(c) * width)) for c in channels]  # width: one number for sweeps
        size = _grid_shape(in_shape)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.critic.dropout={dropout}: must be in [0, 1)")
        if len(kernels) != len(channels) or any(int(k) not in (2, 4) for k in kernels):
            raise ConfigError(f"model.critic.kernels={list(kernels)}: one kernel (2 or 4) per entry of channels")
        # zero-pad each axis at its end to a multiple of 2^len(channels): every cell (e.g. the 25th layer,
        # the 51st column) reaches the heads; a strided conv would otherwise drop the odd last one
        k = 2 ** len(channels)
        padded = tuple(-(-s // k) * k for s in size)
        self.pad = tuple(p for s, q in zip(reversed(size), reversed(padded)) for p in (0, q - s))
        size = padded
        layers: list[nn.Module] = []
        c_in = 1
        for c, kern in zip(channels, kernels):  # each halves the grid
            layers += [nn.Conv3d(c_in, int(c), int(kern), stride=2, padding=(int(kern) - 2) // 2),
                       make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            c_in = int(c)
            size = tuple(s // 2 for s in size)
        self.body = nn.Sequential(*layers)
        self.use_condition = bool(use_condition)  # the original discriminator sees the image only
        n_out = int(out_shape) if isinstance(out_shape, int) else math.prod(out_shape)
        self.head = nn.Linear(c_in * math.prod(size) + (int(cond_dim) if use_condition else 0), n_out)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(F.pad(x.unsqueeze(1), self.pad)).reshape(len(x), -1)
        if self.use_condition and cond is not None and cond.shape[1]:
            h = torch.cat([h, cond.to(h.dtype)], dim=1)
        return self.head(h)


def soft_counts(x: torch.Tensor, limits: torch.Tensor, softness: float) -> torch.Tensor:
    """Per event, the (smoothed) number of cells in the 8 bins > l1, (l2, l1], ..., (0, l6], = 0 of network cells.

    ``limits`` descending (network units); a cell counts as above l by a linear ramp from 0 at
    l (1 - softness) to 1 at l (1 + softness) (a hard count when softness is 0: no gradient).
    """
    flat = x.reshape(len(x), -1)
    edges = torch.cat([limits, limits[-1:] * 1e-2])               # the last edge separates > 0 from = 0
    lo = float(edges[-1]) * (1.0 - softness)
    rows, cols = torch.nonzero(flat > lo, as_tuple=True)          # cells below every ramp count nowhere
    v = flat[rows, cols][:, None]
    if softness > 0:
        ramp = ((v - edges[None]) / (2 * softness * edges[None]) + 0.5).clamp(0.0, 1.0)
    else:
        ramp = (v > edges[None]).to(x.dtype)
    above = torch.zeros(len(x), len(edges), dtype=x.dtype, device=x.device).index_add(0, rows, ramp)
    n = float(flat.shape[1])
    return torch.cat([above[:, :1], above[:, 1:] - above[:, :-1], n - above[:, -1:]], dim=1)


def longitudinal_mismatch(cells: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Percent of the energy in the wrong layer: 50 x sum_z |f_z - f_z^real| of the per-layer energy fractions
    f_z of each event (N, X, Y, Z) against the real shower of the same conditions, averaged over events."""
    def fractions(c: torch.Tensor) -> torch.Tensor:
        per_layer = c.sum(dim=(1, 2))
        return per_layer / per_layer.sum(dim=1, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)
    return 50.0 * (fractions(cells) - fractions(real)).abs().sum(dim=1).mean()


def mape(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keras' mean absolute percentage error (percent; denominators at least 1e-7 as in Keras)."""
    return 100.0 * ((pred - target).abs() / target.abs().clamp_min(1e-7)).mean()


class Gan3D(AdversarialModel):
    """The 3DGAN training objective on :class:`Gan3DGenerator` / :class:`Gan3DDiscriminator` (module doc)."""

    def __init__(self, *args, power: float = 0.85, scale: float = 1.0, energy_fraction: bool = False,
                 energy_scale: float = 100.0, loss_weights: dict | None = None, label_flip: float = 0.05,
                 count_limits: Sequence[float] = COUNT_LIMITS, count_softness: float = 0.0,
                 energy_key: str = "energy", angle_key: str = "theta", **kwargs):
        kwargs.setdefault("n_aux", 1)
        shape = tuple(args[0] if args else kwargs.get("data_shape", ()))
        if len(shape) != 3:
            raise ConfigError(f"model=gan3d needs 3D grid data (x, y, layer); the data has shape {shape}")
        if not power > 0 or not scale > 0 or not math.isfinite(scale):
            raise ConfigError(f"model.power={power}, model.scale={scale}: need power > 0 and a finite scale > 0")
        # the generator's total head rescales in data units: it undoes the same power/scale steps
        args = list(args)
        if len(args) > 2:
            args[2] = functools.partial(args[2], power=float(power), scale=float(scale))
        else:
            kwargs["generator"] = functools.partial(kwargs["generator"], power=float(power), scale=float(scale))
        super().__init__(*args, **kwargs)
        if self.n_aux < 1:
            raise ConfigError("model.n_aux must be >= 1 for gan3d (the energy regression head)")
        if not 0.0 <= label_flip < 0.5:
            raise ConfigError(f"model.label_flip={label_flip}: must be in [0, 0.5)")
        weights = dict(LOSS_WEIGHTS)
        unknown = sorted(set(loss_weights or {}) - set(weights))
        if unknown:
            raise ConfigError(f"model.loss_weights: unknown term(s) {unknown}; terms are {sorted(weights)}")
        weights.update({k: float(v) for k, v in (loss_weights or {}).items()})
        self.loss_weights = weights
        self.power, self.scale, self.energy_scale = float(power), float(scale), float(energy_scale)
        self.label_flip = float(label_flip)
        lim = sorted((float(v) for v in count_limits), reverse=True)
        if not lim or lim[-1] <= 0:
            raise ConfigError(f"model.count_limits={list(count_limits)}: need positive limits")
        # on the powered GeV cells, as the original counts them
        self.register_buffer("count_limits", torch.tensor(lim, dtype=torch.float32) ** self.power, persistent=False)
        self.energy_fraction = bool(energy_fraction)
        self.count_softness = float(count_softness)
        self.energy_key, self.angle_key = energy_key, angle_key

    def prepare(self, data, max_events: int = 2048) -> None:
        """The generator's total head starts at the mean total in data units (sum / E) of the first
        ``max_events`` training showers (:func:`~caloexp.models.nets.mean_total`)."""
        net = self.generator.net
        if getattr(net, "total", None) is not None:
            net.total0.fill_(mean_total(data, self.power, self.scale, max_events))

    def physical(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Network cells -> GeV cells (the inverse of the data's energy_fraction/power/scale steps)."""
        cells = (x / self.scale).clamp_min(0.0) ** (1.0 / self.power)
        if self.energy_fraction:
            cells = cells * batch.raw[self.energy_key].reshape(-1, 1, 1, 1).to(cells.dtype)
        return cells

    def _labels(self, like: torch.Tensor, value: float) -> torch.Tensor:
        y = torch.full_like(like, value)
        if self.label_flip > 0:
            flip = torch.rand(like.shape, generator=self.rng, device=like.device) < self.label_flip
            y = torch.where(flip, 1.0 - y, y)
        return y

    def _energy_target(self, batch: Batch) -> torch.Tensor:
        return batch.raw[self.energy_key].reshape(-1).to(torch.float32) / self.energy_scale

    def critic_loss(self, real_out, fake_out, batch: Batch, fake):
        bce_real = F.binary_cross_entropy_with_logits(real_out[:, 0], self._labels(real_out[:, 0], 1.0))
        bce_fake = F.binary_cross_entropy_with_logits(fake_out[:, 0], self._labels(fake_out[:, 0], 0.0))
        e_fake = mape(fake_out[:, 1], self._energy_target(batch))  # the original trains the head on fakes too
        w = self.loss_weights
        loss = w["gan"] * (bce_real + bce_fake) + w["energy"] * e_fake
        return loss, {"d_real": torch.sigmoid(real_out[:, 0]).mean().detach(),
                      "d_fake": torch.sigmoid(fake_out[:, 0]).mean().detach(),
                      "aux/energy/fake_critic": e_fake.detach()}

    def generator_loss(self, fake_out, batch: Batch, fake):
        score = fake_out[:, 0]
        return self.loss_weights["gan"] * F.binary_cross_entropy_with_logits(score, torch.ones_like(score)), {}

    def aux_loss(self, out, batch: Batch, x, real: bool):
        w = self.loss_weights
        e = mape(out[:, 1], self._energy_target(batch))
        cells = self.physical(x, batch)
        ang = (measured_angle(cells) - batch.raw[self.angle_key].reshape(-1).to(cells.dtype)).abs().mean()
        logs = {"aux/energy": e.detach(), "aux/angle": ang.detach()}
        if real:  # angle, sum and counts have no discriminator weights: only the energy head learns here
            return w["energy"] * e, logs
        real_cells = self.physical(batch.x, batch)
        ecal = mape(cells.sum(dim=(1, 2, 3)), real_cells.sum(dim=(1, 2, 3)))
        with torch.no_grad():
            target = soft_counts(real_cells ** self.power, self.count_limits, self.count_softness).clamp_min(1.0)
        counts = mape(soft_counts(cells ** self.power, self.count_limits, self.count_softness), target)
        prof = longitudinal_mismatch(cells, real_cells)
        logs.update({"aux/ecal": ecal.detach(), "aux/counts": counts.detach(), "aux/profile": prof.detach()})
        return (w["energy"] * e + w["angle"] * ang + w["ecal"] * ecal + w["counts"] * counts
                + w["profile"] * prof), logs
