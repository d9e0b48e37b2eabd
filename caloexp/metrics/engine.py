"""One streaming evaluation for every kind of event, driven by a registry of metric groups.

A metric group (:class:`MetricGroup`) declares the kinds of data it applies to (``calo``,
``grid``, ``image``, ``tabular``; see :mod:`caloexp.data.sample`) and makes an accumulator
(:class:`Accumulator`) that is fed the reference chunks, then the generated chunks, optionally
the reference chunks a second time (histograms whose binning needs the reference's range), and
finally produces its metrics. :func:`evaluate_stream` is the one entry point: training, the CLI
and the plots use it (in memory: one chunk per sample; files: chunk by chunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from caloexp.data.calochallenge import Showers
from caloexp.data.sample import KINDS, Sample
from caloexp.errors import ConfigError, InputError
from caloexp.geometry import Geometry
from caloexp.metrics import features as feat
from caloexp.metrics.features import Features

#: An evaluation input: a Sample, legacy Showers, or a zero-argument callable that returns a fresh
#: iterator of chunks (Sample or Showers) each time it is called (files: streamed twice at most).
Source = Union[Sample, Showers, Callable[[], Iterable[Union[Sample, Showers]]]]


@dataclass
class Chunk:
    """One chunk of one sample as the groups see it: thresholded events, conditions, calo features."""

    x: np.ndarray
    cond: dict[str, np.ndarray]
    features: Features | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def energies(self) -> np.ndarray:
        return np.asarray(self.cond["energy"], np.float64).reshape(len(self.x), -1)[:, 0]


@dataclass
class Context:
    """Settings shared by the accumulators of one evaluation."""

    kind: str
    geometry: Geometry | None
    threshold: float
    classifier: Mapping[str, Any] | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


class Accumulator:
    """Streaming state of one metric group in one evaluation (see the module doc for the order)."""

    second_pass = False  # True: also fed the reference chunks again, after the generated ones

    def add(self, which: str, chunk: Chunk) -> None:
        """``which`` is ``"reference"`` (all of them first) or ``"generated"``."""

    def add_second(self, chunk: Chunk) -> None:
        """A reference chunk of the second pass."""

    def result(self, reference: Features | None, generated: Features | None) -> dict[str, float]:
        """The group's metrics; calo features of the whole samples are passed in (None for other kinds)."""
        raise NotImplementedError


@dataclass(frozen=True)
class MetricGroup:
    """A named set of metrics: the kinds it applies to and its accumulator factory."""

    name: str
    kinds: tuple[str, ...]
    make: Callable[[Context], Accumulator]
    summary: str = ""
    headline: tuple[str, ...] = ()  # metric names printed in the training log's one-line summary


@dataclass
class Evaluation:
    """What an evaluation returns: the metrics and, for calo data, the features of both samples
    (for ``caloexp.plots.plot_all(..., features=(ev.reference_features, ev.generated_features))``)."""

    metrics: dict[str, float]
    reference_features: Features | None = None
    generated_features: Features | None = None
    n_reference: int = 0
    n_generated: int = 0


REGISTRY: dict[str, MetricGroup] = {}


def register(group: MetricGroup) -> MetricGroup:
    """Add a group to the registry (a later group of the same name replaces it)."""
    bad = sorted(set(group.kinds) - set(KINDS))
    if bad:
        raise ValueError(f"metric group {group.name}: unknown kind(s) {bad}; kinds are {list(KINDS)}")
    REGISTRY[group.name] = group
    return group


def groups_for(kind: str) -> list[str]:
    """Names of the registered groups that apply to ``kind``."""
    return [n for n, g in REGISTRY.items() if kind in g.kinds]


def check_groups(groups: Sequence[str], kind: str, setting: str = "groups") -> list[str]:
    """The groups as a list; ConfigError (one line) naming the unknown ones and the valid ones for ``kind``."""
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is unknown; kinds are {list(KINDS)}")
    groups = [str(g) for g in groups]
    unknown = [g for g in groups if g not in REGISTRY]
    other = [g for g in groups if g in REGISTRY and kind not in REGISTRY[g].kinds]
    if unknown or other:
        what = f"unknown metric group(s) {unknown}" if unknown else f"metric group(s) {other} do not apply to {kind} data"
        raise ConfigError(f"{setting}: {what}; for {kind} data choose from {groups_for(kind)}")
    return groups


def _as_sample(obj: Sample | Showers, kind: str) -> Sample:
    if isinstance(obj, Sample):
        return obj
    if hasattr(obj, "energies") and hasattr(obj, "showers"):
        return Sample(np.asarray(obj.showers), {"energy": np.asarray(obj.energies).reshape(-1)}, kind)
    raise ConfigError(f"cannot evaluate a {type(obj).__name__}: give a Sample, Showers or a chunk iterator factory")


