-- Run once by the postgres image on an empty volume: the Optuna database beside MLflow's
-- (POSTGRES_DB creates `mlflow`); the same two databases docker/bare_metal.sh creates.
CREATE DATABASE optuna;
