"""The GAN_602 seed's lossy 2D projections of a shower, compared honestly (metric group ``projections``).

A shower's projection is a (layer, radial bin) image of the energy fraction, summed over the alpha
bins: P[l, j] = sum_a voxel(l, a, j) / E_inc, zero-padded to the widest layer (5 x 19 for dataset-1
photons). The seed compared such images pair by pair; here, as in ``images/*``
(:mod:`caloexp.metrics.distances`), the *average* projections of the two samples are compared:

* ``proj/mse``, ``proj/rel_mse`` = sum (A_gen - A_ref)^2 / sum A_ref^2 and ``proj/ssim`` (skimage
  SSIM, data range = the reference image's range) of the average projections, overall and averaged
  over the incident-energy bins (``*_per_energy``);
* ``proj/wd``: per real pixel, the 1D Wasserstein distance between the reference and generated
  per-shower values, divided by the reference's standard deviation, averaged over pixels (the
  distributions, not only the means).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from caloexp.geometry import Geometry
from caloexp.metrics.distances import AverageImages
from caloexp.metrics.engine import Accumulator, Chunk, Context, MetricGroup, register


def projection_index(geometry: Geometry) -> tuple[tuple[int, int], np.ndarray]:
    """((n_layers, max n_r), pixel of every voxel): the (layer, radial bin) it is summed into."""
    cols = max(layer.n_r for layer in geometry.layers)
    r_bin = np.concatenate([np.tile(np.arange(layer.n_r), layer.n_alpha) for layer in geometry.layers])
    return (geometry.n_layers, cols), geometry.voxel_layer * cols + r_bin


def projections(showers: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, n_layers, max n_r) energy per (layer, radial bin), summed over alpha, zero-padded (vectorised)."""
    shape, pixel = projection_index(geometry)
    x = np.asarray(showers, np.float64)
    out = np.zeros((len(x), shape[0] * shape[1]))
    np.add.at(out, (slice(None), pixel), x)
    return out.reshape(len(x), *shape)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    rng = float(a.max() - a.min())
    if rng <= 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    small = min(a.shape)
    win = min(7, small if small % 2 else small - 1)
    return float(structural_similarity(a, b, data_range=rng, win_size=win))


def _compare(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> tuple[float, float, float]:
    d2 = (b - a) ** 2
    norm = float(np.sum(a ** 2))
    rel = float(d2.sum() / norm) if norm > 0 else float(np.any(b))
    return float(d2.mean()), rel, _ssim(a.reshape(shape), b.reshape(shape))


class _Projections(Accumulator):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.shape, pixel = projection_index(ctx.geometry)
        self.real = np.zeros(self.shape[0] * self.shape[1], bool)
        self.real[pixel] = True
        self.avg = {w: AverageImages(ctx.geometry) for w in ("reference", "generated")}
        self.values: dict[str, list[np.ndarray]] = {"reference": [], "generated": []}

    def add(self, which: str, chunk: Chunk) -> None:
        p = projections(chunk.x, self.ctx.geometry).reshape(len(chunk.x), -1)
        self.avg[which].add(chunk.energies, p)        # averages of p / E_inc, overall and per energy bin
        self.values[which].append((p[:, self.real] / chunk.energies[:, None]).astype(np.float32))

    def result(self, rf, gf) -> dict[str, float]:
        ref, gen = self.avg["reference"], self.avg["generated"]
        out: dict[str, float] = {}
        out["proj/mse"], out["proj/rel_mse"], out["proj/ssim"] = _compare(ref.mean(), gen.mean(), self.shape)
        per = [_compare(ref.mean(k), gen.mean(k), self.shape) for k in ref.bins if k in gen.bins]
        if per:
            arr = np.array(per)
            out["proj/mse_per_energy"], out["proj/rel_mse_per_energy"], out["proj/ssim_per_energy"] = \
                (float(v) for v in arr.mean(0))
        r, g = (np.concatenate(self.values[w]) for w in ("reference", "generated"))
        wd = [wasserstein_distance(r[:, j], g[:, j]) / r[:, j].std() for j in range(r.shape[1]) if r[:, j].std() > 0]
        out["proj/wd"] = float(np.mean(wd)) if wd else 0.0
        return out


register(MetricGroup("projections", ("calo",), _Projections,
                     "proj/* the GAN_602 seed's (layer, r) projections: MSE, SSIM, Wasserstein"))
