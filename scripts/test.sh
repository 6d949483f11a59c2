#!/usr/bin/env bash
# The whole test suite: installs what it needs, starts a throw-away PostgreSQL server
# (scripts/postgres.sh, installing Debian's package when missing), then runs pytest.
# The registry tests run on SQLite and on that server; with HATRACK_TEST_PG_URL set
# they fail, never skip, when PostgreSQL cannot be reached. An HATRACK_TEST_PG_URL
# already in the environment names another server to use instead (the way to run
# this script without root where PostgreSQL is not installed). Headless Chromium for the
# dashboard's browser tests comes the same way (scripts/chromium.sh); where it cannot be
# installed those tests fail with what is missing.
# Exit code is pytest's, except that "no tests collected" (5) is a failure too.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
if [ -z "${HATRACK_TEST_PG_URL:-}" ]; then
  HATRACK_TEST_PG_URL="$(bash scripts/postgres.sh)" || { echo "could not start PostgreSQL for the tests" >&2; exit 1; }
fi
export HATRACK_TEST_PG_URL
bash scripts/chromium.sh || echo "continuing without Chromium: the dashboard's browser tests will fail" >&2
# vLLM (CPU build) in its own venv for the vLLM integration test; a failed install is
# reported here and that test skips, naming the reason
bash scripts/vllm-venv.sh >/dev/null || echo "could not build vLLM's venv (scripts/vllm-venv.sh): the vLLM test will skip" >&2
python -m pytest -q -p no:cacheprovider --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit "$rc"
