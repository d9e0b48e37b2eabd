"""Nothing read from a checkpoint or an MLflow run runs code (issue 8.1), proven on real files.

A tiny run is trained once; its checkpoint is then edited the way an attacker would: the stored
config (``config_yaml``) and the generator ``spec`` name foreign callables (``pathlib.Path.write_text``,
``builtins.open``, ``numpy.save``, ``shutil.copyfile``, ``torch.load(weights_only=False)``) or Hydra's
own escape hatches (``_args_``, ``_recursive_``, ...), and is re-saved through ``checkpoint.save`` so
that its SHA-256 trailer is valid: only the allow-list stands between the file and code. Both ways in
(``caloexp.generate source=<ckpt>`` and ``caloexp.train resume=<run dir>``) must exit 2 with one line
naming the file, the key and "refused", and the payload must never have run (its marker file absent).
Each payload is first shown to be live: instantiating it with plain Hydra does write the marker.
"""
from __future__ import annotations

import copy
import pathlib
from pathlib import Path

import pytest
import torch
import yaml

from caloexp import checkpoint
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


class Evil:
    """Unpickling this writes the marker: what a hostile ``generator.pt`` or checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 10-step run: its directory, MLflow run id and pristine checkpoint state."""
    project = tmp_path_factory.mktemp("project")
    proc = run_cli(["caloexp.train", "+experiment=smoke", "trainer.max_steps=10", "data.n_showers=600",
                    "trainer.plot_every=0"], cwd=project, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (last,) = project.glob("outputs/train/*/checkpoints/last.ckpt")
    state = checkpoint.load(last)
    return {"project": project, "run_dir": last.parent.parent, "last": last, "state": state,
            "run_id": state["run_id"], "pristine": last.read_bytes()}


@pytest.fixture
def fresh(run):
    """The run's last.ckpt restored to its trained content before each test."""
    run["last"].write_bytes(run["pristine"])
    return run


# ------------------------------------------------------------------ payloads
def payloads(tmp: Path, marker: Path) -> dict[str, dict]:
    evil_pickle = tmp / "evil.pt"
    torch.save({"x": Evil(marker)}, evil_pickle)
    src = tmp / "src.txt"
    src.write_text("copied")
    return {
        "write_text": {"_target_": "pathlib.Path.write_text",
                       "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]}, "data": "pwned"},
        "open": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        "numpy_save": {"_target_": "numpy.save", "file": str(marker), "arr": [1, 2, 3]},
        "copyfile": {"_target_": "shutil.copyfile", "src": str(src), "dst": str(marker)},
        "torch_load": {"_target_": "torch.load", "f": str(evil_pickle), "weights_only": False},
    }


def tricks(marker: Path) -> dict[str, dict]:
    """Hydra's escape hatches around a class that *is* allowed, or a partial of a foreign callable."""
    return {
        "_args_": {"_target_": "caloexp.models.wgangp.WGANGP",
                   "_args_": [{"_target_": "builtins.open", "file": str(marker), "mode": "w"}]},
        "_recursive_": {"_target_": "caloexp.models.wgangp.WGANGP", "_recursive_": False,
                        "generator": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}},
        "_convert_": {"_target_": "caloexp.models.wgangp.WGANGP", "_convert_": "all",
                      "generator": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}},
        "_partial_": {"_target_": "builtins.open", "_partial_": True, "file": str(marker), "mode": "w"},
        "imported_name": {"_target_": "caloexp.models.wgangp.WGANGP",
                          "generator": {"_target_": "caloexp.sampling.Path", "_partial_": True}},
    }


def tamper(path: Path, state: dict, *, model: dict | None = None, data: dict | None = None,
           spec_model: dict | None = None, nested: bool = False) -> None:
    """Edit the stored config / spec and re-save through checkpoint.save (valid checksum)."""
    state = dict(state, spec=dict(state["spec"]))
    cfg = yaml.safe_load(state["config_yaml"])
    if model is not None:
        if nested:
            cfg["model"]["generator"] = model
        else:
            cfg["model"] = model
    if data is not None:
        cfg["data"] = data
    state["config_yaml"] = yaml.safe_dump(cfg)
    if spec_model is not None:
        m = dict(state["spec"]["model"])
        if nested:
            m["generator"] = spec_model
        else:
            m = spec_model
        state["spec"]["model"] = m
    checkpoint.save(path, state)
    assert checkpoint.load(path)["run_id"] == state["run_id"]   # the checksum passes


def assert_refused(proc, path: Path, key: str, marker: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"error: {path}: ") and key in line and "refused" in line, line
    assert not marker.exists(), f"the payload ran: {marker} was written"


