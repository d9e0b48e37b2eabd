"""Validation plots, reference (Geant4 or the embedded simulation) vs generated, as PNG files a physicist reads at a glance.

:func:`plot_all` writes (names are stable; MLflow shows them under ``plots/``):

* ``layers_average.png``      average shower per layer as (alpha, r) heat maps: reference, generated, ratio
* ``hist_E_ratio.png``        E_tot / E_inc with ratio panel (protocol binning, separation power quoted)
* ``hist_E_ratio_per_energy.png``  the same per incident energy (dataset 1)
* ``hist_E_layer.png``        energy per layer
* ``hist_EC_eta.png``, ``hist_EC_phi.png``, ``hist_width_eta.png``, ``hist_width_phi.png``,
  ``hist_EC_r.png``, ``hist_width_r.png``, ``hist_sparsity.png``  per-layer shower-shape features
* ``hist_voxel_energy.png``   cell-energy spectrum
* ``response_vs_energy.png``  mean and spread of E_tot / E_inc vs incident energy
* ``shower_shapes.png``       longitudinal and radial profiles, depth centroid, hit multiplicity
* ``shower_3d.png``           single showers as 3D voxel scatter (x = r cos a, y = r sin a, z = layer)

Large geometries (45 layers) show at most 12 evenly spaced layers per multi-panel figure.
"""
from __future__ import annotations

import math
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
from caloexp.metrics.shapes3d import geometry_shapes  # noqa: E402

REF_STYLE = dict(color="0.25", linestyle="--", label="reference")
GEN_STYLE = dict(color="tab:red", linestyle="-", label="generated")
STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.direction": "in", "ytick.direction": "in", "xtick.minor.visible": False,
         "ytick.minor.visible": False, "figure.dpi": 80, "savefig.dpi": 80, "path.simplify": True}
MAX_PANELS = 12


def _log10(v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log10(v)


def _layer_subset(n: int, k: int = MAX_PANELS) -> list[int]:
    return list(range(n)) if n <= k else sorted(set(np.linspace(0, n - 1, k).round().astype(int)))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path


def _hist_ratio_panel(fig: plt.Figure, spec, ref: np.ndarray, gen: np.ndarray, bins: np.ndarray,
                      xlabel: str, title: str, logx: bool = False, logy: bool = False, legend: bool = False) -> None:
    """Normalised step histograms of reference and generated over a generated/reference ratio panel."""
    sub = spec.subgridspec(2, 1, height_ratios=(3, 1), hspace=0.0)
    ax, rax = fig.add_subplot(sub[0]), fig.add_subplot(sub[1])
    h_ref = sep.normalised_histogram(ref, bins)
    h_gen = sep.normalised_histogram(gen, bins)
    n_gen = np.histogram(gen[np.isfinite(gen)], bins=bins)[0]
    s = sep.separation_power(h_ref, h_gen)
    ax.stairs(h_ref, bins, **REF_STYLE)
    ax.stairs(h_gen, bins, **GEN_STYLE)
    err = np.where(n_gen > 0, h_gen / np.sqrt(np.maximum(n_gen, 1)), 0.0)
    ax.fill_between(bins, np.append(h_gen - err, 0), np.append(h_gen + err, 0), step="post",
                    color="tab:red", alpha=0.2, linewidth=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(h_ref > 0, h_gen / h_ref, np.nan)
    rax.stairs(ratio, bins, color="tab:red")
    rax.axhline(1.0, color="0.25", linestyle="--", linewidth=0.8)
    rax.set_ylim(0.5, 1.5)
    rax.set_yticks([0.75, 1.0, 1.25])
    rax.set_ylabel("gen/ref")
    rax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.text(0.97, 0.93, f"sep. power {s:.3f}", transform=ax.transAxes, ha="right", va="top", fontsize=7)
    ax.set_ylabel("fraction of showers")
    if logx:
        ax.set_xscale("log")
        rax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    else:
        top = float(max(h_ref.max(initial=0), (h_gen + err).max(initial=0)))
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4, prune="lower"))
    ax.set_xlim(bins[0], bins[-1])
    rax.set_xlim(bins[0], bins[-1])
    ax.tick_params(labelbottom=False)
    if legend:
        fig.legend(handles=ax.get_legend_handles_labels()[0][:2], loc="upper center", ncol=2, frameon=False)


