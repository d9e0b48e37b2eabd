"""Validation plots, reference (Geant4 or the embedded simulation) vs generated, as PNG files a physicist reads at a glance.

:func:`plot_all` writes (names are stable; MLflow shows them under ``plots/``):

* ``layers_average.png``      average shower per layer over (r [mm], alpha [rad]): reference, generated, ratio
* ``layers_average_per_energy.png``  generated / reference average shower per incident-energy bin and layer
* ``hist_E_ratio.png``        E_tot / E_inc with ratio panel
* ``hist_E_ratio_per_energy.png``  the same per incident energy (dataset 1; ``full=True``)
* ``hist_E_layer.png``        fraction of the incident energy deposited in each layer, E_layer / E_inc
* ``hist_EC_eta.png``, ``hist_EC_phi.png``, ``hist_width_eta.png``, ``hist_width_phi.png``,
  ``hist_EC_r.png``, ``hist_width_r.png``, ``hist_sparsity.png``  per-layer shower shapes (``full=True``)
* ``hist_voxel_energy.png``   spectrum of hit-voxel energies
* ``response_vs_energy.png``  mean and spread of E_tot / E_inc vs incident energy
* ``shower_shapes.png``       longitudinal and transverse profiles, depth centroid, hit multiplicity
* ``shower_3d.png``           single reference and generated showers at the same incident energy

Every histogram takes its range from both samples (0.2 % quantiles) and has an underflow and an
overflow bin (hatched, at the ends), so every shower is counted somewhere; fractions are of all
showers (or hit voxels). Ratio panels pick their range from the data (0.5-1.5 at least, 0-3 at
most); points beyond it are drawn as arrows at the edge. Quantised quantities (hit counts, hit
fractions) get bins aligned to their quantum, so no bin is empty by construction. Histograms
quote the separation power S of the bins shown (flows included) and, where the CaloChallenge
protocol defines a binning, the logged metric's value with that binning.

Why E_layer / E_inc and not E_layer: dataset 1 has 15 discrete incident energies, a factor 2
(0.30 in log10) apart, and the layer holding most of the shower (layer 2 of the photons) has a
few-percent resolution, so E_layer is 15 narrow peaks. The protocol's 40 log bins between 10 MeV
and the maximum are 0.14 wide in log10, about half the spacing, so alternate bins catch a peak
or nothing: a comb that says nothing about the model. E_layer / E_inc is continuous at fixed
E_inc and shows what matters, the longitudinal energy sharing. The logged ``sep/E_layer_*``
metrics keep the protocol's definition.

Large geometries (45 layers) show at most 12 evenly spaced layers per multi-panel figure.
Figures are at least 640 px wide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from caloexp.data.calochallenge import Showers  # noqa: E402
from caloexp.geometry import Geometry  # noqa: E402
from caloexp.metrics import features as feat  # noqa: E402
from caloexp.metrics import separation as sep  # noqa: E402
from caloexp.metrics.distances import energy_bins  # noqa: E402
from caloexp.metrics.features import Features  # noqa: E402
from caloexp.metrics.shapes3d import geometry_shapes  # noqa: E402

REF_STYLE = dict(color="0.25", linestyle="--", label="reference")
GEN_STYLE = dict(color="tab:red", linestyle="-", label="generated")
STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.direction": "in", "ytick.direction": "in", "xtick.top": True, "ytick.right": True,
         "xtick.minor.visible": False, "ytick.minor.visible": False, "figure.dpi": 100, "savefig.dpi": 100,
         "path.simplify": True}
MAX_PANELS = 12
MIN_WIDTH_IN = 6.4          # 640 px at 100 dpi
QUANTILE = 0.002            # each sample has at most 0.2 % of its entries in each flow bin
RATIO_MIN_SPAN = (0.5, 1.5)
RATIO_MAX = 3.0
DS1_ENERGIES = sep.DS1_ENERGIES


# ------------------------------------------------------------------ histograms
def _finite(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64).reshape(-1)
    return v[~np.isnan(v)]


def auto_edges(ref: np.ndarray, gen: np.ndarray, n_bins: int = 40, quantile: float = QUANTILE,
               quantum: float | None = None) -> np.ndarray:
    """Bin edges spanning both samples between their ``quantile`` and ``1 - quantile`` quantiles.

    ``quantum``: the values are multiples of it (counts, hit fractions); edges then sit halfway
    between allowed values with a width of a whole number of quanta, so no bin is empty by
    construction. Infinite values (log of zero) are left to the flow bins.
    """
    parts = [v[np.isfinite(v)] for v in (_finite(ref), _finite(gen))]
    parts = [p for p in parts if p.size]
    if not parts:
        return np.linspace(0.0, 1.0, n_bins + 1)
    lo = min(float(np.quantile(p, quantile)) for p in parts)
    hi = max(float(np.quantile(p, 1 - quantile)) for p in parts)
    if quantum:
        k_lo, k_hi = math.floor(lo / quantum + 1e-9), math.ceil(hi / quantum - 1e-9)
        step = max(1, math.ceil((k_hi - k_lo + 1) / n_bins))
        n = math.ceil((k_hi - k_lo + 1) / step)
        return (k_lo - 0.5 + step * np.arange(n + 1)) * quantum
    if hi <= lo:
        pad = max(abs(lo) * 0.05, 1e-6)
        lo, hi = lo - pad, hi + pad
    pad = 0.02 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, n_bins + 1)


def flow_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts in [underflow, bins..., overflow] (length ``len(edges) + 1``); NaN is not counted.

    -inf (e.g. log10 of an empty layer) is underflow, +inf overflow; the last bin includes its
    upper edge, as in :func:`numpy.histogram`.
    """
    v = _finite(values)
    idx = np.searchsorted(edges, v, side="right")
    idx[v == edges[-1]] = len(edges) - 1
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


