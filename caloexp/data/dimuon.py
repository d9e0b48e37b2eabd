"""A toy Drell-Yan -> mu mu sample with a tt-bar-like admixture, written as a real ROOT file (``data=dimuon_embedded``).

It stands in for a CMS ntuple (tree ``LPHY2131analysis/WeakBosonsAnalysis``) so the ROOT path of
:mod:`caloexp.data.root_table` runs offline; it is *not* real data and runs using it are tagged
``embedded_toy`` in their dataset description. Deterministic for a seed (one ``numpy`` generator).

Per event (all momenta in GeV):

* **process**: Drell-Yan (``1 - ttbar_fraction``) or tt-bar-like (``ttbar_fraction``, default 0.3);
* **dimuon mass**: Drell-Yan: 85 % a Z line shape (relativistic Breit-Wigner, M = 91.19, Gamma = 2.495,
  cut to 60-120) smeared by a 2 % Gaussian resolution, 15 % a falling continuum 50 + Exp(20);
  tt-bar: 12 + Gamma(2.2, 35) (two muons from different W decays);
* **dimuon system**: pT ~ Exp(10) (Drell-Yan) or Gamma(2, 35) (tt-bar), rapidity ~ N(0, 1.2); the
  two muons are decayed isotropically in its rest frame and boosted, so the leading muon pT is
  correlated with the mass (Jacobian peak at M/2) and with the system pT;
* **MET**: Drell-Yan: resolution only, a 2D Gaussian of width 6 + 0.05 pT(mu mu); tt-bar: two
  neutrinos of pT ~ Exp(35) each plus the same resolution;
* **jets** (jagged ``JetsPt``, ``JetsBTag`` 0/1): Drell-Yan Poisson(0.6 + pT(mu mu) / 40) light jets
  (mistag 2 %) and, in 5 % of events, one b jet; tt-bar 2 b jets + Poisson(0.7) light jets;
  b-tag efficiency 70 %. The label "at least one b-tagged jet" is thus mostly tt-bar: higher MET,
  broader mass, harder muons;
* **failing the selection** ``nMuons == 2 & nElectrons == 0``: 4 % of events have one muon, 4 %
  three, and electrons are Poisson(0.03) (Drell-Yan) / Poisson(0.25) (tt-bar).

Branches: ``nMuons``, ``MuonsPt``, ``MuonsEta``, ``MuonsPhi`` (pT-ordered), ``nElectrons``,
``MET``, ``nJets``, ``JetsPt``, ``JetsBTag``, ``process`` (0 Drell-Yan, 1 tt-bar; the truth, not
for training).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

Z_MASS, Z_WIDTH = 91.1876, 2.4952


def _breit_wigner(rng: np.random.Generator, n: int, lo: float = 60.0, hi: float = 120.0) -> np.ndarray:
    """Relativistic Breit-Wigner in m (inverse CDF in m^2 over [lo, hi])."""
    a = np.arctan((lo**2 - Z_MASS**2) / (Z_MASS * Z_WIDTH))
    b = np.arctan((hi**2 - Z_MASS**2) / (Z_MASS * Z_WIDTH))
    m2 = Z_MASS**2 + Z_MASS * Z_WIDTH * np.tan(rng.uniform(a, b, n))
    return np.sqrt(m2)


def _decay(rng: np.random.Generator, m: np.ndarray, pt: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two massless daughters of a system (m, pT, y, random phi): their (pT, eta, phi), each (N, 2)."""
    n = len(m)
    phi = rng.uniform(-np.pi, np.pi, n)
    mt = np.sqrt(m**2 + pt**2)
    big_e, pz = mt * np.cosh(y), mt * np.sinh(y)
    beta = np.stack([pt * np.cos(phi), pt * np.sin(phi), pz], 1) / big_e[:, None]
    b2 = np.clip((beta**2).sum(1), 1e-12, 1 - 1e-12)
    gamma = 1 / np.sqrt(1 - b2)
    cos_t, phs = rng.uniform(-1, 1, n), rng.uniform(-np.pi, np.pi, n)
    sin_t = np.sqrt(1 - cos_t**2)
    p = (m / 2)[:, None] * np.stack([sin_t * np.cos(phs), sin_t * np.sin(phs), cos_t], 1)
    out = []
    for sign in (1.0, -1.0):
        q = sign * p
        bq = (beta * q).sum(1)
        lab = q + (((gamma - 1) * bq / b2) + gamma * m / 2)[:, None] * beta
        qt = np.hypot(lab[:, 0], lab[:, 1])
        out.append((qt, np.arcsinh(lab[:, 2] / np.maximum(qt, 1e-9)), np.arctan2(lab[:, 1], lab[:, 0])))
    return tuple(np.stack([out[0][k], out[1][k]], 1) for k in range(3))


