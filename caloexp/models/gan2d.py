"""GAN_602 done right: a conditional BCE GAN with 2D conv nets on the image view of calorimeter showers.

The data transform ends with the ``calo_image`` step (:mod:`caloexp.data.transforms`): a shower's
voxels become a (layer x alpha bin, radial bin) image, zero-padded where a layer has fewer radial
bins than the widest. The generator (:class:`~caloexp.models.nets.ConvGenerator`, upsampling convs)
maps latent noise and the incident-energy condition to that image, the discriminator
(:class:`~caloexp.models.nets.ConvCritic`, strided convs, condition at the head) scores it; the
losses are those of :class:`~caloexp.models.gan.GAN` (BCE on logits, non-saturating generator).
Generated images go back to voxels through the exact inverse of the view, so the generated showers
are ordinary CaloChallenge showers, evaluated with the full calo suite.

With ``geometry`` (the data's binning) the generator's padding pixels are set to the view's ``fill``,
as they are in real images: otherwise the discriminator could tell fakes by their padding alone.

With ``total_head`` > 0 (not in GAN_602) a small MLP on the generator's input (latent, condition) sets
each shower's total in data units (sum / E_inc with the default transform) and the conv output is
rescaled to it by one differentiable factor per event (:func:`~caloexp.models.nets.rescale_total`,
as in the 3DGAN), so the convs only learn the shape. It needs data in the units ``scale * c^power``
(``power``, ``scale``: the data transform's power and scale steps) with non-negative pixels, padding
0. ``total_weight`` > 0 adds the squared error of each generated total against the real shower's of the
same conditions to the generator loss: it trains the head alone (the rescale is exact) towards the
real mean total per energy (with the BCE loss alone the response was 21 % off after 2,000 steps). With
``threshold`` (the evaluation's voxel threshold, MeV; needs the transform's energy_fraction step) the
totals it compares count only voxels above it, as the response is measured. With the
per-voxel log + min/max transform of the original every voxel the generator did not drive to exactly
-1 came back through the exponential as energy and the totals were 2.3-2.5x too high.
"""
from __future__ import annotations

import torch
from torch import nn

from caloexp import geometry as geo
from caloexp.data.transforms import calo_image_layout
from caloexp.errors import ConfigError
from caloexp.models.gan import GAN
from caloexp.models.nets import mean_total, rescale_total, total_head as total_head_mlp


class PaddedImage(nn.Module):
    """A generator net whose output is held at ``fill`` outside the real pixels of the view (``mask``);
    with ``total_head`` (hidden units, on ``n_in`` inputs) rescaled to a per-event total (module doc)."""

    def __init__(self, net: nn.Module, mask: torch.Tensor, fill: float, n_in: int = 0, total_head: int = 0,
                 power: float = 1.0, scale: float = 1.0, activation: str = "leaky_relu"):
        super().__init__()
        self.net, self.fill = net, float(fill)
        self.register_buffer("mask", mask, persistent=False)
        self.power, self.scale = float(power), float(scale)
        self.total = None
        if total_head:
            # log(total / total0) from (latent, condition); zero-initialised: the first showers have the
            # training data's mean total (``total0``, set by GAN2D.prepare)
            self.total = total_head_mlp(n_in, total_head, activation)
            self.register_buffer("total0", torch.ones(()))

    @property
    def output_range(self):
        return getattr(self.net, "output_range", None)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self.net(z, cond)
        y = torch.where(self.mask.to(torch.bool), y, torch.full_like(y, self.fill))
        if self.total is None:
            return y
        h = z.reshape(len(z), -1)
        if cond is not None and cond.shape[1]:
            h = torch.cat([h, cond.to(h.dtype)], dim=1)
        return rescale_total(y, self.total0 * torch.exp(self.total(h)[:, 0]), self.power, self.scale)