@dataclass
class HistPair:
    """Reference and generated histograms of one quantity, with flow bins at both ends."""

    edges: np.ndarray       # main range, len n + 1
    n_ref: np.ndarray       # counts [under, n bins, over]
    n_gen: np.ndarray

    @property
    def f_ref(self) -> np.ndarray:
        return self.n_ref / max(self.n_ref.sum(), 1.0)

    @property
    def f_gen(self) -> np.ndarray:
        return self.n_gen / max(self.n_gen.sum(), 1.0)

    @property
    def separation(self) -> float:
        """Separation power of the bins shown, flow bins included."""
        return sep.separation_power(self.f_ref, self.f_gen)


def histogram_pair(ref: np.ndarray, gen: np.ndarray, edges: np.ndarray | None = None, n_bins: int = 40,
                   quantum: float | None = None) -> HistPair:
    """The histograms a plot shows: ``edges`` (or :func:`auto_edges` from both samples) plus flows."""
    edges = auto_edges(ref, gen, n_bins, quantum=quantum) if edges is None else np.asarray(edges, np.float64)
    return HistPair(edges, flow_counts(ref, edges), flow_counts(gen, edges))


def _ratio(num: np.ndarray, den: np.ndarray, n_num: np.ndarray, n_den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """num / den (NaN where both are empty, +inf where only den is) and its Poisson error."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, num / den, np.where(num > 0, np.inf, np.nan))
        err = np.where((den > 0) & (n_num > 0), r * np.sqrt(1 / np.maximum(n_num, 1) + 1 / np.maximum(n_den, 1)),
                       np.where(den > 0, 1 / np.sqrt(np.maximum(n_den, 1)), np.nan))
    return r, err


def ratio_limits(r: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """Ratio-panel y range: the finite, reasonably measured ratios, at least 0.5-1.5, at most 0-3."""
    ok = np.isfinite(r) & np.isfinite(err) & (err < 0.5 * np.maximum(r, 1e-12))
    lo, hi = RATIO_MIN_SPAN
    if ok.any():
        lo = min(lo, float(np.min(r[ok])) * 0.9)
        hi = max(hi, float(np.max(r[ok])) * 1.1)
    return max(lo, 0.0), min(hi, RATIO_MAX)


def draw_ratio(rax: plt.Axes, x: np.ndarray, r: np.ndarray, err: np.ndarray, color: str = "tab:red",
               limits: tuple[float, float] | None = None, xerr: np.ndarray | None = None) -> tuple[float, float]:
    """Ratio points with error bars; values beyond the range become arrows at its edge."""
    lo, hi = limits or ratio_limits(r, err)
    inside = np.isfinite(r) & (r >= lo) & (r <= hi)
    rax.errorbar(x[inside], r[inside], yerr=np.nan_to_num(err[inside]),
                 xerr=None if xerr is None else xerr[inside], fmt="o", markersize=2.5, color=color,
                 elinewidth=0.8, capsize=0)
    up, down = np.isfinite(r) & (r > hi), np.isfinite(r) & (r < lo)
    span = hi - lo
    rax.plot(x[up], np.full(up.sum(), hi - 0.06 * span), marker="^", linestyle="none", color=color, markersize=5)
    rax.plot(x[down], np.full(down.sum(), lo + 0.06 * span), marker="v", linestyle="none", color=color, markersize=5)
    rax.axhline(1.0, color="0.25", linestyle="--", linewidth=0.8)
    rax.set_ylim(lo, hi)
    step = 0.2 if span <= 1.2 else 0.5 if span <= 3 else 1.0
    ticks = np.arange(math.ceil((lo + 0.1 * span) / step), math.floor((hi - 0.1 * span) / step) + 1) * step
    rax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    return lo, hi


def _hist_ratio_panel(fig: plt.Figure, spec, h: HistPair, xlabel: str, title: str, logy: bool = False,
                      legend: bool = False, ylabel: str = "fraction of showers",
                      protocol_sep: float | None = None, flow_labels: tuple[str, str] = ("under", "over")) -> None:
    """Normalised step histograms (flow bins hatched at the ends) over a generated/reference ratio panel."""
    sub = spec.subgridspec(2, 1, height_ratios=(3, 1.3), hspace=0.0)
    ax, rax = fig.add_subplot(sub[0]), fig.add_subplot(sub[1])
    e = h.edges
    w = e[1] - e[0] if len(e) > 1 else 1.0
    flow_w = max(w, 0.05 * (e[-1] - e[0]))
    full = np.concatenate([[e[0] - flow_w], e, [e[-1] + flow_w]])
    f_ref, f_gen = h.f_ref, h.f_gen
    ax.stairs(f_ref, full, **REF_STYLE)
    ax.stairs(f_gen, full, **GEN_STYLE)
    err = np.where(h.n_gen > 0, f_gen / np.sqrt(np.maximum(h.n_gen, 1)), 0.0)
    ax.fill_between(full, np.append(f_gen - err, 0), np.append(f_gen + err, 0), step="post",
                    color="tab:red", alpha=0.2, linewidth=0)
    for a in (ax, rax):
        for x0, x1 in ((full[0], e[0]), (e[-1], full[-1])):
            a.axvspan(x0, x1, facecolor="0.93", edgecolor="0.6", hatch="///", linewidth=0, zorder=0)
    r, rerr = _ratio(f_gen, f_ref, h.n_gen, h.n_ref)
    centres = 0.5 * (full[1:] + full[:-1])
    draw_ratio(rax, centres, r, rerr)
    rax.set_ylabel("gen/ref")
    rax.set_xlabel(xlabel)
    text = f"S = {h.separation:.3f}"
    if protocol_sep is not None:
        text += f" (protocol bins: {protocol_sep:.3f})"
    ax.set_title(f"{title}\n{text}", fontsize=8)
    for x, lab in zip((0.5 * (full[0] + e[0]), 0.5 * (e[-1] + full[-1])), flow_labels):
        ax.text(x, 0.5, lab, transform=ax.get_xaxis_transform(), ha="center", va="center", fontsize=6,
                color="0.3", rotation=90, bbox=dict(facecolor="0.93", edgecolor="none", pad=0.5))
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
        pos = np.concatenate([f_ref[f_ref > 0], f_gen[f_gen > 0]])
        if pos.size:
            ax.set_ylim(pos.min() * 0.5, pos.max() * 8)
    else:
        top = float(max(f_ref.max(initial=0), (f_gen + err).max(initial=0)))
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4, prune="lower"))
    for a in (ax, rax):
        a.set_xlim(full[0], full[-1])
    ax.tick_params(labelbottom=False)
    if legend:
        fig.legend(handles=ax.get_legend_handles_labels()[0][:2], loc="upper center", ncol=2, frameon=False)


def _layer_subset(n: int, k: int = MAX_PANELS) -> list[int]:
    return list(range(n)) if n <= k else sorted(set(np.linspace(0, n - 1, k).round().astype(int)))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path


def _histogram_figure(path: Path, panels: list[tuple[str, HistPair, float | None]], xlabel: str,
                      logy: bool = False, ylabel: str = "fraction of showers",
                      flow_labels: tuple[str, str] = ("under", "over")) -> Path:
    """A grid of (title, histograms, protocol separation) panels, each over its ratio panel."""
    rows, cols = _grid(len(panels))
    width = max(MIN_WIDTH_IN, 3.4 * cols)
    height = max(0.6 + 3.0 * rows, 4.6 if rows == 1 else 0)
    fig = plt.figure(figsize=(width, height))
    gs = fig.add_gridspec(rows, cols, hspace=0.45, wspace=0.42, top=1 - 0.6 / height, bottom=0.5 / height,
                          left=0.85 / width + 0.02, right=0.98)
    for k, (title, h, s_protocol) in enumerate(panels):
        _hist_ratio_panel(fig, gs[k // cols, k % cols], h, xlabel, title, logy=logy, legend=k == 0,
                          ylabel=ylabel, protocol_sep=s_protocol, flow_labels=flow_labels)
    return _save(fig, path)


def _protocol_sep(ref: np.ndarray, gen: np.ndarray, bins: np.ndarray) -> float:
    return sep.separation_power(sep.normalised_histogram(ref, bins), sep.normalised_histogram(gen, bins))


def _log10(v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(v)


# --------------------------------------------------------------- average shower
def _energy_label(e: float) -> str:
    """256 MeV, 2.05 GeV, 524 GeV, 4.19 TeV."""
    for scale, unit in ((1e6, "TeV"), (1e3, "GeV"), (1.0, "MeV")):
        if e >= scale or unit == "MeV":
            return f"{e / scale:.3g} {unit}"
    return f"{e:g} MeV"


def energy_groups(geometry: Geometry, e_ref: np.ndarray, e_gen: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, reference mask, generated mask) per incident-energy bin present in both samples."""
    out = []
    for (label, m_ref), (_, m_gen) in zip(energy_bins(geometry, e_ref), energy_bins(geometry, e_gen)):
        if m_ref.any() and m_gen.any():
            if "-" in label:
                lo, hi = (float(v) for v in label.split("-"))
                text = f"{_energy_label(lo)}-{_energy_label(hi)}"
            else:
                text = _energy_label(float(label))
            out.append((text, m_ref, m_gen))
    return out


def _group_means(x: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """Mean shower of each mask, one matrix product: (len(masks), n_voxels)."""
    onehot = np.stack(masks).astype(np.float64)
    return (onehot @ np.asarray(x, np.float64)) / np.maximum(onehot.sum(axis=1, keepdims=True), 1)


def ratio_image(ref: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """gen / ref per voxel: NaN where both are empty, +inf where only the reference is."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, gen / ref, np.where(gen > 0, np.inf, np.nan))


def ratio_scale(ratios: np.ndarray, quantile: float = 0.99) -> float:
    """R of the symmetric log colour scale [1/R, R]: the ``quantile`` of |log ratio| over the voxels
    with energy in both samples, times 1.1, between 1.25 and 100, so (almost) no voxel saturates."""
    r = np.asarray(ratios, np.float64).ravel()
    ok = np.isfinite(r) & (r > 0)
    if not ok.any():
        return 2.0
    q = float(np.quantile(np.abs(np.log(r[ok])), quantile))
    return float(np.clip(np.exp(q) * 1.1, 1.25, 100.0))


class _SqrtScale:
    """x axis in sqrt(r): the mm-sized core and the metre-sized tail of a layer both readable."""

    @staticmethod
    def apply(ax: plt.Axes, r_max: float) -> None:
        ax.set_xscale("function", functions=(lambda v: np.sqrt(np.clip(v, 0, None)), np.square))
        nice = np.array([0, 5, 20, 50, 100, 200, 400, 1000, 2000])
        ticks = nice[nice <= r_max * 1.001]
        ax.set_xticks(ticks[np.r_[True, np.diff(np.sqrt(ticks)) > 0.12 * np.sqrt(r_max)]])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))


def _layer_mesh(ax: plt.Axes, layer, img: np.ndarray, **kw):
    r_edges = np.asarray(layer.r_edges, np.float64)
    a_edges = np.linspace(-np.pi, np.pi, layer.n_alpha + 1)
    m = ax.pcolormesh(r_edges, a_edges, img, shading="flat", **kw)
    _SqrtScale.apply(ax, float(r_edges[-1]))
    ax.set_xlim(0, r_edges[-1])
    ax.set_ylim(-np.pi, np.pi)
    ax.set_yticks([-np.pi, 0, np.pi], [r"$-\pi$", "0", r"$\pi$"] if layer.n_alpha > 1 else ["", "", ""])
    return m


def _ratio_display(ratio: np.ndarray, big: float) -> np.ndarray:
    out = np.where(np.isposinf(ratio), big, ratio)
    return np.where(out == 0, 1.0 / big, out)


def plot_layers_average(ref_x: np.ndarray, gen_x: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Average shower per layer over (r [mm], alpha [rad]): reference, generated, generated / reference."""
    a_ref, a_gen = np.asarray(ref_x, np.float64).mean(axis=0), np.asarray(gen_x, np.float64).mean(axis=0)
    layers = _layer_subset(geometry.n_layers)
    positive = a_ref[a_ref > 0]
    vmax = float(max(a_ref.max(initial=0), a_gen.max(initial=0))) or 1.0
    vmin = max(float(positive.min()) if positive.size else vmax * 1e-6, vmax * 1e-6)
    ratio = ratio_image(a_ref, a_gen)
    big = ratio_scale(ratio)
    height = 1.7 + 1.5 * len(layers)
    fig, axes = plt.subplots(len(layers), 3, figsize=(10, height), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=1.3 / height, top=1 - 0.55 / height, hspace=0.8, wspace=0.25)
    cmap_e = plt.get_cmap("viridis").with_extremes(bad="white")
    cmap_r = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    im = rim = None
    for row, i in enumerate(layers):
        layer = geometry.layers[i]
        sl = geometry.layer_slice(i)
        shape = (layer.n_alpha, layer.n_r)
        for col, (img, title) in enumerate(((a_ref[sl], "reference"), (a_gen[sl], "generated"))):
            im = _layer_mesh(axes[row, col], layer, np.where(img > 0, np.clip(img, vmin, None), np.nan).reshape(shape),
                             cmap=cmap_e, norm=LogNorm(vmin=vmin, vmax=vmax))
            axes[row, col].set_title(f"layer {layer.id}: {title}")
        rim = _layer_mesh(axes[row, 2], layer, _ratio_display(ratio[sl], big).reshape(shape), cmap=cmap_r,
                          norm=LogNorm(vmin=1 / big, vmax=big))
        axes[row, 2].set_title(f"layer {layer.id}: generated / reference")
        axes[row, 0].set_ylabel(r"$\alpha$ [rad]" if layer.n_alpha > 1 else r"$\alpha$ (1 bin)")
        if row == len(layers) - 1:
            for ax in axes[row]:
                ax.set_xlabel("r [mm] (sqrt scale)")
    fig.suptitle(f"Average shower per layer, {len(ref_x)} reference / {len(gen_x)} generated showers "
                 "(grey: no energy in either)", fontsize=9)
    cax = fig.add_axes([0.08, 0.4 / height, 0.57, 0.12 / height])
    fig.colorbar(im, cax=cax, orientation="horizontal", label="mean energy per voxel [MeV]")
    _ratio_colorbar(fig, rim, [0.71, 0.4 / height, 0.26, 0.12 / height], big)
    return _save(fig, path)


def _ratio_colorbar(fig: plt.Figure, mappable, rect: list[float], big: float) -> None:
    cb = fig.colorbar(mappable, cax=fig.add_axes(rect), orientation="horizontal", extend="both",
                      label="generated / reference")
    cb.minorticks_off()
    ticks = sorted({1 / big, 1.0, big} | {t for t in (0.1, 0.2, 0.5, 2.0, 5.0, 10.0) if 1 / big < t < big
                                          and abs(np.log(t)) < 0.8 * np.log(big) and abs(np.log(t)) > 0.3 * np.log(big)})
    cb.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])


def plot_layers_average_per_energy(ref_e: np.ndarray, ref_x: np.ndarray, gen_e: np.ndarray, gen_x: np.ndarray,
                                   geometry: Geometry, path: Path, max_energies: int = 6, max_layers: int = 6) -> Path:
    """generated / reference average shower over (r, alpha) per incident-energy bin (rows) and layer (columns)."""
    groups = energy_groups(geometry, ref_e, gen_e)
    groups = [groups[i] for i in _layer_subset(len(groups), max_energies)] if groups else []
    layers = _layer_subset(geometry.n_layers, max_layers)
    if not groups:
        fig = plt.figure(figsize=(MIN_WIDTH_IN, 2))
        fig.text(0.5, 0.5, "no incident-energy bin is present in both samples", ha="center")
        return _save(fig, path)
    m_ref = _group_means(ref_x, [g[1] for g in groups])
    m_gen = _group_means(gen_x, [g[2] for g in groups])
    ratio = ratio_image(m_ref, m_gen)
    big = ratio_scale(ratio)
    cmap_r = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    width = max(MIN_WIDTH_IN, 2.3 * len(layers) + 1.0)
    height = 1.5 + 1.35 * len(groups)
    fig, axes = plt.subplots(len(groups), len(layers), figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=0.9 / width, right=0.98, bottom=1.25 / height, top=1 - 0.55 / height,
                        hspace=0.75, wspace=0.3)
    rim = None
    for row, (label, mr, mg) in enumerate(groups):
        for col, i in enumerate(layers):
            layer = geometry.layers[i]
            ax = axes[row, col]
            rim = _layer_mesh(ax, layer, _ratio_display(ratio[row, geometry.layer_slice(i)], big)
                              .reshape(layer.n_alpha, layer.n_r), cmap=cmap_r, norm=LogNorm(vmin=1 / big, vmax=big))
            ax.set_title(f"{label}, layer {layer.id} ({int(mr.sum())}/{int(mg.sum())})", fontsize=7)
            ax.tick_params(labelsize=6)
            if col == 0:
                ax.set_ylabel(r"$\alpha$ [rad]", fontsize=7)
            if row == len(groups) - 1:
                ax.set_xlabel("r [mm]", fontsize=7)
    fig.suptitle("Average shower, generated / reference, per incident energy (showers ref/gen in brackets)",
                 fontsize=9)
    _ratio_colorbar(fig, rim, [0.25, 0.4 / height, 0.5, 0.12 / height], big)
    return _save(fig, path)


# -------------------------------------------------------------------- response
def plot_response(ref: Features, gen: Features, geometry: Geometry, path: Path) -> Path:
    """Mean (response) and relative spread (resolution) of E_tot / E_inc per incident-energy bin."""
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(MIN_WIDTH_IN, 5.2), sharex=True, gridspec_kw={"hspace": 0.05})
    for f, style, dx in ((ref, REF_STYLE, 0.97), (gen, GEN_STYLE, 1.03)):
        xs, ms, ss = [], [], []
        for _, m in energy_bins(geometry, f.E_inc):
            if m.sum() > 1:
                ratio = f.E_ratio[m]
                xs.append(np.exp(np.log(f.E_inc[m]).mean()) * dx)
                ms.append(ratio.mean())
                ss.append(ratio.std() / ratio.mean() if ratio.mean() > 0 else 0.0)
        kw = dict(color=style["color"], label=style["label"], marker="o", markersize=3, linestyle=style["linestyle"])
        ax.plot(xs, ms, **kw)
        bx.plot(xs, ss, **kw)
    ax.set_ylabel(r"$\langle E_{tot}/E_{inc}\rangle$ (response)")
    bx.set_ylabel(r"$\sigma/\langle E_{tot}/E_{inc}\rangle$ (resolution)")
    bx.set_xlabel(r"$E_{inc}$ [MeV]")
    bx.set_xscale("log")
    ax.legend(frameon=False)
    ax.set_title("Calorimeter response vs incident energy")
    return _save(fig, path)


