"""Wasserstein GAN with gradient penalty, conditioned on incident energy (FastCaloGAN approach).

Critic loss  L_C = E[C(x_fake)] - E[C(x_real)] + lambda * E[(||grad C(x_hat)||_2 - 1)^2]
with x_hat on random lines between real and fake showers (Gulrajani et al., 2017);
generator loss L_G = -E[C(G(z, E))]. The critic is updated every step, the generator
every ``n_critic`` steps (one batch per step).
"""
from __future__ import annotations

import torch

from caloexp.models.base import AdversarialModel, Batch


class WGANGP(AdversarialModel):
    def __init__(self, *args, n_critic: int = 5, gp_lambda: float = 10.0, drift: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_critic = int(n_critic)
        self.gp_lambda = float(gp_lambda)
        self.drift = float(drift)  # keeps critic outputs near 0 (Karras et al. 2018)

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shape = (len(real),) + (1,) * (real.dim() - 1)
        eps = torch.rand(shape, generator=self.rng, device=real.device, dtype=real.dtype)
        x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
        score = self.criticise(x_hat, cond)
        (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
        return ((grad.reshape(len(grad), -1).norm(2, dim=1) - 1) ** 2).mean()

    def training_step(self, batch: Batch, step: int, optimizers) -> dict[str, torch.Tensor]:
        real, cond = batch.x, batch.cond
        # --- critic
        with torch.no_grad():
            fake = self.generate(cond)
        c_real, c_fake = self.criticise(real, cond), self.criticise(fake, cond)
        gp = self.gradient_penalty(real, fake, cond)
        loss_c = c_fake.mean() - c_real.mean() + self.gp_lambda * gp + self.drift * (c_real ** 2).mean()
        optimizers["critic"].zero_grad(set_to_none=True)
        loss_c.backward()
        optimizers["critic"].step()
        out = {"loss/critic": loss_c.detach(), "wasserstein": (c_real.mean() - c_fake.mean()).detach(),
               "gradient_penalty": gp.detach()}
        # --- generator, every n_critic steps
        if (step + 1) % self.n_critic == 0:
            out["loss/generator"] = self.update_generator(cond, optimizers["generator"], lambda score: -score.mean())
        return out
