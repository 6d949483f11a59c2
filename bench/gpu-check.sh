#!/usr/bin/env bash
# The first checks on a CUDA machine, from a fresh clone, in under 8 minutes:
#   1. .venv with torch 2.13.0's CUDA build (PyPI's own index, whatever pip's config says)
#   2. the engine tests with the model on the GPU   (HATRACK_TEST_DEVICE=cuda)
#   3. the server tests with `hatrack serve --device cuda`
#   4. bench/serve.py on the NF4 base on the GPU (one round)
# and one table at the end: what ran, passed or failed, time, tok/s. Each step has a
# time cap so the whole stays under the budget; a step cut short says so.
#
#   bash bench/gpu-check.sh                 # on a CUDA machine
#   bash bench/gpu-check.sh --device cpu    # the same plumbing on the CPU (slow: CI-sized runs)
#   bash bench/gpu-check.sh --quick         # one test per group and a short benchmark
#
# Exit status: 0 when every step passed; 1 when one failed or ran out of time; 2 when no
# CUDA device is here (and --device cpu was not asked for). Logs go to $GPU_CHECK_LOGS
# (default: a new folder under /tmp, printed at the end). GPU_CHECK_PYTHON names an
# interpreter that already has hatrack's dependencies: the install step is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift ;;
    --device=*) DEVICE="${1#--device=}" ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then
  echo "error: --device expects cuda or cpu, got '$DEVICE'" >&2
  exit 2
fi

BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"  # 7 min 50 s for everything, install included
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d /tmp/hatrack-gpu-check.XXXXXX)}"
mkdir -p "$LOGS"
START=$SECONDS
ROWS=()
FAILED=0

row() {  # what | result | seconds | tok/s
  ROWS+=("| $1 | $2 | $3 | $4 |")
}

left() {  # seconds of the budget left, at most $1
  local rest=$((BUDGET_S - (SECONDS - START)))
  [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}

print_table() {
  echo
  echo "hatrack GPU check — device $DEVICE — $(date -u '+%Y-%m-%d %H:%M UTC') — $((SECONDS - START)) s in all"
  echo
  echo "| what ran | result | s | tok/s |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "logs: $LOGS"
}

# ------------------------------------------------------------------ a GPU, before installing gigabytes
if [ "$DEVICE" = cuda ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$LOGS/nvidia-smi.txt" 2>&1 \
      || ! grep -q '^GPU ' "$LOGS/nvidia-smi.txt"; then
    echo "error: no CUDA device on this machine (nvidia-smi finds no GPU): nothing was run." >&2
    echo "       bash bench/gpu-check.sh --device cpu runs the same steps on the CPU." >&2
    exit 2
  fi
  echo "GPU: $(head -1 "$LOGS/nvidia-smi.txt")"
fi

# ------------------------------------------------------------------ 1. the venv
step_start=$SECONDS
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY="$GPU_CHECK_PYTHON"
  setup_ok=1
  echo "install skipped: GPU_CHECK_PYTHON=$PY" >"$LOGS/setup.log"
elif bash scripts/setup.sh >"$LOGS/setup.log" 2>&1; then
  PY=.venv/bin/python
  setup_ok=1
else
  PY=.venv/bin/python
  setup_ok=0
fi
if [ "$setup_ok" = 1 ] && [ "$DEVICE" = cuda ] && [ "$("$PY" -c 'import torch; print(torch.version.cuda is not None)' 2>/dev/null)" != True ]; then
  # a CPU build is installed (an older .venv, or pip's config pointing at a CPU index or
  # wheel folder): replace it with PyPI's own torch 2.13.0, which is the CUDA build on
  # Linux, with pip's config files and index settings out of the way
  echo "replacing $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) with PyPI's CUDA build" >>"$LOGS/setup.log"
  "$PY" -m pip uninstall -y -q torch >>"$LOGS/setup.log" 2>&1
  env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip install -q "torch==2.13.0" --index-url https://pypi.org/simple >>"$LOGS/setup.log" 2>&1 || setup_ok=0
fi
if [ "$setup_ok" = 1 ]; then
  info="$("$PY" - "$DEVICE" <<'EOF' 2>>"$LOGS/setup.log"
import sys
import torch
want = sys.argv[1]
if want == "cuda" and not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    sys.exit(1)
where = torch.cuda.get_device_name(0) if want == "cuda" else "cpu"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {where}")
EOF
)" || setup_ok=0
fi
if [ "$setup_ok" = 1 ]; then
  row "install ($( [ -n "${GPU_CHECK_PYTHON:-}" ] && echo "skipped: $PY" || echo scripts/setup.sh))" "ok: $info" $((SECONDS - step_start)) "—"
else
  row "install (scripts/setup.sh)" "FAILED: ${info:-see setup.log}" $((SECONDS - step_start)) "—"
  print_table
  tail -20 "$LOGS/setup.log" >&2
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------ 2, 3. tests on the device
ENGINE_TESTS=(tests/test_engine_batching.py tests/test_engine_sampling.py tests/test_engine_constraints.py
              tests/test_engine_stream.py tests/test_engine_slots.py tests/test_int8_base_log.py
              tests/test_engine_integration.py)
SERVER_TESTS=(tests/test_server_api.py tests/test_server_sampling.py tests/test_server_structured.py
              tests/test_server_auth.py tests/test_server_shutdown.py tests/test_server_load.py
              tests/test_serve_integration.py)
QUICK_ARGS=()
[ "$QUICK" = 1 ] && QUICK_ARGS=(-k "mixed_batch or greedy_matches or bias_and_penalties or slot or int8 or streams_openai or shutdown")

run_tests() {  # name cap files...
  local name="$1" cap="$2"
  shift 2
  local t0=$SECONDS limit
  limit=$(left "$cap")
  if [ "$limit" -lt 20 ]; then
    row "$name" "not run: the time budget was spent" 0 "—"
    FAILED=1
    return
  fi
  HATRACK_TEST_DEVICE="$DEVICE" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" timeout --signal=INT --kill-after=15 "$limit" \
    "$PY" -m pytest -q -p no:cacheprovider "${QUICK_ARGS[@]}" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local summary
  summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)' "$LOGS/$name.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//; s/ in [0-9.]*s.*//; s/, [0-9]* warnings\{0,1\}//')"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    row "$name" "TIMED OUT after ${limit} s${summary:+ ($summary)}" $((SECONDS - t0)) "—"
    FAILED=1
  elif [ "$rc" = 0 ]; then
    row "$name" "passed: $summary" $((SECONDS - t0)) "—"
  else
    row "$name" "FAILED (exit $rc): ${summary:-see log}" $((SECONDS - t0)) "—"
    while read -r line; do
      row "  $name" "${line//|//}" "" ""
    done < <(grep -E '^(FAILED|ERROR) ' "$LOGS/$name.log" | head -8)
    FAILED=1
  fi
}

