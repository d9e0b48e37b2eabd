"""The GAN_602 baseline: a (conditional or not) GAN with the binary cross-entropy loss.

Discriminator: minimise BCE(D(x_real), 1 - s) + BCE(D(G(z)), 0) on logits (``BCEWithLogits``:
numerically safe, no sigmoid layer in the net; ``s`` one-sided label smoothing). Generator: the
non-saturating loss BCE(D(G(z)), 1), every ``critic_steps`` steps. With a ``tanh`` generator
output the data transform maps events onto [-1, 1], the generator's range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from caloexp.errors import ConfigError
from caloexp.models.base import AdversarialModel, Batch


class GAN(AdversarialModel):
    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing={label_smoothing}: must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def critic_loss(self, real_out, fake_out, batch: Batch, fake):
        d_real, d_fake = real_out[:, 0], fake_out[:, 0]
        loss = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 1.0 - self.label_smoothing))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        return loss, {"d_real": torch.sigmoid(d_real).mean().detach(), "d_fake": torch.sigmoid(d_fake).mean().detach()}

    def generator_loss(self, fake_out, batch: Batch, fake):
        score = fake_out[:, 0]
        return F.binary_cross_entropy_with_logits(score, torch.ones_like(score)), {}
