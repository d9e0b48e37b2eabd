"""Embedded default dataset: a parametric (GFlash-style) photon-shower simulator.

The product must run fully offline, so it ships its own shower source in the
CaloChallenge dataset-1 photon geometry (368 voxels; ATLAS-like barrel layers 0, 1,
2, 3 = presampler, EM strips, EM middle, EM back, and 12 = first tile layer). It is a
physically plausible *stand-in* for the real dataset, never a silent substitute.

Physics (Grindhammer & Peters, hep-ex/0001020; Grindhammer, Rudowicz, Peters,
NIM A290 (1990) 469), per shower:

* longitudinal: dE/dt ∝ t^(α-1) e^(-βt), T = (α-1)/β, with correlated Gaussian
  fluctuations of (ln T, ln α) whose means grow with ln y, y = E/Ec;
* the photon converts after an exponential depth (mean 9/7 X0), the profile starts there;
* depth in X0 maps onto layers, with dead material (energy lost) in front, between
  presampler and accordion, and before the tile layer (:data:`DEPTH_REGIONS`);
* radial: core + tail, f(r) = p·2rR_C²/(r²+R_C²)² + (1-p)·2rR_T²/(r²+R_T²)² with
  R_C, R_T, p functions of τ ≈ t/T (in Molière radii → mm), sampled by inverse CDF
  r = R·sqrt(u/(1-u)) around a slightly offset shower axis;
* energy is carried by discrete spots (GFlash count ∝ E^0.876, capped per layer), equal
  energy within a layer, binned into (layer, alpha, r) voxels: voxels are sparse and fluctuate;
* sampling fluctuations: a spot of energy e carries Gamma(e/s, scale s), s = a²·GeV, so the
  shower total fluctuates by a/sqrt(E) (drawn once per voxel: equal-scale Gammas add), times
  one constant-term factor per shower.

Everything is vectorised over all spots of a block of :data:`BLOCK` showers (no Python
loop over showers or spots); each block has its own random stream seeded by
``(seed, block)``, so the output is bit-identical for a seed whatever ``chunk_size`` or
thread count. The parameters and their reasons are the module constants below; see
``docs/embedded_dataset.md`` for what the sample reproduces and its limits.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import special

from caloexp.data import calochallenge
from caloexp.data.calochallenge import Showers
from caloexp.errors import InputError
from caloexp.geometry import Geometry, builtin

#: Bump when the simulator's output changes for a given seed (it is part of the cache file name).
VERSION = 1

#: Incident energies of the real dataset-1 photon sample: 256 MeV .. 4 TeV in powers of two (MeV).
DEFAULT_ENERGIES: np.ndarray = 2.0 ** np.arange(8, 23)

# ------------------------------------------------------------------ material
# Effective medium of the ATLAS-like lead/liquid-argon accordion (barrel, |eta| ~ 0.2):
# per accordion cell ~1.5 mm Pb, 2 x 2.1 mm LAr, 0.4 mm steel (mass fractions ~0.65 / 0.22 / 0.12).
# Mixing rules give X0 ~ 20 mm, R_M ~ 43 mm, Ec ~ 10.7 MeV, mass-weighted Z ~ 58.
# All depths below are in units of X0 (the usual scaling approximation across materials).
Z_EFF = 58.0
EC_MEV = 10.7                 # critical energy: sets y = E/Ec, i.e. the shower depth scale
MOLIERE_MM = 43.0             # Molière radius: GFlash radii are in R_M, the geometry in mm

# ------------------------------------------------------- longitudinal (GFlash)
# Homogeneous-medium parametrisation with Z_EFF (hep-ex/0001020 sec. 2.2; Geant4's
# GVFlashHomoShowerTuning), y = E/Ec:
#   <ln T> = ln(ln y + T1),          <ln alpha> = ln(A1 + (A2 + A3/Z) ln y)
#   sigma(ln T) = 1/(S_T0 + S_T1 ln y),  sigma(ln alpha) = 1/(S_A0 + S_A1 ln y)
#   rho(ln T, ln alpha) = R0 + R1 ln y   (a deeper maximum comes with a larger alpha)
# The sampling-calorimeter fluctuation fits of the same paper (sigma(ln T) = 1/(-2.5 + 1.25 ln y))
# sit close to their pole at our lowest energy (y ~ 24), giving unphysically long showers, so the
# homogeneous set is used throughout; sampling enters through the resolution term below.
T1, A1, A2, A3 = -0.812, 0.81, 0.458, 2.26
S_T0, S_T1 = -1.4, 1.26
S_A0, S_A1 = -0.58, 0.86
R0, R1 = 0.705, -0.023
# The fits were made from ~1 GeV up; extrapolated to y ~ 24 (256 MeV) sigma(ln alpha) ~ 0.47 puts
# ~8% of showers at alpha < 1.25, where beta = (alpha-1)/T -> 0 and the centre of gravity
# T*alpha/(alpha-1) runs off into the tile calorimeter. So the widths are evaluated at
# max(E, FLUCT_MIN_MEV) and alpha is clipped at ALPHA_MIN (<t> <= 5 T; ~1.5% of 256 MeV showers).
FLUCT_MIN_MEV = 1000.0
ALPHA_MIN = 1.25
CONVERSION_X0 = 9.0 / 7.0     # photon mean free path before pair production (X0)

# Depth regions along the shower axis (X0, cumulative from the front of the inner-detector
# material), following the ATLAS barrel at |eta| ~ 0.2 (strips ~4.3 X0, middle ~16 X0, back
# ~2 X0) but with the upstream material trimmed to 1.7 X0 (ATLAS: ~2 X0 plus the presampler's
# own walls) so that the response E_dep/E_inc is ~0.87 at 256 MeV and ~0.97-0.99 above 4 GeV.
# The third entry is the geometry layer id; None = dead material (energy lost there).
DEPTH_REGIONS: tuple[tuple[float, float, int | None], ...] = (
    (0.0, 1.7, None),     # inner detector, solenoid, cryostat walls
    (1.7, 2.0, 0),        # presampler (thin active LAr; effective sampling depth)
    (2.0, 2.5, None),     # presampler readout, cables, front of the accordion
    (2.5, 6.8, 1),        # EM strips (~4.3 X0)
    (6.8, 23.0, 2),       # EM middle (~16 X0): the shower maximum lives here
    (23.0, 25.0, 3),      # EM back (~2 X0)
    (25.0, 27.0, None),   # outer cryostat walls and gap to the tile calorimeter
    (27.0, 39.0, 12),     # tile layer A (~1.5 lambda of Fe/scintillator ~ 12 X0)
)                         # beyond 39 X0: longitudinal leakage (lost)

# ------------------------------------------------------------ radial (GFlash)
# Homogeneous-medium radial parameters (hep-ex/0001020 eq. 21-23 as tuned in Geant4's
# GVFlashHomoShowerTuning), E in GeV, radii in R_M:
#   R_C = z1 + z2 tau,  z1 = 0.0251 + 0.00319 ln E,  z2 = 0.1162 - 0.000381 Z
#   R_T = k1 (exp(k3 (tau-k2)) + exp(k4 (tau-k2))),  k1 = 0.659 - 0.00309 Z, k2 = 0.645,
#         k3 = -2.59, k4 = 0.3585 + 0.0412 ln E
#   p   = p1 exp((p2-tau)/p3 - exp((p2-tau)/p3)),  p1 = 2.632 - 0.00094 Z,
#         p2 = 0.401 + 0.00187 Z, p3 = 1.313 - 0.0686 ln E
Z1 = (0.0251, 0.00319)
Z2 = (0.1162, -0.000381)
K1, K2, K3, K4 = (0.659, -0.00309), 0.645, -2.59, (0.3585, 0.0412)
P1, P2, P3 = (2.632, -0.00094), (0.401, 0.00187), (1.313, -0.0686)
AXIS_SIGMA_MM = 1.5           # per-shower offset of the shower axis from the voxel-grid origin

# --------------------------------------------------------- spots and resolution
# Each active layer is cut into thin depth slices (SLICE_X0 at most); the shower's own
# (fluctuated) Gamma profile, integrated over each slice, gives the slice energies exactly as
# GFlash integrates dE/dt step by step. The spots of a layer share its energy equally.
SLICE_X0 = 1.0
# Spot count as GFlash (homogeneous medium): N = 93 ln(Z) (E/GeV)^0.876 for the whole shower,
# shared among layers in proportion to their energy and capped per layer for speed (the caps
# are reached above ~4 GeV in the strips/middle; with a few spots per voxel the sparsity has
# nearly saturated). A fractional count is rounded stochastically with the spot energy kept at
# E_layer/expected-count, so a layer far in the tail is hit now and then but is right on average.
SPOTS_N0 = 93.0 * np.log(Z_EFF)
SPOTS_EXP = 0.876
SPOTS_CAP = {0: 60, 1: 600, 2: 600, 3: 60, 12: 60}
# Energy resolution: sampling term a/sqrt(E/GeV) and constant term b (ATLAS EM barrel design:
# ~10% and ~0.7%). Dead material and leakage add their own fluctuations on top (as in data).
SAMPLING_TERM = 0.10
CONSTANT_TERM = 0.007

#: Showers per independent random stream and per vectorised pass (~0.3 M spots: cache-sized).
BLOCK = 256
#: Threads used by :func:`simulate` (blocks are independent; the result does not depend on it).
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
#: Lowest accepted incident energy: the GFlash means need ln(E/Ec) well above 0.81.
MIN_ENERGY_MEV = 64.0

PARAMS = dict(
    version=VERSION, z_eff=Z_EFF, ec_mev=EC_MEV, moliere_mm=MOLIERE_MM,
    depth_regions=repr(DEPTH_REGIONS), conversion_x0=CONVERSION_X0, axis_sigma_mm=AXIS_SIGMA_MM,
    spots=f"{SPOTS_N0:.1f}*(E/GeV)^{SPOTS_EXP}, per-layer caps {SPOTS_CAP}", slice_x0=SLICE_X0,
    sampling_term=SAMPLING_TERM, constant_term=CONSTANT_TERM,
)

_PHOTON_LAYERS = (0, 1, 2, 3, 12)


def _slices() -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """Depth slices of the active regions: (lo, hi) in X0 and, per layer, its slice range."""
    lo, hi, ranges = [], [], []
    for lid in _PHOTON_LAYERS:
        a, b = next((r[0], r[1]) for r in DEPTH_REGIONS if r[2] == lid)
        m = max(1, int(np.ceil((b - a) / SLICE_X0 - 1e-9)))
        e = np.linspace(a, b, m + 1)
        ranges.append(slice(len(lo), len(lo) + m))
        lo += list(e[:-1])
        hi += list(e[1:])
    return np.array(lo), np.array(hi), ranges


_SLICE_LO, _SLICE_HI, _LAYER_SLICES = _slices()
SLICE_WIDTH = _SLICE_HI - _SLICE_LO
_SLICE_LAYER = np.concatenate([np.full(s.stop - s.start, i) for i, s in enumerate(_LAYER_SLICES)])
_CAPS = np.array([SPOTS_CAP[l] for l in _PHOTON_LAYERS], dtype=np.float64)


def _check_geometry(geometry: Geometry | None) -> Geometry:
    g = builtin("dataset_1_photons") if geometry is None else geometry
    if tuple(g.layer_ids) != _PHOTON_LAYERS:
        raise InputError(f"embedded simulator: geometry {g.name} has layers {g.layer_ids}; only the "
                         f"dataset-1 photon geometry (layers {list(_PHOTON_LAYERS)}) is supported")
    return g


def _assign_energies(n_showers: int, seed: int, energies: np.ndarray) -> np.ndarray:
    """Equal count per energy (round robin), in a deterministic shuffled order."""
    e = energies[np.arange(n_showers) % len(energies)]
    return e[np.random.default_rng([seed, 0x5EED, 0]).permutation(n_showers)]


def _draw_block(e_inc: np.ndarray, rng: np.random.Generator, g: Geometry) -> np.ndarray:
    """Simulate one block of showers into (n, n_voxels) voxel energies (MeV).

    Random numbers are drawn in a fixed order from ``rng`` only, so a block is reproducible.
    Spots are laid out depth-slice-major, then by shower: every layer is one contiguous range
    and per-shower values reach their spots through ``np.repeat``; per-spot maths is float32.
    """
    n = len(e_inc)
    ln_y = np.log(e_inc / EC_MEV)
    # --- per-shower longitudinal profile: correlated (ln T, ln alpha) as GFlash, g1 +- g2
    #     weighted by sqrt((1 +- rho)/2)
    g1, g2 = rng.standard_normal(n), rng.standard_normal(n)
    ln_yf = np.maximum(ln_y, np.log(FLUCT_MIN_MEV / EC_MEV))
    rho = np.clip(R0 + R1 * ln_yf, -0.99, 0.99)
    c1, c2 = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
    mean_alpha = A1 + (A2 + A3 / Z_EFF) * ln_y
    t_max = np.exp(np.log(ln_y + T1) + (c1 * g1 + c2 * g2) / (S_T0 + S_T1 * ln_yf))
    alpha = np.maximum(mean_alpha * np.exp((c1 * g1 - c2 * g2) / (S_A0 + S_A1 * ln_yf)), ALPHA_MIN)
    beta = (alpha - 1.0) / t_max
    t0 = rng.exponential(CONVERSION_X0, n)                      # photon conversion depth (X0)
    axis = rng.normal(0.0, AXIS_SIGMA_MM, (2, n))               # shower axis offset (mm)
    const = 1.0 + CONSTANT_TERM * rng.standard_normal(n)        # constant term of the resolution

    # --- energy per depth slice: the shower's Gamma profile (from t0) integrated over the slice
    def cdf(x: np.ndarray) -> np.ndarray:
        return special.gammainc(alpha[:, None], beta[:, None] * np.maximum(x[None, :] - t0[:, None], 0.0))
    frac = cdf(_SLICE_HI) - cdf(_SLICE_LO)                      # (n, n_slices)
    e_layer = e_inc[:, None] * np.stack([frac[:, s].sum(1) for s in _LAYER_SLICES], axis=1)

    # --- spot counts per layer (GFlash N(E), shared by energy, capped, stochastic rounding)
    n_total = SPOTS_N0 * (e_inc / 1000.0) ** SPOTS_EXP
    lam = np.minimum(n_total[:, None] * e_layer / e_inc[:, None], _CAPS[None, :])
    counts = np.floor(lam)
    counts = (counts + (rng.random(lam.shape) < lam - counts)).astype(np.int64)
    e_spot = np.divide(e_layer, lam, out=np.zeros_like(e_layer), where=lam > 0)
    per_slice = np.empty(frac.shape, dtype=np.int64)           # spots per (shower, slice)
    for i, s in enumerate(_LAYER_SLICES):
        p = frac[:, s]
        tot = p.sum(1, keepdims=True)
        p = np.divide(p, tot, out=np.full_like(p, 1.0 / p.shape[1]), where=tot > 0)
        per_slice[:, s] = rng.multinomial(counts[:, i], p)

    # --- spots, ordered slice-major (so each layer is one contiguous range), then by shower;
    #     per-shower values reach their spots through np.repeat (no gathers); float32 maths
    k = per_slice.T.ravel()
    n_sl = frac.shape[1]
    rep = lambda x: np.repeat(np.tile(np.asarray(x, dtype=np.float32), n_sl), k)
    bounds = np.concatenate([[0], np.cumsum(per_slice.sum(0))])  # spot range of each slice
    m = int(bounds[-1])
    owner = np.repeat(np.tile(np.arange(n), n_sl), k)
    u = rng.random((4, m), dtype=np.float32)                    # depth, core/tail, r, phi
    depth = np.repeat(_SLICE_LO.astype(np.float32), per_slice.sum(0)) + \
        np.repeat(SLICE_WIDTH.astype(np.float32), per_slice.sum(0)) * u[0]
    energy = np.repeat(e_spot[:, _SLICE_LAYER].T.ravel(), k)    # mean energy of each spot

    # --- radial profile (GFlash) at tau = t/<t>_i * <alpha>/(<alpha>-1) (Geant4's ComputeTau),
    #     t from the conversion point; radii in R_M -> mm, sampled by inverse CDF
    ln_e = np.log(e_inc / 1000.0)
    tau = np.maximum(depth - rep(t0), 0.0) * rep(beta / alpha * mean_alpha / (mean_alpha - 1.0))
    r_core = rep(Z1[0] + Z1[1] * ln_e) + np.float32(Z2[0] + Z2[1] * Z_EFF) * tau
    tk = tau - np.float32(K2)
    r_tail = np.float32(K1[0] + K1[1] * Z_EFF) * (np.exp(np.float32(K3) * tk) + np.exp(rep(K4[0] + K4[1] * ln_e) * tk))
    x = (np.float32(P2[0] + P2[1] * Z_EFF) - tau) * rep(1.0 / (P3[0] + P3[1] * ln_e))
    p_core = np.float32(P1[0] + P1[1] * Z_EFF) * np.exp(x - np.exp(x))
    r = np.where(u[1] < p_core, r_core, r_tail) * np.float32(MOLIERE_MM) * np.sqrt(u[2] / (1.0 - u[2]))
    phi = np.float32(2.0 * np.pi) * u[3]
    px = rep(axis[0]) + r * np.cos(phi)
    py = rep(axis[1]) + r * np.sin(phi)
    rr = np.hypot(px, py)

    # --- binning into (layer, alpha, r) voxels, one contiguous spot range per layer
    voxel = np.empty(m, dtype=np.int64)
    for i, (lay, s) in enumerate(zip(g.layers, _LAYER_SLICES)):
        lo, hi = bounds[s.start], bounds[s.stop]
        rb = np.searchsorted(np.asarray(lay.r_edges, dtype=np.float32), rr[lo:hi], side="right") - 1
        v = g.layer_offsets[i] + rb
        if lay.n_alpha > 1:
            ab = ((np.arctan2(py[lo:hi], px[lo:hi]) + np.float32(np.pi))
                  * np.float32(lay.n_alpha / (2 * np.pi))).astype(np.int64)
            v += np.minimum(ab, lay.n_alpha - 1) * lay.n_r
        v[rb >= lay.n_r] = -1                                   # beyond the last edge: lateral leakage
        voxel[lo:hi] = v
    keep = voxel >= 0
    mean = np.bincount(owner[keep] * g.n_voxels + voxel[keep], weights=energy[keep],
                       minlength=n * g.n_voxels)

    # --- sampling fluctuations: a spot of mean energy e would get Gamma(e/s, scale s) with
    #     s = a^2 GeV (variance a^2 GeV * e, so the total fluctuates by a*sqrt(E)); Gamma laws of
    #     equal scale add, so drawing once per voxel, Gamma(E_voxel/s, s), is the same in law and
    #     ~5x cheaper. Then the constant term, one factor per shower.
    scale = SAMPLING_TERM ** 2 * 1000.0
    hit = np.flatnonzero(mean)
    out = np.zeros(n * g.n_voxels)
    out[hit] = rng.standard_gamma(mean[hit] / scale) * scale
    return out.reshape(n, g.n_voxels) * const[:, None]


def simulate(n_showers: int, seed: int = 0, energies: np.ndarray | None = None,
             geometry: Geometry | None = None, chunk_size: int = 4096) -> Showers:
    """Simulate ``n_showers`` photon showers (MeV), equally many per incident energy.

    Showers are assigned to ``energies`` (default :data:`DEFAULT_ENERGIES`) round robin and
    shuffled deterministically. Work is done in blocks of :data:`BLOCK` showers, each with its
    own random stream seeded by ``(seed, block)``; ``chunk_size`` (rounded up to a multiple of
    BLOCK) is the unit handed to each of up to :data:`WORKERS` threads (numpy releases the GIL).
    The output is therefore bit-identical for ``(n_showers, seed, energies)`` whatever
    ``chunk_size`` or the thread count; peak memory is ~40 MB per thread.
    """
    g = _check_geometry(geometry)
    if n_showers < 0:
        raise InputError(f"embedded simulator: n_showers={n_showers} must be >= 0")
    levels = DEFAULT_ENERGIES if energies is None else np.asarray(energies, dtype=np.float64).reshape(-1)
    if len(levels) == 0 or not np.all(np.isfinite(levels)) or np.any(levels < MIN_ENERGY_MEV):
        raise InputError(f"embedded simulator: incident energies must be finite and >= {MIN_ENERGY_MEV:g} MeV "
                         f"(the GFlash parametrisation needs E >> Ec = {EC_MEV} MeV)")
    e_inc = _assign_energies(n_showers, seed, levels)
    out = np.empty((n_showers, g.n_voxels), dtype=np.float32)

    def run(lo: int, hi: int) -> None:
        for b0 in range(lo, hi, BLOCK):
            b1 = min(b0 + BLOCK, hi)
            rng = np.random.default_rng([seed, 0x5EED, 1, b0 // BLOCK])
            out[b0:b1] = _draw_block(e_inc[b0:b1], rng, g)

    step = max(1, -(-int(chunk_size) // BLOCK)) * BLOCK
    tasks = [(lo, min(lo + step, n_showers)) for lo in range(0, n_showers, step)]
    if WORKERS > 1 and len(tasks) > 1:
        with ThreadPoolExecutor(max_workers=min(WORKERS, len(tasks))) as pool:
            for f in [pool.submit(run, lo, hi) for lo, hi in tasks]:
                f.result()
    else:
        for lo, hi in tasks:
            run(lo, hi)
    return Showers(e_inc.astype(np.float32), out)


def embedded_path(data_dir: str | Path, n_showers: int = 15000, seed: int = 1234) -> Path:
    """Cache file name of an embedded sample (version in the name: a new simulator never reuses old files)."""
    return Path(data_dir) / f"embedded_photons_n{n_showers}_s{seed}_v{VERSION}.hdf5"


def ensure_embedded(data_dir: str | Path, n_showers: int = 15000, seed: int = 1234) -> Path:
    """Path of the embedded sample, generating it on first use (atomic write, cached after)."""
    path = embedded_path(data_dir, n_showers, seed)
    g = builtin("dataset_1_photons")
    if path.exists():
        try:
            if calochallenge.inspect(path, g).n_showers == n_showers:
                return path
        except InputError:
            pass                                                # damaged cache: regenerate below
    data = simulate(n_showers, seed=seed, geometry=g)
    attrs = dict(PARAMS, generator="caloexp.data.embedded", n_showers=n_showers, seed=seed,
                 geometry=g.name, note="parametric stand-in for CaloChallenge dataset 1 photons, not real data")
    # unique temporary name: concurrent first uses never write the same file; the rename is atomic
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.hdf5")
    try:
        calochallenge.write(tmp, data.energies, data.showers, geometry=g, attrs=attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> Path:
    """``python -m caloexp.data.embedded --seed 7 --output data/heldout.hdf5``: write a simulator sample.

    With another seed than the training data's (``data.embedded_seed``, 1234) it is an independent
    held-out sample of the same physics, e.g. the reference for ``caloexp.evaluate``.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m caloexp.data.embedded",
                                     description="Write a sample of the embedded photon simulator (CaloChallenge "
                                                 "dataset-1 photon format) and print its path.")
    parser.add_argument("--seed", type=int, default=1234, help="random seed (training data: 1234; default %(default)s)")
    parser.add_argument("--n-showers", type=int, default=15000, help="number of showers (default %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="file to write (default: the cache file in --data-dir that training would use)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="cache folder (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.n_showers < 1:
            raise InputError(f"--n-showers={args.n_showers} must be >= 1")
        if args.output is None:
            path = ensure_embedded(args.data_dir, args.n_showers, args.seed)
        else:
            g = builtin("dataset_1_photons")
            data = simulate(args.n_showers, seed=args.seed, geometry=g)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            path = calochallenge.write(args.output, data.energies, data.showers, geometry=g, attrs=dict(
                PARAMS, generator="caloexp.data.embedded", n_showers=args.n_showers, seed=args.seed,
                geometry=g.name, note="parametric stand-in for CaloChallenge dataset 1 photons, not real data"))
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)
    return path


if __name__ == "__main__":
    main()
