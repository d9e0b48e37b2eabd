"""High-level shower features in the CaloChallenge 2022 convention, vectorised.

Definitions follow the official ``HighLevelFeatures.py`` of CaloChallenge/homepage and
the paper (arXiv:2410.21611):

* voxels below a readout threshold are set to zero first (:func:`apply_threshold`);
* ``E_tot`` = sum of all voxels, ``E_ratio`` = E_tot / E_inc, ``E_layer`` = sum per layer;
* per layer binned in alpha (n_alpha > 1) the centre of energy ``EC = sum(x E) / (sum E + 1e-16)``
  and width ``sqrt(max(sum(x^2 E) / (sum E + 1e-16) - EC^2, 0))`` in x = eta = r cos(alpha) and
  x = phi = r sin(alpha); layers with a single alpha bin have no eta/phi features (their
  alpha centre is 0, so eta = r and phi = 0 carry no information);
* the same centre and width in r for every layer (r at the radial bin centre);
* ``sparsity`` per layer = fraction of voxels that are zero (1 - hit fraction).

An empty layer gets EC = width = 0 (the 1e-16 in the denominator), as in the official code.
Everything is one matrix product per chunk of showers: ``showers @ W`` with a
(n_voxels, K) weight matrix that holds per-layer indicator x coordinate columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np

from caloexp.geometry import Geometry

EPS = 1e-16  # the official denominator guard

#: Official minimal readout for datasets 2 and 3: 0.5 keV in silicon / sampling fraction 0.033 (MeV).
THRESHOLD_DS23 = 0.5e-3 / 0.033
#: Voxel threshold for dataset 1 (MeV), as specified for this project (issue 3).
THRESHOLD_DS1 = 1.0
#: ``min_energy`` of the official evaluate.py for dataset 1 since 2024-01-25 (commit e1109af; 10 MeV
#: in the 2022 code): lower edge of the log-binned energy-per-layer and voxel-energy histograms (MeV).
#: For ds2/3 it equals THRESHOLD_DS23.
HIST_MIN_DS1 = 1.0

#: Per-layer feature families, in the order they appear in metric names.
LAYER_FEATURES = ("E_layer", "ECeta", "ECphi", "width_eta", "width_phi", "ECr", "width_r", "sparsity")
ALPHA_FEATURES = ("ECeta", "ECphi", "width_eta", "width_phi")


def is_ds23(geometry: Geometry) -> bool:
    """Datasets 2/3 (the Par04 SiW electron calorimeter) vs dataset-1-like (ATLAS) geometries."""
    return geometry.particle == "electron" or geometry.pid == 11


def default_threshold(geometry: Geometry) -> float:
    """Voxel readout threshold in MeV: 1 MeV for dataset 1, 0.5 keV / 0.033 for datasets 2-3."""
    return THRESHOLD_DS23 if is_ds23(geometry) else THRESHOLD_DS1


def histogram_min_energy(geometry: Geometry) -> float:
    """Lower edge (MeV) of the log-binned energy histograms, the official ``min_energy``."""
    return THRESHOLD_DS23 if is_ds23(geometry) else HIST_MIN_DS1


def apply_threshold(showers: np.ndarray, threshold: float) -> np.ndarray:
    """Copy of ``showers`` with voxels below ``threshold`` set to zero (``x < t -> 0``)."""
    showers = np.asarray(showers)
    if threshold <= 0:
        return showers
    return np.where(showers < threshold, 0, showers).astype(showers.dtype, copy=False)


def alpha_layers(geometry: Geometry) -> list[int]:
    """Indices (0-based, into ``geometry.layers``) of layers binned in alpha."""
    return [i for i, layer in enumerate(geometry.layers) if layer.n_alpha > 1]


@lru_cache(maxsize=16)
def _weights(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(n_voxels, 3L + 4La) weights [1, r, r^2 | eta, eta^2, phi, phi^2] and the (n_voxels, L) indicator."""
    n_l, v = geometry.n_layers, geometry.n_voxels
    onehot = np.zeros((v, n_l))
    onehot[np.arange(v), geometry.voxel_layer] = 1.0
    r = geometry.voxel_r[:, None]
    al = alpha_layers(geometry)
    a_hot = onehot[:, al]
    eta, phi = geometry.voxel_eta[:, None], geometry.voxel_phi[:, None]
    w = np.concatenate([onehot, onehot * r, onehot * r**2,
                        a_hot * eta, a_hot * eta**2, a_hot * phi, a_hot * phi**2], axis=1)
    return np.ascontiguousarray(w), onehot.astype(np.float32)


