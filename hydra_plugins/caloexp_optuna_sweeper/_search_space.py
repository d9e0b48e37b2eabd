"""Sweep-file search space: Hydra override syntax -> Optuna suggestions, with one-line errors."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

try:  # inside caloexp the entry point prints ConfigError as one line without a traceback
    from caloexp.errors import ConfigError as _Base
except Exception:  # pragma: no cover - plugin used outside caloexp
    _Base = ValueError  # type: ignore[misc,assignment]

SYNTAX = "choice(a,b,...), range(start,stop[,step]), interval(low,high), tag(log, interval(low,high)), tag(int, ...) or a fixed value"
KNOWN_TAGS = {"log", "int"}


class SweepConfigError(_Base):  # type: ignore[valid-type,misc]
    """A sweep definition is invalid; the message names the file and key."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: ``kind`` is categorical, int or float."""

    name: str
    kind: str
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: Tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Ask ``trial`` (an ``optuna.Trial``) for a value through the public suggest API."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def _fail(source: str, key: str, msg: str) -> SweepConfigError:
    return SweepConfigError(f"{source}: {key}: {msg}")


def _interval(name: str, value: IntervalSweep, where: str, key: str) -> ParamSpec:
    tags = set(value.tags)
    unknown = tags - KNOWN_TAGS
    if unknown:
        raise _fail(where, key, f"unknown tag(s) {sorted(unknown)} (known: log, int)")
    low, high, log = value.start, value.end, "log" in tags
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        raise _fail(where, key, f"interval bounds must be finite numbers, got ({low}, {high})")
    if not low < high:
        raise _fail(where, key, f"interval low must be < high, got ({low}, {high})")
    if log and low <= 0:
        raise _fail(where, key, f"log-scale interval needs low > 0, got ({low}, {high})")
    if "int" in tags:
        if low != int(low) or high != int(high):
            raise _fail(where, key, f"tag(int, ...) needs integer bounds, got ({low}, {high})")
        return ParamSpec(name, "int", int(low), int(high), log=log)
    return ParamSpec(name, "float", float(low), float(high), log=log)


def _range(name: str, value: RangeSweep, where: str, key: str) -> ParamSpec:
    if value.tags - {"int"}:
        raise _fail(where, key, f"range(...) takes no tags, got {sorted(value.tags)}; use interval for log scale")
    start, stop, step = value.start, value.stop, value.step if value.step is not None else 1
    if start is None or stop is None or step is None or step <= 0 or not start < stop:
        raise _fail(where, key, f"range needs start < stop and step > 0, got range({start}, {stop}, {step})")
    n = int(math.ceil((stop - start) / step - 1e-9))  # like Python's range: stop is excluded
    if value.shuffle:
        return ParamSpec(name, "categorical", choices=tuple(start + i * step for i in range(n)))
    if all(isinstance(v, int) for v in (start, stop, step)):
        return ParamSpec(name, "int", start, start + (n - 1) * step, step=step)
    return ParamSpec(name, "float", float(start), float(start + (n - 1) * step), step=float(step))


def _choice(name: str, value: ChoiceSweep, where: str, key: str) -> ParamSpec:
    if value.tags:
        raise _fail(where, key, f"choice(...) takes no tags, got {sorted(value.tags)}")
    choices = []
    for c in value.list:
        if not isinstance(c, (str, int, float, bool)):
            raise _fail(where, key, f"choice values must be str, int, float or bool, got {c!r}")
        choices.append(c)
    if len(set(map(repr, choices))) != len(choices):
        raise _fail(where, key, f"choice has duplicate values: {choices}")
    return ParamSpec(name, "categorical", choices=tuple(choices))


def parse_search_space(
    params: Dict[str, Any], cli_overrides: Sequence[str], sweep_file: Optional[str]
) -> Tuple[List[ParamSpec], Dict[str, Override]]:
    """Split ``hydra.sweeper.params`` plus command-line overrides into searched specs and fixed overrides.

    ``params`` come from the sweep file (named by ``sweep_file`` in errors); command-line overrides
    (``key=interval(...)`` etc. in ``--multirun``) win over the file for the same key.
    Returns (specs, fixed) where ``fixed`` maps key -> the parsed fixed override (passed to every trial).
    """
    parser = OverridesParser.create()
    specs: Dict[str, ParamSpec] = {}
    fixed: Dict[str, Override] = {}
    entries = [(f"{k}={v}", sweep_file or "hydra.sweeper.params", f"hydra.sweeper.params.{k}")
               for k, v in params.items()]
    entries += [(o, "command line", o.split("=", 1)[0]) for o in cli_overrides]
    for line, where, key in entries:
        try:
            (ov,) = parser.parse_overrides([line])
        except Exception as e:  # Hydra's message is multi-line; keep its core reason
            reason = str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else str(e)
            raise _fail(where, key, f"cannot parse '{line.split('=', 1)[1]}' ({reason.strip()}); expected {SYNTAX}") from None
        name = ov.get_key_element().lstrip("+~")
        if not ov.is_sweep_override():
            specs.pop(name, None)
            fixed[name] = ov
            continue
        if ov.is_delete() or ov.is_add() or ov.is_force_add():
            raise _fail(where, key, "a searched parameter cannot use +, ++ or ~")
        value = ov.value()
        if isinstance(value, IntervalSweep):
            spec = _interval(name, value, where, key)
        elif isinstance(value, RangeSweep):
            spec = _range(name, value, where, key)
        elif isinstance(value, ChoiceSweep):
            spec = _choice(name, value, where, key)
        else:
            raise _fail(where, key, f"unsupported sweep {type(value).__name__} ('{line}'); expected {SYNTAX}")
        fixed.pop(name, None)
        specs[name] = spec
    return list(specs.values()), fixed


_BARE = re.compile(r"^[A-Za-z_][\w\-./:]*$")
_RESERVED = {"true", "false", "null", "nan", "inf"}


def format_value(value: Any) -> str:
    """Render a sampled value as a Hydra override value that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _BARE.match(text) and text.lower() not in _RESERVED:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
