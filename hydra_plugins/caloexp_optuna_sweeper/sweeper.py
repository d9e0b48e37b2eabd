"""``hydra/sweeper=caloexp_optuna``: the Hydra Sweeper plugin (heavy imports are deferred to ``sweep``)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CaloexpOptunaSweeper(Sweeper):
    """Optuna study over Hydra overrides; fields are documented in ``config.py`` and docs/sweeps.md."""

    def __init__(self, sampler: Any = None, direction: str = "minimize", study_name: Optional[str] = None,
                 storage: Optional[str] = None, n_trials: int = 20, n_jobs: Optional[int] = None,
                 params: Optional[Dict[str, Any]] = None, custom_search_space: Optional[str] = None,
                 mlflow: Optional[bool] = None, best_config_dir: Optional[str] = None,
                 heartbeat_interval: int = 30, grace_period: int = 600, retry_abandoned: bool = True,
                 sqlite_timeout: float = 120.0) -> None:
        self.sampler, self.direction, self.study_name, self.storage = sampler, direction, study_name, storage
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, params
        self.custom_search_space, self.mlflow, self.best_config_dir = custom_search_space, mlflow, best_config_dir
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.retry_abandoned, self.sqlite_timeout = retry_abandoned, sqlite_timeout
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the composed config and build the configured launcher."""
        self.config = config
        HydraConfig.instance().set_config(config)  # ${hydra:...} in paths/storage resolve from here on
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        """Run this worker's share of the study; returns the best FrozenTrial (or None)."""
        from ._impl import StudyRunner

        return StudyRunner(self, arguments).run()