def _jagged(counts: np.ndarray, values: np.ndarray):
    import awkward as ak

    return ak.unflatten(values, counts)


def generate(n_events: int = 60000, seed: int = 1234, ttbar_fraction: float = 0.3) -> dict:
    """The branches of ``n_events`` toy events (see the module doc), as numpy / awkward arrays."""
    rng = np.random.default_rng(seed)
    n = int(n_events)
    tt = rng.random(n) < ttbar_fraction
    # dimuon mass
    m = np.where(rng.random(n) < 0.85, _breit_wigner(rng, n) * (1 + 0.02 * rng.standard_normal(n)),
                 50.0 + rng.exponential(20.0, n))
    m = np.where(tt, 12.0 + rng.gamma(2.2, 35.0, n), m)
    pt_ll = np.where(tt, rng.gamma(2.0, 35.0, n), rng.exponential(10.0, n))
    y = rng.normal(0.0, 1.2, n)
    mu_pt, mu_eta, mu_phi = _decay(rng, m, pt_ll, y)
    # MET: resolution (+ two neutrinos for tt-bar)
    res = 6.0 + 0.05 * pt_ll
    mex, mey = rng.normal(0, 1, n) * res, rng.normal(0, 1, n) * res
    for _ in range(2):
        nu_pt, nu_phi = rng.exponential(35.0, n), rng.uniform(-np.pi, np.pi, n)
        mex, mey = mex + tt * nu_pt * np.cos(nu_phi), mey + tt * nu_pt * np.sin(nu_phi)
    met = np.hypot(mex, mey)
    # muon multiplicity: a few events with one or three muons (fail the selection)
    u = rng.random(n)
    n_mu = np.where(u < 0.04, 1, np.where(u < 0.08, 3, 2))
    extra = np.stack([5.0 + rng.exponential(5.0, n), rng.normal(0, 1.5, n), rng.uniform(-np.pi, np.pi, n)], 1)
    order = np.argsort(-mu_pt, axis=1)
    cols = [np.take_along_axis(a, order, 1) for a in (mu_pt, mu_eta, mu_phi)]
    three = [np.concatenate([c, extra[:, k:k + 1]], 1) for k, c in enumerate(cols)]
    keep = np.arange(3)[None, :] < n_mu[:, None]
    mu = [t[keep] for t in three]
    # electrons and jets
    n_el = rng.poisson(np.where(tt, 0.25, 0.03))
    n_light = np.where(tt, rng.poisson(0.7, n), rng.poisson(0.6 + pt_ll / 40.0))
    n_b = np.where(tt, 2, (rng.random(n) < 0.05).astype(np.int64))
    n_jet = n_light + n_b
    total = int(n_jet.sum())
    jet_pt = 25.0 + rng.exponential(35.0, total)
    starts = np.concatenate([[0], np.cumsum(n_jet)[:-1]])
    is_b = (np.arange(total) - np.repeat(starts, n_jet)) < np.repeat(n_b, n_jet)
    tag = np.where(is_b, rng.random(total) < 0.7, rng.random(total) < 0.02).astype(np.int32)
    # order jets by pT within each event (the tag follows its jet)
    ev = np.repeat(np.arange(n), n_jet)
    idx = np.lexsort((-jet_pt, ev))
    return {
        "nMuons": n_mu.astype(np.int32), "MuonsPt": _jagged(n_mu, mu[0].astype(np.float32)),
        "MuonsEta": _jagged(n_mu, mu[1].astype(np.float32)), "MuonsPhi": _jagged(n_mu, mu[2].astype(np.float32)),
        "nElectrons": n_el.astype(np.int32), "MET": met.astype(np.float32), "nJets": n_jet.astype(np.int32),
        "JetsPt": _jagged(n_jet, jet_pt[idx].astype(np.float32)), "JetsBTag": _jagged(n_jet, tag[idx]),
        "process": tt.astype(np.int32),
    }


def write_root(path: str | Path, n_events: int = 60000, seed: int = 1234, ttbar_fraction: float = 0.3,
               tree: str = "LPHY2131analysis/WeakBosonsAnalysis") -> Path:
    """Write the toy sample as a ROOT file with uproot (atomic rename); returns the path."""
    import uproot

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    branches = generate(n_events, seed, ttbar_fraction)
    tmp = path.with_name(path.name + ".part")
    try:
        with uproot.recreate(tmp) as f:
            f.mktree(tree, {k: v.type if hasattr(v, "layout") else v.dtype for k, v in branches.items()},
                     counter_name=lambda name: f"n{name}_")
            f[tree].extend(branches)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
