"""Embedded ZDC data: a parametric toy simulator of the ALICE neutron ZDC (ZN) photon-count images.

A stand-in so that ``data=zdc_embedded`` runs offline; it is never used in place of real files
(``data=zdc`` reads those). Basis (ALICE ZDC TDR, CERN/LHCC 99-5; the ZN is a tungsten/quartz-fibre
"spaghetti" calorimeter 112.5 m from the interaction point with a 7.04 x 7.04 cm^2 face, read here as
44 x 44 pixels of 1.6 mm, the fibre pitch), per particle:

* kind: neutron, proton, photon, pi+ or pi- (:data:`KINDS`, with their fractions); neutrons and
  protons are spectators at the beam energy (2.51 TeV per nucleon, 2 % spread) with probability
  :data:`SPECTATOR_FRACTION`, the others log-uniform between 5 GeV and 2.5 TeV;
* transverse momentum from a Rayleigh law (scale :data:`PT_GEV`), so the angle pT / p is large for
  soft particles, which then miss the face: many responses are empty, as in the real data;
* vertex x, y ~ N(0, 50 um), z ~ N(0, 6 cm); the impact point is the vertex plus the straight line to
  the face, plus a horizontal magnetic deflection ``charge * DEFLECTION_CM_GEV / p`` for charged particles;
* light: the mean photon count is ``yield * E`` (more for photons: EM showers convert more energy
  into Cherenkov light), spread over a Gaussian core plus a wide halo whose sizes grow with log E
  (hadronic showers are wider than electromagnetic ones; charged ones are elongated along the
  deflection); the part outside the face is lost;
* fibre grid: two interleaved fibre families (the checkerboard read by the common PMT and by the
  four tower PMTs) with different light-collection efficiencies (:data:`FIBRE_EFFICIENCY`);
* counts: Poisson per pixel (sum of Poisson = the total count is Poisson-fluctuated).

Limits: no shower-depth physics, no cross-talk, PMT gain or electronic noise, no ZP/ZEM; spectrum
and angles are only plausible, so absolute figures on it say nothing about the real detector.
Vectorised over all pixels of a block of :data:`BLOCK` events; each block has its own random stream
seeded by ``(seed, block)``, so the output is identical for a seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from caloexp.data.sample import Sample

VERSION = 1
SIZE = 44
PIXEL_CM = 0.16
FACE_Z_CM = 11250.0
BEAM_GEV = 2510.0
BLOCK = 2000
#: (name, mass GeV, charge, fraction, photons per GeV, core sigma at 100 GeV [pixels], halo fraction)
KINDS = (("neutron", 0.93957, 0.0, 0.55, 0.5, 1.4, 0.30),
         ("proton", 0.93827, 1.0, 0.20, 0.5, 1.4, 0.30),
         ("photon", 0.0, 0.0, 0.10, 0.8, 0.7, 0.10),
         ("pi+", 0.13957, 1.0, 0.075, 0.45, 1.2, 0.25),
         ("pi-", 0.13957, -1.0, 0.075, 0.45, 1.2, 0.25))
SPECTATOR_FRACTION = 0.35
PT_GEV = 0.08
DEFLECTION_CM_GEV = 4000.0
FIBRE_EFFICIENCY = (1.0, 0.7)   # (i + j) even, odd


def simulate(n: int, seed: int) -> Sample:
    """``n`` responses (N, 1, 44, 44) photon counts with their particles (N, 9); deterministic for ``seed``."""
    xs, ps = [], []
    for b, lo in enumerate(range(0, n, BLOCK)):
        x, p = _block(min(BLOCK, n - lo), np.random.default_rng([int(seed), b]))
        xs.append(x)
        ps.append(p)
    return Sample(np.concatenate(xs), {"particle": np.concatenate(ps)}, "image")


def _block(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    table = np.array([k[1:] for k in KINDS])
    kind = rng.choice(len(KINDS), size=n, p=table[:, 2] / table[:, 2].sum())
    mass, charge, yld, sig100, halo = table[kind, 0], table[kind, 1], table[kind, 3], table[kind, 4], table[kind, 5]
    spectator = (kind <= 1) & (rng.random(n) < SPECTATOR_FRACTION)
    energy = np.where(spectator, BEAM_GEV * rng.normal(1.0, 0.02, n), 10 ** rng.uniform(np.log10(5.0), np.log10(2500.0), n))
    energy = np.maximum(energy, mass + 0.1)
    p = np.sqrt(energy ** 2 - mass ** 2)
    pt = np.minimum(rng.rayleigh(PT_GEV, n), 0.9 * p)
    phi = rng.uniform(0, 2 * np.pi, n)
    px, py = pt * np.cos(phi), pt * np.sin(phi)
    pz = np.sqrt(p ** 2 - pt ** 2)
    vx, vy, vz = rng.normal(0, 0.005, n), rng.normal(0, 0.005, n), rng.normal(0, 6.0, n)
    depth = FACE_Z_CM - vz
    hit_x = vx + px / pz * depth + charge * DEFLECTION_CM_GEV / p
    hit_y = vy + py / pz * depth
    col, row = hit_x / PIXEL_CM + (SIZE - 1) / 2, hit_y / PIXEL_CM + (SIZE - 1) / 2
    log_e = np.log10(energy / 100.0)
    sig = sig100 * np.clip(1.0 + 0.35 * log_e, 0.5, None) * rng.lognormal(0, 0.1, n)
    sx, sy = sig * np.where(charge != 0, 1.3, 1.0), sig
    mu = yld * energy
    j = np.arange(SIZE, dtype=np.float64)
    dx2 = (j[None, None, :] - col[:, None, None]) ** 2
    dy2 = (j[None, :, None] - row[:, None, None]) ** 2

    def gauss(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        a, b = (sx * fx)[:, None, None], (sy * fy)[:, None, None]
        return np.exp(-0.5 * (dx2 / a ** 2 + dy2 / b ** 2)) / (2 * np.pi * a * b)

    prof = (1 - halo)[:, None, None] * gauss(1.0, 1.0) + halo[:, None, None] * gauss(3.0, 3.0)
    eff = np.where((j[:, None] + j[None, :]) % 2 == 0, *FIBRE_EFFICIENCY)
    counts = rng.poisson(mu[:, None, None] * prof * eff[None])
    particles = np.stack([energy, vx, vy, vz, px, py, pz, mass, charge], 1)
    return counts[:, None].astype(np.float32), particles.astype(np.float32)


def ensure_embedded(data_dir: str | Path, n: int, seed: int) -> Path:
    """The cached HDF5 file of ``n`` simulated responses for ``seed`` (simulated on first use)."""
    from caloexp.data import zdc

    path = Path(data_dir) / f"zdc_embedded_v{VERSION}_seed{seed}_n{n}.h5"
    if not path.exists():
        zdc.write(path, simulate(n, seed))
    return path
