"""Tabular physics variables from ROOT TTrees (read with uproot + awkward), a class label and a selection.

A dataset config names the file(s), the TTree path, the variables as expressions over branches
(jagged ones included), the event selection and the label::

    files: [dy.root]
    tree: LPHY2131analysis/WeakBosonsAnalysis
    variables:                       # name: expression (order = column order)
      mu_pt: MuonsPt[0]              # the leading element of a jagged branch
      mass: sqrt(2*MuonsPt[0]*MuonsPt[1]*(cosh(MuonsEta[0]-MuonsEta[1]) - cos(MuonsPhi[0]-MuonsPhi[1])))
      met: MET
    selection: nMuons == 2 & nElectrons == 0
    label: count(JetsBTag[JetsBTag > 0]) > 0    # integer class >= 0 (booleans: 0/1)

Expressions come from files, so they are **parsed, never evaluated as Python**: :func:`parse`
accepts only numbers, branch names, arithmetic (``+ - * / // % **``, unary ``-``), comparisons,
``& | ~`` (``and``/``or``/``not`` too), ``x[i]`` (the i-th element of a jagged branch per event,
NaN where it has none), ``x[mask]`` (the elements where a jagged mask is true) and the functions
of :data:`FUNCTIONS` (``count``, ``sum``, ``max``, ``min``, ``mean``, ``any``, ``all`` reduce one list
per event; ``abs``, ``sqrt``, ``log``, ``exp``, trigonometric and hyperbolic functions, ``where``,
``minimum``, ``maximum``, ``hypot``, ``arctan2`` act element-wise). Anything else is a one-line
:class:`~caloexp.errors.ConfigError`. The trees are read in chunks (``uproot`` ``iterate``,
``step_size``) and only the selected events' variables are kept (N x V floats), so files larger
than memory work. Problems are one :class:`~caloexp.errors.InputError` line naming the file: a
missing file, tree or branch, a selection that keeps no event, NaN/inf in a selected event (with
its entry number).

Generated events are written as a ROOT file too (:func:`write`): one TTree ``events`` with one
branch per variable and ``label``, readable with this module (variables ``{v: v}``) or any ROOT tool.
"""
from __future__ import annotations

import ast
import io
import logging
import tokenize
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from caloexp.data.base import DataModule, MemorySource, Source
from caloexp.data.sample import Sample
from caloexp.errors import ConfigError, InputError

log = logging.getLogger("caloexp.data")

OUTPUT_TREE = "events"


# ------------------------------------------------------------------ expressions
def _ak():
    import awkward as ak

    return ak


def _reducer(name: str) -> Callable:
    def reduce(x):
        ak = _ak()
        if name == "count":
            return ak.num(x, axis=1)
        fn = {"sum": ak.sum, "max": ak.max, "min": ak.min, "mean": ak.mean, "any": ak.any, "all": ak.all}[name]
        return fn(x, axis=1)
    return reduce


def _ufunc(name: str) -> Callable:
    return getattr(np, name)


#: function name -> (number of arguments, implementation); nothing else can be called.
FUNCTIONS: dict[str, tuple[int, Callable]] = {
    **{n: (1, _reducer(n)) for n in ("count", "sum", "max", "min", "mean", "any", "all")},
    **{n: (1, _ufunc(n)) for n in ("abs", "sqrt", "log", "log10", "exp", "sin", "cos", "tan", "sinh", "cosh",
                                   "tanh", "arcsin", "arccos", "arctan")},
    **{n: (2, _ufunc(n)) for n in ("minimum", "maximum", "hypot", "arctan2")},
    "where": (3, lambda c, a, b: np.where(c, a, b) if not _is_jagged(c, a, b) else _ak().where(c, a, b)),
}

_BINOPS = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.true_divide,
           ast.FloorDiv: np.floor_divide, ast.Mod: np.mod, ast.Pow: np.power}
_CMPS = {ast.Eq: np.equal, ast.NotEq: np.not_equal, ast.Lt: np.less, ast.LtE: np.less_equal,
         ast.Gt: np.greater, ast.GtE: np.greater_equal}


def _c_logic(text: str) -> str:
    """``&``/``|`` as ``and``/``or``: they bind more loosely than comparisons, as in C, ROOT and pandas'
    query (Python's own ``&`` would read ``a == 2 & b == 0`` as ``a == (2 & b) == 0``)."""
    text = " ".join(text.split())   # one line: token columns index the string
    spots = [t.start[1] for t in tokenize.generate_tokens(io.StringIO(text).readline)
             if t.type == tokenize.OP and t.string in ("&", "|")]
    for col in reversed(spots):
        text = text[:col] + (" and " if text[col] == "&" else " or ") + text[col + 1:]
    return text