# ---------------------------------------------------------------- shower shapes
def _profile_with_ratio(fig, spec, curves, xlabel, ylabel, title, logx=False, logy=False, xticks=None):
    """Profiles over their ratio panel; ``curves``: (label or None, colour, edges, ref, gen, n_ref, n_gen),
    reference dashed, generated solid (one colour per labelled curve)."""
    sub = spec.subgridspec(2, 1, height_ratios=(3, 1.3), hspace=0.0)
    ax, rax = fig.add_subplot(sub[0]), fig.add_subplot(sub[1])
    ratios = []
    for label, colour, edges, ref, gen, n_ref, n_gen in curves:
        ax.stairs(ref, edges, color=REF_STYLE["color"] if colour is None else colour, linestyle="--",
                  label=None if label else "reference")
        ax.stairs(gen, edges, color=GEN_STYLE["color"] if colour is None else colour, linestyle="-",
                  label=label or "generated")
        ratios.append(_ratio(gen, ref, n_gen, n_ref))
    lim = ratio_limits(np.concatenate([r for r, _ in ratios]), np.concatenate([e for _, e in ratios]))
    for (label, colour, edges, *_), (r, e) in zip(curves, ratios):
        centres = np.sqrt(edges[1:] * edges[:-1]) if logx else 0.5 * (edges[1:] + edges[:-1])
        draw_ratio(rax, centres, r, e, color=colour if colour is not None else GEN_STYLE["color"], limits=lim)
    lo = min(c[2][0] for c in curves)
    hi = max(c[2][-1] for c in curves)
    for a in (ax, rax):
        a.set_xlim(lo, hi)
        if logx:
            a.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xticks is not None:
        rax.set_xticks(*xticks)
    ax.tick_params(labelbottom=False)
    rax.set_xlabel(xlabel)
    rax.set_ylabel("gen/ref")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7)


