"""Writing generated events in the format of the data they imitate (one place for every format).

A data module's ``writer_spec()`` (stored in every checkpoint) names the format and its options:
``calochallenge`` (``incident_energies``/``showers`` in MeV, what the official evaluator reads) or
``arrays`` (the named datasets the events were read from, e.g. 3DGAN's ``ECAL``/``energy``/``theta``)
or ``zdc`` (``responses``/``particles``, :mod:`caloexp.data.zdc`), or ``root_table`` (a ROOT TTree, one
branch per tabular variable plus ``label``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from caloexp.data.sample import Sample
from caloexp.errors import ConfigError


def write(path: str | Path, sample: Sample, spec: Mapping[str, Any]) -> Path:
    fmt = spec.get("format")
    if fmt == "calochallenge":
        from caloexp import geometry as geo
        from caloexp.data import calochallenge

        return calochallenge.write(path, sample.energies, sample.showers, geometry=geo.load(spec["geometry"]))
    if fmt == "arrays":
        from caloexp.data import arrays

        return arrays.write(path, sample, x_key=spec.get("x_key", "x"), conditions=spec.get("conditions"),
                            columns=spec.get("columns"), kind=spec.get("kind"))
    if fmt == "zdc":
        from caloexp.data import zdc

        return zdc.write(path, sample)
    if fmt == "root_table":
        from caloexp.data import root_table

        return root_table.write(path, sample, columns=spec.get("columns"),
                                tree=spec.get("tree", root_table.OUTPUT_TREE))
    raise ConfigError(f"unknown output format {fmt!r}: choose calochallenge, arrays, zdc or root_table")