def test_payloads_are_live(tmp_path):
    """Without the allow-list each payload does run code (so a missing marker below means refused)."""
    import hydra

    for name, payload in payloads(tmp_path, tmp_path / "m").items():
        marker = tmp_path / f"live_{name}.npy"  # numpy.save appends .npy to other names
        p = payloads(tmp_path, marker)[name]
        try:
            obj = hydra.utils.instantiate(p)
            if hasattr(obj, "close"):
                obj.close()
        except Exception:  # noqa: BLE001 - torch.load's payload returns a dict whose value is None
            pass
        assert marker.exists(), name


# ------------------------------------------------ generate source=<checkpoint>
@pytest.mark.parametrize("name", ["write_text", "open", "numpy_save", "copyfile", "torch_load"])
def test_generate_refuses_foreign_targets_in_the_spec(fresh, tmp_path, name):
    marker = tmp_path / "marker.npy"
    tamper(fresh["last"], fresh["state"], spec_model=payloads(tmp_path, marker)[name])
    proc = run_cli(["caloexp.generate", f"source={fresh['last']}", "n_showers=10",
                    f"output={tmp_path / 'gen.h5'}"], cwd=fresh["project"], env=ENV)
    assert_refused(proc, fresh["last"], "model._target_", marker)
    assert not (tmp_path / "gen.h5").exists()


def test_generate_refuses_hydra_tricks_in_the_spec(fresh, tmp_path):
    """In-process through sampling.load (what caloexp.generate calls): same one line, nothing runs."""
    from caloexp import sampling
    from caloexp.errors import InputError

    marker = tmp_path / "marker.npy"
    for name, payload in tricks(marker).items():
        tamper(fresh["last"], fresh["state"], spec_model=payload)
        with pytest.raises(InputError) as err:
            sampling.load(str(fresh["last"]))
        msg = str(err.value)
        assert msg.startswith(f"{fresh['last']}: generator spec: model") and "refused" in msg \
            and "\n" not in msg, (name, msg)
        assert not marker.exists(), name


def test_a_transform_spec_this_version_cannot_build_is_one_line_naming_the_file_and_setting(fresh):
    """E.g. a checkpoint written by a caloexp with a transform setting this one does not have."""
    from caloexp import sampling
    from caloexp.errors import InputError

    state = copy.deepcopy(fresh["state"])
    state["spec"]["transform"]["steps"][0]["made_up_setting"] = 1.0
    checkpoint.save(fresh["last"], state)
    with pytest.raises(InputError) as err:
        sampling.load(str(fresh["last"]))
    msg = str(err.value)
    assert msg.startswith(f"{fresh['last']}: its data transform spec does not build here") and "made_up_setting" in msg \
        and "\n" not in msg, msg


def test_generate_refuses_a_nested_foreign_net(fresh, tmp_path):
    marker = tmp_path / "marker.npy"
    tamper(fresh["last"], fresh["state"], spec_model=payloads(tmp_path, marker)["open"], nested=True)
    proc = run_cli(["caloexp.generate", f"source={fresh['run_dir']}", "n_showers=10",
                    f"output={tmp_path / 'gen.h5'}"], cwd=fresh["project"], env=ENV)
    assert_refused(proc, fresh["last"], "model.generator._target_", marker)


# ---------------------------------------------------- train resume=<run dir>
@pytest.mark.parametrize("name", ["write_text", "copyfile", "torch_load"])
def test_resume_refuses_foreign_targets_in_the_stored_config(fresh, tmp_path, name):
    marker = tmp_path / "marker.npy"
    where = {"model": payloads(tmp_path, marker)[name]} if name != "copyfile" else \
        {"data": payloads(tmp_path, marker)[name]}          # data is built first on resume
    tamper(fresh["last"], fresh["state"], **where)
    proc = run_cli(["caloexp.train", f"resume={fresh['run_dir']}"], cwd=fresh["project"], env=ENV)
    assert_refused(proc, fresh["last"], f"{next(iter(where))}._target_", marker)


def test_resume_refuses_hydra_tricks_in_the_stored_config(fresh, tmp_path):
    marker = tmp_path / "marker.npy"
    tamper(fresh["last"], fresh["state"], model=tricks(marker)["_recursive_"])
    proc = run_cli(["caloexp.train", f"resume={fresh['run_dir']}"], cwd=fresh["project"], env=ENV)
    assert_refused(proc, fresh["last"], "model._recursive_", marker)
    # the others in-process, through the check resume makes before building anything
    from omegaconf import OmegaConf

    from caloexp.build import check_stored_config
    from caloexp.errors import InputError

    base = yaml.safe_load(fresh["state"]["config_yaml"])
    for name, payload in tricks(marker).items():
        for group in ("model", "data"):
            with pytest.raises(InputError, match="refused") as err:
                check_stored_config(OmegaConf.create({**base, group: payload}), fresh["last"])
            assert str(err.value).startswith(f"{fresh['last']}: stored config: {group}"), (name, str(err.value))
    assert not marker.exists()


