"""Physics validation metrics: the CaloChallenge protocol (official code of 2025-01-02), the seeds' metrics
made honest, generic metrics for grid, image and tabular data, and a training monitor that cannot be fooled.

One streaming entry point, :func:`evaluate_stream` (a registry of metric groups, each declaring the
kinds of data it applies to; see :mod:`caloexp.metrics.engine`), returns an :class:`Evaluation`:
a flat dict of floats with MLflow-safe names plus the calo features of both samples.
:func:`evaluate` is its in-memory shorthand returning the dict. Groups (``docs/metrics.md``):

calo      ``separation`` (``sep/*``, ``resp/*``, ``monitor/score``), ``images``, ``wasserstein``,
          ``classifier``, ``fpd_kpd``, ``shapes3d``, ``projections``
grid      ``cells``
image     ``cells``
tabular   ``tabular``

``monitor/score`` (every kind's default groups compute it) is the default training monitor.
Non-finite events raise :class:`~caloexp.errors.InputError` (one line, naming the first bad row).
Calo samples get the same voxel threshold first (``threshold=None``: 1 MeV for dataset 1,
0.5 keV / 0.033 for datasets 2-3). Degenerate input (e.g. all-zero generated showers) gives
finite values that signal "maximally different", never NaN.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from caloexp.data.calochallenge import Showers
from caloexp.data.sample import Sample
from caloexp.geometry import Geometry
from caloexp.metrics.engine import (REGISTRY, Evaluation, MetricGroup, check_groups, evaluate_stream, groups_for,
                                    register)
from caloexp.metrics.features import Features, default_threshold
from caloexp.metrics.groups import ALL, DEFAULT_GROUPS, FAST

GROUPS = ALL
#: The default training monitor (lower is better), computed by every kind's default groups.
MONITOR = "monitor/score"


def evaluate(reference: Sample | Showers, generated: Sample | Showers, geometry: Geometry | None = None,
             groups: Sequence[str] | None = FAST, threshold: float | None = None,
             classifier: Mapping[str, Any] | None = None, seed: int = 0, kind: str | None = None,
             return_features: bool = False) -> dict[str, float] | Evaluation:
    """All metrics of the requested groups as a flat dict of Python floats (lower is better, except
    AUC = 0.5 and SSIM = 1 for a perfect model); with ``return_features=True`` the whole
    :class:`Evaluation` (metrics plus the features of both samples, for the plots).

    ``groups=None``: the default groups of the kind (calo: ``FAST``).
    """
    kind = kind or (reference.kind if isinstance(reference, Sample) else "calo")
    if groups is not None and kind != "calo" and tuple(groups) == FAST:
        groups = None  # the calo default asked for non-calo data: the kind's default
    ev = evaluate_stream(reference, generated, geometry, groups=groups, kind=kind, threshold=threshold,
                         classifier=classifier, seed=seed)
    return ev if return_features else ev.metrics


__all__ = ["ALL", "DEFAULT_GROUPS", "Evaluation", "FAST", "Features", "MONITOR", "MetricGroup", "REGISTRY",
           "check_groups", "default_threshold", "evaluate", "evaluate_stream", "groups_for", "register"]
