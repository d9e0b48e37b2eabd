"""The leaderboard: your MLflow runs next to the published CaloChallenge dataset-1-photon results.

``python -m caloexp.leaderboard [experiment_name=caloexp] [family=CFM] [dataset=embedded_photons] ['filter="..."']``

One row per training run (tag ``caloexp.model``) or stand-alone evaluation run of the experiment(s):
classifier AUC on low- and high-level features (``cls/auc_low``, ``cls/auc_high``), FPD and KPD
(``fpd``, ``kpd``, shown × 10³ as the paper does), the official-feature separation ``sep/mean`` and
the generation time ``gen/ms_per_shower``. A metric is taken from the newest evaluation of the run
(``caloexp.evaluate mlflow_run=<id>``, tag ``caloexp.evaluates``), else from the run itself (its last
in-training evaluation); the time from the newest generation timing (``caloexp.generate
mlflow_run=<id>``, tag ``caloexp.generates``) per device. The published rows come from the package
file ``caloexp/data/published/calochallenge_ds1_photons.csv`` (arXiv:2410.21611). Writes
``leaderboard.csv``, ``leaderboard.md`` and ``leaderboard.png`` to ``out`` and prints the table.
"""
from __future__ import annotations

import csv
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import hydra
from omegaconf import DictConfig, ListConfig

from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.errors import ConfigError, InputError

log = logging.getLogger("caloexp.leaderboard")

PUBLISHED_FILE = "published/calochallenge_ds1_photons.csv"
PUBLISHED_BENCHMARK = "published: CaloChallenge ds1 photons (Geant4)"
NOTE = ("Benchmarks differ: rows marked 'embedded' are judged on caloexp's own parametric photon simulator, "
        "rows marked 'real' on CaloChallenge Geant4 files with caloexp's evaluator, published rows with the "
        "official evaluator and protocol classifier (arXiv:2410.21611). Compare a row only with rows of the "
        "same benchmark; 0.5 = indistinguishable from the reference.")

#: Table columns: key, header, MLflow metric and the factor it is shown with.
METRICS: dict[str, tuple[str, float]] = {"auc_low": ("cls/auc_low", 1.0), "auc_high": ("cls/auc_high", 1.0),
                                         "fpd_x1e3": ("fpd", 1e3), "kpd_x1e3": ("kpd", 1e3),
                                         "sep_mean": ("sep/mean", 1.0)}
GEN_METRIC = "gen/ms_per_shower"
COLUMNS: dict[str, str] = {
    "benchmark": "benchmark", "family": "family", "run": "run", "run_id": "run id",
    "auc_low": "AUC low", "auc_high": "AUC high", "fpd_x1e3": "FPD ×10³", "kpd_x1e3": "KPD ×10³",
    "sep_mean": "sep/mean", "cpu_ms_per_shower": "CPU ms/shower", "gpu_ms_per_shower": "GPU ms/shower",
    "gen_batch": "gen batch", "steps": "steps", "metrics_from": "metrics from",
}
SORTABLE = ("auc_low", "auc_high", "fpd_x1e3", "kpd_x1e3", "sep_mean", "cpu_ms_per_shower", "gpu_ms_per_shower", "run")
MISSING = "n/a"

Row = dict[str, Any]


# ------------------------------------------------------------ published figures
def published() -> list[Row]:
    """The published dataset-1-photon rows shipped with the package (header comment: their source)."""
    text = resources.files("caloexp.data").joinpath(PUBLISHED_FILE).read_text(encoding="utf-8")
    rows = []
    for rec in csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#")):
        row: Row = {k: None for k in COLUMNS}
        row.update(benchmark=PUBLISHED_BENCHMARK, family="published", run=rec["model"], run_id="",
                   metrics_from="arXiv:2410.21611", gen_batch=10000 if rec["cpu_ms_per_shower"] else None)
        for key in (*METRICS, "cpu_ms_per_shower", "gpu_ms_per_shower"):
            row[key] = float(rec[key]) if rec[key] else None
        rows.append(row)
    return rows


