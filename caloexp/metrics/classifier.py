"""DNN classifier test of the CaloChallenge protocol: can a network tell generated from reference?

As in the official ``evaluate.py`` (CaloChallenge/homepage):

* inputs ``low``: [log10 E_inc, voxel / E_inc]; ``low_normed``: [log10 E_inc, voxel / E_layer,
  log10(E_layer + 1e-8)]; ``high``: the high-level vector of
  :func:`caloexp.metrics.features.classifier_features`;
* labels generated = 0, reference = 1; both samples cut to the same size, each split 60/20/20
  into train / test / validation and shuffled;
* an MLP: Linear(d, h), LeakyReLU, then ``n_layer`` x [Linear(h, h), LeakyReLU] (dropout
  optional), Linear(h, 1); BCE-with-logits, Adam(lr 2e-4), batch 1000; after each epoch the
  test accuracy is measured and the best epoch's weights are kept (stop early at accuracy 1);
* the sigmoid output is calibrated with isotonic regression fitted on the test split
  (clipped to [1e-6, 1 - 1e-6]); AUC and JSD = (ln 2 - BCE) / ln 2 are reported on the
  validation split with the calibrated probabilities.

Settings: ``PROTOCOL`` (3 hidden layers of 2048 = n_layer 2, 50 epochs) and ``FAST`` (the
default during training). ``precision: bf16`` runs the matmuls in bfloat16 (fp32 weights, Adam and
probabilities): the protocol's 3 x 2048 net trains ~3x faster on a CPU with AMX (Sapphire Rapids) or a
GPU; the official evaluator runs fp32, so report which one was used. Training uses its own RNG
streams and leaves torch's global RNG untouched (the trainer's resume reproducibility relies on it).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from caloexp.data.calochallenge import Showers
from caloexp.errors import ConfigError
from caloexp.geometry import Geometry
from caloexp.metrics.features import Features, classifier_features

PROTOCOL: dict[str, Any] = {"inputs": ["low", "low_normed", "high"], "n_layer": 2, "n_hidden": 2048,
                            "epochs": 50, "lr": 2e-4, "batch_size": 1000, "dropout": 0.0,
                            "max_showers": None, "device": "auto", "precision": "32"}
FAST: dict[str, Any] = {"inputs": ["low", "high"], "n_layer": 2, "n_hidden": 256, "epochs": 10, "lr": 1e-3,
                        "batch_size": 1000, "dropout": 0.0, "max_showers": 50_000, "device": "auto", "precision": "32"}
PRESETS = {"protocol": PROTOCOL, "fast": FAST}
INPUTS = ("low", "low_normed", "high")


def resolve_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """FAST, a preset by name (``{"preset": "protocol"}``), or either with keys overridden."""
    settings = dict(settings or {})
    base = dict(PRESETS.get(str(settings.pop("preset", "fast")), FAST))
    unknown = sorted(set(settings) - set(base) - {"threads"})
    if unknown:
        raise ConfigError(f"unknown classifier setting(s) {unknown}: known are {sorted(base)} and 'preset'")
    base.update(settings)
    if str(base["precision"]) not in ("32", "bf16"):
        raise ConfigError(f"classifier precision={base['precision']!r}: choose '32' or 'bf16'")
    base["precision"] = str(base["precision"])
    bad = sorted(set(base["inputs"]) - set(INPUTS))
    if bad:
        raise ConfigError(f"classifier inputs {bad} unknown: choose from {list(INPUTS)}")
    return base


def low_level(showers: Showers, geometry: Geometry, normed: bool = False) -> np.ndarray:
    """Official low-level classifier inputs, float32 (built without float64 copies of the voxels)."""
    e = np.asarray(showers.energies, np.float64).reshape(-1, 1)
    x = np.asarray(showers.showers)
    out = np.empty((len(x), 1 + x.shape[1] + (geometry.n_layers if normed else 0)), np.float32)
    out[:, 0] = np.log10(e[:, 0])
    if not normed:
        np.divide(x, e.astype(np.float32), out=out[:, 1:], dtype=np.float32)
        return out
    e_layer = geometry.layer_energies(x.astype(np.float64))
    for i in range(geometry.n_layers):
        sl = geometry.layer_slice(i)
        np.divide(x[:, sl], (e_layer[:, i:i + 1] + 1e-16).astype(np.float32), out=out[:, 1 + sl.start:1 + sl.stop],
                  dtype=np.float32)
    out[:, 1 + x.shape[1]:] = np.log10(e_layer + 1e-8)
    return out


def _mlp(d: int, n_layer: int, n_hidden: int, dropout: float) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = [torch.nn.Linear(d, n_hidden), torch.nn.LeakyReLU(), torch.nn.Dropout(dropout)]
    for _ in range(n_layer):
        layers += [torch.nn.Linear(n_hidden, n_hidden), torch.nn.LeakyReLU(), torch.nn.Dropout(dropout)]
    layers.append(torch.nn.Linear(n_hidden, 1))
    return torch.nn.Sequential(*layers)


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = rng.permutation(n)
    a, b = int(0.6 * n), int(0.6 * n) + int(0.2 * n)
    return idx[:a], idx[a:b], idx[b:]


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _autocast(dev: torch.device, precision: str):
    """bf16 matmuls (fp32 weights, optimiser and outputs): ~3x faster on CPUs with AMX or on GPUs."""
    return torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 10_000, precision: str = "32") -> np.ndarray:
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch):
        with _autocast(dev, precision):
            logit = model(x[i:i + batch].to(dev))
        out.append(torch.sigmoid(logit.float()).reshape(-1).double().cpu())   # probabilities in full precision
    return torch.cat(out).numpy()


def train_and_score(x_gen: np.ndarray, x_ref: np.ndarray, settings: Mapping[str, Any] | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Train the classifier on two input matrices; AUC and JSD (calibrated) on the validation split."""
    s = resolve_settings(settings)
    n = min(len(x_gen), len(x_ref))
    if s.get("max_showers"):
        n = min(n, int(s["max_showers"]))
    if n < 10:
        raise ConfigError(f"classifier needs at least 10 showers per sample, got {n}")
    rng = np.random.default_rng(seed)
    g_idx, r_idx = rng.permutation(len(x_gen))[:n], rng.permutation(len(x_ref))[:n]
    g_split, r_split = _split(n, rng), _split(n, rng)
    data = {}
    for name, gs, rs in zip(("train", "test", "val"), g_split, r_split):
        # one float32 matrix per split, filled in shuffled order (no intermediate copies of the inputs)
        k, m = len(gs), len(gs) + len(rs)
        order = rng.permutation(m)
        xs = np.empty((m, x_gen.shape[1]), np.float32)
        ys = np.empty(m, np.float32)
        xs[order[:k]] = x_gen[np.sort(g_idx[gs])]
        xs[order[k:]] = x_ref[np.sort(r_idx[rs])]
        ys[order[:k]], ys[order[k:]] = 0.0, 1.0
        np.nan_to_num(xs, copy=False, nan=0.0, posinf=1e6, neginf=-1e6)
        data[name] = (torch.from_numpy(xs), torch.from_numpy(ys))

    threads = s.get("threads")
    old_threads = torch.get_num_threads()
    dev = _device(str(s.get("device", "auto")))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model = _mlp(data["train"][0].shape[1], int(s["n_layer"]), int(s["n_hidden"]),
                         float(s["dropout"])).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=float(s["lr"]))
            loss_fn = torch.nn.BCEWithLogitsLoss()
            gen = torch.Generator().manual_seed(seed)
            xt, yt = data["train"][0].to(dev), data["train"][1].to(dev)
            best_acc, best_state = -1.0, None
            for _ in range(int(s["epochs"])):
                model.train()
                perm = torch.randperm(len(yt), generator=gen).to(dev)
                for i in range(0, len(yt), int(s["batch_size"])):
                    j = perm[i:i + int(s["batch_size"])]
                    with _autocast(dev, s["precision"]):
                        logit = model(xt[j])
                    loss = loss_fn(logit.float().reshape(-1), yt[j])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                acc = float(((_predict(model, data["test"][0], precision=s["precision"]) > 0.5)
                             == data["test"][1].numpy().astype(bool)).mean())
                if acc > best_acc:
                    best_acc, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
                if acc == 1.0:
                    break
            if best_state is not None:
                model.load_state_dict(best_state)
            p_test = _predict(model, data["test"][0], precision=s["precision"])
            p_val = _predict(model, data["val"][0], precision=s["precision"])
        finally:
            torch.set_num_threads(old_threads)
    y_test, y_val = data["test"][1].numpy(), data["val"][1].numpy()
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6).fit(p_test, y_test)
    p_cal = np.clip(iso.predict(p_val), 1e-6, 1 - 1e-6)
    auc = float(roc_auc_score(y_val, p_cal)) if len(np.unique(y_val)) == 2 else 0.5
    bce = float(-np.mean(y_val * np.log(p_cal) + (1 - y_val) * np.log(1 - p_cal)))
    return {"auc": auc, "jsd": (math.log(2.0) - bce) / math.log(2.0), "test_accuracy": best_acc}


def classifier_metrics(reference: Showers, generated: Showers, geometry: Geometry, ref_f: Features,
                       gen_f: Features, settings: Mapping[str, Any] | None = None, seed: int = 0) -> dict[str, float]:
    """``cls/auc_<inputs>``, ``cls/jsd_<inputs>`` for each configured input type (thresholded showers)."""
    s = resolve_settings(settings)
    out = {}
    for kind in s["inputs"]:
        if kind == "high":
            xg, xr = classifier_features(gen_f), classifier_features(ref_f)
        else:
            normed = kind == "low_normed"
            xg, xr = low_level(generated, geometry, normed), low_level(reference, geometry, normed)
        res = train_and_score(xg, xr, s, seed=seed)
        out[f"cls/auc_{kind}"] = res["auc"]
        out[f"cls/jsd_{kind}"] = res["jsd"]
    return out