def _is_jagged(*xs) -> bool:
    ak = _ak()
    return any(isinstance(x, ak.Array) and x.ndim > 1 for x in xs)


class Expression:
    """A parsed expression: its branch names and a vectorised evaluation over awkward arrays."""

    def __init__(self, text: str, where: str):
        self.text, self.where = str(text), where
        try:
            self.source = _c_logic(self.text.strip())
            tree = ast.parse(self.source, mode="eval")
        except (SyntaxError, tokenize.TokenError) as exc:
            why = exc.msg if isinstance(exc, SyntaxError) else exc.args[0]
            raise ConfigError(f"{where}: expression {self.text!r} does not parse ({why})") from None
        self.branches: list[str] = []
        self._check(tree.body)
        self.root = tree.body

    def _fail(self, node: ast.AST, why: str):
        piece = ast.get_source_segment(self.source, node) or type(node).__name__
        raise ConfigError(f"{self.where}: expression {self.text!r}: {why} ({piece!r}); allowed: numbers, branch "
                          f"names, + - * / // % **, comparisons, & | ~, x[i], x[mask], {', '.join(FUNCTIONS)}")

    def _check(self, node: ast.AST) -> None:
        """Allow-list of syntax; records the branch names."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                self._fail(node, "only numbers are allowed as constants")
        elif isinstance(node, ast.Name):
            if node.id not in self.branches:
                self.branches.append(node.id)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                self._fail(node, "operator not allowed")
            self._check(node.left), self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Invert, ast.Not)):
                self._fail(node, "operator not allowed")
            self._check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                self._check(v)
        elif isinstance(node, ast.Compare):
            if any(type(op) not in _CMPS for op in node.ops):
                self._fail(node, "comparison not allowed")
            for v in [node.left, *node.comparators]:
                self._check(v)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                self._fail(node, "unknown function")
            if node.keywords or len(node.args) != FUNCTIONS[node.func.id][0]:
                self._fail(node, f"{node.func.id} takes {FUNCTIONS[node.func.id][0]} positional argument(s)")
            for a in node.args:
                self._check(a)
        elif isinstance(node, ast.Subscript):
            idx = node.slice
            if isinstance(idx, ast.Constant):
                if isinstance(idx.value, bool) or not isinstance(idx.value, int) or idx.value < 0:
                    self._fail(node, "an element index must be an integer >= 0")
            else:
                self._check(idx)
            self._check(node.value)
        else:
            self._fail(node, "syntax not allowed")

    def evaluate(self, arrays: Mapping[str, Any]) -> Any:
        return self._eval(self.root, arrays)

    def _eval(self, node: ast.AST, a: Mapping[str, Any]) -> Any:
        ak = _ak()
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return a[node.id]
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](self._eval(node.left, a), self._eval(node.right, a))
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, a)
            if isinstance(node.op, (ast.Invert, ast.Not)):
                return np.logical_not(v)
            return np.negative(v) if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BoolOp):
            fn = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            out = self._eval(node.values[0], a)
            for v in node.values[1:]:
                out = fn(out, self._eval(v, a))
            return out
        if isinstance(node, ast.Compare):
            left, out = self._eval(node.left, a), None
            for op, comp in zip(node.ops, node.comparators):
                right = self._eval(comp, a)
                r = _CMPS[type(op)](left, right)
                out = r if out is None else np.logical_and(out, r)
                left = right
            return out
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id][1](*[self._eval(x, a) for x in node.args])
        if isinstance(node, ast.Subscript):
            v = self._eval(node.value, a)
            if not _is_jagged(v):
                self._fail(node, "indexing needs a jagged (list per event) value")
            if isinstance(node.slice, ast.Constant):
                i = int(node.slice.value)
                padded = ak.pad_none(v, i + 1, axis=1)
                return ak.fill_none(padded[:, i], np.nan)
            return v[self._eval(node.slice, a)]
        raise AssertionError(type(node))  # _check allowed nothing else


def parse(text: str, where: str = "expression") -> Expression:
    """Parse an expression from a config (see the module doc); ConfigError naming ``where`` when it is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: expected an expression string, got {text!r}")
    return Expression(text, where)


def _to_numpy(value: Any, n: int, what: str) -> np.ndarray:
    """A per-event value as a float64 numpy column (scalars broadcast; a list per event is an error)."""
    ak = _ak()
    if isinstance(value, ak.Array):
        if value.ndim > 1:
            raise ConfigError(f"{what} gives a list per event; reduce it (e.g. x[0], max(x), count(x))")
        value = ak.to_numpy(ak.fill_none(value, np.nan))
    arr = np.asarray(value, dtype=np.float64)
    return np.broadcast_to(arr, (n,)).copy() if arr.ndim == 0 else arr.reshape(n)


