#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (see benchmarks/README.md): installs carried wheels, runs the GPU-only
# kernel tests, benchmarks attention, writes full logs under $OUT and prints a short table last.
#
# Usage (from the repository root):  bash benchmarks/gpu_check.sh
# Env: OUT (log folder; default ./gpu_check_out), WHEELS (default wheels), BUDGET_S (whole run, default 450),
#      BENCH_ARGS (extra/override arguments for benchmarks/attention.py), PYTHON (default python3).
# Every stage runs under `timeout`, a failing stage does not stop the next, and the exit code is non-zero if any
# stage failed. Stages: env, wheels, gpu-tests, kernel-tests, bench.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_check_out}"
WHEELS="${WHEELS:-wheels}"
BUDGET_S="${BUDGET_S:-450}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export JAX_PLATFORMS="${JAX_PLATFORMS-}"  # set (empty = auto): tests/conftest.py defaults an unset one to cpu
START=$(date +%s)
declare -a NAMES STATUS SECS

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME CAP_S LOG CMD...: runs CMD under timeout min(CAP_S, time left - 20 s reserve), logs, records status.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( $(remaining) - 20 )) t0 rc
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then
    NAMES+=("$name"); STATUS+=("SKIPPED (no time left)"); SECS+=(0); return
  fi
  local cmd="$*"
  echo "=== [$name] (timeout ${cap}s) ${cmd:0:160}" | tee -a "$log"
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) STATUS+=("ok") ;;
    124|137) STATUS+=("TIMEOUT after ${cap}s") ;;
    5) STATUS+=("no tests collected") ;;
    *) STATUS+=("FAILED rc=$rc") ;;
  esac
  NAMES+=("$name"); SECS+=($(( $(date +%s) - t0 )))
  tail -n 3 "$log" | sed "s/^/    [$name] /"
}

# --- env: what this machine is (written first, so a later hang still leaves it) -------------------------------
stage env 60 "$OUT/env.log" bash -c "
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  $PYTHON - <<'EOF'
import importlib, platform
print('python', platform.python_version())
for m in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'triton', 'torch', 'jax_triton', 'ml_collections'):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, '__version__', '?'))
    except Exception as e:
        print(m, 'MISSING', type(e).__name__, str(e).splitlines()[0][:120] if str(e) else '')
import jax
print('backend', jax.default_backend(), jax.devices())
EOF"

# --- wheels: ml_collections and jax_triton are not in the image; they travel as wheels -------------------------
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # Normal resolution first: it keeps the image's jax/triton and picks the newest jax_triton whose requirements
  # they meet (0.4.x needs triton >= 3.7; 0.3.1 runs on triton 3.6). If that fails, install the wheels as they are.
  stage wheels 120 "$OUT/env.log" bash -c "
    $PYTHON -m pip install -q --no-index --no-cache-dir --find-links '$WHEELS' ml_collections jax_triton ||
    { echo 'resolver install failed; installing every wheel with --no-deps'; \
      $PYTHON -m pip install -q --no-index --no-cache-dir --no-deps '$WHEELS'/*.whl; }
    $PYTHON -c 'import jax_triton, ml_collections; print(\"jax_triton\", jax_triton.__version__)'"
else
  NAMES+=("wheels"); STATUS+=("SKIPPED (no $WHEELS/*.whl: triton path will decline)"); SECS+=(0)
fi

# --- tests: GPU-marked tests everywhere, then the compiled Pallas GPU paths (unmarked there) and the XLA reference
# on GPU. The interpret-mode tests already run on CPU CI; KERNEL_TESTS / KERNEL_K override the second stage.
stage gpu-tests 170 "$OUT/tests_gpu.log" $PYTHON -m pytest -rs -p no:cacheprovider --continue-on-collection-errors -m gpu tests
KERNEL_K="${KERNEL_K:-compiled or lowers or gating}"
stage kernel-tests 150 "$OUT/tests_kernels.log" bash -c "
  rc=0
  $PYTHON -m pytest -rs -p no:cacheprovider --continue-on-collection-errors -m 'not gpu' ${KERNEL_TESTS:-tests/test_attention.py} || rc=1
  if [ -z '${KERNEL_TESTS:-}' ] && [ -f tests/test_pallas_gpu_attention.py ]; then
    $PYTHON -m pytest -rs -p no:cacheprovider --continue-on-collection-errors -m 'not gpu' -k '$KERNEL_K' tests/test_pallas_gpu_attention.py || rc=1
  fi
  exit \$rc"

# --- benchmark: dense (head_dim 128 first, so a time-boxed run has the headline numbers), then block-sparse ----
BENCH_LEFT=$(( $(remaining) - 40 ))
(( BENCH_LEFT > 240 )) && BENCH_LEFT=240
stage bench $(( BENCH_LEFT + 30 )) "$OUT/bench.log" $PYTHON benchmarks/attention.py \
  --lengths 2048,8192,16384 --head-dims 128,64 --reps 7 --sparse-length 8192 --sparse-block 128 --sparse-modes fwd \
  --time-budget $(( BENCH_LEFT * 2 / 3 )) --json "$OUT/bench.json" ${BENCH_ARGS:-}

# --- summary (printed last: the reply carries the end of the output) ------------------------------------------
{
  echo
  echo "=== gpu_check summary ($(( $(date +%s) - START )) s total; logs in $OUT)"
  for i in "${!NAMES[@]}"; do printf '  %-13s %-40s %4ss\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
  echo "--- test results"
  for f in "$OUT"/tests_gpu.log "$OUT"/tests_kernels.log; do
    [ -f "$f" ] && grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|deselected|error)|no tests ran" "$f" |
      tail -n 20 | sed "s|^|  $(basename "$f" .log): |"
  done
  echo "--- benchmark (full: $OUT/bench.log, $OUT/bench.json)"
  if grep -q '^TFLOP/s' "$OUT/bench.log" 2>/dev/null; then
    sed -n '/^TFLOP\/s/,$p' "$OUT/bench.log" | head -n 60
  else  # killed before its table: the per-configuration lines it printed as it went
    grep -E '^# (d=|stage|time budget|vision)' "$OUT/bench.log" 2>/dev/null | tail -n 30
  fi
} | tee "$OUT/summary.txt"
for s in "${STATUS[@]}"; do [[ $s == ok || $s == SKIPPED* ]] || exit 1; done
exit 0
