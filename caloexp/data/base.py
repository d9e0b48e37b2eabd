"""The data-module protocol: from a dataset config to sharded training batches and a held-out reference.

A format module subclasses :class:`DataModule` and provides a :class:`Source` (rows of events with
their conditions, in memory or read from disk on demand) and a writer for generated events. The
base class does the rest, the same for every format:

* ``setup(rank, world_size)``  - split rows into training and held-out (seeded by ``split_seed``),
  read the reference sample, fit the condition transforms (so ``cond_dim`` is known);
* ``fit_transform(output_range, device)`` - fit the event transform on the training split;
* ``train_batches(epoch, start, seed)`` - the batches of one epoch from batch ``start`` on, in an
  order fixed by ``(seed, epoch)``: a resumed run sees exactly the batches an uninterrupted one saw.
  Each global batch of ``batch_size * world_size`` rows is cut into one slice per rank.

``streaming: false`` keeps the training split in network space on the device (fast, for data that
fits). ``streaming: true`` reads buffers of contiguous blocks in a seeded order with one buffer of
prefetch, so memory stays at a few buffers (``buffer_mb`` each) whatever the file size.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from caloexp.data.sample import KINDS, Batch, Sample
from caloexp.data.transforms import Transform
from caloexp.errors import ConfigError, InputError


class Source:
    """Rows of events. ``read(lo, hi)`` returns a contiguous slice as a :class:`Sample`."""

    kind = "calo"

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def event_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, lo: int, hi: int) -> Sample:
        raise NotImplementedError

    def take(self, rows: np.ndarray, max_span: int = 4096) -> Sample:
        """Rows at sorted indices, read as contiguous spans of at most ``max_span`` rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return self.read(0, 0)
        parts, i = [], 0
        while i < len(rows):
            lo = rows[i]
            j = int(np.searchsorted(rows, lo + max_span, side="left"))
            chunk = self.read(int(lo), int(rows[j - 1]) + 1)
            parts.append(chunk.subset(rows[i:j] - lo))
            i = j
        return Sample.concatenate(parts)


class MemorySource(Source):
    def __init__(self, sample: Sample):
        self.sample = sample
        self.kind = sample.kind

    def __len__(self) -> int:
        return len(self.sample)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.sample.event_shape

    def read(self, lo: int, hi: int) -> Sample:
        return self.sample.subset(slice(lo, hi))

    def take(self, rows: np.ndarray, max_span: int = 0) -> Sample:
        return self.sample.subset(np.asarray(rows, dtype=np.int64))


