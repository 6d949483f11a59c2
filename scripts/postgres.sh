#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server on 127.0.0.1 (Debian's package, installed if
# missing) and prints its URL on stdout. Used by the test suite to run the registry
# tests against PostgreSQL as well as SQLite.  Usage: url=$(bash scripts/postgres.sh)
# A server already running on the data dir is reused; a data dir left by an earlier
# run whose server is gone is wiped and made again.
set -euo pipefail
PGPORT="${HATRACK_TEST_PG_PORT:-55432}"
DATA="${HATRACK_TEST_PG_DIR:-/tmp/hatrack-pg}"
URL="postgresql+psycopg://hatrack@127.0.0.1:$PGPORT/postgres"

find_bindir() {
  bindir=""
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && bindir="$d"; done
  return 0
}
find_bindir
if [ -z "$bindir" ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  else
    echo "PostgreSQL is not installed and this user cannot apt-get install it" >&2
    exit 1
  fi
  find_bindir
  [ -n "$bindir" ] || { echo "apt-get installed postgresql, but no initdb was found" >&2; exit 1; }
fi
run() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Two callers at once (the test script and a pytest fixture, two checkouts) must not
# both wipe and initialise the same data dir.
lock="/tmp/hatrack-pg-$PGPORT.lock"
[ -e "$lock" ] || : >"$lock"
exec 9<"$lock"  # read-only: works whoever made the file
flock -w 120 9 || { echo "timed out waiting for another scripts/postgres.sh" >&2; exit 1; }

if ! run "$bindir/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  if [ -e "$DATA" ] && [ ! -f "$DATA/PG_VERSION" ] && [ -n "$(ls -A "$DATA" 2>/dev/null)" ]; then
    echo "$DATA is not a PostgreSQL data dir and not empty: not wiping it (set HATRACK_TEST_PG_DIR)" >&2
    exit 1
  fi
  rm -rf "$DATA"
  mkdir -p "$DATA"
  if [ "$(id -u)" = 0 ]; then chown postgres "$DATA"; fi
  run "$bindir/initdb" -D "$DATA" -A trust -U hatrack >/dev/null
  if ! run "$bindir/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k /tmp -c max_connections=200 -c fsync=off" start >/dev/null 9<&-; then  # the server must not hold the lock
    echo "PostgreSQL did not start; the end of $DATA/server.log:" >&2
    tail -n 5 "$DATA/server.log" >&2 || true
    exit 1
  fi
fi
# running on this data dir, but is it the one on our port?
if ! "$bindir/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" -t 30; then
  echo "a PostgreSQL server runs on $DATA, but nothing answers on 127.0.0.1:$PGPORT" >&2
  exit 1
fi
echo "$URL"
