"""caloexp's Optuna sweeper for Hydra (Optuna >= 4, SQLAlchemy 2).

Keeps the sweep-file schema of hydra-optuna-sweeper (``hydra.sweeper.params`` with
``choice``/``range``/``interval``/``tag(log, ...)``, ``sampler``, ``direction``, ``study_name``,
``storage``, ``n_trials``, ``n_jobs``, ``custom_search_space``) and adds what caloexp needs:
a persistent study that resumes and is shared by several workers, failed trials recorded
with their reason, MLflow parent/child runs and the best trial written as an experiment config.
See docs/sweeps.md.
"""
__version__ = "0.1.0"
