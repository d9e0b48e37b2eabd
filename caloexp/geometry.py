"""Calorimeter voxel geometry in the CaloChallenge 2022 convention.

A geometry is a list of layers; each layer has radial bin edges (mm) and a number
of angular (alpha) bins. The flattened voxel order of a shower vector is
layer-major, then alpha, then r: voxel ``offset[layer] + a * n_r + r``.
Layers whose ``r_edges`` is just ``[0]`` hold no voxels (they exist in the XML
only to keep the detector's layer numbering) and are dropped here.

Voxel coordinates follow the official evaluation code: r at the bin centre,
alpha at the centre of ``linspace(-pi, pi, n_alpha + 1)`` bins,
``eta = r cos(alpha)`` and ``phi = r sin(alpha)``.

The project ships its own description of the four CaloChallenge geometries
(:func:`builtin`) and can read the official binning XML files (:func:`from_xml`).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from caloexp.errors import InputError


@dataclass(frozen=True)
class Layer:
    """One longitudinal layer: detector layer id, radial edges (mm) and alpha bins."""

    id: int
    r_edges: tuple[float, ...]
    n_alpha: int

    @property
    def n_r(self) -> int:
        return len(self.r_edges) - 1

    @property
    def n_voxels(self) -> int:
        return self.n_r * self.n_alpha


@dataclass(frozen=True)
class Geometry:
    """Voxel geometry of one calorimeter dataset (only layers that hold voxels)."""

    name: str
    particle: str
    layers: tuple[Layer, ...]
    pid: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    # ------------------------------------------------------------------ sizes
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_ids(self) -> list[int]:
        return [layer.id for layer in self.layers]

    @cached_property
    def voxels_per_layer(self) -> np.ndarray:
        return np.array([layer.n_voxels for layer in self.layers], dtype=np.int64)

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """Start index of each layer in the flat voxel vector (length n_layers + 1)."""
        return np.concatenate([[0], np.cumsum(self.voxels_per_layer)])

    @property
    def n_voxels(self) -> int:
        return int(self.layer_offsets[-1])

    def layer_slice(self, i: int) -> slice:
        """Slice of the flat voxel vector belonging to the i-th (non-empty) layer."""
        return slice(int(self.layer_offsets[i]), int(self.layer_offsets[i + 1]))

    @property
    def is_regular(self) -> bool:
        """True when every layer has the same (n_alpha, r_edges): showers reshape to a 3D grid."""
        first = self.layers[0]
        return all(l.n_alpha == first.n_alpha and l.r_edges == first.r_edges for l in self.layers)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """(layers, alpha, r) of a regular geometry (datasets 2 and 3)."""
        if not self.is_regular:
            raise ValueError(f"geometry {self.name} has layers of different binning: no regular grid")
        return (self.n_layers, self.layers[0].n_alpha, self.layers[0].n_r)

    # ------------------------------------------------------ per-voxel arrays
    @cached_property
    def voxel_layer(self) -> np.ndarray:
        """Index (0..n_layers-1) of the layer each voxel belongs to."""
        return np.repeat(np.arange(self.n_layers), self.voxels_per_layer)

    @cached_property
    def voxel_r(self) -> np.ndarray:
        """Radial bin centre (mm) of every voxel."""
        out = []
        for layer in self.layers:
            edges = np.asarray(layer.r_edges, dtype=np.float64)
            centres = 0.5 * (edges[1:] + edges[:-1])
            out.append(np.tile(centres, layer.n_alpha))  # alpha-major, r fastest
        return np.concatenate(out)

    @cached_property
    def voxel_alpha(self) -> np.ndarray:
        """Angular bin centre (rad) of every voxel."""
        out = []
        for layer in self.layers:
            edges = np.linspace(-np.pi, np.pi, layer.n_alpha + 1)
            centres = 0.5 * (edges[1:] + edges[:-1])
            out.append(np.repeat(centres, layer.n_r))
        return np.concatenate(out)

    @property
    def voxel_eta(self) -> np.ndarray:
        return self.voxel_r * np.cos(self.voxel_alpha)

    @property
    def voxel_phi(self) -> np.ndarray:
        return self.voxel_r * np.sin(self.voxel_alpha)

    # ------------------------------------------------------------- helpers
    def layer_energies(self, showers: np.ndarray) -> np.ndarray:
        """Energy per layer, (N, n_voxels) -> (N, n_layers), vectorised."""
        return np.add.reduceat(np.asarray(showers), self.layer_offsets[:-1], axis=1)

    def layer_image(self, showers: np.ndarray, i: int) -> np.ndarray:
        """Voxels of layer i as (N, n_alpha, n_r) images."""
        layer = self.layers[i]
        return np.asarray(showers)[:, self.layer_slice(i)].reshape(-1, layer.n_alpha, layer.n_r)

    def describe(self) -> str:
        parts = [f"L{l.id}:{l.n_alpha}a x {l.n_r}r" for l in self.layers]
        return f"{self.name} ({self.particle}, {self.n_voxels} voxels): " + ", ".join(parts)


# --------------------------------------------------------------------- XML
def from_xml(path: str | Path, name: str | None = None) -> Geometry:
    """Read an official CaloChallenge binning XML (``<Bins><Bin><Layer .../>``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: binning file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not a valid binning XML ({exc})") from None
    bins = root.findall("Bin")
    if len(bins) != 1:
        raise InputError(f"{path}: expected exactly one <Bin> element, found {len(bins)}")
    b = bins[0]
    layers = []
    seen: set[int] = set()
    for el in b.findall("Layer"):
        try:
            edges = tuple(float(x) for x in el.attrib["r_edges"].split(","))
            n_alpha = int(el.attrib.get("n_bin_alpha", 1))
            lid = int(el.attrib["id"])
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: malformed <Layer> {el.attrib} ({exc})") from None
        _check_layer(path, lid, edges, n_alpha, seen)
        seen.add(lid)
        if len(edges) > 1:
            layers.append(Layer(lid, edges, n_alpha))
    if not layers:
        raise InputError(f"{path}: no layer with voxels")
    particle = b.attrib.get("name", "unknown")
    return Geometry(name=name or path.stem.replace("binning_", ""), particle=particle,
                    layers=tuple(layers), pid=int(b.attrib.get("pid", 0)), meta=dict(b.attrib))


def _check_layer(path: Path, lid: int, edges: tuple[float, ...], n_alpha: int, seen: set[int]) -> None:
    """Reject a layer that would give a wrong or empty geometry (one line naming file and layer)."""
    if lid in seen:
        raise InputError(f"{path}: duplicate layer id {lid}")
    if n_alpha <= 0:
        raise InputError(f"{path}: layer {lid} n_bin_alpha={n_alpha} (must be >= 1)")
    if not all(np.isfinite(edges)):
        raise InputError(f"{path}: layer {lid} r_edges contain NaN/inf ({','.join(map(str, edges))})")
    if edges[0] < 0:
        raise InputError(f"{path}: layer {lid} r_edges start below 0 ({edges[0]} mm)")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise InputError(f"{path}: layer {lid} r_edges are not increasing")


# ---------------------------------------------------------------- built-ins
def _regular(n_layers: int, step: float, n_r: int, n_alpha: int) -> tuple[Layer, ...]:
    edges = tuple(round(step * i, 6) for i in range(n_r + 1))
    return tuple(Layer(i, edges, n_alpha) for i in range(n_layers))


_BUILTIN = {
    # dataset 1 (ATLAS-like, from AtlFast3 / FastCaloGAN): radial edges in mm.
    "dataset_1_photons": lambda: Geometry("dataset_1_photons", "photon", (
        Layer(0, (0, 5, 10, 30, 50, 100, 200, 400, 600), 1),
        Layer(1, (0, 2, 4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 70, 90, 120, 150, 200), 10),
        Layer(2, (0, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 350, 400), 10),
        Layer(3, (0, 50, 100, 200, 400, 600), 1),
        Layer(12, (0, 100, 200, 400, 1000, 2000), 1),
    ), pid=22),
    "dataset_1_pions": lambda: Geometry("dataset_1_pions", "pion", (
        Layer(0, (0, 5, 10, 30, 50, 100, 200, 400, 600), 1),
        Layer(1, (0, 1, 4, 7, 10, 15, 30, 50, 90, 150, 200), 10),
        Layer(2, (0, 5, 10, 20, 30, 50, 80, 130, 200, 300, 400), 10),
        Layer(3, (0, 50, 100, 200, 400, 600), 1),
        Layer(12, (0, 10, 20, 30, 50, 80, 100, 130, 160, 200, 250, 300, 350, 400, 1000, 2000), 10),
        Layer(13, (0, 10, 20, 30, 50, 80, 100, 130, 160, 200, 250, 300, 350, 400, 600, 1000, 2000), 10),
        Layer(14, (0, 50, 100, 150, 200, 250, 300, 400, 600, 1000, 2000), 1),
    ), pid=211),
    # datasets 2 and 3 (Par04 SiW calorimeter): 45 layers on a regular (alpha, r) grid.
    "dataset_2": lambda: Geometry("dataset_2", "electron", _regular(45, 4.65, 9, 16), pid=11),
    "dataset_3": lambda: Geometry("dataset_3", "electron", _regular(45, 2.325, 18, 50), pid=11),
}

ALIASES = {
    "photons": "dataset_1_photons", "1-photons": "dataset_1_photons", "ds1_photons": "dataset_1_photons",
    "pions": "dataset_1_pions", "1-pions": "dataset_1_pions", "ds1_pions": "dataset_1_pions",
    "2": "dataset_2", "ds2": "dataset_2", "3": "dataset_3", "ds3": "dataset_3",
}


def builtin(name: str) -> Geometry:
    """One of the shipped geometries: dataset_1_photons, dataset_1_pions, dataset_2, dataset_3."""
    key = ALIASES.get(name, name)
    if key not in _BUILTIN:
        raise InputError(f"unknown geometry '{name}': choose one of {sorted(_BUILTIN)} or give a binning XML path")
    return _BUILTIN[key]()


def load(spec: str | Path | Geometry) -> Geometry:
    """A geometry from a built-in name or a binning XML path."""
    if isinstance(spec, Geometry):
        return spec
    spec = str(spec)
    if spec.endswith(".xml") or Path(spec).is_file():
        return from_xml(spec)
    return builtin(spec)


def by_voxel_count(n_voxels: int) -> Geometry | None:
    """The built-in geometry with this many voxels per shower, if exactly one matches."""
    hits = [g for g in (f() for f in _BUILTIN.values()) if g.n_voxels == n_voxels]
    return hits[0] if len(hits) == 1 else None