@dataclass
class Features:
    """High-level features of N showers: arrays (N,) or (N, n_layers) / (N, n_alpha_layers)."""

    E_inc: np.ndarray
    E_tot: np.ndarray
    E_layer: np.ndarray
    ECeta: np.ndarray
    ECphi: np.ndarray
    width_eta: np.ndarray
    width_phi: np.ndarray
    ECr: np.ndarray
    width_r: np.ndarray
    sparsity: np.ndarray

    @property
    def E_ratio(self) -> np.ndarray:
        return self.E_tot / self.E_inc

    def __len__(self) -> int:
        return len(self.E_inc)

    def subset(self, index) -> "Features":
        return Features(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})

    @staticmethod
    def concatenate(parts: Iterable["Features"]) -> "Features":
        parts = list(parts)
        return Features(**{k: np.concatenate([getattr(p, k) for p in parts])
                           for k in Features.__dataclass_fields__})

    def columns(self, geometry: Geometry) -> dict[str, np.ndarray]:
        """Every scalar feature by its metric name (``E_ratio``, ``E_layer_<id>``, ``ECeta_layer_<id>`` ...)."""
        ids = geometry.layer_ids
        a_ids = [ids[i] for i in alpha_layers(geometry)]
        out = {"E_ratio": self.E_ratio}
        for name in LAYER_FEATURES:
            arr = getattr(self, name)
            for j, lid in enumerate(a_ids if name in ALPHA_FEATURES else ids):
                key = f"E_layer_{lid}" if name == "E_layer" else f"{name}_layer_{lid}"
                out[key] = arr[:, j]
        return out


def compute(energies: np.ndarray, showers: np.ndarray, geometry: Geometry,
            threshold: float | None = None, chunk_size: int | None = None) -> Features:
    """High-level features of showers (MeV) at incident energies (MeV), after the threshold.

    ``threshold=None`` uses :func:`default_threshold`; pass 0 for no threshold (e.g. when the
    showers were already thresholded).
    """
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    showers = np.asarray(showers)
    if showers.ndim != 2 or showers.shape[1] != geometry.n_voxels:
        raise ValueError(f"showers of shape {showers.shape} do not match geometry {geometry.name} "
                         f"({geometry.n_voxels} voxels)")
    thr = default_threshold(geometry) if threshold is None else float(threshold)
    # ~256 MB of float64 per chunk: 20k dataset-1 showers, ~800 dataset-3 showers
    chunk_size = chunk_size or int(np.clip(2**25 // geometry.n_voxels, 256, 20_000))
    parts = [_compute_chunk(energies[i:i + chunk_size], showers[i:i + chunk_size], geometry, thr)
             for i in range(0, max(len(showers), 1), chunk_size)] if len(showers) else []
    if not parts:
        return _compute_chunk(energies, showers.reshape(0, geometry.n_voxels), geometry, thr)
    return parts[0] if len(parts) == 1 else Features.concatenate(parts)


def _compute_chunk(e_inc: np.ndarray, x: np.ndarray, g: Geometry, thr: float) -> Features:
    w, onehot = _weights(g)
    x = apply_threshold(x, thr)
    s = np.asarray(x, dtype=np.float64) @ w
    n_l, n_a = g.n_layers, len(alpha_layers(g))
    e_layer, sr, sr2 = s[:, :n_l], s[:, n_l:2 * n_l], s[:, 2 * n_l:3 * n_l]
    o = 3 * n_l
    se, se2, sp, sp2 = (s[:, o + k * n_a:o + (k + 1) * n_a] for k in range(4))
    e_alpha = e_layer[:, alpha_layers(g)]

    def centre_width(s1: np.ndarray, s2: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = s1 / (e + EPS)
        return c, np.sqrt(np.clip(s2 / (e + EPS) - c**2, 0.0, None))

    ec_eta, w_eta = centre_width(se, se2, e_alpha)
    ec_phi, w_phi = centre_width(sp, sp2, e_alpha)
    ec_r, w_r = centre_width(sr, sr2, e_layer)
    hits = (x > 0).astype(np.float32) @ onehot
    sparsity = 1.0 - hits / g.voxels_per_layer[None, :]
    return Features(E_inc=e_inc, E_tot=e_layer.sum(axis=1), E_layer=e_layer, ECeta=ec_eta, ECphi=ec_phi,
                    width_eta=w_eta, width_phi=w_phi, ECr=ec_r, width_r=w_r,
                    sparsity=sparsity.astype(np.float64))


def classifier_features(f: Features) -> np.ndarray:
    """The official high-level vector: ``cls-high`` input and the FPD/KPD features (30 for dataset-1 photons).

    As ``prepare_high_data_for_classifier`` of the official evaluate.py since 2023-11-27 (mm -> 100 mm):
    [log10 E_inc, log10(E_layer + 1e-8), ECeta/100, ECphi/100, width_eta/100, width_phi/100,
    log10(E_tot + 1e-8), sparsity, ECr/100, width_r/100]. The 2022 vector stopped after width_phi.
    """
    return np.concatenate([np.log10(f.E_inc)[:, None], np.log10(f.E_layer + 1e-8),
                           f.ECeta / 1e2, f.ECphi / 1e2, f.width_eta / 1e2, f.width_phi / 1e2,
                           np.log10(f.E_tot + 1e-8)[:, None], f.sparsity, f.ECr / 1e2, f.width_r / 1e2], axis=1)


def high_level_dim(geometry: Geometry) -> int:
    """Length of :func:`classifier_features`: 2 + 4 L + 4 L_alpha (30 for dataset-1 photons)."""
    return 2 + 4 * geometry.n_layers + 4 * len(alpha_layers(geometry))