def _chunks(source: Source, kind: str, chunk_rows: int | None) -> Iterator[Sample]:
    if callable(source) and not isinstance(source, (Sample, Showers)):
        for c in source():
            yield _as_sample(c, kind)
        return
    s = _as_sample(source, kind)
    step = chunk_rows or max(len(s), 1)
    for i in range(0, max(len(s), 1), step):
        yield s.subset(slice(i, i + step))


def infer_kind(source: Source) -> str:
    """The kind of a Sample (legacy Showers: ``calo``); callables must be given a kind."""
    if isinstance(source, Sample):
        return source.kind
    if isinstance(source, Showers) or (hasattr(source, "energies") and hasattr(source, "showers")):
        return "calo"
    raise ConfigError("kind= is required when the samples are given as chunk iterators")


def _prepare(s: Sample, ctx: Context, what: str, row0: int, features: bool = True) -> Chunk:
    x = np.asarray(s.x)
    if ctx.kind == "calo":
        x = x.reshape(len(x), -1)
        g = ctx.geometry
        if g is None:
            raise ConfigError("calo metrics need a geometry (geometry=<name or binning XML>)")
        if x.shape[1] != g.n_voxels:
            raise ConfigError(f"{what} showers have shape {x.shape}, geometry {g.name} needs (N, {g.n_voxels})")
        if "energy" not in s.cond:
            raise ConfigError(f"{what} sample has no 'energy' condition (incident energies in MeV)")
    flat = x.reshape(len(x), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        noun = "showers" if ctx.kind == "calo" else "events"
        raise InputError(f"{what} {noun} contain NaN/inf in {int(bad.sum())} of {len(x)} {noun} "
                         f"(first: row {row0 + int(np.argmax(bad))})")
    if ctx.threshold > 0:
        x = feat.apply_threshold(x, ctx.threshold)
    chunk = Chunk(x, dict(s.cond))
    if ctx.kind == "calo" and features:
        chunk.features = feat.compute(chunk.energies, x, ctx.geometry, threshold=0)
    return chunk


def evaluate_stream(reference: Source, generated: Source, geometry: Geometry | None = None,
                    groups: Sequence[str] | None = None, kind: str | None = None, threshold: float | None = None,
                    classifier: Mapping[str, Any] | None = None, seed: int = 0, chunk_rows: int | None = None,
                    options: Mapping[str, Any] | None = None) -> Evaluation:
    """Evaluate ``generated`` against ``reference`` with the named metric groups.

    ``kind`` defaults to the reference's (Showers: ``calo``); ``groups=None`` uses
    :data:`DEFAULT_GROUPS` of the kind. ``threshold=None``: the dataset's voxel threshold for
    calo data (:func:`~caloexp.metrics.features.default_threshold`), none otherwise. Returns an
    :class:`Evaluation` (metrics as Python floats, calo features of both samples).
    """
    from caloexp.metrics.groups import DEFAULT_GROUPS  # registers the built-in groups

    kind = kind or infer_kind(reference)
    groups = check_groups(DEFAULT_GROUPS[kind] if groups is None else groups, kind)
    if threshold is None:
        thr = feat.default_threshold(geometry) if (kind == "calo" and geometry is not None) else 0.0
    else:
        thr = float(threshold)
    ctx = Context(kind, geometry, thr, classifier, int(seed), dict(options or {}))
    accs = [REGISTRY[g].make(ctx) for g in groups]
    feats: dict[str, list[Features]] = {"reference": [], "generated": []}
    counts = {}
    for which, src in (("reference", reference), ("generated", generated)):
        n = 0
        for s in _chunks(src, kind, chunk_rows):
            if len(s) == 0:
                continue
            c = _prepare(s, ctx, which, n)
            n += len(c)
            if c.features is not None:
                feats[which].append(c.features)
            for a in accs:
                a.add(which, c)
        if n < 2:
            raise ConfigError(f"{which} sample has {n} events; metrics need at least 2")
        counts[which] = n
    second = [a for a in accs if a.second_pass]
    if second:
        row = 0
        for s in _chunks(reference, kind, chunk_rows):
            if len(s):
                c = _prepare(s, ctx, "reference", row, features=False)
                row += len(c)
                for a in second:
                    a.add_second(c)
    rf = Features.concatenate(feats["reference"]) if feats["reference"] else None
    gf = Features.concatenate(feats["generated"]) if feats["generated"] else None
    out: dict[str, float] = {}
    for a in accs:
        out.update(a.result(rf, gf))
    return Evaluation({k: _finite(v) for k, v in sorted(out.items())}, rf, gf,
                      counts["reference"], counts["generated"])


def _finite(v: float) -> float:
    v = float(v)
    if np.isnan(v):
        return v  # only metrics that cannot apply are NaN; groups leave those out
    return float(np.clip(v, -1e30, 1e30))
