"""Makes a project's top-level ``sweeps/`` directory the config group ``sweeps``.

Hydra only finds groups under search-path roots. For an app whose primary config directory is
``<project>/conf`` and whose project has ``<project>/sweeps/``, ``<project>`` is appended to the
search path (after the app's own configs, so ``conf/`` always wins), which makes
``sweeps=wgangp_lr`` select ``<project>/sweeps/wgangp_lr.yaml``. Apps without a sibling
``sweeps/`` directory are left untouched.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class CaloexpSweepsSearchPathPlugin(SearchPathPlugin):
    """Appends ``file://<parent of the primary config dir>`` when it holds a ``sweeps/`` directory."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            path = element.path or ""
            if element.provider != "main" or "://" in path.replace("file://", "", 1):
                continue  # not the primary config dir, or a pkg:// / structured:// source
            project = Path(path.replace("file://", "", 1)).resolve().parent
            if (project / "sweeps").is_dir():
                search_path.append(provider="caloexp-sweeps", path=f"file://{project}")
            return
