"""Structured config of the ``caloexp_optuna`` sweeper (``hydra/sweeper=caloexp_optuna``)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class CaloexpOptunaSweeperConf:
    """Fields of ``hydra.sweeper``; the first block is hydra-optuna-sweeper's schema."""

    _target_: str = "hydra_plugins.caloexp_optuna_sweeper.sweeper.CaloexpOptunaSweeper"
    # keep `sampler` a config: the sweeper instantiates it itself with a resume-aware seed
    _recursive_: bool = False

    # instantiable Optuna sampler; `seed` is offset by the number of trials already in the study
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    direction: str = "minimize"          # minimize | maximize (the task returns one float)
    study_name: Optional[str] = None     # null: the selected sweep file's name, else the job name
    storage: Optional[str] = None        # SQLAlchemy URL; null: sqlite:///<paths.root_dir or cwd>/optuna.db
    n_trials: int = 20                   # finished trials of the whole study (all workers, all restarts)
    n_jobs: Optional[int] = None         # trials per launcher batch; null: hydra.launcher.n_jobs or 1
    params: Dict[str, Any] = field(default_factory=dict)   # key: choice(...) | range(...) | interval(...) | value
    custom_search_space: Optional[str] = None              # "module.fn", called as fn(cfg, trial)

    # caloexp additions
    mlflow: Optional[bool] = None        # parent run + child grouping; null: on iff the app has logger.tracking_uri
    best_config_dir: Optional[str] = None  # null: <paths.root_dir or cwd>/experiments (+experiment=<study>_best)
    heartbeat_interval: int = 30         # s between "still running" marks of in-flight trials
    grace_period: int = 600              # s without a mark after which a RUNNING trial is abandoned
    retry_abandoned: bool = True         # re-run an abandoned (interrupted/killed) trial's params once
    sqlite_timeout: float = 120.0        # s a SQLite writer waits for the database lock


ConfigStore.instance().store(
    group="hydra/sweeper", name="caloexp_optuna", node=CaloexpOptunaSweeperConf, provider="caloexp_optuna_sweeper"
)
