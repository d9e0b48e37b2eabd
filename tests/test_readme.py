"""The README's offline examples run as written, offline, in a fresh project directory.

A code block preceded by the line ``<!-- offline -->`` promises to run on a fresh clone without
network after set-up step 1 (``python -m caloexp.train``). Each such block runs here in a bash
shell (``set -euo pipefail``) in an empty project directory where that step 1 has run, with no
``MLFLOW_TRACKING_URI``/``CALOEXP_ROOT`` and ``CALOEXP_OFFLINE=1``. To keep the suite fast, the
overrides in ``FAST`` are appended to the README's ``python -m caloexp...`` commands (later
overrides win in Hydra and argparse); nothing else of a command is changed. In the Python block,
``"<run id>"`` becomes the id of the step-1 run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- offline -->"
TRAIN_FAST = ("data.n_showers=1500 data.eval_events=300 data.batch_size=64 trainer.max_steps=20 "
              "trainer.eval_every=20 trainer.log_every=5 trainer.checkpoint_every=20 trainer.plot_every=0")
FAST = {
    "caloexp.train": TRAIN_FAST,
    "caloexp.train --multirun": TRAIN_FAST + " hydra.sweeper.n_trials=1",
    "caloexp.generate": "",
    "caloexp.evaluate": "metrics=fast plot_bytes=20000000",
    "caloexp.data.embedded": "--n-showers 3000",
}
COMMAND = re.compile(r"^python -m (caloexp(?:\.\w+)+)(?=\s|$)")


def offline_blocks(text: str) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every block marked offline, in README order."""
    out = []
    for m in re.finditer(r"^" + re.escape(MARK) + r"\n```(\w+)\n(.*?)^```", text, re.M | re.S):
        heading = re.findall(r"^## (.+)$", text[:m.start()], re.M)[-1]
        out.append((heading, m.group(1), m.group(2)))
    return out


def fast(code: str) -> str:
    """The block with FAST appended to its caloexp commands (continuations joined, comments dropped)."""
    lines = []
    for line in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s+)#\s.*$", "", line).rstrip()
        m = COMMAND.match(line)
        if m:
            key = m.group(1) + (" --multirun" if " --multirun" in line else "")
            assert key in FAST, f"README runs {key}: add its test overrides to FAST"
            line = f"{line} {FAST[key]}".rstrip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


README = (REPO / "README.md").read_text()
BLOCKS = offline_blocks(README)


def block(heading: str, lang: str = "bash") -> str:
    found = [code for h, l, code in BLOCKS if h == heading and l == lang]
    assert len(found) == 1, f"README: expected one {lang} block marked offline under '## {heading}'"
    return found[0]


def run_block(code: str, project: Path, lang: str = "bash", timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CALOEXP_ROOT")}
    bindir = project / ".bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "python").exists():
        (bindir / "python").symlink_to(sys.executable)  # `python` in the README is this interpreter
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), CALOEXP_OFFLINE="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    r = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"README block failed ({r.returncode}):\n{code}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project}/mlflow.db")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh project directory after set-up step 1 (``python -m caloexp.train``, shortened by FAST)."""
    root = tmp_path_factory.mktemp("clone")
    run_block(fast("python -m caloexp.train\n"), root)
    return root


@pytest.fixture(scope="module")
def generated(project: Path) -> Path:
    run_block(fast(block("Generating showers")), project)
    return project


def test_offline_blocks_are_marked_and_hold_no_placeholders():
    assert [(h, l) for h, l, _ in BLOCKS] == [("Generating showers", "bash"), ("Generating showers", "python"),
                                              ("Evaluating", "bash"), ("Sweeps", "bash")]
    for heading, lang, code in BLOCKS:
        if lang == "bash":
            assert not re.search(r"<[^>]*>|\.\.\.", code), f"placeholder in the offline block under {heading}"
    assert "--n-showers 3000" in fast("python -m caloexp.data.embedded --seed 7  # comment\n")


def test_generating_examples_run_offline(generated: Path):
    with h5py.File(generated / "gen.hdf5") as f:
        assert f["showers"].shape == (15000, 368)
        assert len(np.unique(f["incident_energies"][:])) == 15
    with h5py.File(generated / "gen_2E.hdf5") as f:
        assert f["showers"].shape == (2000, 368)
        assert set(np.unique(f["incident_energies"][:])) == {1024.0, 65536.0}
    with h5py.File(generated / "data" / "heldout.hdf5") as ref, h5py.File(generated / "gen_heldout.hdf5") as gen:
        assert ref["showers"].shape == (3000, 368)
        np.testing.assert_array_equal(gen["incident_energies"][:], ref["incident_energies"][:])


def test_python_snippet_loads_the_generator_from_the_store(generated: Path):
    exp = client(generated).get_experiment_by_name("caloexp")
    (run,) = client(generated).search_runs([exp.experiment_id])
    code = block("Generating showers", "python").replace("<run id>", run.info.run_id)
    r = run_block(code, generated, lang="python")
    assert "torch.Size([2, 368])" in r.stdout, r.stdout


def test_evaluating_examples_run_offline(generated: Path):
    c = client(generated)
    exp = c.get_experiment_by_name("caloexp")
    (trained,) = c.search_runs([exp.experiment_id])
    run_block(fast(block("Evaluating")), generated)
    metrics = json.loads((generated / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["sep/mean"])
    (standalone,) = c.search_runs([c.get_experiment_by_name("caloexp-evaluate").experiment_id])
    assert standalone.data.metrics["sep/mean"] == pytest.approx(metrics["sep/mean"])
    (child,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`caloexp.evaluates` = '{trained.info.run_id}'")
    assert child.data.tags["mlflow.parentRunId"] == trained.info.run_id
    after = c.get_run(trained.info.run_id)
    assert (after.info.status, after.info.end_time) == (trained.info.status, trained.info.end_time)


def test_sweeps_examples_run_offline(project: Path):
    import optuna

    source_best = sorted((REPO / "conf" / "experiment").glob("*_best.yaml"))
    run_block(fast(block("Sweeps")), project)
    storage = f"sqlite:///{project}/optuna.db"
    assert {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)} == \
        {"wgangp_lr": 1, "wgangp_arch": 1, "wgangp_joint": 1}
    best = optuna.load_study(study_name="wgangp_lr", storage=storage).best_params
    assert (project / "experiments" / "wgangp_lr_best.yaml").is_file()
    assert sorted((REPO / "conf" / "experiment").glob("*_best.yaml")) == source_best  # source tree untouched
    c = client(project)
    exp = c.get_experiment_by_name("caloexp")
    last = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FINISHED" and "+experiment=wgangp_lr_best" in last.data.tags["caloexp.overrides"]
    for name, value in best.items():
        assert float(last.data.params[name]) == pytest.approx(value), name
    view = json.loads(exp.tags["mlflow.sharedViewState.sweep"])
    assert "params.`sweep.optimizer.generator.lr`" in view["selectedColumns"]
