"""The embedded photon-shower simulator: determinism, format and the physics it must show."""
from __future__ import annotations

import numpy as np
import pytest

from caloexp.data import calochallenge, embedded
from caloexp.data.embedded import DEFAULT_ENERGIES, ensure_embedded, simulate
from caloexp.errors import InputError
from caloexp.geometry import builtin

G = builtin("dataset_1_photons")


@pytest.fixture(scope="module")
def sample():
    """3000 showers (200 per energy): enough for means, widths and correlations."""
    return simulate(3000, seed=7)


def _per_energy(s, fn):
    return np.array([fn(s.showers[s.energies == e], e) for e in DEFAULT_ENERGIES])


def test_determinism_and_chunk_independence():
    a = simulate(700, seed=3)
    b = simulate(700, seed=3, chunk_size=100)     # other chunking and thread split
    c = simulate(700, seed=4)
    assert np.array_equal(a.showers, b.showers) and np.array_equal(a.energies, b.energies)
    assert not np.array_equal(a.showers, c.showers)


def test_single_thread_gives_same_result(monkeypatch):
    a = simulate(600, seed=11, chunk_size=256)
    monkeypatch.setattr(embedded, "WORKERS", 1)
    assert np.array_equal(a.showers, simulate(600, seed=11).showers)


def test_energies_shapes_dtypes(sample):
    assert np.array_equal(DEFAULT_ENERGIES, 2.0 ** np.arange(8, 23)) and len(DEFAULT_ENERGIES) == 15
    assert sample.energies.dtype == np.float32 and sample.showers.dtype == np.float32
    assert sample.showers.shape == (3000, 368) and sample.energies.shape == (3000,)
    values, counts = np.unique(sample.energies, return_counts=True)
    assert np.array_equal(values, DEFAULT_ENERGIES.astype(np.float32)) and np.all(counts == 200)
    assert np.all(np.isfinite(sample.showers)) and sample.showers.min() >= 0
    assert len(np.unique(sample.energies[:15])) > 1  # shuffled, not sorted
    custom = simulate(10, seed=0, energies=np.array([1000.0, 2000.0]))
    assert sorted(np.unique(custom.energies)) == [1000.0, 2000.0]


def test_response_and_resolution(sample):
    resp = sample.showers.sum(1) / sample.energies
    assert 0.85 <= resp.mean() <= 1.0
    mean = _per_energy(sample, lambda x, e: x.sum(1).mean() / e)
    res = _per_energy(sample, lambda x, e: x.sum(1).std() / x.sum(1).mean())
    assert np.all(mean > 0.8) and np.all(mean < 1.0)                # losses: response below 1
    assert res[0] > 0.15 and res[2] > 0.08                          # ~10%/sqrt(E) + losses at low E
    assert res[-5] < 0.03                                           # ~1% at 256 GeV
    assert np.all(np.diff(res[:9]) < 0)                             # resolution improves with E
    assert res[-1] < res[0] / 5


def test_depth_grows_with_log_energy(sample):
    # energy-weighted mean depth (X0) of the layers' centres
    centres = np.array([next((a + b) / 2 for a, b, l in embedded.DEPTH_REGIONS if l == lid) for lid in G.layer_ids])
    depth = _per_energy(sample, lambda x, e: (G.layer_energies(x) @ centres).sum() / x.sum())
    assert np.all(np.diff(depth) > 0)
    assert np.corrcoef(np.log(DEFAULT_ENERGIES), depth)[0, 1] > 0.98
    # same with the layer index as depth: strips dominate at low E, the middle at high E
    frac = _per_energy(sample, lambda x, e: G.layer_energies(x).sum(0) / x.sum())
    assert frac[0, 1] > frac[0, 2] and frac[-1, 2] > 5 * frac[-1, 1]
    assert frac[-1, 3] > frac[0, 3] and frac[-1, 4] > frac[0, 4]   # more leakage behind at high E


def test_sparsity_falls_with_energy(sample):
    zero = _per_energy(sample, lambda x, e: (x == 0).mean())
    assert zero[0] > 0.7 and zero[0] > zero[-1] + 0.3
    assert np.all(np.diff(zero[:5]) < 0)
    assert zero.min() > 0.1                                          # never a dense blob


def test_layer_fractions_fluctuate_with_correlations(sample):
    # a shower that starts/maximises late puts less in the strips (1) and more in the back (3):
    # per-shower fluctuations of ln T and of the conversion depth make the fractions anti-correlated
    for e in (4096.0, 65536.0, 1048576.0):
        x = sample.showers[sample.energies == e]
        f = G.layer_energies(x) / x.sum(1, keepdims=True)
        assert f[:, 1].std() > 0.02
        assert np.corrcoef(f[:, 1], f[:, 3])[0, 1] < -0.2
        assert np.corrcoef(f[:, 1], f[:, 2])[0, 1] < -0.2


def test_radial_core_and_tail(sample):
    x = sample.showers[sample.energies == 65536.0]
    for i in (1, 2):
        layer = G.layers[i]
        edges = np.asarray(layer.r_edges)
        e_r = G.layer_image(x, i).sum((0, 1))                       # energy per radial bin
        density = e_r / (np.pi * (edges[1:] ** 2 - edges[:-1] ** 2))
        assert density[0] > 100 * density[-1]                        # steep core
        assert density[:3].mean() > density[3:].max()
        assert e_r[-3:].sum() > 0                                    # but a tail reaches far out
        inside = e_r[edges[1:] <= 50].sum() / e_r.sum()              # ~R_M = 43 mm
        assert 0.7 < inside < 0.99


def test_other_geometry_rejected():
    with pytest.raises(InputError, match="photon"):
        simulate(10, geometry=builtin("dataset_2"))
    with pytest.raises(InputError):
        simulate(10, energies=np.array([10.0]))


def test_ensure_embedded_caches(tmp_path):
    p = ensure_embedded(tmp_path, n_showers=300, seed=5)
    assert p.name == f"embedded_photons_n300_s5_v{embedded.VERSION}.hdf5"
    mtime = p.stat().st_mtime_ns
    assert ensure_embedded(tmp_path, n_showers=300, seed=5) == p
    assert p.stat().st_mtime_ns == mtime
    data = calochallenge.read(p, geometry=G)
    ref = simulate(300, seed=5)
    assert np.array_equal(data.showers, ref.showers) and np.array_equal(data.energies, ref.energies)
    import h5py
    with h5py.File(p) as f:
        assert f.attrs["version"] == embedded.VERSION and f.attrs["seed"] == 5
        assert "stand-in" in f.attrs["note"]
    assert sorted(q.name for q in tmp_path.iterdir()) == [p.name]    # no temporary left behind


def test_ensure_embedded_regenerates_damaged_cache(tmp_path):
    p = embedded.embedded_path(tmp_path, 256, 1)
    p.write_bytes(b"not hdf5")
    ensure_embedded(tmp_path, n_showers=256, seed=1)
    assert len(calochallenge.read(p, geometry=G)) == 256
