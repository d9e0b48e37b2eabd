"""The ``tabular`` metric group and plots: per-variable and per-class fidelity of tables of physics variables.

Events are rows ``x`` (N, V) of any sign with an optional class ``label`` condition ((N,) integers
or one-hot (N, K)). Variables are named ``x0``, ``x1``, ... in metric names (column order of the
data config). Histograms use :func:`caloexp.metrics.generic.common_bins` (pooled binning with
under/overflow), so no value is dropped.

Per variable ``v``, over all events and (prefix ``tab/label_<k>/``) per class ``k`` present in both samples:

* ``sep_<v>`` separation power (triangular discrimination, 0 same, 1 disjoint);
* ``wd_<v>`` 1D Wasserstein-1 distance divided by the reference's standard deviation;
* ``ks_<v>`` the two-sample Kolmogorov-Smirnov *statistic* sup |F_ref - F_gen| (a distance in [0, 1],
  not a p-value);
* their means ``sep_mean``, ``wd_mean``, ``ks_mean``;
* ``corr_max`` = max |rho_ref - rho_gen| of the Pearson matrices, ``spearman_max`` the same for
  Spearman's rank correlations (constant columns: rho 0).

Over classes: ``tab/corr_max_class`` and ``tab/spearman_max_class`` (the worst class), ``tab/sep_mean_class``
(separation averaged over classes and variables).

Classifiers (scikit-learn gradient-boosted trees, seeded, 50/50 train/test split of equal-size samples):

* ``tab/auc`` real vs generated on the variables, ``tab/auc_label`` on variables + one-hot label
  (0.5: indistinguishable; 1: separable);
* class fidelity: a classifier of the label from the variables is trained on half of the reference;
  on the other half it gives the confusion matrix C[j, k] = P(predicted k | class j). For generated
  events requested in class fractions r_j, the expected predicted fractions are e_k = sum_j r_j C[j, k];
  ``tab/class_fid/requested_<k>`` = r_k, ``tab/class_fid/generated_<k>`` = the measured fraction predicted
  as k, ``tab/class_fid/expected_<k>`` = e_k and ``tab/class_fid/max_dev`` = max_k |generated_k - e_k|
  (0 when the generated classes are as recognisable as real ones); ``tab/class_fid/recall_dev`` =
  max_j |P(predicted j | requested j) - C[j, j]| (catches classes swapped at equal fractions).

``tab/mean`` = ``tab/sep_mean``; ``monitor/score`` = ``tab/sep_mean`` + ``tab/wd_mean``.

:func:`plot_tabular` draws, per class, the histograms of every variable with ratio panels, the
Pearson and Spearman matrices (reference, generated, difference) and 2D densities of every pair.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import ks_2samp, rankdata, wasserstein_distance

from caloexp.metrics.engine import Accumulator, Chunk, Context, MetricGroup, register
from caloexp.metrics.generic import separation_common

MAX_CLASSIFIER_ROWS = 20_000


# ------------------------------------------------------------------ pieces
def pearson(x: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix (V, V); constant columns (and samples of < 2 rows) give rho 0."""
    x = np.asarray(x, np.float64)
    if x.shape[1] < 2 or len(x) < 2:
        return np.zeros((x.shape[1], x.shape[1]))
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    c = z.T @ z / len(x)
    c[:, sd == 0] = 0.0
    c[sd == 0, :] = 0.0
    return c


