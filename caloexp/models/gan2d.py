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
"""
from __future__ import annotations

import torch
from torch import nn

from caloexp import geometry as geo
from caloexp.data.transforms import calo_image_layout
from caloexp.errors import ConfigError
from caloexp.models.gan import GAN


class PaddedImage(nn.Module):
    """A generator net whose output is held at ``fill`` outside the real pixels of the view (``mask``)."""

    def __init__(self, net: nn.Module, mask: torch.Tensor, fill: float):
        super().__init__()
        self.net, self.fill = net, float(fill)
        self.register_buffer("mask", mask, persistent=False)

    @property
    def output_range(self):
        return getattr(self.net, "output_range", None)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self.net(z, cond)
        return torch.where(self.mask.to(torch.bool), y, torch.full_like(y, self.fill))


class GAN2D(GAN):
    """BCE GAN on (H, W) images; ``geometry``: the CaloChallenge binning whose ``calo_image`` view the data is."""

    def __init__(self, data_shape, cond_dim, generator, critic, geometry: str | None = None, fill: float = 0.0,
                 **kwargs):
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
        self.generator.net = PaddedImage(self.generator.net, mask, fill)