class GAN2D(GAN):
    """BCE GAN on (H, W) images; ``geometry``: the CaloChallenge binning whose ``calo_image`` view the data is;
    ``total_head``, ``power``, ``scale``: the per-event total head and the data units it rescales in (module doc)."""

    def __init__(self, data_shape, cond_dim, generator, critic, geometry: str | None = None, fill: float = 0.0,
                 total_head: int = 0, power: float = 1.0, scale: float = 1.0, total_weight: float = 0.0,
                 threshold: float = 0.0, energy_key: str = "energy", **kwargs):
        shape = tuple(int(d) for d in data_shape)
        if len(shape) != 2:
            raise ConfigError(f"model=gan2d needs 2D events, got event shape {shape}; end data.transform.steps with "
                              "{step: calo_image, layers: geometry} (the image view of the voxels)")
        super().__init__(shape, cond_dim, generator, critic, **kwargs)
        mask = torch.ones(shape)
        if geometry is not None:
            g = geo.load(str(geometry))
            view, pixel = calo_image_layout([(layer.n_alpha, layer.n_r) for layer in g.layers])
            if tuple(view) != shape:
                raise ConfigError(f"model.geometry={g.name}: its image view is {view}, the data's events are {shape}")
            mask = torch.zeros(view[0] * view[1])
            mask[torch.as_tensor(pixel)] = 1.0
            mask = mask.reshape(view)
        if total_head < 0 or not power > 0 or not scale > 0:
            raise ConfigError(f"model.total_head={total_head}, model.power={power}, model.scale={scale}: need "
                              "total_head >= 0 (0: off), power > 0 and scale > 0")
        if total_weight < 0 or (total_weight and not total_head):
            raise ConfigError(f"model.total_weight={total_weight}: needs >= 0 and model.total_head > 0 "
                              "(it trains the head)")
        self.total_weight = float(total_weight)
        if not threshold >= 0:
            raise ConfigError(f"model.threshold={threshold}: the voxel threshold (energy units, e.g. MeV) must be >= 0")
        self.threshold, self.energy_key = float(threshold), energy_key
        if total_head and fill != 0.0:
            raise ConfigError(f"model.fill={fill}: the total head needs padding at 0 (calo_image fill: 0.0)")
        n_in = self.generator.latent_dim + (int(cond_dim) if self.conditional else 0)
        self.generator.net = PaddedImage(self.generator.net, mask, fill, n_in, int(total_head), power, scale)

    def total(self, x: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
        """Per-event total in data units (sum / E_inc with the default transform) of network images (N, H, W);
        with ``energy`` (N,) and ``threshold`` only of the pixels at or above threshold / energy."""
        net = self.generator.net
        c = ((x / net.scale).clamp_min(0.0) ** (1.0 / net.power)).reshape(len(x), -1)
        if energy is not None and self.threshold > 0:
            c = c * (c * energy.reshape(-1, 1).to(c.dtype) >= self.threshold)
        return c.sum(dim=1)

    def aux_loss(self, out, batch, x, real: bool):
        """With ``total_weight``: the squared error of each generated total against the real shower's of the
        same conditions, over the batch's mean real total squared. Its minimum is the real mean total at each
        energy (the response); the rescale makes a generated total the head's output exactly, so only the
        head learns from it."""
        if real or not self.total_weight:
            return 0.0, {}
        energy = batch.raw[self.energy_key].reshape(-1) if self.threshold > 0 else None
        target = self.total(batch.x, energy)
        err = ((self.total(x, energy) - target) ** 2).mean() / target.mean().clamp_min(torch.finfo(x.dtype).tiny) ** 2
        return self.total_weight * err, {"aux/total": err.detach()}

    def prepare(self, data, max_events: int = 2048) -> None:
        """The total head starts at the mean total in data units of the first ``max_events`` training showers."""
        net = self.generator.net
        if net.total is not None:
            net.total0.fill_(mean_total(data, net.power, net.scale, max_events))