# ------------------------------------------------------------------- reading
def read_table(paths: Sequence[Path], tree: str, variables: Mapping[str, str], selection: str | None = None,
               label: str | None = None, step_size: str | int = "64 MB") -> tuple[np.ndarray, np.ndarray | None]:
    """The selected events' variables (N, V) float32 and labels (N,) of ROOT files, read in chunks."""
    import uproot

    if not variables:
        raise ConfigError("data.variables: name at least one variable (name: expression)")
    exprs = {n: parse(e, f"data.variables.{n}") for n, e in variables.items()}
    sel = parse(selection, "data.selection") if selection else None
    lab = parse(label, "data.label") if label else None
    needed = sorted({b for e in [*exprs.values(), sel, lab] if e is not None for b in e.branches})
    xs, ls, total = [], [], 0
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: file not found")
        try:
            f = uproot.open(path)
        except Exception as exc:  # noqa: BLE001 - uproot raises many types for a file that is not ROOT
            raise InputError(f"{path}: not a readable ROOT file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                             ) from None
        with f:
            try:
                t = f[tree]
            except Exception:  # noqa: BLE001 - KeyInFileError and friends
                trees = [k.split(";")[0] for k, c in f.classnames().items() if c.startswith("TTree")]
                raise InputError(f"{path}: no TTree '{tree}' (trees: {trees})") from None
            if not isinstance(t, uproot.behaviors.TBranch.HasBranches) or not hasattr(t, "num_entries"):
                raise InputError(f"{path}: '{tree}' is a {type(t).__name__}, not a TTree")
            keys = set(t.keys())
            for e in [*exprs.values(), sel, lab]:
                missing = [b for b in (e.branches if e else []) if b not in keys]
                if missing:
                    raise InputError(f"{path}:{tree}: no branch {missing[0]!r} for {e.where} = {e.text!r} "
                                     f"(branches: {', '.join(sorted(keys)[:30])})")
            entry0 = 0
            for chunk in t.iterate(filter_name=lambda name: name in needed, step_size=step_size, library="ak"):
                n = len(chunk)
                arrays = {b: chunk[b] for b in needed}
                rows = np.arange(entry0, entry0 + n)
                if sel is not None:
                    keep = _to_numpy(sel.evaluate(arrays), n, f"data.selection = {sel.text!r}") != 0
                    arrays = {b: v[keep] for b, v in arrays.items()}
                    rows = rows[keep]
                m = len(rows)
                cols = np.stack([_to_numpy(e.evaluate(arrays), m, f"data.variables.{name} = {e.text!r}")
                                 for name, e in exprs.items()], axis=1)
                bad = ~np.isfinite(cols)
                if bad.any():
                    r, c = np.argwhere(bad)[0]
                    name = list(exprs)[c]
                    raise InputError(f"{path}:{tree}: variable {name} = {exprs[name].text!r} is NaN/inf in "
                                     f"{int(bad.any(1).sum())} selected event(s) (first: entry {rows[r]}); "
                                     "tighten data.selection")
                if lab is not None:
                    lv = _to_numpy(lab.evaluate(arrays), m, f"data.label = {lab.text!r}")
                    badl = ~np.isfinite(lv) | (lv < 0) | (lv != np.round(lv))
                    if badl.any():
                        raise InputError(f"{path}:{tree}: label {lab.text!r} is {lv[badl][0]} at entry "
                                         f"{rows[np.argmax(badl)]}; labels must be integers >= 0")
                    ls.append(lv.astype(np.float32))
                xs.append(cols.astype(np.float32))
                entry0 += n
            total += entry0
    x = np.concatenate(xs) if xs else np.zeros((0, len(exprs)), np.float32)
    if len(x) == 0:
        names = ", ".join(str(p) for p in paths)
        raise InputError(f"{names}: the selection {selection!r} keeps no event of {total}")
    return x, (np.concatenate(ls) if lab is not None else None)


class RootTableDataModule(DataModule):
    """Tabular variables (kind ``tabular``) with an optional ``label`` condition from ROOT files.

    ``embedded`` (``{generator: dimuon, n_events, seed}``) writes caloexp's toy Drell-Yan file
    (:mod:`caloexp.data.dimuon`) into ``data_dir`` first; the run's dataset description says so.
    """

    kind = "tabular"
    default_transform = {"steps": [{"step": "normalise", "mode": "standard"}],
                         "conditions": {"label": {"step": "one_hot"}}, "nonnegative": False}

    def __init__(self, name: str, files: Sequence[str], tree: str, variables: Mapping[str, str],
                 selection: str | None = None, label: str | None = None, data_dir: str = ".",
                 step_size: str | int = "64 MB", embedded: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(name, **kwargs)
        if self.streaming:
            raise ConfigError(f"data={name}: streaming=true is not needed for ROOT tables: the files are read in "
                              "chunks (step_size) and only the selected events' variables are kept")
        if not files:
            raise ConfigError(f"data={name}: no files listed (data.files)")
        if not variables:
            raise ConfigError(f"data={name}: data.variables is empty (name: expression over branches)")
        self.files = [Path(f).expanduser() if Path(f).expanduser().is_absolute() else Path(data_dir) / f for f in files]
        self.tree = str(tree)
        self.variables = {str(k): str(v) for k, v in variables.items()}
        self.selection = None if selection in (None, "") else str(selection)
        self.label = None if label in (None, "") else str(label)
        self.step_size = step_size
        self.embedded = dict(embedded) if embedded else None
        # parse now: a bad expression stops the run before any file is touched
        for n, e in self.variables.items():
            parse(e, f"data.variables.{n}")
        for key, e in (("selection", self.selection), ("label", self.label)):
            if e is not None:
                parse(e, f"data.{key}")
        if self.label is None:
            self.transform_cfg["conditions"] = {k: v for k, v in (self.transform_cfg.get("conditions") or {}).items()
                                                if k != "label"}
        self.transform_cfg.setdefault("nonnegative", False)
        self.class_fractions: list[float] | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.variables)

    def prepare_data(self) -> None:
        if not self.embedded:
            return
        from caloexp.data import dimuon

        settings = dict(self.embedded)
        if settings.pop("generator", "dimuon") != "dimuon":
            raise ConfigError(f"data.embedded.generator={self.embedded.get('generator')!r}: only 'dimuon' exists")
        for path in self.files:
            if not path.exists():
                log.info("writing caloexp's toy Drell-Yan dimuon sample (embedded, not real data) to %s", path)
                dimuon.write_root(path, tree=self.tree, **settings)

    def open_files(self) -> Source:
        x, lab = read_table(self.files, self.tree, self.variables, self.selection, self.label, self.step_size)
        cond = {"label": lab} if lab is not None else {}
        if lab is not None:
            counts = np.bincount(lab.astype(np.int64))
            self.class_fractions = [float(c) for c in counts / counts.sum()]
        return MemorySource(Sample(x, cond, "tabular"))

    def resolve_step(self, entry: Any) -> Any:
        """``columns`` of a step may name variables; they become column indices."""
        if isinstance(entry, Mapping) and entry.get("columns") is not None:
            cols = []
            for c in entry["columns"]:
                if isinstance(c, str):
                    if c not in self.variables:
                        raise ConfigError(f"data.transform: column {c!r} is not a variable ({self.columns})")
                    c = self.columns.index(c)
                cols.append(int(c))
            return dict(entry, columns=cols)
        return entry

    def writer_spec(self) -> dict[str, Any]:
        return {"format": "root_table", "tree": OUTPUT_TREE, "columns": self.columns, "kind": "tabular",
                "conditions": {"label": "label"} if self.label else {}, "class_fractions": self.class_fractions}

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), files=[str(p) for p in self.files], tree=self.tree, variables=self.variables,
                    selection=self.selection, label=self.label, class_fractions=self.class_fractions,
                    embedded_toy=bool(self.embedded))