def _feature_figure(path: Path, names: list[str], labels: list[str], ref_cols, gen_cols, bins, xlabel: str,
                    logx: bool = False, logy: bool = False, transform=None) -> Path:
    rows, cols = _grid(len(names))
    fig = plt.figure(figsize=(3.3 * cols, 0.5 + 2.9 * rows))
    gs = fig.add_gridspec(rows, cols, hspace=0.5, wspace=0.4, top=1 - 0.55 / (0.5 + 2.9 * rows),
                          bottom=0.45 / (0.5 + 2.9 * rows), left=0.8 / (3.3 * cols) + 0.02, right=0.98)
    for k, (name, label) in enumerate(zip(names, labels)):
        r, g = ref_cols[name], gen_cols[name]
        if transform is not None:
            r, g = transform(r), transform(g)
        _hist_ratio_panel(fig, gs[k // cols, k % cols], r, g, bins[name], xlabel, label,
                          logx=logx, logy=logy, legend=k == 0)
    return _save(fig, path)


def plot_layers_average(ref_x: np.ndarray, gen_x: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Average shower per layer: reference, generated and generated/reference as (alpha, r) maps."""
    a_ref, a_gen = ref_x.mean(axis=0), gen_x.mean(axis=0)
    layers = _layer_subset(geometry.n_layers)
    positive = a_ref[a_ref > 0]
    vmax = float(a_ref.max()) if positive.size else 1.0
    vmin = max(float(positive.min()) if positive.size else 1e-3, vmax * 1e-6)
    height = 1.6 + 1.45 * len(layers)
    fig, axes = plt.subplots(len(layers), 3, figsize=(10, height), squeeze=False)
    fig.subplots_adjust(left=0.07, right=0.97, bottom=1.25 / height, top=1 - 0.35 / height, hspace=0.75, wspace=0.25)
    for row, i in enumerate(layers):
        layer = geometry.layers[i]
        sl = geometry.layer_slice(i)
        r_img = a_ref[sl].reshape(layer.n_alpha, layer.n_r)
        g_img = a_gen[sl].reshape(layer.n_alpha, layer.n_r)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(r_img > 0, g_img / r_img, np.nan)
        for col, (img, title) in enumerate(((r_img, "reference"), (g_img, "generated"))):
            im = axes[row, col].imshow(np.clip(img, vmin, None), origin="lower", aspect="auto", cmap="viridis",
                                       norm=LogNorm(vmin=vmin, vmax=vmax), interpolation="nearest")
            axes[row, col].set_title(f"layer {layer.id}: {title}")
        rim = axes[row, 2].imshow(ratio, origin="lower", aspect="auto", cmap="RdBu_r",
                                  norm=LogNorm(vmin=0.5, vmax=2.0), interpolation="nearest")
        axes[row, 2].set_title(f"layer {layer.id}: generated / reference")
        for col, ax in enumerate(axes[row]):
            ax.set_yticks([0, layer.n_alpha - 1] if layer.n_alpha > 1 else [])
            ax.set_xticks(sorted({0, layer.n_r // 2, layer.n_r - 1}))
            if col == 0:
                ax.set_ylabel(r"$\alpha$ bin" if layer.n_alpha > 1 else "")
            if row == len(layers) - 1:
                ax.set_xlabel("r bin (inner to outer)")
    cax = fig.add_axes([0.07, 0.35 / height, 0.58, 0.12 / height])
    fig.colorbar(im, cax=cax, orientation="horizontal", label="mean energy per voxel [MeV]")
    rcax = fig.add_axes([0.71, 0.35 / height, 0.26, 0.12 / height])
    cb = fig.colorbar(rim, cax=rcax, orientation="horizontal", label="generated / reference")
    cb.minorticks_off()
    cb.set_ticks([0.5, 0.8, 1.0, 1.25, 2.0], labels=["0.5", "0.8", "1", "1.25", "2"])
    return _save(fig, path)


def plot_response(ref: feat.Features, gen: feat.Features, geometry: Geometry, path: Path) -> Path:
    """Mean (response) and relative spread (resolution) of E_tot / E_inc per incident-energy bin."""
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(5.5, 5.0), sharex=True, gridspec_kw={"hspace": 0.05})
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


def plot_shower_shapes(ref_x: np.ndarray, gen_x: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Longitudinal profile, radial profile, depth centroid and hit multiplicity."""
    rs, gs = geometry_shapes(ref_x, geometry), geometry_shapes(gen_x, geometry)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), gridspec_kw={"hspace": 0.35, "wspace": 0.3})
    ids = np.arange(geometry.n_layers)
    for s, style in ((rs, REF_STYLE), (gs, GEN_STYLE)):
        prof = s["long_profile"].mean(axis=0)
        axes[0, 0].step(ids, prof / max(prof.sum(), 1e-30), where="mid", color=style["color"],
                        linestyle=style["linestyle"], label=style["label"])
    axes[0, 0].set_xticks(ids if len(ids) <= 12 else ids[::5])
    axes[0, 0].set_xticklabels([str(geometry.layer_ids[i]) for i in (ids if len(ids) <= 12 else ids[::5])])
    axes[0, 0].set_xlabel("layer")
    axes[0, 0].set_ylabel("mean energy fraction")
    axes[0, 0].set_title("Longitudinal profile")
    axes[0, 0].legend(frameon=False)
    # transverse profile: mean energy density (MeV / mm^2) of each radial ring, per layer (summed over
    # layers for the regular datasets 2/3 geometry), at the ring's radial centre
    a_ref, a_gen = ref_x.mean(axis=0), gen_x.mean(axis=0)
    groups = [list(range(geometry.n_layers))] if geometry.is_regular else [[i] for i in _layer_subset(geometry.n_layers)]
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    for colour, group in zip(colours, groups):
        first = geometry.layers[group[0]]
        edges = np.asarray(first.r_edges)
        area = np.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
        centres = 0.5 * (edges[1:] + edges[:-1])
        for avg, style in ((a_ref, REF_STYLE), (a_gen, GEN_STYLE)):
            ring = sum(avg[geometry.layer_slice(i)].reshape(geometry.layers[i].n_alpha, -1).sum(axis=0) for i in group)
            dens = ring / area
            label = (f"layer {first.id}" if len(group) == 1 else "all layers") if style is GEN_STYLE else None
            axes[0, 1].plot(centres, np.where(dens > 0, dens, np.nan), color=colour if len(groups) > 1 else style["color"],
                            linestyle=style["linestyle"], marker="o", markersize=2, label=label)
    axes[0, 1].set_xscale("log")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_xlabel("r [mm]")
    axes[0, 1].set_ylabel(r"mean energy density [MeV/mm$^2$]")
    axes[0, 1].set_title("Transverse profile (dashed: reference, solid: generated)")
    axes[0, 1].legend(frameon=False, fontsize=7)
    for key, ax, xl in (("depth_mean", axes[1, 0], "energy-weighted mean layer index"),
                        ("hits", axes[1, 1], "hit multiplicity (voxels above threshold)")):
        lo = min(rs[key].min(), gs[key].min())
        hi = max(rs[key].max(), gs[key].max())
        b = np.linspace(lo, hi if hi > lo else lo + 1, 41)
        ax.stairs(sep.normalised_histogram(rs[key], b), b, **REF_STYLE)
        ax.stairs(sep.normalised_histogram(gs[key], b), b, **GEN_STYLE)
        ax.set_xlabel(xl)
        ax.set_ylabel("fraction of showers")
    axes[1, 0].set_title("Shower depth")
    axes[1, 1].set_title("Hit multiplicity")
    return _save(fig, path)


