#!/usr/bin/env bash
# PostgreSQL for tests/workflows/test_studies.py (Optuna RDB storage shared by several workers).
# Installs the Debian package, starts a throwaway cluster on 127.0.0.1:${KDBENCH_PG_PORT:-54329}
# owned by the postgres user, and creates role/database kdbench (password kdbench). The URL is
# written to ${KDBENCH_PG_URL_FILE:-/tmp/kdbench-postgres.url}, which the test reads:
#   postgresql://kdbench:kdbench@127.0.0.1:54329/kdbench
# Usage: postgres.sh [start|stop]. `stop` stops the cluster that `start` started (fast shutdown),
# deletes its data directory and the URL file; it is a no-op when none runs. `.ci/run` calls it on
# exit, also after a failure.
set -euo pipefail
ACTION="${1:-start}"
PORT="${KDBENCH_PG_PORT:-54329}"
DATA="${KDBENCH_PG_DATA:-/tmp/kdbench-pgdata}"
URL_FILE="${KDBENCH_PG_URL_FILE:-/tmp/kdbench-postgres.url}"
SU=(runuser -u postgres --)
[ "$(id -u)" = 0 ] || SU=()   # not root: run as ourselves

if [ "$ACTION" = stop ]; then
  BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  # Only a cluster that `start` started (marked below): never one that was running before.
  [ -n "$BIN" ] && [ -e "$DATA/started-by-ci" ] || exit 0
  rm -f "$URL_FILE"
  if "${SU[@]}" "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    "${SU[@]}" "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    echo "PostgreSQL on 127.0.0.1:$PORT stopped"
  fi
  rm -rf "$DATA"
  exit 0
elif [ "$ACTION" != start ]; then
  echo "usage: $0 [start|stop]" >&2
  exit 2
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

if ! "${SU[@]}" "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  if [ ! -s "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
    "${SU[@]}" "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
  fi
  "${SU[@]}" "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k /tmp" start >/dev/null
  touch "$DATA/started-by-ci"
fi
PSQL=("${SU[@]}" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
"${PSQL[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='kdbench'" | grep -q 1 ||
  "${PSQL[@]}" -c "CREATE ROLE kdbench LOGIN PASSWORD 'kdbench'"
"${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname='kdbench'" | grep -q 1 ||
  "${PSQL[@]}" -c "CREATE DATABASE kdbench OWNER kdbench"
echo "postgresql://kdbench:kdbench@127.0.0.1:$PORT/kdbench" > "$URL_FILE"
chmod 644 "$URL_FILE"
echo "PostgreSQL ready: $(cat "$URL_FILE")"
