"""Conditional GAN with a class embedding (the CMS background-modelling cGAN, BrieuxK/Background-Modelling-cGAN).

The condition vector (a one-hot class label, or any other conditions) is mapped by a learned
linear embedding (for a one-hot label exactly an ``nn.Embedding`` row) and combined with the input:

* ``embedding: multiply`` (the seed's choice): generator input ``z * E_g c`` (``E_g``: cond_dim ->
  latent_dim), discriminator input ``x * E_d c`` (cond_dim -> data_dim);
* ``embedding: concat``: ``[z, E_g c]`` and ``[x, E_d c]`` (``embedding_dim`` wide).

Generator: an MLP (batch norm in the config); discriminator: an MLP on logits. Losses are those of
:class:`caloexp.models.gan.GAN`: BCE for the discriminator (optional one-sided label smoothing),
the non-saturating BCE for the generator. Any number of variables and classes (shapes come from
the data). The seed's optimiser (SGD, Nesterov momentum 0.8, gradient clipping, a ``triangular2``
cyclic learning rate) is ``experiment=cgan_cms``; ``model=cgan_wgangp`` is a WGAN-GP
conditioned on the same label.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from caloexp.errors import ConfigError
from caloexp.models.gan import GAN

EMBEDDINGS = ("multiply", "concat")


class Embedded(nn.Module):
    """``net(combine(v, E c))``: a condition embedding multiplied into or concatenated with the input ``v``."""

    def __init__(self, net: Callable[..., nn.Module], in_shape: tuple[int, ...], out_shape, cond_dim: int,
                 mode: str, embedding_dim: int):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.mode = mode
        d = math.prod(self.in_shape)
        width = d if mode == "multiply" else int(embedding_dim)
        self.embed = nn.Linear(int(cond_dim), width, bias=False) if cond_dim else None
        if self.embed is not None:   # N(0, 1) rows as nn.Embedding starts, so z * E c keeps unit scale
            nn.init.normal_(self.embed.weight)
        extra = width if (mode == "concat" and self.embed is not None) else 0
        self.net = net(in_shape=(d + extra,), out_shape=out_shape, cond_dim=0)

    @property
    def output_range(self):
        return getattr(self.net, "output_range", None)

    def forward(self, v: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = v.reshape(len(v), -1)
        if self.embed is not None and cond is not None and cond.shape[1]:
            e = self.embed(cond.to(h.dtype))
            h = h * e if self.mode == "multiply" else torch.cat([h, e], dim=1)
        return self.net(h)


class CGAN(GAN):
    """BCE GAN whose generator and discriminator see the condition through a learned embedding."""

    def __init__(self, data_shape, cond_dim, generator, critic, embedding: str = "multiply",
                 embedding_dim: int = 16, **kwargs):
        if embedding not in EMBEDDINGS:
            raise ConfigError(f"model.embedding={embedding!r}: choose one of {list(EMBEDDINGS)}")
        if embedding_dim < 1:
            raise ConfigError(f"model.embedding_dim={embedding_dim}: must be >= 1")

        def wrap(net):
            return lambda in_shape, out_shape, cond_dim: Embedded(net, in_shape, out_shape, cond_dim, embedding,
                                                                  embedding_dim)

        super().__init__(data_shape, cond_dim, wrap(generator), wrap(critic), **kwargs)
        self.embedding = embedding