def plot_shower_3d(ref: Showers, gen: Showers, geometry: Geometry, path: Path, n: int = 2, seed: int = 0) -> Path:
    """Single showers as 3D voxel scatter: x = r cos(alpha), y = r sin(alpha), z = layer; size and colour ~ energy."""
    rng = np.random.default_rng(seed)
    x = geometry.voxel_r * np.cos(geometry.voxel_alpha)
    y = geometry.voxel_r * np.sin(geometry.voxel_alpha)
    z = geometry.voxel_layer.astype(float)
    picks = []
    for s, name in ((ref, "reference"), (gen, "generated")):
        idx = rng.choice(len(s), size=min(n, len(s)), replace=False) if len(s) else []
        picks += [(s.showers[i], float(s.energies[i]), name) for i in idx]
    if not picks:
        fig = plt.figure()
        return _save(fig, path)
    fig = plt.figure(figsize=(4.2 * len(picks), 4.4))
    emax = max(float(np.max(p[0])) for p in picks)
    emax = emax if emax > 0 else 1.0
    norm = LogNorm(vmin=emax * 1e-4, vmax=emax)
    sc = None
    for k, (shower, e_inc, name) in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), k + 1, projection="3d")
        hit = shower > 0
        e = shower[hit]
        if e.size:
            order = np.argsort(e)
            sizes = 4 + 150 * (np.log10(e / norm.vmin).clip(0) / np.log10(norm.vmax / norm.vmin)) ** 2
            sc = ax.scatter(x[hit][order], y[hit][order], z[hit][order], c=np.clip(e[order], norm.vmin, None),
                            s=sizes[order], cmap="inferno", norm=norm, alpha=0.8, depthshade=False)
            core = e > emax * 1e-3
            lim = float(np.max(geometry.voxel_r[hit][core])) * 1.1 if core.any() else float(geometry.voxel_r.max())
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        ax.set_zlim(-0.5, geometry.n_layers - 0.5)
        ax.set_xlabel(r"$\Delta\eta$ axis x [mm]", labelpad=-2)
        ax.set_ylabel(r"$\Delta\phi$ axis y [mm]", labelpad=-2)
        ax.set_zlabel("layer index", labelpad=-2)
        ax.tick_params(labelsize=6)
        unit = f"{e_inc / 1e3:.1f} GeV" if e_inc < 1e6 else f"{e_inc / 1e6:.2f} TeV"
        ax.set_title(f"{name}, $E_{{inc}}$ = {unit}\n$E_{{dep}}$ = {shower.sum() / 1e3:.2f} GeV, {int(hit.sum())} hits")
    if sc is not None:
        fig.colorbar(sc, ax=fig.axes, shrink=0.6, label="voxel energy [MeV]")
    return _save(fig, path)


