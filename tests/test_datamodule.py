"""The data-module contract: each training row once per epoch, a seeded order resumable at any batch,
disjoint rank shards that make up the global batch, streamed batches equal to in-memory ones."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from caloexp.data.arrays import ArrayDataModule
from caloexp.errors import ConfigError, InputError


@pytest.fixture
def grid_file(tmp_path):
    rng = np.random.default_rng(0)
    n = 700
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        x = rng.exponential(1.0, (n, 4, 5, 6)).astype(np.float32)
        x[:, 0, 0, 0] = np.arange(n)            # each event carries its row index
        f["ECAL"] = x
        f["energy"] = rng.uniform(1, 100, n).astype(np.float32)
    return path


def module(path, **kw):
    args = dict(name="g", files=[str(path)], kind="grid", x_key="ECAL", conditions={"energy": "energy"},
                batch_size=32, eval_events=50, block_events=16,
                transform={"steps": [{"step": "log", "eps": 1e-3}, "normalise"], "conditions": {"energy": "log_scale"}})
    args.update(kw)
    dm = ArrayDataModule(**args)
    return dm.setup(0, 1)


def rows_of(dm: ArrayDataModule, batch) -> np.ndarray:
    """Row index of each event of a network-space batch (inverted through the transform)."""
    x = dm.transform.inverse(batch.x, {"energy": batch.raw["energy"]})
    return np.rint(x[:, 0, 0, 0].numpy()).astype(int)


@pytest.mark.parametrize("streaming", [False, True])
def test_every_training_row_once_per_epoch_in_a_seeded_order(grid_file, streaming):
    dm = module(grid_file, streaming=streaming, buffer_mb=0.02)
    dm.fit_transform(None, "cpu")
    epoch = np.concatenate([rows_of(dm, b) for b in dm.train_batches(0, seed=3)])
    assert len(epoch) == dm.steps_per_epoch * 32 and len(set(epoch)) == len(epoch)
    assert set(epoch) <= set(dm.train_rows.tolist()) and not set(epoch) & set(dm.val_rows.tolist())
    again = np.concatenate([rows_of(dm, b) for b in dm.train_batches(0, seed=3)])
    other = np.concatenate([rows_of(dm, b) for b in dm.train_batches(1, seed=3)])
    np.testing.assert_array_equal(epoch, again)
    assert not np.array_equal(epoch, other)
    later = np.concatenate([rows_of(dm, b) for b in dm.train_batches(0, start=5, seed=3)])
    np.testing.assert_array_equal(later, epoch[5 * 32:])      # resuming at batch 5 sees the same batches


def test_streamed_batches_match_in_memory_values(grid_file):
    mem, st = module(grid_file), module(grid_file, streaming=True, buffer_mb=0.02)
    mem.fit_transform(None, "cpu")
    st.fit_transform(None, "cpu")
    for bm, bs in zip(mem.train_batches(0, seed=1), st.train_batches(0, seed=1)):
        # same transform, so the same row has the same network values in both paths
        rm, rs = rows_of(mem, bm), rows_of(st, bs)
        common = np.intersect1d(rm, rs)
        for r in common:
            torch.testing.assert_close(bm.x[rm == r][0], bs.x[rs == r][0])


def test_ranks_take_disjoint_slices_of_each_global_batch(grid_file):
    full = module(grid_file, batch_size=64)
    full.fit_transform(None, "cpu")
    shards = []
    for rank in (0, 1):
        dm = module(grid_file, batch_size=32)
        dm.setup(rank, 2)
        dm.fit_transform(None, "cpu")
        shards.append([rows_of(dm, b) for b in dm.train_batches(0, seed=2)])
    assert len(shards[0]) == len(shards[1]) == full.steps_per_epoch
    for g, a, b in zip(full.train_batches(0, seed=2), *shards):
        assert not set(a) & set(b)
        np.testing.assert_array_equal(np.concatenate([a, b]), rows_of(full, g))


def test_streaming_memory_is_bounded_by_buffers(grid_file):
    dm = module(grid_file, streaming=True, buffer_mb=0.02)
    assert dm.buffer_rows % dm.global_batch == 0 and dm.buffer_rows * 4 * 120 <= 0.02 * 2**20 + 4 * 120 * 32


def test_bad_data_settings_and_files(grid_file, tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        module(grid_file, batch_size=0)
    with pytest.raises(ConfigError, match="too few"):
        module(grid_file, batch_size=1000)
    with pytest.raises(InputError, match="missing dataset 'nope'"):
        module(grid_file, x_key="nope")
    bad = tmp_path / "bad.h5"
    with h5py.File(grid_file) as f, h5py.File(bad, "w") as g:
        x = f["ECAL"][:]
        x[600, 1, 1, 1] = np.nan
        g["ECAL"], g["energy"] = x, f["energy"][:]
    with pytest.raises(InputError, match=r"bad.h5: 'ECAL' contains NaN/inf \(first at row 600\)"):
        module(bad)


def test_an_empty_file_is_named(tmp_path):
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f["ECAL"] = np.zeros((0, 4, 5, 6), np.float32)
        f["energy"] = np.zeros(0, np.float32)
    with pytest.raises(InputError, match=r"empty.h5: holds no events"):
        module(empty)
