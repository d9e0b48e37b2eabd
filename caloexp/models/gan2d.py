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
``total_group`` > 1 compares the mean totals of groups of that many showers of neighbouring energy instead
of each shower's: the term then sets the mean total per energy (the response) and leaves the spread to the
adversarial loss (per shower it pulled every total to the mean: the spread came out 1.7-16x too narrow);
``spread_weight`` also compares the groups' standard deviations of log(total). With ``threshold`` the convs
get a gradient from the term too (which pixels pass the cut); with ``total_weight`` 1000 the discriminator won.
With ``total_gaussian`` the head is a Gaussian in log(total) whose mean and standard deviation are MLP outputs
of the condition, drawn with the first latent component: the spread of the totals per energy is then one
output to learn, not a property of how the MLP uses 256 latent components.

``critic_features`` (not in GAN_602) hands the discriminator's head, next to the conv features and the
energy, features of the shower in data units (:meth:`GAN2D.shower_features`): ``total`` log(sum), ``layers``
log(layer sum) per calorimeter layer (needs ``geometry``), ``minibatch_std`` the batch's standard deviation
of the pixels (mean over pixels) and of each of those features. A conv net hardly sums 368 pixels exactly;
with them the discriminator sees the distribution of totals and layer energies directly, as BoloGAN's
and CaloShowerGAN's critics see energy-derived inputs. ``spectral_norm`` (not in GAN_602) normalises every
weight of the discriminator by its largest singular value (Miyato et al. 2018), the usual regulariser of BCE GANs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from caloexp import geometry as geo
from caloexp.data.transforms import calo_image_layout
from caloexp.errors import ConfigError
from caloexp.models.gan import GAN
from caloexp.models.nets import mean_total, rescale_total, total_head as total_head_mlp

CRITIC_FEATURES = ("total", "layers", "minibatch_std")
FEATURE_EPS = 1e-6      # log(sum + eps): an empty layer is a finite feature
GAUSSIAN_STD0 = 0.1     # total_gaussian: the starting std of log(total), about the data's at 1 GeV


class PaddedImage(nn.Module):
    """A generator net whose output is held at ``fill`` outside the real pixels of the view (``mask``);
    with ``total_head`` (hidden units, on ``n_in`` inputs) rescaled to a per-event total (module doc)."""

    def __init__(self, net: nn.Module, mask: torch.Tensor, fill: float, n_in: int = 0, total_head: int = 0,
                 power: float = 1.0, scale: float = 1.0, activation: str = "leaky_relu", gaussian: bool = False,
                 latent_dim: int = 0):
        super().__init__()
        self.net, self.fill = net, float(fill)
        self.register_buffer("mask", mask, persistent=False)
        self.power, self.scale = float(power), float(scale)
        self.total, self.gaussian, self.latent_dim = None, bool(gaussian), int(latent_dim)
        if total_head:
            # log(total / total0) from (latent, condition), or with ``gaussian`` (mean, log std) of it from the
            # condition; zero-initialised: the first showers have the training data's mean total (``total0``, set
            # by GAN2D.prepare), with ``gaussian`` spread by GAUSSIAN_STD0
            self.total = total_head_mlp(n_in - self.latent_dim if gaussian else n_in, total_head, activation,
                                        2 if gaussian else 1)
            if gaussian:
                with torch.no_grad():
                    self.total[-1].bias[1] = math.log(GAUSSIAN_STD0)
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
        if self.gaussian:       # log total ~ N(mean(E), std(E)^2), drawn with the first latent component
            out = self.total(cond.to(h.dtype) if cond is not None else h[:, :0])
            log_total = out[:, 0] + torch.exp(out[:, 1]) * h[:, 0]
        else:
            if cond is not None and cond.shape[1]:
                h = torch.cat([h, cond.to(h.dtype)], dim=1)
            log_total = self.total(h)[:, 0]
        return rescale_total(y, self.total0 * torch.exp(log_total), self.power, self.scale)