# ------------------------------------------------------------ runs from MLflow
def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():  # do not create an empty store by reading one
            raise InputError(f"{db}: no MLflow store (give tracking_uri=<uri> or set MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri)


def _search(client, exp_ids: list[str], filter_string: str, max_runs: int) -> list[Any]:
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    try:
        while len(runs) < max_runs:
            page = client.search_runs(exp_ids, filter_string, max_results=min(1000, max_runs - len(runs)),
                                      order_by=["attributes.start_time DESC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        what = f"filter={filter_string!r}" if filter_string else "search"
        raise InputError(f"{what}: {str(exc).splitlines()[0][:200]}") from None
    return runs


def _family(run) -> str:
    target = run.data.tags.get("caloexp.model")
    return target.rsplit(".", 1)[-1] if target else "-"


def _benchmark(run) -> str:
    dataset = run.data.tags.get("caloexp.dataset")
    if dataset is None:  # a stand-alone evaluation: its reference file decides
        return f"file: {Path(run.data.params.get('reference', '?')).name}"
    return "embedded (caloexp simulator)" if dataset.startswith("embedded") else f"real: {dataset}"


def _is_finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def run_row(run, evaluations: list[Any], timings: list[Any]) -> Row:
    """One row: each metric from the newest evaluation having it, else from the run; the newest time per device."""
    row: Row = {k: None for k in COLUMNS}
    row.update(benchmark=_benchmark(run), family=_family(run), run=run.info.run_name or run.info.run_id[:8],
               run_id=run.info.run_id)
    sources = []
    for key, (name, scale) in METRICS.items():
        for src in [*evaluations, run]:
            value = src.data.metrics.get(name)
            if _is_finite(value):
                row[key] = float(value) * scale
                training = src is run and "caloexp.model" in run.data.tags
                label = "training" if training else f"evaluate {src.info.run_id[:8]}"
                if label not in sources:
                    sources.append(label)
                break
    row["metrics_from"] = ", ".join(sources) or MISSING
    for src in [*timings, run]:
        value = src.data.metrics.get(GEN_METRIC)
        if not _is_finite(value):
            continue
        p = src.data.params
        on_cpu = p.get("gen.device", "cpu") == "cpu"  # else cuda, mps, ...: an accelerator
        key = "cpu_ms_per_shower" if on_cpu else "gpu_ms_per_shower"
        if row[key] is None:
            row[key] = float(value)
            if row["gen_batch"] is None:
                row["gen_batch"] = int(p["gen.batch_size"]) if "gen.batch_size" in p else None
                row["steps"] = p.get("gen.sampler.steps")
    return row


def collect(tracking_uri: str, experiments: list[str], filter_string: str = "", max_runs: int = 1000,
            family: str | None = None, dataset: str | None = None) -> list[Row]:
    """The rows of the user's runs in these experiments: optionally an MLflow search filter on them, and
    only one model family (class name, any case) or dataset (``data.name``, tag ``caloexp.dataset``)."""
    client = _client(tracking_uri)
    exp_ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            have = sorted(e.name for e in client.search_experiments())
            raise InputError(f"experiment_name={name}: no such MLflow experiment at {tracking_uri} "
                             f"(experiments there: {', '.join(have) or 'none'})")
        exp_ids.append(exp.experiment_id)
    everything = _search(client, exp_ids, "", max_runs=50 * max_runs)  # newest first
    chosen = _search(client, exp_ids, filter_string, max_runs) if filter_string else everything
    side: dict[str, dict[str, list[Any]]] = {}
    for r in everything:
        for tag in ("caloexp.evaluates", "caloexp.generates"):
            if r.data.tags.get(tag) and r.info.status == "FINISHED":
                side.setdefault(r.data.tags[tag], {}).setdefault(tag, []).append(r)
    rows = []
    for r in chosen:
        tags = r.data.tags
        if tags.get("caloexp.evaluates") or tags.get("caloexp.generates"):
            continue  # recorded with the run it measured
        if "caloexp.model" not in tags and "generated" not in r.data.params:
            continue  # a sweep's parent run, a stand-alone generation timing, foreign runs
        if (family and _family(r).lower() != family.lower()) or (dataset and tags.get("caloexp.dataset") != dataset):
            continue
        mine = side.get(r.info.run_id, {})
        rows.append(run_row(r, mine.get("caloexp.evaluates", []), mine.get("caloexp.generates", [])))
        if len(rows) >= max_runs:
            break
    return rows


# ------------------------------------------------------------ ordering and output
def sort_rows(rows: Iterable[Row], key: str) -> list[Row]:
    """Best first: AUCs by their distance from 0.5, other figures ascending, names alphabetically; missing last."""
    if key not in SORTABLE:
        raise ConfigError(f"sort={key}: not one of {', '.join(SORTABLE)}")

    def k(row: Row) -> tuple:
        v = row[key]
        if v is None:
            return (1, 0.0, row["run"])
        if key == "run":
            return (0, 0.0, str(v))
        return (0, abs(v - 0.5) if key.startswith("auc") else v, row["run"])
    return sorted(rows, key=k)


def fmt(key: str, v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        if key.startswith("auc"):
            return f"{v:.3f}"
        a = abs(v)
        return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3g}" if a >= 1e-3 or a == 0 else f"{v:.2e}"
    return str(v)


SHOWN = ("benchmark", "family", "run", "auc_low", "auc_high", "fpd_x1e3", "kpd_x1e3", "sep_mean",
         "cpu_ms_per_shower", "gpu_ms_per_shower", "steps", "metrics_from")


def text_table(rows: list[Row], columns: Iterable[str] = SHOWN) -> str:
    cols = list(columns)
    cells = [[COLUMNS[c] for c in cols]] + [[fmt(c, r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[Row], columns: Iterable[str] = SHOWN) -> str:
    cols = list(columns)
    out = ["| " + " | ".join(COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(c, r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]
                        for k in COLUMNS})


def plot(path: Path, rows: list[Row], label_runs: int = 15) -> Path:
    """AUC low vs AUC high (left) and AUC low vs generation ms/shower (right); published rows in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    benchmarks = sorted({r["benchmark"] for r in rows if r["benchmark"] != PUBLISHED_BENCHMARK})
    styles = {PUBLISHED_BENCHMARK: dict(color="0.45", marker="o", s=30)}
    for i, b in enumerate(benchmarks):
        styles[b] = dict(color=f"C{i}", marker="*Dsp^vP"[i % 7], s=110)
    n_user = sum(r["benchmark"] != PUBLISHED_BENCHMARK for r in rows)
    for b, style in styles.items():
        pts = [r for r in rows if r["benchmark"] == b]
        xy = [(r["auc_low"], r["auc_high"], r["run"]) for r in pts
              if r["auc_low"] is not None and r["auc_high"] is not None]
        if xy:
            ax1.scatter([p[0] for p in xy], [p[1] for p in xy], label=b, **style)
        for dev, key, hollow in (("CPU", "cpu_ms_per_shower", False), ("GPU", "gpu_ms_per_shower", True)):
            t = [(r[key], r["auc_low"], r["run"]) for r in pts if r[key] is not None and r["auc_low"] is not None]
            if t:
                kw = dict(style, facecolors="none", edgecolors=style["color"]) if hollow else style
                kw = {k: v for k, v in kw.items() if not (hollow and k == "color")}
                ax2.scatter([p[0] for p in t], [p[1] for p in t], label=f"{b} ({dev})", **kw)
        if b == PUBLISHED_BENCHMARK or n_user <= label_runs:
            for x, y, name in xy:
                ax1.annotate(name[:28], (x, y), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
            for x, y, name, batch in [(r["cpu_ms_per_shower"], r["auc_low"], r["run"], r["gen_batch"]) for r in pts
                                      if r["cpu_ms_per_shower"] is not None and r["auc_low"] is not None]:
                name = name[:28] + (f" (batch {batch:,})" if batch not in (None, 10000) else "")
                ax2.annotate(name, (x, y), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
    for ax in (ax1, ax2):
        ax.axhline(0.5, color="k", lw=0.6, ls="--")
        ax.grid(alpha=0.3)
    ax1.axvline(0.5, color="k", lw=0.6, ls="--")
    ax1.set(xlabel="classifier AUC, low-level features", ylabel="classifier AUC, high-level features",
            title="AUC (0.5 = indistinguishable from the reference)")
    ax2.set_xscale("log")
    ax2.set(xlabel="generation ms/shower (batch 10,000 unless labelled; filled CPU, hollow GPU)",
            ylabel="classifier AUC, low-level",
            title="fidelity vs generation time")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if ax is ax2 else "upper left")
    fig.suptitle("Different benchmarks: embedded-data, real-data and published figures are not directly comparable",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------ entry point
def _names(value: Any) -> list[str]:
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ConfigError("experiment_name=<name>: give at least one MLflow experiment name")
    return names


def run(cfg: DictConfig) -> list[Row]:
    """Build, print and write the leaderboard as configured; return its rows (the user's first)."""
    max_runs = int(cfg.max_runs)
    if max_runs < 1:
        raise ConfigError(f"max_runs={max_runs}: must be >= 1")
    sort_rows([], str(cfg.sort))  # a bad sort key is reported before any work
    found = collect(str(cfg.tracking_uri), _names(cfg.experiment_name), str(cfg.filter or ""), max_runs,
                    family=cfg.family, dataset=cfg.dataset)
    rows = sort_rows(found, str(cfg.sort))
    table = rows + (sort_rows(published(), str(cfg.sort)) if cfg.published else [])
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "leaderboard.csv", table)
    notes = [NOTE]
    no_time = [r["run"] for r in rows if r["cpu_ms_per_shower"] is None and r["gpu_ms_per_shower"] is None]
    if no_time:
        notes.append(f"No generation time for {len(no_time)} of {len(rows)} runs: "
                     "log it with `python -m caloexp.generate source=<run id> mlflow_run=<run id>`.")
    no_auc = [r["run"] for r in rows if r["auc_low"] is None]
    if no_auc:
        notes.append(f"No classifier AUC for {len(no_auc)} of {len(rows)} runs: evaluate with `python -m "
                     "caloexp.evaluate generated=<file> reference=<file> metrics=protocol mlflow_run=<run id>`.")
    if not rows:
        notes.append(f"No runs found in experiment(s) {', '.join(_names(cfg.experiment_name))}"
                     + "".join(f" with {k}={cfg[k]!r}" for k in ("family", "dataset", "filter") if cfg[k]) + ".")
    (out / "leaderboard.md").write_text("# Leaderboard\n\n" + "\n\n".join(f"> {n}" for n in notes) + "\n\n"
                                        + markdown(table) + "\n", encoding="utf-8")
    plot(out / "leaderboard.png", table)
    print(text_table(table))
    print()
    for n in notes:
        print("note:", n)
    log.info("%d runs, %d published rows -> %s (leaderboard.csv, .md, .png)", len(rows), len(table) - len(rows), out)
    return table


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="leaderboard")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        run(cfg)


def main() -> None:
    run_hydra_app(hydra_main, config_name="leaderboard")


if __name__ == "__main__":
    main()
