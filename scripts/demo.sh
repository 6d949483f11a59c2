#!/usr/bin/env bash
# Installs what it needs, then runs `hatrack demo` on the default base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec hatrack demo "$@"