run_tests "engine-tests-$DEVICE" 150 "${ENGINE_TESTS[@]}"
run_tests "server-tests-$DEVICE" 180 "${SERVER_TESTS[@]}"

# ------------------------------------------------------------------ 4. the serving benchmark
t0=$SECONDS
limit=$(left 150)
if [ "$limit" -lt 30 ]; then
  row "bench/serve.py --quantize nf4" "not run: the time budget was spent" 0 "—"
  FAILED=1
else
  if [ "$QUICK" = 1 ]; then
    bench_args=(--concurrency 8 --requests 8 --naive-requests 2 --repeats 1)
  else
    bench_args=(--concurrency 8 32 --requests 32 --naive-requests 4 --repeats 1)
  fi
  timeout --signal=INT --kill-after=15 "$limit" "$PY" bench/serve.py --quantize nf4 --device "$DEVICE" \
    "${bench_args[@]}" --out "$LOGS/serve.md" >"$LOGS/bench-serve.log" 2>&1
  rc=$?
  if [ "$rc" = 0 ] && [ -f "$LOGS/serve.md" ]; then
    row "bench/serve.py --quantize nf4 --device $DEVICE ${bench_args[*]}" "ok" $((SECONDS - t0)) ""
    # the benchmark's own rows: "| run | output tok/s | p50 | p95 | TTFT |"
    grep -E '^\| (base only|8 adapters|naive)' "$LOGS/serve.md" | while IFS='|' read -r _ label toks _; do
      echo "$label|$toks"
    done >"$LOGS/serve-rows.txt"
    while IFS='|' read -r label toks; do
      row "  serve.py: $(echo "$label" | xargs)" "" "" "$(echo "$toks" | xargs)"
    done <"$LOGS/serve-rows.txt"
  else
    what="FAILED (exit $rc)"
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && what="TIMED OUT after ${limit} s"
    row "bench/serve.py --quantize nf4 --device $DEVICE" "$what: see bench-serve.log" $((SECONDS - t0)) "—"
    FAILED=1
  fi
fi

print_table
exit "$FAILED"