class DataModule:
    """Split, transform and batch a :class:`Source`; subclasses say where the rows come from."""

    kind = "calo"
    default_transform: dict[str, Any] = {}
    memory_limit_bytes = 8 << 30   # beyond this, in-memory training asks for streaming

    def __init__(self, name: str, batch_size: int = 256, val_fraction: float = 0.2, eval_events: int = 5000,
                 split_seed: int = 0, max_events: int | None = None, transform: Mapping[str, Any] | None = None,
                 streaming: bool = False, buffer_mb: float = 128.0, block_events: int = 256,
                 fit_events: int = 50000, fit_mb: float = 512.0):
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must be in (0, 1)")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be >= 1")
        if eval_events < 2:
            raise ConfigError(f"data.eval_events={eval_events}: must be >= 2 (the reference sample)")
        if max_events is not None and max_events < 2:
            raise ConfigError(f"data.max_events={max_events}: must be >= 2 (or null for all)")
        for key, value in (("block_events", block_events), ("fit_events", fit_events)):
            if value < 1:
                raise ConfigError(f"data.{key}={value}: must be >= 1")
        for key, value in (("buffer_mb", buffer_mb), ("fit_mb", fit_mb)):
            if not value > 0:
                raise ConfigError(f"data.{key}={value}: must be > 0")
        self.name = name
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.eval_events = int(eval_events)
        self.split_seed = int(split_seed)
        self.max_events = max_events
        self.transform_cfg = dict(transform) if transform else dict(self.default_transform)
        self.streaming = bool(streaming)
        self.buffer_mb = float(buffer_mb)
        self.block_events = int(block_events)
        self.fit_events = int(fit_events)
        self.fit_mb = float(fit_mb)
        self.rank, self.world_size = 0, 1
        self.source: Source | None = None
        self.train_rows: np.ndarray | None = None
        self.val_rows: np.ndarray | None = None
        self._reference: Sample | None = None
        self.transform: Transform | None = None
        self._x: torch.Tensor | None = None  # in-memory training set, network space
        self._c: torch.Tensor | None = None
        self._raw: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    # -------------------------------------------------------- for subclasses
    def open_files(self) -> Source:
        """The rows of the dataset on disk (files made available first), read on demand."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Make the files available (download, generate); run once, by rank 0, before every rank's setup."""

    def open_source(self) -> Source:
        """The files as they are when streaming, else their first ``max_events`` rows in memory."""
        files = self.open_files()
        if len(files) == 0:
            names = ", ".join(str(p) for p in (getattr(files, "paths", None) or [])) or self.name
            raise InputError(f"{names}: holds no events (data={self.name})")
        if self.streaming:
            return files
        n = len(files) if self.max_events is None else min(len(files), int(self.max_events))
        need = n * int(math.prod(files.event_shape)) * 4
        if need > self.memory_limit_bytes:
            raise ConfigError(f"data={self.name}: {n} events need {need / 2**30:.1f} GiB in memory; "
                              "set data.streaming=true (or data.max_events)")
        return MemorySource(files.read(0, n))

    def writer_spec(self) -> dict[str, Any]:
        """How generated events of this data are written (see :mod:`caloexp.data.formats`)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A short, plain description for tracking (name, kind, files, sizes)."""
        return {"name": self.name, "kind": self.kind, "n_events": len(self.source) if self.source else None,
                "event_shape": list(self.event_shape) if self.source else None}

    # ----------------------------------------------------------------- setup
    def setup(self, rank: int = 0, world_size: int = 1) -> "DataModule":
        """Open the source, split rows, read the reference sample, fit the condition transforms."""
        self.rank, self.world_size = int(rank), int(world_size)
        self.source = self.open_source()
        n = len(self.source) if self.max_events is None else min(len(self.source), int(self.max_events))
        n_val = int(round(n * self.val_fraction))
        if n - n_val < self.batch_size * self.world_size or n_val < 2:
            raise ConfigError(f"data={self.name}: {n} events are too few for batch_size={self.batch_size} x "
                              f"{self.world_size} process(es) with val_fraction={self.val_fraction}")
        perm = np.random.default_rng(self.split_seed).permutation(n)
        self.train_rows, self.val_rows = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        self._reference = self.source.take(self.val_rows[:self.eval_events])
        fit = self._fit_sample()
        self.transform = Transform(self.event_shape, **self._transform_kwargs(fit))
        self.transform.fit_conditions(fit.cond)
        self._fit = fit
        return self

    def resolve_step(self, entry: Any) -> Any:
        """Fill in settings only the data knows (e.g. ``layers: geometry``); formats override this."""
        return entry

    def _transform_kwargs(self, fit: Sample) -> dict[str, Any]:
        cfg = dict(self.transform_cfg)
        cfg["steps"] = [self.resolve_step(e) for e in (cfg.get("steps") or [])]
        cond_dims = {k: (1 if v.ndim == 1 else int(np.prod(v.shape[1:]))) for k, v in fit.cond.items()}
        return {"steps": list(cfg.get("steps") or []), "conditions": dict(cfg.get("conditions") or {}),
                "cond_dims": cond_dims, "nonnegative": bool(cfg.get("nonnegative", True))}

    @property
    def event_size(self) -> int:
        return int(math.prod(self.event_shape))

    def _fit_sample(self) -> Sample:
        """The first ``fit_events`` training rows, at most ``fit_mb`` in float64 (the transform is fitted on them)."""
        cap = max(2, int(self.fit_mb * 2**20 // (8 * self.event_size)))
        return self.source.take(self.train_rows[:min(self.fit_events, cap)])

    # ------------------------------------------------------------- transform
    def fit_transform(self, output_range: Sequence[float] | None = None,
                      device: str | torch.device = "cpu") -> Transform:
        """Fit the event transform on the training split (a ``fit_events`` sample when streaming)."""
        assert self.source is not None, "call setup() first"
        self.transform.use_output_range(output_range)
        self.transform.fit(self._fit.x, self._fit.cond)
        self.device = torch.device(device)
        self.transform.to(self.device)
        self._fit = None
        if not self.streaming:
            self._x, self._c, self._raw = self._network_training_set()
        return self.transform

    @torch.no_grad()
    def _network_training_set(self, chunk_mb: float = 64.0):
        """The training split in network space, converted in chunks (no full-size temporaries)."""
        n = len(self.train_rows)
        x = torch.empty((n, *self.data_shape), dtype=torch.float32, device=self.device)
        conds, raws = [], []
        step = max(1, int(chunk_mb * 2**20 // (4 * self.event_size)))
        for lo in range(0, n, step):
            xi, ci, ri = self._to_network(self.source.take(self.train_rows[lo:lo + step]))
            x[lo:lo + len(xi)] = xi
            conds.append(ci)
            raws.append(ri)
        raw = {k: torch.cat([r[k] for r in raws]) for k in raws[0]} if raws else {}
        return x, torch.cat(conds), raw

    @torch.no_grad()
    def _to_network(self, s: Sample) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raw = {k: self._to_device(v) for k, v in s.cond.items()}
        x = self.transform(self._to_device(s.x), raw)
        if not torch.isfinite(x).all():
            raise ConfigError(f"data={self.name}: the transform {self.transform.spec()['steps']} gives non-finite "
                              "values on the training data (e.g. log of negative values: choose other steps)")
        return x, self.transform.condition(raw), raw

    def _to_device(self, a: Any) -> torch.Tensor:
        """Host data onto the device; on CUDA through page-locked memory, so the copy of a streamed buffer
        (made in the prefetch thread) runs asynchronously instead of blocking on pageable memory."""
        t = torch.as_tensor(a)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    # ---------------------------------------------------------------- shapes
    @property
    def event_shape(self) -> tuple[int, ...]:
        assert self.source is not None, "call setup() first"
        return tuple(self.source.event_shape)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape a network sees (the transform's output shape)."""
        return self.transform.net_shape

    @property
    def cond_names(self) -> list[str]:
        return self.transform.cond_names

    @property
    def cond_dim(self) -> int:
        return self.transform.cond_dim

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        assert self.train_rows is not None
        return len(self.train_rows) // self.global_batch

    # --------------------------------------------------------------- batches
    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """Positions into the training rows for one epoch (all ranks compute the same order)."""
        n = len(self.train_rows)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        if not self.streaming:
            return torch.randperm(n, generator=g).numpy()
        # streaming: shuffled blocks of contiguous rows, grouped into buffers shuffled within
        n_blocks = math.ceil(n / self.block_events)
        blocks = torch.randperm(n_blocks, generator=g).numpy()
        order = np.concatenate([np.arange(b * self.block_events, min(n, (b + 1) * self.block_events)) for b in blocks])
        size = self.buffer_rows
        for lo in range(0, n, size):
            seg = order[lo:lo + size]
            order[lo:lo + size] = seg[torch.randperm(len(seg), generator=g).numpy()]
        return order

    @property
    def buffer_rows(self) -> int:
        """Rows per streamed buffer (about ``buffer_mb``), a multiple of the global batch: no batch spans two."""
        rows = int(self.buffer_mb * 2**20 // (4 * self.event_size))
        return max(1, rows // self.global_batch) * self.global_batch

    def _rank_slice(self, b: int) -> slice:
        lo = b * self.global_batch + self.rank * self.batch_size
        return slice(lo, lo + self.batch_size)

    def train_batches(self, epoch: int, start: int = 0, seed: int = 0) -> Iterator[Batch]:
        """Batches of epoch ``epoch`` from batch index ``start`` on (drop-last, deterministic order)."""
        assert self.transform is not None, "call fit_transform() first"
        order = self.epoch_order(epoch, seed)
        if not self.streaming:
            perm = torch.as_tensor(order).to(self.device)
            for b in range(start, self.steps_per_epoch):
                idx = perm[self._rank_slice(b)]
                yield Batch(self._x[idx], self._c[idx], {k: v[idx] for k, v in self._raw.items()})
            return
        yield from self._streamed_batches(order, start)

    def _streamed_batches(self, order: np.ndarray, start: int) -> Iterator[Batch]:
        per_buffer = self.buffer_rows // self.global_batch
        first, last = start // per_buffer, math.ceil(self.steps_per_epoch / per_buffer)

        def load(j: int):
            pos = order[j * self.buffer_rows:(j + 1) * self.buffer_rows]
            rows = self.train_rows[pos]
            sorter = np.argsort(rows, kind="stable")
            chunk = self.source.take(rows[sorter], max_span=self.block_events * 8)
            back = np.empty_like(sorter)
            back[sorter] = np.arange(len(sorter))
            return self._to_network(chunk.subset(back))

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, first) if first < last else None
            for j in range(first, last):
                x, c, raw = pending.result()
                pending = pool.submit(load, j + 1) if j + 1 < last else None
                for b in range(max(start, j * per_buffer), min(self.steps_per_epoch, (j + 1) * per_buffer)):
                    local = self._rank_slice(b - j * per_buffer)
                    yield Batch(x[local], c[local], {k: v[local] for k, v in raw.items()})

    # -------------------------------------------------------------- reference
    def reference(self) -> Sample:
        """Held-out events (physical units) that generated events are compared against."""
        assert self._reference is not None, "call setup() first"
        return self._reference


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"data.kind={kind!r}: choose one of {list(KINDS)}")
    return kind