def write(path: str | Path, sample: Sample, columns: Sequence[str] | None = None, tree: str = OUTPUT_TREE) -> Path:
    """Events as a ROOT file: one TTree, one float32 branch per variable plus each condition (atomic rename)."""
    import uproot

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(sample.x, np.float32).reshape(len(sample), -1)
    names = list(columns) if columns else [f"x{j}" for j in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ConfigError(f"{len(names)} column names for {x.shape[1]} variables")
    branches = {n: x[:, j] for j, n in enumerate(names)}
    for k, v in sample.cond.items():
        v = np.asarray(v)
        branches[k] = (v.reshape(len(v), -1).argmax(1) if v.ndim > 1 and v.shape[1] > 1 else v.reshape(-1)
                       ).astype(np.int32 if k == "label" else np.float32)
    tmp = path.with_name(path.name + ".part")
    try:
        with uproot.recreate(tmp) as f:   # mktree: a TTree (assigning a dict would write an RNTuple)
            f.mktree(tree, {k: v.dtype for k, v in branches.items()})
            f[tree].extend(branches)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_output(path: str | Path, tree: str = OUTPUT_TREE) -> Sample:
    """A file written by :func:`write` back as a Sample (variables in branch order, ``label`` as condition)."""
    import uproot

    with uproot.open(path) as f:
        t = f[tree]
        names = [k for k in t.keys() if k != "label"]
        arrays = t.arrays(library="np")
    x = np.stack([arrays[n] for n in names], axis=1)
    return Sample(x, {"label": arrays["label"]} if "label" in arrays else {}, "tabular")


__all__ = ["FUNCTIONS", "Expression", "RootTableDataModule", "parse", "read_output", "read_table", "write"]
