"""Makes a project's top-level ``sweeps/`` directory the config group ``sweeps`` -- and nothing else --
and the sweeps' best configs in ``<project root>/experiments/`` options of the group ``experiment``.

Hydra only finds groups under search-path roots. For an app whose primary config directory is
``<project>/conf`` and whose project has ``<project>/sweeps/``, a ``caloexp-sweeps://<project>``
root is appended to the search path (after the app's own configs, so ``conf/`` always wins),
which makes ``sweeps=wgangp_lr`` select ``<project>/sweeps/wgangp_lr.yaml``. Apps without a
sibling ``sweeps/`` directory are left untouched.

The root is served by :class:`SweepsOnlyConfigSource`, a file source that shows only the
``sweeps`` subtree of the project. A plain ``file://<project>`` root would turn every YAML file
below the project (``mlruns/``, ``outputs/``, ``multirun/``, test apps) into a bogus config
group listed by ``--help`` and selectable from the command line.

Sweeps write ``<study>_best.yaml`` into ``<paths.root_dir>/experiments/`` (outside the source
tree). For the same apps, when ``$CALOEXP_ROOT`` (else the working directory, as
``paths.root_dir``) holds an ``experiments/`` folder, a ``caloexp-experiments://<root>/experiments``
root serves its files as options of the existing ``experiment`` group, so
``+experiment=<study>_best`` finds them; it adds no group of its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "sweeps"
SCHEME = "caloexp-sweeps"
EXPERIMENT_GROUP = "experiment"
EXPERIMENTS_DIR = "experiments"
EXPERIMENTS_SCHEME = "caloexp-experiments"


def _in_group(config_path: str) -> bool:
    first = config_path.strip("/").split("/", 1)[0]
    return first == GROUP


class SweepsOnlyConfigSource(FileConfigSource):
    """``caloexp-sweeps://<dir>``: the files of ``<dir>/sweeps`` as group ``sweeps``; nothing else of ``<dir>``."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def load_config(self, config_path: str) -> ConfigResult:
        if not _in_group(config_path):
            raise ConfigLoadError(f"Config not found : {config_path} (only '{GROUP}/' is served from {self.path})")
        return super().load_config(config_path)

    def available(self) -> bool:
        return super().is_group(GROUP)

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return self.available()
        return _in_group(config_path) and super().is_group(config_path)

    def is_config(self, config_path: str) -> bool:
        return _in_group(config_path) and super().is_config(config_path)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if config_path.strip("/") == "":
            return [GROUP] if self.available() and results_filter in (None, ObjectType.GROUP) else []
        if not _in_group(config_path):
            return []
        return super().list(config_path, results_filter)


def _experiment_path(config_path: str) -> Optional[str]:
    """``experiment/<x>`` -> ``<x>`` (a path inside the experiments folder); None outside the group."""
    path = config_path.strip("/")
    if path == EXPERIMENT_GROUP:
        return ""
    if path.startswith(EXPERIMENT_GROUP + "/"):
        return path[len(EXPERIMENT_GROUP) + 1:]
    return None


class ExperimentsConfigSource(FileConfigSource):
    """``caloexp-experiments://<dir>``: the files of ``<dir>`` as options of group ``experiment``; nothing else."""

    @staticmethod
    def scheme() -> str:
        return EXPERIMENTS_SCHEME

    def load_config(self, config_path: str) -> ConfigResult:
        inner = _experiment_path(config_path)
        if not inner:
            raise ConfigLoadError(f"Config not found : {config_path} (only '{EXPERIMENT_GROUP}/' is served "
                                  f"from {self.path})")
        return super().load_config(inner)

    def available(self) -> bool:
        return super().is_group("")

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return self.available()
        inner = _experiment_path(config_path)
        return inner is not None and super().is_group(inner)

    def is_config(self, config_path: str) -> bool:
        inner = _experiment_path(config_path)
        return bool(inner) and super().is_config(inner)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if config_path.strip("/") == "":
            group = self.available() and results_filter in (None, ObjectType.GROUP)
            return [EXPERIMENT_GROUP] if group else []
        inner = _experiment_path(config_path)
        folder = Path(self.path) / (inner or "")
        if inner is None or not folder.is_dir():
            return []
        files: List[str] = []
        for name in os.listdir(folder):  # is_group/is_config below take the group's (outer) paths
            self._list_add_result(files=files, file_path=f"{config_path.strip('/')}/{name}", file_name=name,
                                  results_filter=results_filter)
        return sorted(set(files))


def experiments_dir() -> Path:
    """Where sweeps put best configs by default: ``$CALOEXP_ROOT`` (else the working directory) / experiments."""
    return Path(os.environ.get("CALOEXP_ROOT") or os.getcwd()).resolve() / EXPERIMENTS_DIR


class CaloexpSweepsSearchPathPlugin(SearchPathPlugin):
    """Appends ``caloexp-sweeps://<parent of the primary config dir>`` when it holds a ``sweeps/`` directory,
    and then ``caloexp-experiments://<root>/experiments`` when that folder exists."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            path = element.path or ""
            if element.provider != "main" or "://" in path.replace("file://", "", 1):
                continue  # not the primary config dir, or a pkg:// / structured:// source
            project = Path(path.replace("file://", "", 1)).resolve().parent
            if (project / GROUP).is_dir():
                search_path.append(provider="caloexp-sweeps", path=f"{SCHEME}://{project}")
                if experiments_dir().is_dir():
                    search_path.append(provider="caloexp-experiments",
                                       path=f"{EXPERIMENTS_SCHEME}://{experiments_dir()}")
            return
