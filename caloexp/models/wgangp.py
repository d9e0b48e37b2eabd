"""Wasserstein GAN with gradient penalty, conditioned on incident energy (FastCaloGAN approach).

Critic loss  L_C = E[C(x_fake)] - E[C(x_real)] + lambda * E[(||grad C(x_hat)||_2 - 1)^2] + drift * E[C(x_real)^2]
with x_hat on random lines between real and fake events (Gulrajani et al., 2017);
generator loss L_G = -E[C(G(z, c))]. The critic is updated every step, the generator every
``critic_steps`` steps (one batch per step).
"""
from __future__ import annotations

import torch

from caloexp.errors import ConfigError
from caloexp.models.base import AdversarialModel, Batch


class WGANGP(AdversarialModel):
    def __init__(self, *args, critic_steps: int = 5, gp_lambda: float = 10.0, drift: float = 1e-3, **kwargs):
        super().__init__(*args, critic_steps=critic_steps, **kwargs)
        if gp_lambda < 0:
            raise ConfigError(f"model.gp_lambda={gp_lambda}: must be >= 0")
        if drift < 0:
            raise ConfigError(f"model.drift={drift}: must be >= 0")
        self.gp_lambda = float(gp_lambda)
        self.drift = float(drift)  # keeps critic outputs near 0 (Karras et al. 2018)

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shape = (len(real),) + (1,) * (real.dim() - 1)
        eps = torch.rand(shape, generator=self.rng, device=real.device, dtype=real.dtype)
        x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
        score = self.criticise(x_hat, cond)[:, 0]
        (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
        return ((grad.reshape(len(grad), -1).norm(2, dim=1) - 1) ** 2).mean()

    def critic_loss(self, real_out, fake_out, batch: Batch, fake):
        c_real, c_fake = real_out[:, 0], fake_out[:, 0]
        gp = self.gradient_penalty(batch.x, fake, batch.cond)
        loss = c_fake.mean() - c_real.mean() + self.gp_lambda * gp + self.drift * (c_real ** 2).mean()
        return loss, {"wasserstein": (c_real.mean() - c_fake.mean()).detach(), "gradient_penalty": gp.detach()}

    def generator_loss(self, fake_out, batch: Batch, fake):
        return -fake_out[:, 0].mean(), {}
