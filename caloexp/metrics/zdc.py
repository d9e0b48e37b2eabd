"""ZDC metrics (group ``zdc``, image data) and plots: channel sums, properties, average images.

Channel mapping (the ALICE neutron ZDC readout; as in the seeds' ``sum_channels_parallel``): the
quartz fibres alternate between two families laid out as a checkerboard of the image pixels. Pixels
with ``(row + col)`` odd feed the common PMT (channel 5, the whole face); pixels with ``(row + col)``
even feed the four tower PMTs, one per quadrant: channel 1 = rows < H/2, cols < W/2; 2 = rows < H/2,
cols >= W/2; 3 = rows >= H/2, cols < W/2; 4 = rows >= H/2, cols >= W/2. A channel sum is the photon
count summed over its pixels (:func:`channel_sums`).

Metrics (reference and generated at the same particles, as training's evaluation makes them):

* ``zdc/ws_channels`` - the headline: mean over the 5 channels of the 1D Wasserstein distance of the
  channel sums (photons); ``zdc/ws_ch<k>`` per channel;
* ``zdc/ws_<property>`` - Wasserstein distance of each response property (:mod:`caloexp.data.zdc`,
  in its own units) and ``zdc/ws_props_mean``, their mean divided by the reference's standard deviation;
* ``zdc/mse_e<i>``, ``zdc/ssim_e<i>`` - MSE and SSIM of the average log(1 + counts) image per bin of
  particle energy (:data:`ENERGY_EDGES_GEV`, bins holding >= 2 events of both samples) and their
  means ``zdc/mse_avg``, ``zdc/ssim_avg``.

:func:`control_error` is the property-control error of a generation with targets (|requested -
achieved|, per property and mean); the ``plot_*`` functions draw real vs generated responses, latent
traversals along each ``w`` dimension (a strip and a GIF) and requested vs achieved properties.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import wasserstein_distance

from caloexp.data.zdc import PROPERTIES, properties_of_counts
from caloexp.metrics.engine import Accumulator, Chunk, Context, MetricGroup, register

#: Particle-energy bins (GeV) of the average images: soft, medium, hard, spectators at the beam energy.
ENERGY_EDGES_GEV = (0.0, 100.0, 1000.0, 2000.0, np.inf)


def _images(x: np.ndarray) -> np.ndarray:
    """(N, H, W) float64 photon counts (a leading channel axis is summed)."""
    x = np.asarray(x, np.float64)
    return x.sum(axis=1) if x.ndim == 4 else x.reshape(len(x), x.shape[-2], x.shape[-1])


def channel_masks(h: int, w: int) -> np.ndarray:
    """(5, H, W) 0/1 masks of the ZDC channels (module doc)."""
    r, c = np.mgrid[0:h, 0:w]
    tower = (r + c) % 2 == 0
    top, left = r < h // 2, c < w // 2
    return np.stack([tower & top & left, tower & top & ~left, tower & ~top & left, tower & ~top & ~left,
                     ~tower]).astype(np.float64)


def channel_sums(x: np.ndarray) -> np.ndarray:
    """(N, 5) photon counts per ZDC channel."""
    img = _images(x)
    return np.einsum("nhw,khw->nk", img, channel_masks(*img.shape[1:]))


def _energy(cond: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    if "particle" in cond:
        return np.asarray(cond["particle"], np.float64).reshape(n, -1)[:, 0]
    if "energy" in cond:
        return np.asarray(cond["energy"], np.float64).reshape(n)
    return np.full(n, np.nan)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    rng = float(a.max() - a.min())
    if rng <= 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(structural_similarity(a, b, data_range=rng, win_size=min(7, min(a.shape) // 2 * 2 - 1)))


def compare(ref: Mapping[str, np.ndarray], gen: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The ``zdc/*`` metrics from the collected per-event arrays of both samples (see :class:`_ZDC`)."""
    out: dict[str, float] = {}
    ws = [wasserstein_distance(ref["channels"][:, k], gen["channels"][:, k]) for k in range(5)]
    out.update({f"zdc/ws_ch{k + 1}": float(v) for k, v in enumerate(ws)})
    out["zdc/ws_channels"] = float(np.mean(ws))
    scaled = []
    for k, name in enumerate(PROPERTIES):
        d = float(wasserstein_distance(ref["props"][:, k], gen["props"][:, k]))
        out[f"zdc/ws_{name}"] = d
        sd = float(ref["props"][:, k].std())
        scaled.append(d / sd if sd > 0 else d)
    out["zdc/ws_props_mean"] = float(np.mean(scaled))
    mses, ssims = [], []
    for i, (rs, rn, gs, gn) in enumerate(zip(ref["bin_sum"], ref["bin_n"], gen["bin_sum"], gen["bin_n"])):
        if rn >= 2 and gn >= 2:
            a, b = rs / rn, gs / gn
            mses.append(float(((a - b) ** 2).mean()))
            ssims.append(ssim(a, b))
            out[f"zdc/mse_e{i}"], out[f"zdc/ssim_e{i}"] = mses[-1], ssims[-1]
    if mses:
        out["zdc/mse_avg"], out["zdc/ssim_avg"] = float(np.mean(mses)), float(np.mean(ssims))
    return out