def spearman(x: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation matrix: Pearson of the (average-tie) ranks of each column."""
    x = np.asarray(x, np.float64)
    return pearson(rankdata(x, axis=0) if len(x) else x)


def ks_statistic(ref: np.ndarray, gen: np.ndarray) -> float:
    """sup_t |F_ref(t) - F_gen(t)| of the two empirical CDFs."""
    return float(ks_2samp(ref, gen).statistic)


def variable_metrics(ref: np.ndarray, gen: np.ndarray, prefix: str, per_variable: bool = True) -> dict[str, float]:
    """Separation, scaled Wasserstein, KS per variable, their means, Pearson and Spearman max |delta rho|."""
    out: dict[str, float] = {}
    seps, wds, kss = [], [], []
    for j in range(ref.shape[1]):
        r, g = ref[:, j], gen[:, j]
        sd = float(np.std(r))
        s = separation_common(r, g)
        wd = float(wasserstein_distance(r, g)) / (sd if sd > 0 else 1.0)
        ks = ks_statistic(r, g)
        seps.append(s), wds.append(wd), kss.append(ks)
        if per_variable:
            out[f"{prefix}/sep_x{j}"], out[f"{prefix}/wd_x{j}"], out[f"{prefix}/ks_x{j}"] = s, wd, ks
    out[f"{prefix}/sep_mean"] = float(np.mean(seps))
    out[f"{prefix}/wd_mean"] = float(np.mean(wds))
    out[f"{prefix}/ks_mean"] = float(np.mean(kss))
    out[f"{prefix}/corr_max"] = float(np.max(np.abs(pearson(ref) - pearson(gen)), initial=0.0))
    out[f"{prefix}/spearman_max"] = float(np.max(np.abs(spearman(ref) - spearman(gen)), initial=0.0))
    return out


class _Boosted:
    """Gradient-boosted trees on one thread (OpenMP threads on a busy machine slow it by 100x)."""

    def __init__(self, seed: int):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.clf = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                                  random_state=seed)

    def _one_thread(self):
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1)

    def fit(self, x, y) -> "_Boosted":
        with self._one_thread():
            self.clf.fit(x, y)
        return self

    def predict(self, x):
        with self._one_thread():
            return self.clf.predict(x)

    def predict_proba(self, x):
        with self._one_thread():
            return self.clf.predict_proba(x)


def _boosted(seed: int) -> _Boosted:
    return _Boosted(seed)


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)


def classifier_auc(ref: np.ndarray, gen: np.ndarray, seed: int = 0, cap: int = MAX_CLASSIFIER_ROWS) -> float:
    """ROC AUC of a classifier telling generated (0) from reference (1), on a held-out half."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = min(len(ref), len(gen), cap)
    if n < 4:
        return float("nan")
    a, b = ref[_subsample(len(ref), n, rng)], gen[_subsample(len(gen), n, rng)]
    x = np.concatenate([a, b])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    perm = rng.permutation(2 * n)
    tr, te = perm[:n], perm[n:]
    if len(np.unique(y[te])) < 2 or len(np.unique(y[tr])) < 2:
        return float("nan")
    clf = _boosted(seed).fit(x[tr], y[tr])
    return float(roc_auc_score(y[te], clf.predict_proba(x[te])[:, 1]))


def class_fidelity(ref: np.ndarray, ref_lab: np.ndarray, gen: np.ndarray, gen_lab: np.ndarray, n_classes: int,
                   seed: int = 0) -> dict[str, float]:
    """Generated fraction per predicted class vs what the requested labels should give (see the module doc)."""
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(len(ref))
    tr, te = perm[: len(ref) // 2], perm[len(ref) // 2:]
    out: dict[str, float] = {}
    requested = np.bincount(gen_lab, minlength=n_classes) / len(gen_lab)
    if len(np.unique(ref_lab[tr])) < 2:
        return out
    clf = _boosted(seed).fit(ref[tr], ref_lab[tr])
    conf = np.zeros((n_classes, n_classes))
    pred_te = clf.predict(ref[te]).astype(np.int64)
    for j in range(n_classes):
        m = ref_lab[te] == j
        if m.any():
            conf[j] = np.bincount(pred_te[m], minlength=n_classes)[:n_classes] / m.sum()
        else:
            conf[j, j] = 1.0
    expected = requested @ conf
    pred_gen = clf.predict(gen).astype(np.int64)
    generated = np.bincount(pred_gen, minlength=n_classes)[:n_classes] / len(gen)
    recall = [abs(float((pred_gen[gen_lab == j] == j).mean()) - conf[j, j]) for j in range(n_classes)
              if (gen_lab == j).any()]
    out["tab/class_fid/recall_dev"] = float(max(recall))
    for k in range(n_classes):
        out[f"tab/class_fid/requested_{k}"] = float(requested[k])
        out[f"tab/class_fid/generated_{k}"] = float(generated[k])
        out[f"tab/class_fid/expected_{k}"] = float(expected[k])
    out["tab/class_fid/max_dev"] = float(np.max(np.abs(generated - expected)))
    return out


def _labels(cond: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    if "label" not in cond:
        return None
    lab = np.asarray(cond["label"]).reshape(n, -1)
    return (lab[:, 0] if lab.shape[1] == 1 else np.argmax(lab, axis=1)).astype(np.int64)


def tabular_metrics(rx: np.ndarray, gx: np.ndarray, rl: np.ndarray | None = None, gl: np.ndarray | None = None,
                    seed: int = 0, classifiers: bool = True) -> dict[str, float]:
    """Every metric of the module doc from two tables (and their labels)."""
    out = variable_metrics(rx, gx, "tab")
    if classifiers:
        out["tab/auc"] = classifier_auc(rx, gx, seed)
    if rl is not None and gl is not None:
        k_max = int(max(rl.max(initial=0), gl.max(initial=0))) + 1
        per = []
        for k in np.unique(rl):
            mr, mg = rl == k, gl == k
            if mr.sum() >= 2 and mg.sum() >= 2:
                m = variable_metrics(rx[mr], gx[mg], f"tab/label_{int(k)}")
                out.update(m)
                per.append(m)
        if per:
            for name in ("corr_max", "spearman_max"):
                out[f"tab/{name}_class"] = max(m[next(k for k in m if k.endswith("/" + name))] for m in per)
            out["tab/sep_mean_class"] = float(np.mean([m[next(k for k in m if k.endswith("/sep_mean"))]
                                                       for m in per]))
        if classifiers:
            onehot = lambda lab: np.eye(k_max)[lab]  # noqa: E731
            out["tab/auc_label"] = classifier_auc(np.hstack([rx, onehot(rl)]), np.hstack([gx, onehot(gl)]), seed)
            out.update(class_fidelity(rx, rl, gx, gl, k_max, seed))
    out["tab/mean"] = out["tab/sep_mean"]
    out["monitor/score"] = out["tab/sep_mean"] + out["tab/wd_mean"]
    return {k: v for k, v in out.items() if not np.isnan(v)}


class _Tabular(Accumulator):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.parts: dict[str, list] = {"reference": [], "generated": []}

    def add(self, which: str, chunk: Chunk) -> None:
        self.parts[which].append((np.asarray(chunk.x, np.float64).reshape(len(chunk), -1),
                                  _labels(chunk.cond, len(chunk))))

    def result(self, rf, gf) -> dict[str, float]:
        (rx, rl), (gx, gl) = ((np.concatenate([p[0] for p in parts]),
                               None if parts[0][1] is None else np.concatenate([p[1] for p in parts]))
                              for parts in (self.parts["reference"], self.parts["generated"]))
        return tabular_metrics(rx, gx, rl, gl, seed=self.ctx.seed,
                               classifiers=bool(self.ctx.options.get("tabular_classifiers", True)))


register(MetricGroup("tabular", ("tabular",), _Tabular,
                     "tab/* per variable and class: separation, Wasserstein, KS; Pearson/Spearman max|drho|; "
                     "classifier AUC; class fidelity; monitor/score"))


# ------------------------------------------------------------------ plots
def plot_tabular(rx: np.ndarray, rl: np.ndarray | None, gx: np.ndarray, gl: np.ndarray | None, outdir: str | Path,
                 columns: Sequence[str] | None = None, max_points: int = 20_000) -> list[Path]:
    """Per class: histograms with ratio panels, correlation matrices and pairwise 2D densities (PNGs)."""
    import matplotlib.pyplot as plt

    from caloexp import plots

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    v = rx.shape[1]
    names = list(columns) if columns and len(columns) == v else [f"x{j}" for j in range(v)]
    classes = [("all", np.ones(len(rx), bool), np.ones(len(gx), bool))]
    if rl is not None and gl is not None:
        classes += [(f"label_{int(k)}", rl == k, gl == k) for k in np.unique(rl) if (gl == k).sum() >= 2]
    paths: list[Path] = []
    with plt.rc_context(plots.STYLE):
        panels = [(f"{names[j]} ({cls})", plots.histogram_pair(rx[mr, j], gx[mg, j]), None)
                  for cls, mr, mg in classes for j in range(v)]
        paths.append(plots._histogram_figure(outdir / "tab_hist.png", panels, "value", ylabel="fraction of events"))
        if v >= 2:
            paths.append(_correlations(rx, gx, classes, names, outdir / "tab_correlations.png"))
            paths.append(_pairs(rx, gx, classes, names, outdir / "tab_pairs.png", max_points))
    return paths


def _correlations(rx, gx, classes, names, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [(cls, kind, fn(rx[mr]), fn(gx[mg])) for cls, mr, mg in classes
            for kind, fn in (("Pearson", pearson), ("Spearman", spearman))]
    fig, axes = plt.subplots(len(rows), 3, figsize=(max(6.4, 2.2 * 3 + 1), 2.2 * len(rows)), squeeze=False)
    for i, (cls, kind, a, b) in enumerate(rows):
        for ax, mat, title, cmap, lim in ((axes[i, 0], a, "reference", "coolwarm", 1.0),
                                          (axes[i, 1], b, "generated", "coolwarm", 1.0),
                                          (axes[i, 2], b - a, "gen - ref", "PiYG", 0.1)):
            im = ax.imshow(mat, cmap=cmap, vmin=-lim, vmax=lim)
            for (r, c), val in np.ndenumerate(mat):
                ax.text(c, r, f"{val:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(names)), names, rotation=45, fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
            ax.set_title(f"{kind} {cls}: {title}" + (f" (max {np.abs(mat).max():.3f})" if lim < 1 else ""), fontsize=7)
        fig.colorbar(im, ax=axes[i, 2], fraction=0.046)
    fig.tight_layout()
    return plots_save(fig, path)


def _pairs(rx, gx, classes, names, path: Path, max_points: int) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    fig, axes = plt.subplots(len(classes), 2 * len(pairs), figsize=(max(6.4, 2.4 * 2 * len(pairs)),
                                                                    2.4 * len(classes)), squeeze=False)
    for i, (cls, mr, mg) in enumerate(classes):
        for p, (a, b) in enumerate(pairs):
            both = np.concatenate([rx[mr][:, [a, b]], gx[mg][:, [a, b]]])
            lo, hi = np.quantile(both, 0.005, axis=0), np.quantile(both, 0.995, axis=0)
            bins = [np.linspace(lo[0], hi[0] + 1e-9, 40), np.linspace(lo[1], hi[1] + 1e-9, 40)]
            for s, (x, what) in enumerate(((rx[mr][:max_points], "reference"), (gx[mg][:max_points], "generated"))):
                ax = axes[i, 2 * p + s]
                h, _, _ = np.histogram2d(x[:, a], x[:, b], bins=bins)
                ax.pcolormesh(bins[0], bins[1], h.T / max(h.sum(), 1), norm=LogNorm(vmin=1e-5, vmax=0.05),
                              cmap="viridis")
                ax.set_xlabel(names[a], fontsize=7)
                ax.set_ylabel(names[b], fontsize=7)
                ax.set_title(f"{what} ({cls})", fontsize=7)
    fig.tight_layout()
    return plots_save(fig, path)


def plots_save(fig, path: Path) -> Path:
    from caloexp import plots

    return plots._save(fig, path)


__all__ = ["class_fidelity", "classifier_auc", "ks_statistic", "pearson", "plot_tabular", "spearman",
           "tabular_metrics", "variable_metrics"]
