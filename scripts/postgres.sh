#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server on 127.0.0.1 (Debian's package, installed if
# missing) and prints its URL on stdout. Used by the test suite to run the registry
# tests against PostgreSQL as well as SQLite.  Usage: url=$(bash scripts/postgres.sh)
set -euo pipefail
PGPORT="${HATRACK_TEST_PG_PORT:-55432}"
DATA="${HATRACK_TEST_PG_DIR:-/tmp/hatrack-pg}"
bindir=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bindir="$d"; done
if [ -z "$bindir" ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  else
    echo "PostgreSQL is not installed and this user cannot apt-get install it" >&2
    exit 1
  fi
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bindir="$d"; done
fi
run() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if ! run "$bindir/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  rm -rf "$DATA"
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres "$DATA"
  run "$bindir/initdb" -D "$DATA" -A trust -U hatrack >/dev/null
  run "$bindir/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k /tmp -c max_connections=200 -c fsync=off" start >/dev/null
fi
echo "postgresql+psycopg://hatrack@127.0.0.1:$PGPORT/postgres"
