"""Embedded 3DGAN-style ECAL showers: the GFlash-style simulator rendered onto a 51 x 51 x 25 Cartesian grid.

An offline stand-in for the 3DGAN variable-angle electron data (never a silent substitute; see
``docs/embedded_dataset.md``). Per shower, electrons of primary energy E uniform in [2, 500] GeV
enter a silicon-tungsten sampling ECAL at an angle theta uniform in [60, 120] degrees:

* geometry: 51 x 51 cells of 5.1 mm, 25 layers; one layer is one radiation length (X0) of the
  effective W/Si medium along the normal and as thick as a cell is wide, so that in cell units the
  shower axis moves by cot(theta) cells in y per layer (the quantity 3DGAN's measured angle uses);
* longitudinal (GFlash, Grindhammer & Peters, hep-ex/0001020): dE/dt ~ t^(alpha-1) e^(-beta t) with
  the correlated fluctuations of (ln T, ln alpha) of :mod:`caloexp.data.embedded`, Z = 74, Ec = 8 MeV;
  the depth t runs along the tilted axis, so an inclined shower peaks t sin(theta) layers deep;
* radial (GFlash core + tail in Molière radii, R_M = 14 mm effective) in the plane perpendicular to
  the axis: each energy spot is placed in 3D and binned into (x, y, layer); spots leaving the grid
  are leakage;
* energy spots: GFlash count 93 ln(Z) E^0.876 (capped at :data:`SPOTS_CAP` per shower), equal
  energy; then the sampling fluctuation of each cell, Gamma(e/s, s) with s = a^2 GeV (a = 17 %, so
  the sum fluctuates by a / sqrt(E)), a 1 % constant term, and the data's 1e-4 cell threshold.

Cells are calibrated GeV (sum / E is the containment, ~0.95), ``theta`` is in radians as in the
real files. Blocks of :data:`BLOCK` showers have their own random streams seeded by
``(seed, block)``, so a sample is bit-identical for ``(n_showers, seed)``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from caloexp.data import embedded as gflash
from caloexp.data.ecal import SHAPE
from caloexp.errors import InputError

#: Bump when the output for a seed changes (part of the cache file name).
VERSION = 1
E_RANGE_GEV = (2.0, 500.0)
THETA_RANGE_DEG = (60.0, 120.0)
Z_EFF = 74.0                 # tungsten dominates the effective medium
EC_MEV = 8.0                 # critical energy of tungsten
MOLIERE_MM = 14.0            # W/Si effective Molière radius (pure W: 9.3 mm)
CELL_MM = 5.1                # cell pitch; a layer (1 X0 along the normal) is as thick in cell units
AXIS_REF_LAYER = 12.5        # the axis crosses the window centre at this depth (layer units)
AXIS_SIGMA_CELLS = 0.3       # per-shower jitter of the axis in x and y
SPOTS_CAP = 3000             # spots per shower at most (GFlash: ~700 at 2 GeV, ~90,000 at 500 GeV)
SAMPLING_TERM = 0.17         # a / sqrt(E/GeV): Si-W sampling calorimeters reach 15-20 %
CONSTANT_TERM = 0.01
CELL_THRESHOLD = 1e-4        # GeV; the 3DGAN data set cells below it to zero
BLOCK = 128

PARAMS = dict(version=VERSION, e_range_gev=str(E_RANGE_GEV), theta_range_deg=str(THETA_RANGE_DEG), z_eff=Z_EFF,
              ec_mev=EC_MEV, moliere_mm=MOLIERE_MM, cell_mm=CELL_MM, spots_cap=SPOTS_CAP,
              sampling_term=SAMPLING_TERM, constant_term=CONSTANT_TERM, cell_threshold=CELL_THRESHOLD)


def _draw_block(e_gev: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One block of showers -> (n, 51, 51, 25) cell energies (GeV); random numbers in a fixed order."""
    n = len(e_gev)
    nx, ny, nz = SHAPE
    e_mev = e_gev * 1000.0
    ln_y = np.log(e_mev / EC_MEV)
    # --- longitudinal profile per shower (GFlash, correlated ln T / ln alpha as in caloexp.data.embedded)
    g1, g2 = rng.standard_normal(n), rng.standard_normal(n)
    rho = np.clip(gflash.R0 + gflash.R1 * ln_y, -0.99, 0.99)
    c1, c2 = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
    mean_alpha = gflash.A1 + (gflash.A2 + gflash.A3 / Z_EFF) * ln_y
    t_max = np.exp(np.log(ln_y + gflash.T1) + (c1 * g1 + c2 * g2) / (gflash.S_T0 + gflash.S_T1 * ln_y))
    alpha = np.maximum(mean_alpha * np.exp((c1 * g1 - c2 * g2) / (gflash.S_A0 + gflash.S_A1 * ln_y)), gflash.ALPHA_MIN)
    beta = (alpha - 1.0) / t_max
    jitter = rng.normal(0.0, AXIS_SIGMA_CELLS, (2, n))
    const = 1.0 + CONSTANT_TERM * rng.standard_normal(n)
    # --- spots: GFlash count, capped; each carries E / count
    k = np.minimum(np.ceil(gflash.SPOTS_N0 / math.log(gflash.Z_EFF) * math.log(Z_EFF)
                           * e_gev ** gflash.SPOTS_EXP), SPOTS_CAP).astype(np.int64)
    owner = np.repeat(np.arange(n), k)
    m = len(owner)
    t = rng.standard_gamma(alpha[owner]) / beta[owner]           # depth along the axis (X0)
    u = rng.random((3, m))
    ln_e = np.log(e_gev)[owner]
    tau = t * (beta / alpha * mean_alpha / (mean_alpha - 1.0))[owner]
    r_core = (gflash.Z1[0] + gflash.Z1[1] * ln_e) + (gflash.Z2[0] + gflash.Z2[1] * Z_EFF) * tau
    tk = tau - gflash.K2
    r_tail = (gflash.K1[0] + gflash.K1[1] * Z_EFF) * (np.exp(gflash.K3 * tk) + np.exp((gflash.K4[0] + gflash.K4[1] * ln_e) * tk))
    xarg = (gflash.P2[0] + gflash.P2[1] * Z_EFF - tau) / (gflash.P3[0] + gflash.P3[1] * ln_e)
    p_core = (gflash.P1[0] + gflash.P1[1] * Z_EFF) * np.exp(xarg - np.exp(xarg))
    u1 = np.minimum(u[1], 1.0 - 1e-9)
    r = np.where(u[0] < p_core, r_core, r_tail) * (MOLIERE_MM / CELL_MM) * np.sqrt(u1 / (1.0 - u1))  # cells
    phi = 2.0 * np.pi * u[2]
    # --- place spots in 3D: the axis tilts in y by cot(theta) per layer; lateral spread perpendicular to it
    st, ct = np.sin(theta)[owner], np.cos(theta)[owner]
    z = t * st - r * np.sin(phi) * ct
    y = ny / 2 + jitter[1][owner] + (t * st - AXIS_REF_LAYER) * ct / st + r * np.sin(phi) * st
    x = nx / 2 + jitter[0][owner] + r * np.cos(phi)
    ix, iy, iz = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64), np.floor(z).astype(np.int64)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < nz)   # the rest leaks
    cell = ((owner * nx + ix) * ny + iy) * nz + iz
    mean = np.bincount(cell[inside], weights=(e_gev / k)[owner][inside], minlength=n * nx * ny * nz)
    # --- sampling fluctuations per cell (equal-scale Gammas add: once per cell), constant term, threshold
    scale = SAMPLING_TERM ** 2
    hit = np.flatnonzero(mean)
    out = np.zeros(n * nx * ny * nz)
    out[hit] = rng.standard_gamma(mean[hit] / scale) * scale
    out = out.reshape(n, nx, ny, nz) * const[:, None, None, None]
    out[out < CELL_THRESHOLD] = 0.0
    return out.astype(np.float32)