class _ZDC(Accumulator):
    """Collects channel sums and properties per event and the log-image sums per energy bin."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.parts = {w: {"channels": [], "props": []} for w in ("reference", "generated")}
        self.bins: dict[str, list] = {w: None for w in ("reference", "generated")}

    def add(self, which: str, chunk: Chunk) -> None:
        img = _images(chunk.x)
        self.parts[which]["channels"].append(channel_sums(img))
        self.parts[which]["props"].append(properties_of_counts(img))
        e = _energy(chunk.cond, len(img))
        idx = np.digitize(np.nan_to_num(e, nan=0.0), ENERGY_EDGES_GEV[1:-1])
        log = np.log1p(np.clip(img, 0, None))
        n_bins = len(ENERGY_EDGES_GEV) - 1
        sums = np.zeros((n_bins, *img.shape[1:]))
        np.add.at(sums, idx, log)
        counts = np.bincount(idx, minlength=n_bins)
        if self.bins[which] is None:
            self.bins[which] = [sums, counts]
        else:
            self.bins[which][0] += sums
            self.bins[which][1] += counts

    def collected(self, which: str) -> dict[str, np.ndarray]:
        p = self.parts[which]
        return {"channels": np.concatenate(p["channels"]), "props": np.concatenate(p["props"]),
                "bin_sum": self.bins[which][0], "bin_n": self.bins[which][1]}

    def result(self, rf, gf) -> dict[str, float]:
        return compare(self.collected("reference"), self.collected("generated"))


register(MetricGroup("zdc", ("image",), _ZDC,
                     "zdc/ws_channels (ZDC channel sums), zdc/ws_<property>, zdc/mse_*/ssim_* per energy bin"))


# ------------------------------------------------------------------ control
def control_error(x: np.ndarray, targets: Mapping[str, float], lo: Sequence[float] | None = None,
                  hi: Sequence[float] | None = None) -> dict[str, float]:
    """|requested - achieved| of generated photon-count images ``x``: per property (its units) and the mean
    over the targeted properties (divided by the property range ``hi - lo`` when given)."""
    props = properties_of_counts(x)
    out, errs = {}, []
    for name, req in targets.items():
        k = PROPERTIES.index(name)
        err = float(np.abs(props[:, k] - float(req)).mean())
        out[f"control/{name}/abs_err"] = err
        out[f"control/{name}/achieved_mean"] = float(props[:, k].mean())
        errs.append(err / (float(hi[k]) - float(lo[k])) if lo is not None and hi is not None else err)
    out["control/abs_err_mean"] = float(np.mean(errs)) if errs else float("nan")
    out["control/n_events"] = float(len(props))
    return out


# ------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_real_vs_generated(ref_x: np.ndarray, gen_x: np.ndarray, energies: np.ndarray, path: str | Path,
                           n: int = 6) -> Path:
    """Real (top) and generated (bottom) log(1 + counts) for the same particles, the most energetic hits first."""
    plt = _plt()
    ref, gen = _images(ref_x), _images(gen_x)
    hit = np.flatnonzero(ref.reshape(len(ref), -1).sum(1) > 0)
    pick = hit[np.argsort(-np.asarray(energies)[hit])][:: max(1, len(hit) // n)][:n] if len(hit) else np.arange(n)
    fig, axes = plt.subplots(2, len(pick), figsize=(2.2 * len(pick), 4.6), squeeze=False)
    for j, i in enumerate(pick):
        vmax = max(np.log1p(ref[i]).max(), np.log1p(gen[i]).max(), 1e-6)
        for r, (img, lab) in enumerate(((ref[i], "real"), (gen[i], "generated"))):
            ax = axes[r, j]
            ax.imshow(np.log1p(img), cmap="gnuplot", vmin=0, vmax=vmax, interpolation="none")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{lab}, E={energies[i]:.0f} GeV", fontsize=7)
    return _save(fig, Path(path))


def plot_traversals(strips: np.ndarray, values: np.ndarray, path: str | Path) -> Path:
    """Strips (W, K, H, W_img) of log(1 + counts): row j varies ``w_j`` over ``values`` (K)."""
    plt = _plt()
    rows, cols = strips.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
    vmax = max(float(np.log1p(strips).max()), 1e-6)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(np.log1p(strips[r, c]), cmap="gnuplot", vmin=0, vmax=vmax, interpolation="none")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{values[c]:+.1f}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"w{r}", fontsize=7)
    return _save(fig, Path(path))


def traversal_gif(strips: np.ndarray, path: str | Path, scale: int = 3) -> Path:
    """An animated GIF of the traversals: frame k shows every ``w_j`` (side by side) at the k-th value."""
    from PIL import Image

    v = np.log1p(np.clip(strips, 0, None))
    v = (255 * v / max(float(v.max()), 1e-6)).astype(np.uint8)          # (W, K, H, W_img)
    frames = [Image.fromarray(np.concatenate(list(v[:, k]), axis=1)).resize(
        (v.shape[3] * v.shape[0] * scale, v.shape[2] * scale), Image.NEAREST) for k in range(v.shape[1])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:] + frames[-2:0:-1], duration=300, loop=0)
    return path


def plot_control(requested: np.ndarray, achieved: np.ndarray, name: str, path: str | Path) -> Path:
    """Achieved (mean and spread per request) against requested values of one property."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.scatter(np.repeat(requested, achieved.shape[1]), achieved.reshape(-1), s=4, alpha=0.3)
    ax.plot(requested, achieved.mean(1), "o-", color="tab:red", label="mean achieved")
    lo, hi = float(min(requested.min(), achieved.min())), float(max(requested.max(), achieved.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="requested")
    ax.set_xlabel(f"requested {name}"), ax.set_ylabel(f"achieved {name}"), ax.legend(fontsize=7)
    return _save(fig, Path(path))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path
