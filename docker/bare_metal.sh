#!/usr/bin/env bash
# The team tracking stack of docker/docker-compose.yml without containers: one PostgreSQL server
# (database `mlflow`: MLflow's backend store; database `optuna`: Optuna studies) and an MLflow
# server on it with proxied artifacts (clients upload/download through the server; files land in
# $DIR/mlartifacts). Needs PostgreSQL's server binaries (Debian/Ubuntu: apt install postgresql;
# found in PATH or /usr/lib/postgresql/*/bin) and caloexp installed (mlflow, psycopg2-binary).
#
#   docker/bare_metal.sh start [DIR]   # initialise (first time) and start; prints the export lines
#   docker/bare_metal.sh stop [DIR]    # stop both servers (data stays in DIR)
#
# Settings (environment): PG_PORT (5433), MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1; 0.0.0.0 to
# serve a team, then set MLFLOW_ALLOWED_HOSTS to the names clients use, e.g. myhost:5000),
# PG_USER / PG_PASSWORD (caloexp / caloexp), PYTHON (python). As root, PostgreSQL runs as the
# `postgres` system user (initdb refuses root).
set -euo pipefail

cmd=${1:-}
DIR=$(realpath -m "${2:-${CALOEXP_STACK_DIR:-$PWD/stack}}")
PG_PORT=${PG_PORT:-5433}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
MLFLOW_ALLOWED_HOSTS=${MLFLOW_ALLOWED_HOSTS:-127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT}
PG_USER=${PG_USER:-caloexp}
PG_PASSWORD=${PG_PASSWORD:-caloexp}
PYTHON=${PYTHON:-python}

die() { echo "bare_metal.sh: $*" >&2; exit 1; }
[ "$cmd" = start ] || [ "$cmd" = stop ] || die "usage: $0 start|stop [DIR]"

if command -v pg_ctl >/dev/null 2>&1; then
    PGBIN=$(dirname "$(realpath "$(command -v pg_ctl)")")   # the real bin dir (beside initdb, psql)
else
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
fi
[ -x "${PGBIN:-}/pg_ctl" ] || die "PostgreSQL server binaries not found (apt install postgresql, or put pg_ctl in PATH)"

as_pg() {  # run a PostgreSQL tool as a non-root user
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
PGDATA="$DIR/pgdata"
PG_URL="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT"

if [ "$cmd" = stop ]; then
    if [ -f "$DIR/mlflow.pid" ]; then
        kill -TERM -- "-$(cat "$DIR/mlflow.pid")" 2>/dev/null || true
        rm -f "$DIR/mlflow.pid"
    fi
    if [ -f "$PGDATA/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    exit 0
fi

mkdir -p "$PGDATA" "$DIR/mlartifacts"
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' system user (apt install postgresql)"
    chown postgres "$PGDATA"
    chmod 755 "$DIR"
fi
chmod 700 "$PGDATA"
if [ ! -f "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$PG_PASSWORD" > "$pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres "$pwfile"; fi
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U "$PG_USER" --pwfile="$pwfile" -E UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$DIR/initdb.log" 2>&1 \
        || die "initdb failed; see $DIR/initdb.log"
    rm -f "$pwfile"
fi
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PGDATA" start >/dev/null \
    || die "PostgreSQL did not start; see $PGDATA/postgres.log"
for db in mlflow optuna; do
    if ! as_pg "$PGBIN/psql" -h "$PGDATA" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        as_pg "$PGBIN/createdb" -h "$PGDATA" -p "$PG_PORT" -U "$PG_USER" "$db"
    fi
done

# its own session, so that `stop` ends the server and its workers together
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$PYTHON" -m mlflow server \
    --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "$PG_URL/mlflow" \
    --serve-artifacts --artifacts-destination "$DIR/mlartifacts" \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" >"$DIR/mlflow.log" 2>&1 < /dev/null &
echo $! > "$DIR/mlflow.pid"
for _ in $(seq 240); do
    if "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=2)" \
            2>/dev/null; then
        echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
        echo "export OPTUNA_STORAGE=$PG_URL/optuna"
        exit 0
    fi
    kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || die "mlflow server exited; see $DIR/mlflow.log"
    sleep 0.5
done
die "mlflow server did not answer in 120 s; see $DIR/mlflow.log"