def simulate(n_showers: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ECAL (n, 51, 51, 25) GeV, energy (n,) GeV, theta (n,) rad)``, bit-identical for ``(n_showers, seed)``."""
    if n_showers < 0:
        raise InputError(f"embedded ECAL simulator: n_showers={n_showers} must be >= 0")
    rng = np.random.default_rng([seed, 0xECA1, 0])
    e = rng.uniform(*E_RANGE_GEV, n_showers)
    theta = np.radians(rng.uniform(*THETA_RANGE_DEG, n_showers))
    out = np.empty((n_showers, *SHAPE), dtype=np.float32)
    for b0 in range(0, n_showers, BLOCK):
        b1 = min(b0 + BLOCK, n_showers)
        out[b0:b1] = _draw_block(e[b0:b1], theta[b0:b1], np.random.default_rng([seed, 0xECA1, 1, b0 // BLOCK]))
    return out, e.astype(np.float32), theta.astype(np.float32)


def embedded_path(data_dir: str | Path, n_showers: int, seed: int) -> Path:
    return Path(data_dir) / f"ecal_embedded_n{n_showers}_s{seed}_v{VERSION}.h5"


def ensure_embedded(data_dir: str | Path, n_showers: int = 2000, seed: int = 1234) -> Path:
    """Path of the cached sample, simulated on first use (atomic write; a damaged cache is regenerated)."""
    import h5py

    from caloexp.data import arrays
    from caloexp.data.sample import Sample

    path = embedded_path(data_dir, n_showers, seed)
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                if f["ECAL"].shape == (n_showers, *SHAPE) and f["theta"].shape == (n_showers,):
                    return path
        except (OSError, KeyError):
            pass
    x, e, theta = simulate(n_showers, seed)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.h5")
    try:
        arrays.write(tmp, Sample(x, {"energy": e, "theta": theta}, "grid"), x_key="ECAL", kind="grid",
                     compression="lzf")

        with h5py.File(tmp, "a") as f:
            f.attrs.update({k: v for k, v in PARAMS.items()})
            f.attrs["note"] = "parametric stand-in for the 3DGAN variable-angle ECAL electrons, not real data"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
