"""The GAN_602 baseline: a (conditional or not) GAN with the binary cross-entropy loss.

Discriminator: minimise BCE(D(x_real), 1) + BCE(D(G(z)), 0) on logits (``BCEWithLogits``:
numerically safe, no sigmoid layer in the net). Generator: the non-saturating loss
BCE(D(G(z)), 1). Both are updated every step (``d_steps`` discriminator updates per
generator update). With a ``tanh`` generator output the data transform maps showers
onto [-1, 1], the generator's range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from caloexp.models.base import AdversarialModel, Batch


class GAN(AdversarialModel):
    def __init__(self, *args, d_steps: int = 1, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.d_steps = int(d_steps)
        self.label_smoothing = float(label_smoothing)  # one-sided: real label 1 - s

    def training_step(self, batch: Batch, step: int, optimizers) -> dict[str, torch.Tensor]:
        real, cond = batch.x, batch.cond
        # --- discriminator ("critic" role)
        with torch.no_grad():
            fake = self.generate(cond)
        d_real, d_fake = self.criticise(real, cond), self.criticise(fake, cond)
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 1.0 - self.label_smoothing))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        optimizers["critic"].zero_grad(set_to_none=True)
        loss_d.backward()
        optimizers["critic"].step()
        out = {"loss/critic": loss_d.detach(), "d_real": torch.sigmoid(d_real).mean().detach(),
               "d_fake": torch.sigmoid(d_fake).mean().detach()}
        # --- generator
        if (step + 1) % self.d_steps == 0:
            out["loss/generator"] = self.update_generator(
                cond, optimizers["generator"],
                lambda score: F.binary_cross_entropy_with_logits(score, torch.ones_like(score)))
        return out