def plot_all(reference: Showers, generated: Showers, geometry: Geometry, outdir: str | Path,
             max_3d: int = 2, full: bool = False, threshold: float | None = None,
             max_showers: int | None = 200_000) -> list[Path]:
    """Write the validation plots for a reference and a generated sample; return the PNG paths.

    ``full=False`` (the default, used at every evaluation during training) writes the compact
    set: layers_average, hist_E_ratio, hist_E_layer, hist_voxel_energy, response_vs_energy,
    shower_shapes, shower_3d. ``full=True`` (the standalone evaluator) adds the per-energy
    response histograms and every per-layer shape feature. Both samples get the metrics'
    voxel threshold first; at most ``max_showers`` per sample are plotted (the first ones).
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    thr = feat.default_threshold(geometry) if threshold is None else threshold
    ref, gen = reference, generated
    if max_showers and len(ref) > max_showers:
        ref = ref.subset(slice(0, max_showers))
    if max_showers and len(gen) > max_showers:
        gen = gen.subset(slice(0, max_showers))
    ref_x = feat.apply_threshold(np.asarray(ref.showers), thr)
    gen_x = feat.apply_threshold(np.asarray(gen.showers), thr)
    ref_e = np.asarray(ref.energies, np.float64).reshape(-1)
    gen_e = np.asarray(gen.energies, np.float64).reshape(-1)
    rf = feat.compute(ref_e, ref_x, geometry, threshold=0)
    gf = feat.compute(gen_e, gen_x, geometry, threshold=0)
    bins = sep.feature_binnings(geometry, rf)
    rc, gc = rf.columns(geometry), gf.columns(geometry)
    ids = geometry.layer_ids
    a_ids = [ids[i] for i in feat.alpha_layers(geometry)]
    paths: list[Path] = []
    with plt.rc_context(STYLE):
        paths.append(plot_layers_average(ref_x, gen_x, geometry, out / "layers_average.png"))
        paths.append(_feature_figure(out / "hist_E_ratio.png", ["E_ratio"], ["Total energy response"], rc, gc, bins,
                                     r"$E_{tot}/E_{inc}$"))
        per_e = sep.energy_ratio_bins(geometry) if full else []
        if per_e:
            present = [(e, b) for e, b in per_e if ((rf.E_inc >= e) & (rf.E_inc < 2 * e)).any()
                       and ((gf.E_inc >= e) & (gf.E_inc < 2 * e)).any()]
            if present:
                names, labels, rcol, gcol, bb = [], [], {}, {}, {}
                for e, b in present:
                    key = f"E_ratio_{int(e)}"
                    mr, mg = (rf.E_inc >= e) & (rf.E_inc < 2 * e), (gf.E_inc >= e) & (gf.E_inc < 2 * e)
                    rcol[key], gcol[key], bb[key] = rf.E_ratio[mr], gf.E_ratio[mg], b
                    names.append(key)
                    labels.append(f"$E_{{inc}}$ = {e / 1e3:g} GeV")
                paths.append(_feature_figure(out / "hist_E_ratio_per_energy.png", names, labels, rcol, gcol, bb,
                                             r"$E_{tot}/E_{inc}$"))
        sub = _layer_subset(len(ids))
        lsub = [ids[i] for i in sub]
        asub = [a_ids[i] for i in _layer_subset(len(a_ids))]
        log_bins = {k: np.log10(bins[k]) for k in (f"E_layer_{l}" for l in lsub)}
        paths.append(_feature_figure(out / "hist_E_layer.png", [f"E_layer_{l}" for l in lsub],
                                     [f"Energy in layer {l}" for l in lsub], rc, gc, log_bins,
                                     r"$\log_{10}(E\,/\,\mathrm{MeV})$", transform=_log10))
        if full:
            shape_figs = [("ECeta", r"Centre of energy in $\Delta\eta$", "hist_EC_eta.png", asub),
                          ("ECphi", r"Centre of energy in $\Delta\phi$", "hist_EC_phi.png", asub),
                          ("width_eta", r"Width in $\Delta\eta$", "hist_width_eta.png", asub),
                          ("width_phi", r"Width in $\Delta\phi$", "hist_width_phi.png", asub),
                          ("ECr", "Centre of energy in r", "hist_EC_r.png", lsub),
                          ("width_r", "Width in r", "hist_width_r.png", lsub)]
            for fam, label, fname, layer_ids in shape_figs:
                if layer_ids:
                    paths.append(_feature_figure(out / fname, [f"{fam}_layer_{l}" for l in layer_ids],
                                                 [f"{label}, layer {l}" for l in layer_ids], rc, gc, bins,
                                                 "[mm]", logy=True))
            paths.append(_feature_figure(out / "hist_sparsity.png", [f"sparsity_layer_{l}" for l in lsub],
                                         [f"Hit fraction, layer {l}" for l in lsub], rc, gc, bins,
                                         "fraction of voxels hit", transform=lambda v: 1.0 - v))
        vb = sep.voxel_bins(geometry, float(np.max(ref_x, initial=0.0)))
        sub_r = ref_x[: min(len(ref_x), 20_000)].ravel()
        sub_g = gen_x[: min(len(gen_x), 20_000)].ravel()
        paths.append(_feature_figure(out / "hist_voxel_energy.png", ["voxel"], ["Voxel energy spectrum"],
                                     {"voxel": sub_r}, {"voxel": sub_g}, {"voxel": np.log10(vb)},
                                     r"$\log_{10}$(voxel energy / MeV)", logy=True, transform=_log10))
        paths.append(plot_response(rf, gf, geometry, out / "response_vs_energy.png"))
        paths.append(plot_shower_shapes(ref_x, gen_x, geometry, out / "shower_shapes.png"))
        if max_3d > 0:
            paths.append(plot_shower_3d(Showers(ref_e, ref_x), Showers(gen_e, gen_x), geometry,
                                        out / "shower_3d.png", n=max_3d))
    return paths