class GAN2D(GAN):
    """BCE GAN on (H, W) images; ``geometry``: the CaloChallenge binning whose ``calo_image`` view the data is;
    ``total_head``, ``power``, ``scale``: the per-event total head and the data units it rescales in;
    ``total_group``: showers per group whose mean totals the total term compares; ``critic_features``: what the
    discriminator's head sees besides the conv features (module doc)."""

    def __init__(self, data_shape, cond_dim, generator, critic, geometry: str | None = None, fill: float = 0.0,
                 total_head: int = 0, power: float = 1.0, scale: float = 1.0, total_weight: float = 0.0,
                 threshold: float = 0.0, energy_key: str = "energy", total_group: int = 1, spread_weight: float = 0.0,
                 critic_features: tuple[str, ...] | list[str] = (), spectral_norm: bool = False,
                 total_gaussian: bool = False, **kwargs):
        shape = tuple(int(d) for d in data_shape)
        if len(shape) != 2:
            raise ConfigError(f"model=gan2d needs 2D events, got event shape {shape}; end data.transform.steps with "
                              "{step: calo_image, layers: geometry} (the image view of the voxels)")
        mask, rows = torch.ones(shape), []
        if geometry is not None:
            g = geo.load(str(geometry))
            view, pixel = calo_image_layout([(layer.n_alpha, layer.n_r) for layer in g.layers])
            if tuple(view) != shape:
                raise ConfigError(f"model.geometry={g.name}: its image view is {view}, the data's events are {shape}")
            mask = torch.zeros(view[0] * view[1])
            mask[torch.as_tensor(pixel)] = 1.0
            mask = mask.reshape(view)
            rows = [layer.n_alpha for layer in g.layers]        # image rows of each layer, in order
        features = tuple(str(f) for f in critic_features)
        if set(features) - set(CRITIC_FEATURES) or len(set(features)) != len(features):
            raise ConfigError(f"model.critic_features={list(features)}: choose each at most once from "
                              f"{list(CRITIC_FEATURES)}")
        if "layers" in features and not rows:
            raise ConfigError("model.critic_features has 'layers': needs model.geometry (the data's binning)")
        if int(total_group) < 1:
            raise ConfigError(f"model.total_group={total_group}: must be >= 1 (1: each shower's total)")
        if spread_weight < 0 or (spread_weight and int(total_group) < 2):
            raise ConfigError(f"model.spread_weight={spread_weight}: needs >= 0 and model.total_group > 1 (the spread "
                              "of a group's totals)")
        n_shower = ("total" in features) + ("layers" in features) * len(rows)
        n_feat = n_shower + ("minibatch_std" in features) * (1 + n_shower)
        if n_feat:      # the critic's head takes the features after the condition
            critic = _wider_condition(critic, n_feat)
        super().__init__(shape, cond_dim, generator, critic, **kwargs)
        self.features, self.n_features = features, n_feat
        if spectral_norm:       # every conv and linear layer of the discriminator: Lipschitz <= 1 each
            for m in list(self.critic.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(m)
        self.total_group, self.spread_weight = int(total_group), float(spread_weight)
        self.register_buffer("layer_of_row", torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(
            rows, dtype=torch.long)) if rows else torch.zeros(0, dtype=torch.long), persistent=False)
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
        if total_gaussian and not total_head:
            raise ConfigError("model.total_gaussian=true: needs model.total_head > 0 (the head it shapes)")
        self.generator.net = PaddedImage(self.generator.net, mask, fill, n_in, int(total_head), power, scale,
                                         gaussian=bool(total_gaussian), latent_dim=self.generator.latent_dim)
        if self.features and fill != 0.0:
            raise ConfigError(f"model.fill={fill}: model.critic_features need padding at 0 (calo_image fill: 0.0)")

    def _data_units(self, x: torch.Tensor) -> torch.Tensor:
        """Network pixels y = scale * c^power back to data units c (sum / E_inc with the default transform)."""
        net = self.generator.net
        return (x / net.scale).clamp_min(0.0) ** (1.0 / net.power)

    def total(self, x: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
        """Per-event total in data units (sum / E_inc with the default transform) of network images (N, H, W);
        with ``energy`` (N,) and ``threshold`` only of the pixels at or above threshold / energy."""
        c = self._data_units(x).reshape(len(x), -1)
        if energy is not None and self.threshold > 0:
            c = c * (c * energy.reshape(-1, 1).to(c.dtype) >= self.threshold)
        return c.sum(dim=1)

    def shower_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_features) discriminator inputs of network images (N, H, W), in ``critic_features`` order:
        log(total + eps), log(layer sum + eps) per layer (data units: sum / E_inc with the default transform),
        and with ``minibatch_std`` the batch's std of the pixels (mean over pixels) and of each feature before it,
        the same for every event. Differentiable, so the generator learns from them."""
        c = self._data_units(x)
        feats = []
        if "total" in self.features:
            feats.append(torch.log(c.sum(dim=(1, 2)) + FEATURE_EPS)[:, None])
        if "layers" in self.features:
            rows = c.sum(dim=2)                                                     # (N, H)
            per_layer = rows.new_zeros(len(x), int(self.layer_of_row.max()) + 1).index_add(1, self.layer_of_row, rows)
            feats.append(torch.log(per_layer + FEATURE_EPS))
        f = torch.cat(feats, dim=1) if feats else x.new_zeros(len(x), 0)
        if "minibatch_std" in self.features:
            spread = torch.cat([x.reshape(len(x), -1).std(dim=0, unbiased=False).mean()[None],
                                f.std(dim=0, unbiased=False)]) if len(x) > 1 else x.new_zeros(1 + f.shape[1])
            f = torch.cat([f, spread.expand(len(x), -1)], dim=1)
        return f

    def criticise(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Critic outputs (B, 1 + n_aux); its head sees the condition and the :meth:`shower_features`."""
        c = cond if self.conditional else cond[:, :0]
        if self.n_features:
            c = torch.cat([c, self.shower_features(x).to(c.dtype)], dim=1)
        return self.critic(x, c).reshape(len(x), -1)

    def aux_loss(self, out, batch, x, real: bool):
        """With ``total_weight``: the squared error of the generated totals against the real showers' of the
        same conditions, over the batch's mean real total squared; with ``total_group`` g > 1 of the mean totals
        of groups of g showers in energy order (the first condition). Its minimum is the real mean total at each
        energy (the response); the rescale makes a generated total the head's output exactly, so only the
        head learns from it. ``spread_weight`` adds that weight x the squared difference of the groups' standard
        deviations of log(total) (the relative resolution), generated vs real."""
        if real or not self.total_weight:
            return 0.0, {}
        energy = batch.raw[self.energy_key].reshape(-1) if self.threshold > 0 else None
        target, total = self.total(batch.x, energy), self.total(x, energy)
        scale = target.mean().clamp_min(torch.finfo(x.dtype).tiny)
        if self.total_group == 1:
            err = ((total - target) ** 2).mean() / scale ** 2
            return self.total_weight * err, {"aux/total": err.detach()}
        key = batch.cond[:, 0] if batch.cond is not None and batch.cond.shape[1] else torch.zeros_like(target)
        group = torch.empty_like(key, dtype=torch.long)
        group[torch.argsort(key, stable=True)] = torch.arange(len(key), device=key.device) // self.total_group
        n = int(group.max()) + 1
        count = target.new_zeros(n).index_add(0, group, torch.ones_like(target))

        def mean(v):
            return v.new_zeros(n).index_add(0, group, v) / count

        err = ((mean(total) - mean(target)) ** 2).mean() / scale ** 2
        logs = {"aux/total": err.detach()}
        if self.spread_weight:
            def sd_log(t):
                lt = torch.log(t.clamp_min(torch.finfo(x.dtype).tiny))
                return (mean((lt - mean(lt)[group]) ** 2) + 1e-12).sqrt()

            spread = ((sd_log(total) - sd_log(target)) ** 2).mean()
            err, logs["aux/total_spread"] = err + self.spread_weight * spread, spread.detach()
        return self.total_weight * err, logs

    def prepare(self, data, max_events: int = 2048) -> None:
        """The total head starts at the mean total in data units of the first ``max_events`` training showers."""
        net = self.generator.net
        if net.total is not None:
            net.total0.fill_(mean_total(data, net.power, net.scale, max_events))


def _wider_condition(critic, n: int):
    """The critic builder with ``n`` more condition inputs (the :meth:`GAN2D.shower_features` at its head)."""
    def build(in_shape, out_shape, cond_dim):
        return critic(in_shape=in_shape, out_shape=out_shape, cond_dim=int(cond_dim) + n)
    return build