def test_resume_refuses_foreign_optimizer_and_scheduler_classes(fresh, tmp_path):
    """The optimiser/scheduler are built from the stored config too: only torch.optim classes, by name."""
    marker = tmp_path / "marker.npy"
    for group, target in (("optimizer", "torch.optim.adam.Tensor"),            # torch.Tensor, imported there
                          ("scheduler", "torch.optim.lr_scheduler.partial")):  # functools.partial
        state = dict(fresh["state"])
        cfg = yaml.safe_load(state["config_yaml"])
        cfg[group] = {"_target_": target, "lr": 1e-3} if group == "optimizer" else {"_target_": target}
        state["config_yaml"] = yaml.safe_dump(cfg)
        checkpoint.save(fresh["last"], state)
        proc = run_cli(["caloexp.train", f"resume={fresh['run_dir']}"], cwd=fresh["project"], env=ENV)
        assert_refused(proc, fresh["last"], f"{group}._target_", marker)


def test_resume_refuses_python_yaml_tags(fresh, tmp_path):
    """A stored config is YAML read safely: a python/object tag is one line, never an object."""
    marker = tmp_path / "marker.npy"
    state = dict(fresh["state"])
    state["config_yaml"] += f"evil: !!python/object/apply:pathlib.Path.write_text [!!python/object/apply:" \
                            f"pathlib.Path ['{marker}'], pwned]\n"
    checkpoint.save(fresh["last"], state)
    proc = run_cli(["caloexp.train", f"resume={fresh['run_dir']}"], cwd=fresh["project"], env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"error: {fresh['last']}: ") and "config" in line, line
    assert not marker.exists()


# ------------------------------------------------------ pickles that run code
def test_code_executing_pickles_fail_in_one_line(fresh, tmp_path):
    """A checkpoint file or a logged generator/generator.pt that is a code-running pickle: weights_only
    refuses it with one line naming the file, in generate and in resume."""
    marker = tmp_path / "marker.npy"
    evil = fresh["run_dir"] / "checkpoints" / "evil.ckpt"
    checkpoint.save(evil, {**fresh["state"], "model": {"w": Evil(marker)}})   # valid trailer, evil payload
    plain = fresh["run_dir"] / "checkpoints" / "plain.ckpt"
    torch.save({"model": Evil(marker), "config_yaml": ""}, plain)              # legacy file, no trailer
    try:
        for path in (evil, plain):
            for args in (["caloexp.generate", f"source={path}", f"output={tmp_path / 'g.h5'}"],
                         ["caloexp.train", f"resume={path}"]):
                proc = run_cli(args, cwd=fresh["project"], env=ENV)
                assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
                lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
                assert len(lines) == 1 and str(path) in lines[0], proc.stderr[-3000:]
                assert not marker.exists(), f"{args}: the pickle ran"
    finally:
        evil.unlink()
        plain.unlink()


def _generator_pt(run) -> Path:
    (path,) = [p for p in run["project"].rglob("generator.pt") if run["run_id"] in p.parts]
    return path


def test_logged_generator_that_runs_code_is_refused(run, tmp_path):
    """``generate source=<run id>`` reads generator/generator.pt weights-only: a replaced pickle fails in
    one line and never runs; a generator.pt whose spec names foreign code is refused by the allow-list."""
    gen_pt = _generator_pt(run)
    good = gen_pt.read_bytes()
    marker = tmp_path / "marker.npy"
    try:
        torch.save({"model": Evil(marker), "transform": {}, "spec": {}}, gen_pt)
        proc = run_cli(["caloexp.generate", f"source={run['run_id']}", "n_showers=10",
                        f"output={tmp_path / 'g.h5'}"], cwd=run["project"], env=ENV)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr[-3000:]
        (line,) = lines
        assert line.startswith("error: ") and f"runs:/{run['run_id']}/generator/generator.pt: not a readable" in line, line
        assert not marker.exists(), "the pickle ran"

        state = torch.load(__import__("io").BytesIO(good), weights_only=True)
        state["spec"]["model"] = payloads(tmp_path, marker)["torch_load"]
        torch.save(state, gen_pt)
        proc = run_cli(["caloexp.generate", f"source={run['run_id']}", "n_showers=10",
                        f"output={tmp_path / 'g.h5'}"], cwd=run["project"], env=ENV)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert line.startswith(f"error: runs:/{run['run_id']}/generator/generator.pt: ") and "model._target_='torch.load'" in line \
            and "refused" in line, line
        assert not marker.exists(), "the payload ran"
    finally:
        gen_pt.write_bytes(good)
    proc = run_cli(["caloexp.generate", f"source={run['run_id']}", "n_showers=10", f"output={tmp_path / 'g.h5'}"],
                   cwd=run["project"], env=ENV)
    assert proc.returncode == 0 and (tmp_path / "g.h5").exists(), proc.stderr[-3000:]