def plot_shower_shapes(ref_x: np.ndarray, gen_x: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Longitudinal profile, transverse profile, depth centroid and hit multiplicity, each with a ratio panel."""
    rs, gs = geometry_shapes(ref_x, geometry), geometry_shapes(gen_x, geometry)
    fig = plt.figure(figsize=(10, 8))
    grid = fig.add_gridspec(2, 2, hspace=0.35, wspace=0.3, left=0.08, right=0.98, top=0.95, bottom=0.07)
    n_l, n_ref, n_gen = geometry.n_layers, len(ref_x), len(gen_x)
    # longitudinal: mean energy fraction per layer (errors from the number of showers)
    p_ref, p_gen = rs["long_profile"].mean(axis=0), gs["long_profile"].mean(axis=0)
    ids = np.arange(n_l)
    tick_idx = ids if n_l <= 12 else ids[::5]
    _profile_with_ratio(fig, grid[0, 0], [(None, None, np.arange(n_l + 1) - 0.5, p_ref / max(p_ref.sum(), 1e-30),
                                           p_gen / max(p_gen.sum(), 1e-30), np.full(n_l, n_ref), np.full(n_l, n_gen))],
                        "layer", "mean energy fraction", "Longitudinal profile", logy=True,
                        xticks=(tick_idx, [str(geometry.layer_ids[i]) for i in tick_idx]))
    # transverse: mean energy density (MeV / mm^2) per radial ring, per layer (all layers for regular
    # geometries); the innermost ring [0, r1] is drawn from r1 / 2 on the log axis
    a_ref, a_gen = np.asarray(ref_x, np.float64).mean(axis=0), np.asarray(gen_x, np.float64).mean(axis=0)
    groups = [list(range(n_l))] if geometry.is_regular else [[i] for i in _layer_subset(n_l, 6)]
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(groups)))
    curves = []
    for colour, group in zip(colours, groups):
        first = geometry.layers[group[0]]
        edges = np.asarray(first.r_edges, np.float64)
        area = np.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
        dens = [sum(avg[geometry.layer_slice(i)].reshape(geometry.layers[i].n_alpha, -1).sum(axis=0) for i in group) / area
                for avg in (a_ref, a_gen)]
        shown = edges.copy()
        shown[0] = edges[1] / 2
        curves.append((f"layer {first.id}" if len(group) == 1 else "all layers", colour, shown, dens[0], dens[1],
                       np.full(len(area), n_ref), np.full(len(area), n_gen)))
    _profile_with_ratio(fig, grid[0, 1], curves, "r [mm]", r"mean energy density [MeV/mm$^2$]",
                        "Transverse profile (dashed: reference, solid: generated)", logx=True, logy=True)
    for key, spec, xl, title, quantum in (("depth_mean", grid[1, 0], "energy-weighted mean layer index",
                                           "Shower depth", None),
                                          ("hits", grid[1, 1], "voxels above threshold", "Hit multiplicity", 1.0)):
        _hist_ratio_panel(fig, spec, histogram_pair(rs[key], gs[key], quantum=quantum), xl, title)
    return _save(fig, path)


# --------------------------------------------------------------------- 3D view
def pick_like_with_like(ref_e: np.ndarray, gen_e: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(reference index, generated index) pairs at the same (nearest in log) incident energy.

    The ``n`` target energies are spread over the reference's energy quantiles 0.35-0.95 (a
    typical and a high-energy shower for n = 2); ties are broken at random with ``seed``.
    """
    ref_e, gen_e = np.asarray(ref_e, np.float64).ravel(), np.asarray(gen_e, np.float64).ravel()
    if not len(ref_e) or not len(gen_e):
        return []
    rng = np.random.default_rng(seed)
    pairs = []
    for q in np.linspace(0.35, 0.95, n) if n > 1 else [0.6]:
        target = np.quantile(ref_e, q)
        d_ref = np.abs(np.log(ref_e / target))
        i = int(rng.choice(np.flatnonzero(d_ref <= d_ref.min() * (1 + 1e-9) + 1e-12)))
        d_gen = np.abs(np.log(gen_e / ref_e[i]))
        j = int(rng.choice(np.flatnonzero(d_gen <= d_gen.min() * (1 + 1e-9) + 1e-12)))
        pairs.append((i, j))
    return pairs


def plot_shower_3d(ref: Showers, gen: Showers, geometry: Geometry, path: Path, n: int = 2, seed: int = 0) -> Path:
    """Single showers as 3D voxel scatter (x = r cos alpha, y = r sin alpha, z = layer): reference (top)
    and generated (bottom) at the same incident energy per column, on the same axes and colour scale
    (voxel energy / E_inc)."""
    x = geometry.voxel_r * np.cos(geometry.voxel_alpha)
    y = geometry.voxel_r * np.sin(geometry.voxel_alpha)
    z = geometry.voxel_layer.astype(float)
    pairs = pick_like_with_like(ref.energies, gen.energies, n, seed)
    if not pairs:
        fig = plt.figure(figsize=(MIN_WIDTH_IN, 2))
        return _save(fig, path)
    cols = [[(np.asarray(ref.showers[i], np.float64), float(ref.energies[i]), "reference"),
             (np.asarray(gen.showers[j], np.float64), float(gen.energies[j]), "generated")] for i, j in pairs]
    fracs = [s / e for col in cols for s, e, _ in col]
    fmax = max(float(f.max(initial=0)) for f in fracs) or 1.0
    norm = LogNorm(vmin=fmax * 1e-4, vmax=fmax)
    lim = max(containment_radius(f, geometry) for f in fracs) * 1.3 or float(geometry.voxel_r.max())
    width = max(MIN_WIDTH_IN, 4.0 * len(cols) + 1.2)
    fig = plt.figure(figsize=(width, 8.2))
    fig.subplots_adjust(left=0.02, right=1 - 1.2 / width, bottom=0.03, top=0.9, wspace=0.1, hspace=0.2)
    sc = None
    for c, col in enumerate(cols):
        for r, (shower, e_inc, name) in enumerate(col):
            ax = fig.add_subplot(2, len(cols), r * len(cols) + c + 1, projection="3d")
            hit = (shower > 0) & (np.abs(x) <= lim) & (np.abs(y) <= lim)  # 3D axes do not clip
            f = shower[hit] / e_inc
            if f.size:
                order = np.argsort(f)
                sizes = 3 + 80 * (np.log10(f / norm.vmin).clip(0) / np.log10(norm.vmax / norm.vmin)) ** 2
                sc = ax.scatter(x[hit][order], y[hit][order], z[hit][order], c=np.clip(f[order], norm.vmin, None),
                                s=sizes[order], cmap="inferno", norm=norm, alpha=0.8, depthshade=False)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_zlim(-0.5, geometry.n_layers - 0.5)
            ax.set_xlabel(r"x = r cos$\alpha$ [mm]", labelpad=-2)
            ax.set_ylabel(r"y = r sin$\alpha$ [mm]", labelpad=-2)
            ax.set_zlabel("layer index", labelpad=-2)
            ax.tick_params(labelsize=6)
            ax.set_title(f"{name}, $E_{{inc}}$ = {_energy_label(e_inc)}\n"
                         f"$E_{{dep}}/E_{{inc}}$ = {shower.sum() / e_inc:.3f}, {int((shower > 0).sum())} hits", fontsize=8)
    if sc is not None:
        fig.colorbar(sc, cax=fig.add_axes([1 - 0.95 / width, 0.25, 0.15 / width, 0.5]), label=r"voxel energy / $E_{inc}$")
    fig.suptitle(f"Single showers at the same incident energy; axes cut at 1.3 x the 95 % containment radius "
                 f"({lim:.0f} mm)", fontsize=8)
    return _save(fig, path)


def containment_radius(shower: np.ndarray, geometry: Geometry, fraction: float = 0.95) -> float:
    """Smallest voxel radius (bin centre, mm) within which ``fraction`` of the shower's energy lies."""
    e = np.asarray(shower, np.float64)
    if e.sum() <= 0:
        return 0.0
    order = np.argsort(geometry.voxel_r, kind="stable")
    c = np.cumsum(e[order])
    return float(geometry.voxel_r[order][np.searchsorted(c, fraction * c[-1])])


# ------------------------------------------------------------------------- all
def plot_all(reference: Showers, generated: Showers, geometry: Geometry, outdir: str | Path,
             max_3d: int = 2, full: bool = False, threshold: float | None = None,
             max_showers: int | None = 200_000, features: tuple[Features, Features] | None = None) -> list[Path]:
    """Write the validation plots for a reference and a generated sample; return the PNG paths.

    ``full=False`` (the default, used at every evaluation during training) writes the compact
    set: layers_average, layers_average_per_energy, hist_E_ratio, hist_E_layer, hist_voxel_energy,
    response_vs_energy, shower_shapes, shower_3d. ``full=True`` (the standalone evaluator) adds
    the per-energy response histograms and every per-layer shape feature. Both samples get the
    metrics' voxel threshold first; at most ``max_showers`` per sample are plotted (the first ones).
    ``features``: the (reference, generated) high-level features of these samples after the same
    threshold, e.g. from the metrics, so they are not computed twice.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    thr = feat.default_threshold(geometry) if threshold is None else threshold
    ref, gen = reference, generated
    if features is not None:
        rf, gf = features
        if len(rf) != len(ref) or len(gf) != len(gen):
            raise ValueError(f"features for {len(rf)}/{len(gf)} showers given with {len(ref)}/{len(gen)} showers")
    if max_showers and len(ref) > max_showers:
        ref = ref.subset(slice(0, max_showers))
    if max_showers and len(gen) > max_showers:
        gen = gen.subset(slice(0, max_showers))
    ref_x = feat.apply_threshold(np.asarray(ref.showers), thr)
    gen_x = feat.apply_threshold(np.asarray(gen.showers), thr)
    ref_e = np.asarray(ref.energies, np.float64).reshape(-1)
    gen_e = np.asarray(gen.energies, np.float64).reshape(-1)
    if features is None:
        rf = feat.compute(ref_e, ref_x, geometry, threshold=0)
        gf = feat.compute(gen_e, gen_x, geometry, threshold=0)
    else:
        rf, gf = rf.subset(slice(0, len(ref))), gf.subset(slice(0, len(gen)))
    bins = sep.feature_binnings(geometry, rf)
    rc, gc = rf.columns(geometry), gf.columns(geometry)
    ids = geometry.layer_ids
    a_ids = [ids[i] for i in feat.alpha_layers(geometry)]
    lsub = [ids[i] for i in _layer_subset(len(ids))]
    asub = [a_ids[i] for i in _layer_subset(len(a_ids))]
    paths: list[Path] = []
    with plt.rc_context(STYLE):
        paths.append(plot_layers_average(ref_x, gen_x, geometry, out / "layers_average.png"))
        paths.append(plot_layers_average_per_energy(ref_e, ref_x, gen_e, gen_x, geometry,
                                                    out / "layers_average_per_energy.png"))
        paths.append(_histogram_figure(out / "hist_E_ratio.png", [(
            "Total energy response", histogram_pair(rf.E_ratio, gf.E_ratio, n_bins=50),
            _protocol_sep(rf.E_ratio, gf.E_ratio, bins["E_ratio"]))], r"$E_{tot}/E_{inc}$"))
        if full:
            panels = []
            for label, m_ref, m_gen in energy_groups(geometry, rf.E_inc, gf.E_inc):
                panels.append((f"$E_{{inc}}$ = {label}", histogram_pair(rf.E_ratio[m_ref], gf.E_ratio[m_gen], n_bins=30),
                               None))
            if panels and not feat.is_ds23(geometry):
                paths.append(_histogram_figure(out / "hist_E_ratio_per_energy.png", panels, r"$E_{tot}/E_{inc}$"))
        panels = []
        for j, lid in enumerate(ids):
            if lid in lsub:
                fr, fg = _log10(rf.E_layer[:, j] / rf.E_inc), _log10(gf.E_layer[:, j] / gf.E_inc)
                panels.append((f"Energy fraction in layer {lid}", histogram_pair(fr, fg),
                               _protocol_sep(rc[f"E_layer_{lid}"], gc[f"E_layer_{lid}"], bins[f"E_layer_{lid}"])))
        paths.append(_histogram_figure(out / "hist_E_layer.png", panels, r"$\log_{10}(E_{layer}/E_{inc})$",
                                       flow_labels=("under (incl. 0)", "over")))
        if full:
            shape_figs = [("ECeta", r"Centre of energy in $\Delta\eta$", "hist_EC_eta.png", asub),
                          ("ECphi", r"Centre of energy in $\Delta\phi$", "hist_EC_phi.png", asub),
                          ("width_eta", r"Width in $\Delta\eta$", "hist_width_eta.png", asub),
                          ("width_phi", r"Width in $\Delta\phi$", "hist_width_phi.png", asub),
                          ("ECr", "Centre of energy in r", "hist_EC_r.png", lsub),
                          ("width_r", "Width in r", "hist_width_r.png", lsub)]
            for fam, label, fname, layer_ids in shape_figs:
                if layer_ids:
                    panels = [(f"{label}, layer {lid}", histogram_pair(rc[k], gc[k]), _protocol_sep(rc[k], gc[k], bins[k]))
                              for lid in layer_ids for k in [f"{fam}_layer_{lid}"]]
                    paths.append(_histogram_figure(out / fname, panels, "[mm]", logy=True))
            panels = []
            for j, lid in enumerate(ids):
                if lid in lsub:
                    k = f"sparsity_layer_{lid}"
                    hr, hg = 1.0 - rc[k], 1.0 - gc[k]
                    panels.append((f"Hit fraction, layer {lid}",
                                   histogram_pair(hr, hg, quantum=1.0 / int(geometry.voxels_per_layer[j])),
                                   _protocol_sep(hr, hg, bins[k])))
            paths.append(_histogram_figure(out / "hist_sparsity.png", panels, "fraction of voxels hit"))
        vb = sep.voxel_bins(geometry, float(np.max(ref_x, initial=0.0)))
        sub_r = ref_x[: min(len(ref_x), 20_000)].ravel()
        sub_g = gen_x[: min(len(gen_x), 20_000)].ravel()
        hit_r, hit_g = sub_r[sub_r > 0], sub_g[sub_g > 0]
        paths.append(_histogram_figure(
            out / "hist_voxel_energy.png",
            [("Voxel energy spectrum (hit voxels)", histogram_pair(_log10(hit_r), _log10(hit_g), n_bins=50),
              _protocol_sep(sub_r, sub_g, vb))],
            r"$\log_{10}$(voxel energy / MeV)", logy=True, ylabel="fraction of hit voxels"))
        paths.append(plot_response(rf, gf, geometry, out / "response_vs_energy.png"))
        paths.append(plot_shower_shapes(ref_x, gen_x, geometry, out / "shower_shapes.png"))
        if max_3d > 0:
            paths.append(plot_shower_3d(Showers(ref_e, ref_x), Showers(gen_e, gen_x), geometry,
                                        out / "shower_3d.png", n=max_3d))
    return paths


# ----------------------------------------------------------------- 3D grids
def _profile_panel(fig: plt.Figure, spec, ref: np.ndarray, gen: np.ndarray, x: np.ndarray, xlabel: str,
                   ylabel: str, title: str) -> None:
    """Two curves (reference, generated) over their generated/reference ratio."""
    sub = spec.subgridspec(2, 1, height_ratios=(3, 1.3), hspace=0.0)
    ax, rax = fig.add_subplot(sub[0]), fig.add_subplot(sub[1])
    ax.plot(x, ref, drawstyle="steps-mid", **REF_STYLE)
    ax.plot(x, gen, drawstyle="steps-mid", **GEN_STYLE)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ref > 0, gen / ref, np.nan)
    draw_ratio(rax, x, r, np.zeros_like(r))
    ax.set_title(title, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.tick_params(labelbottom=False)
    rax.set_xlabel(xlabel)
    rax.set_ylabel("gen/ref")


def _binned_mean(key: np.ndarray, value: np.ndarray, edges: np.ndarray) -> np.ndarray:
    idx = np.clip(np.searchsorted(edges, key, side="right") - 1, 0, len(edges) - 2)
    n = np.bincount(idx, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(idx, weights=value, minlength=len(edges) - 1) / n


def plot_grid(reference, generated, out_dir: str | Path) -> list[Path]:
    """3D-grid plots (kind ``grid``, :mod:`caloexp.metrics.grid`): shower shapes and per-event features with
    ratio panels, sampling fraction vs energy and vs angle, mean x-y, x-z, y-z projections."""
    from caloexp.metrics.grid import FEATURES, event_features

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = {w: event_features(s.x, s.cond["energy"], s.cond.get("theta"))
         for w, s in (("ref", reference), ("gen", generated))}
    paths = []
    labels = {"sf": "sum / E", "hits": "cells > 1e-4 GeV", "angle_res": "measured - requested angle [deg]"}
    panels = [(k, histogram_pair(f["ref"][k], f["gen"][k]), None) for k in FEATURES]
    paths.append(_histogram_figure(out / "grid_features.png", panels, "value"))
    fig = plt.figure(figsize=(13, 8))
    gs = fig.add_gridspec(2, 3, hspace=0.4, wspace=0.35)
    for i, a in enumerate("xyz"):
        n = f["ref"][f"profile_{a}"].shape[1]
        _profile_panel(fig, gs[0, i], f["ref"][f"profile_{a}"].mean(0), f["gen"][f"profile_{a}"].mean(0),
                       np.arange(n), "layer" if a == "z" else f"{a} cell", "mean energy fraction",
                       "longitudinal profile" if a == "z" else f"transverse profile ({a})")
    e_edges = np.array([0, 10, 50, 100, 200, 300, 400, 500.0])
    a_edges = np.arange(60, 121, 10.0)
    for j, (key, edges, xlabel) in enumerate((("energy", e_edges, "primary energy [GeV]"),
                                              ("theta_deg", a_edges, "incident angle [deg]"))):
        mids = 0.5 * (edges[1:] + edges[:-1])
        _profile_panel(fig, gs[1, j], _binned_mean(f["ref"][key], f["ref"]["sf"], edges),
                       _binned_mean(f["gen"][key], f["gen"]["sf"], edges), mids, xlabel, "mean sum / E",
                       f"sampling fraction vs {xlabel.split(' [')[0]}")
    ax = fig.add_subplot(gs[1, 2])
    for w, style in (("ref", REF_STYLE), ("gen", GEN_STYLE)):
        ax.plot(f[w]["theta_deg"], f[w]["theta_deg"] + f[w]["angle_res"], "o", markersize=2,
                color=style.get("color", "k"), alpha=0.5, label=style.get("label"))
    ax.set_xlabel("requested angle [deg]")
    ax.set_ylabel("measured angle [deg]")
    ax.set_title("measured vs requested angle", fontsize=8)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "grid_profiles.png"))
    fig, axes = plt.subplots(3, 3, figsize=(11, 10))
    for i, (axis, name) in enumerate(((3, "x-y"), (2, "x-z"), (1, "y-z"))):
        mr, mg = (np.asarray(s.x, np.float64).mean(0).sum(axis - 1) for s in (reference, generated))
        vmax = max(mr.max(), mg.max(), 1e-12)
        norm = LogNorm(vmin=vmax * 1e-5, vmax=vmax)
        for j, (img, title) in enumerate(((mr, "reference"), (mg, "generated"))):
            axes[i, j].imshow(np.where(img > 0, img, np.nan).T, origin="lower", norm=norm, aspect="auto")
            axes[i, j].set_title(f"mean {name} projection, {title}", fontsize=8)
        with np.errstate(divide="ignore", invalid="ignore"):
            lr = np.log10(ratio_image(mr, mg))
        axes[i, 2].imshow(np.clip(lr, -1, 1).T, origin="lower", cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        axes[i, 2].set_title(f"{name}: log10(generated / reference), clipped to +-1", fontsize=8)
    paths.append(_save(fig, out / "grid_projections.png"))
    return paths
