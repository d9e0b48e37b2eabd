"""Export a trained generator as one self-contained file for inference outside caloexp (Geant4, C++).

``python -m caloexp.export source=<run id | checkpoint | run dir> format=onnx|torchscript [out=<path>]``

The exported graph is :meth:`caloexp.sampling.EventGenerator.decode` - the very code caloexp
generates with - traced with a dynamic batch dimension: the family's sampler (a latent generator,
or a flow-matching ODE solve unrolled with a fixed number of steps, both stages of a two-stage
model) followed by the fitted inverse transform. Contract (written beside the file as
``<out>.json`` and inside it: ONNX metadata / TorchScript extra file ``contract.json``)::

    inputs   noise       float32 (B, noise_dim)   standard normal, drawn by the caller
             conditions  float32 (B, n_cond)      physical units, columns in `conditions` order
                                                  (CaloChallenge: incident energy in MeV)
    output   events      float32 (B, n_cells)     physical units (CaloChallenge: MeV per voxel),
                                                  the dataset's voxel order (row-major event shape)

The generator is rebuilt from the checkpoint's plain spec (:func:`caloexp.sampling.load`): no file
is unpickled. After writing, the file is loaded back (onnxruntime / ``torch.jit.load``) and run on
fresh noise at another batch size; the largest relative difference to caloexp's own generation is
logged and stored in the contract. A run id source (or a checkpoint of a tracked run) gets the
files logged to its MLflow run under ``export/``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from caloexp import sampling
from caloexp.cli import CONF_DIR, report_errors, run_hydra_app
from caloexp.errors import ConfigError, InputError

log = logging.getLogger("caloexp.export")

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
UNITS = {"calo": "MeV", "grid": "GeV"}


class ExportedGenerator(nn.Module):
    """``(noise, conditions) -> events``: flat tensors only, as Geant4's Par04 inference interfaces feed them."""

    def __init__(self, gen: sampling.EventGenerator, options: Mapping[str, Any] | None = None):
        super().__init__()
        if not hasattr(gen.sampler, "decode"):
            raise ConfigError(f"{type(gen.sampler).__name__}: this family's sampler has no decode(noise, cond); "
                              "it cannot be exported")
        self.gen = gen
        self.options = dict(options or {})
        dims = gen.transform.spec().get("cond_dims") or {}
        self.cond_dims = [int(dims.get(name, 1)) for name in gen.cond_names]
        self.noise_dim = int(gen.sampler.noise_dim)
        self.n_cells = int(math.prod(gen.transform.event_shape))

    def forward(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        cond: dict[str, torch.Tensor] = {}
        i = 0
        for name, d in zip(self.gen.cond_names, self.cond_dims):
            col = conditions[:, i:i + d]
            cond[name] = col.reshape(-1) if d == 1 else col
            i += d
        x = self.gen.decode(noise, cond, **self.options)
        return x.reshape(noise.shape[0], self.n_cells)


def contract(wrapper: ExportedGenerator, spec: Mapping[str, Any], fmt: str, source: str) -> dict[str, Any]:
    """The plain description of the exported file's inputs and output (also what Geant4 code needs)."""
    kind = str(spec.get("kind", "calo"))
    unit = UNITS.get(kind, "the data's units")
    cond = []
    for name, d in zip(wrapper.gen.cond_names, wrapper.cond_dims):
        cond.append({"name": name, "columns": d, "unit": "MeV" if name == "energy" else "as in the data"})
    return {
        "format": fmt, "source": source, "kind": kind, "model": str(spec.get("model", {}).get("_target_", "")),
        "dataset": (spec.get("data") or {}).get("name"),
        "inputs": [{"name": "noise", "dtype": "float32", "shape": ["batch", wrapper.noise_dim],
                    "distribution": "standard normal N(0, 1), independent"},
                   {"name": "conditions", "dtype": "float32", "shape": ["batch", sum(wrapper.cond_dims)],
                    "columns": cond, "units": "physical"}],
        "outputs": [{"name": "events", "dtype": "float32", "shape": ["batch", wrapper.n_cells], "unit": unit,
                     "event_shape": list(wrapper.gen.transform.event_shape),
                     "order": "the dataset's cell order (row-major event shape; CaloChallenge voxel order)"}],
        "sampler": dict(wrapper.options),
    }


def _example(wrapper: ExportedGenerator, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and physical conditions for tracing and checking (energies log-uniform over the trained range)."""
    g = torch.Generator().manual_seed(seed)
    noise = wrapper.gen.sampler.draw_noise(n, g, torch.device("cpu"), torch.float32)
    cols = []
    for name, d in zip(wrapper.gen.cond_names, wrapper.cond_dims):
        step = wrapper.gen.transform.cond_steps[name]
        lo_hi = getattr(step, "lo_hi", None)
        u = torch.rand(n, d, generator=g, dtype=torch.float64)
        if step.name in ("log_scale", "linear") and lo_hi is not None:
            lo, hi = lo_hi[0].double(), lo_hi[1].double()
            cols.append(10 ** (lo + (hi - lo) * u) if step.name == "log_scale" else lo + (hi - lo) * u)
        elif step.name == "one_hot":
            cols.append(torch.randint(0, step.out_dim, (n, 1), generator=g).double())
        else:
            cols.append(torch.randn(n, d, generator=g, dtype=torch.float64))
    cond = torch.cat(cols, 1).float() if cols else torch.zeros(n, 0)
    return noise, cond


def _write_onnx(wrapper: ExportedGenerator, example: tuple[torch.Tensor, torch.Tensor], out: Path, opset: int,
                meta: Mapping[str, Any]) -> None:
    import onnx

    chatter = io.StringIO()  # the exporter prints its progress; the user reads caloexp's lines only
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch")
        try:
            program = torch.onnx.export(wrapper, example, input_names=["noise", "conditions"],
                                        output_names=["events"], dynamic_shapes=({0: batch}, {0: batch}),
                                        opset_version=int(opset), dynamo=True, external_data=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; name the model and the op
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"ONNX export failed (opset {opset}): {first}") from None
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = "caloexp.contract", json.dumps(meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _write_torchscript(wrapper: ExportedGenerator, example: tuple[torch.Tensor, torch.Tensor], out: Path,
                       meta: Mapping[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript; LibTorch reads it
        torch.jit.save(traced, str(out), _extra_files={"contract.json": json.dumps(meta)})


def run_exported(path: str | Path, noise: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Run an exported file (``.onnx`` with onnxruntime, else TorchScript) as a consumer would."""
    path = Path(path)
    noise, conditions = np.ascontiguousarray(noise, np.float32), np.ascontiguousarray(conditions, np.float32)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return sess.run(["events"], {"noise": noise, "conditions": conditions})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(noise), torch.from_numpy(conditions)).numpy()


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|b|, 1e-3 of b's scale): relative where cells carry energy, absolute near 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    floor = 1e-3 * max(float(np.abs(b).max(initial=0.0)), 1e-12)
    return float((np.abs(a - b) / np.maximum(np.abs(b), floor)).max(initial=0.0))


def export(source: str, fmt: str = "onnx", out: str | Path | None = None, tracking_uri: str | None = None,
           sampler: Mapping[str, Any] | None = None, batch: int = 4, opset: int = 18, check: bool = True,
           tolerance: float = 1e-3, log_to_run: bool = True, seed: int = 0) -> Path:
    """Write the generator of ``source`` as ``fmt``; returns the written path (the contract beside it)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: choose one of {sorted(FORMATS)}")
    if int(batch) < 2:
        raise ConfigError(f"batch={batch}: the example batch for tracing must be >= 2")
    gen, spec = sampling.load(str(source), tracking_uri, "cpu")
    options = dict(sampler or {})
    wrapper = ExportedGenerator(gen, options).eval()
    example = _example(wrapper, int(batch), seed)
    try:
        with torch.no_grad():
            wrapper(*example)  # bad sampler options fail here, with caloexp's own message
    except TypeError as exc:
        raise ConfigError(f"sampler={options}: {exc}") from None
    out = Path(out) if out else Path(f"generator{FORMATS[fmt]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = contract(wrapper, spec, fmt, str(source))
    if fmt == "onnx":
        _write_onnx(wrapper, example, out, opset, meta)
    else:
        _write_torchscript(wrapper, example, out, meta)
    if check:
        noise, cond = _example(wrapper, int(batch) + 3, seed + 1)
        with torch.no_grad():
            want = wrapper(noise, cond).numpy()
        got = run_exported(out, noise.numpy(), cond.numpy())
        diff = max_rel_diff(got, want)
        meta["check"] = {"batch": int(batch) + 3, "max_rel_diff": diff}
        if not got.shape == want.shape or not diff <= tolerance:
            raise InputError(f"{out}: the exported {fmt} model differs from caloexp's generator "
                             f"(max relative difference {diff:.3g} > tolerance {tolerance:g})")
        log.info("checked %s: max relative difference to caloexp's generator %.2e (batch %d)", out, diff, len(want))
    Path(f"{out}.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s (%s; noise %d, conditions %s, events %d cells) and %s.json", out, fmt, wrapper.noise_dim,
             gen.cond_names, wrapper.n_cells, out)
    if log_to_run:
        _log_to_run(source, tracking_uri, [out, Path(f"{out}.json")])
    return out


def _log_to_run(source: str, tracking_uri: str | None, files: list[Path]) -> None:
    """Attach the export to its MLflow run when the source names one (a run id or a tracked checkpoint)."""
    from caloexp import checkpoint

    run_id = None
    src = str(source)
    if src.startswith("runs:/"):
        run_id = src.split("/")[1]
    elif len(src) == 32 and all(c in "0123456789abcdef" for c in src):
        run_id = src
    elif Path(src).exists():
        try:
            info = checkpoint.info(checkpoint.find(src, "."))
        except InputError:
            info = None
        run_id = (info or {}).get("run_id")
    if not run_id or not tracking_uri:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
        for f in files:
            client.log_artifact(run_id, str(f), "export")
        log.info("logged to MLflow run %s under export/", run_id)
    except MlflowException as exc:
        log.warning("not logged to MLflow run %s (%s)", run_id, str(exc).splitlines()[0][:160])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    with report_errors():
        options = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None
        export(str(cfg.source), str(cfg.format), cfg.out, cfg.tracking_uri, options, int(cfg.batch), int(cfg.opset),
               bool(cfg.check), float(cfg.tolerance), bool(cfg.log_to_run), int(cfg.seed))


def main() -> None:
    run_hydra_app(hydra_main, config_name="export")


if __name__ == "__main__":
    main()
