#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest.
# Exit code is pytest's, except that "no tests collected" (5) is a failure too.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit "$rc"
