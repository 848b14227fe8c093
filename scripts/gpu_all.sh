#!/usr/bin/env bash
# Everything that needs a GPU, in one call, strict and staged:
#
#     bash scripts/gpu_all.sh                    # from anywhere, on the GPU machine
#     GPU_ALL_BUDGET=900 bash scripts/gpu_all.sh # a longer overall budget (seconds, default 540)
#
# Stages, in this order, each with its own time limit (cut to what is left of the overall budget;
# a stage that no longer fits is reported "NOT RUN"):
#   build      the native module with CUDA kernels for this GPU; a CPU-only fallback is an error
#   backends   cpu, cuda and triton must all report "available"
#   cuda       tests/test_cuda.py (the CUDA kernels vs float64; -m "not slow": the CPU-side compile
#              checks run in CI)
#   triton     tests/test_triton.py, kernels compiled for this GPU
#   sanitizer  compute-sanitizer racecheck, synccheck, memcheck on scripts/sanitize_kernels.py
#   op_cpu     every other test file, -m "not slow" (public API, autograd, optimizers on the GPU)
#   bench_*    apo-bench, one section per stage (op, precond, train, lowprec)
# Every pytest stage runs with a per-test --timeout and writes a junit file; a stage's time limit
# sends SIGINT first, so pytest still writes its summary and junit file.
#
# Output: bench/results/gpu-<device>-<date>/ (logs, junit files, env.txt, summary.txt, apo-bench
# results), packed into one archive gpu_all-<device>-<date>.tar.gz, written with a copy of
# summary.txt to $OUT when set (else next to the folder). One summary line per stage is printed
# and written to summary.txt. Exit status: 0 only if every stage passed.
#
# Environment: no network needed. Python: $PYTHON, else .venv/bin/python if it sees a GPU, else
# python3. pytest-timeout and pytest-xdist are used when installed (the run says when they are not).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
BUDGET=${GPU_ALL_BUDGET:-540}

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
DATE=$(date +%Y-%m-%d)
DEV=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu")' 2>/dev/null || echo unknown)
SLUG=$(echo "$DEV" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
NAME="gpu-$SLUG-$DATE"
RUN="$ROOT/bench/results/$NAME"
rm -rf "$RUN"
mkdir -p "$RUN"
LOG="$RUN/gpu_all.log"
SUMMARY="$RUN/summary.txt"
FAILED=0

export APO_REQUIRE_BACKENDS=cpu,cuda,triton
export APO_KERNELS_REQUIRE_CUDA=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/build/cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/cache/inductor}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu_all $(elapsed)s] $*" | tee -a "$LOG"; }
summary() { echo "$*" | tee -a "$SUMMARY" >> "$LOG"; echo "$*"; }

# stage NAME LIMIT_S CMD...: runs CMD with min(LIMIT_S, what is left of the budget); one summary line.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then
    summary "$(printf '%-14s NOT RUN   (overall budget of %ss spent)' "$name" "$BUDGET")"
    FAILED=1
    return 0
  fi
  log "== $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout -s INT --kill-after=20 "$limit" "$@" > >(tee -a "$LOG" > "$RUN/$name.log") 2>&1
  local rc=$? secs=$(( $(date +%s) - t )) verdict=PASS
  if (( rc == 124 || rc == 137 )); then verdict=TIMEOUT; elif (( rc != 0 )); then verdict=FAIL; fi
  [[ $verdict != PASS ]] && FAILED=1
  local counts=""
  [[ -f "$RUN/junit-$name.xml" ]] && counts=$("$PYTHON" scripts/junit_counts.py "$RUN/junit-$name.xml" 2>/dev/null)
  summary "$(printf '%-14s %-8s rc=%-3s %4ss  %s' "$name" "$verdict" "$rc" "$secs" "$counts")"
  return 0
}

# pytest NAME TIMEOUT_PER_TEST WORKERS ARGS...: the common pytest options of a stage.
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && HAVE_TIMEOUT=1 || HAVE_TIMEOUT=0
"$PYTHON" -c 'import xdist' 2>/dev/null && HAVE_XDIST=1 || HAVE_XDIST=0
pytest_args() {
  local name=$1 per_test=$2 workers=$3
  local args=(-m pytest -q -rfEs -p no:cacheprovider --junitxml="$RUN/junit-$name.xml" -o junit_family=xunit2)
  (( HAVE_TIMEOUT )) && args+=(--timeout="$per_test")
  (( HAVE_XDIST && workers > 1 )) && args+=(-n "$workers")
  echo "${args[@]}"
}

{
  echo "device: $DEV"
  echo "date: $(date -Iseconds)"
  echo "host: $(hostname), $(nproc) CPUs"
  echo "python: $PYTHON ($("$PYTHON" -V 2>&1))"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)' 2>&1
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
  echo "budget: ${BUDGET}s; pytest-timeout: $HAVE_TIMEOUT; pytest-xdist: $HAVE_XDIST"
} > "$RUN/env.txt" 2>&1
cat "$RUN/env.txt" | tee -a "$LOG"
summary "gpu_all $NAME (budget ${BUDGET}s)"

# 1. Build for this GPU only (fast); APO_KERNELS_REQUIRE_CUDA=1 turns a CPU-only fallback into an error.
CAP=$("$PYTHON" -c 'import torch; c=torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
stage build 200 "$PYTHON" setup.py build_ext --inplace
stage backends 30 "$PYTHON" -c '
import json, apo_kernels
status = apo_kernels.backends()
print(json.dumps(status, indent=1))
missing = {b: s for b, s in status.items() if b in ("cpu", "cuda", "triton") and not s.startswith("available")}
assert not missing, f"backends not available: {missing}"
assert "TRITON_INTERPRET" not in status["triton"], "triton must run compiled here"
'

# 2. Tests, one stage per file group. Per-test timeouts leave room for first-call JIT compiles.
# shellcheck disable=SC2046
stage cuda 150 "$PYTHON" $(pytest_args cuda 60 4) -m "not slow" tests/test_cuda.py
# shellcheck disable=SC2046
stage triton 180 "$PYTHON" $(pytest_args triton 120 8) tests/test_triton.py
# After the triton stage: Triton's compile cache is warm, so the sanitizer runs the kernels, not ptxas.
if command -v compute-sanitizer >/dev/null; then
  for tool in racecheck synccheck memcheck; do
    # memcheck without the caching allocator, so that an out-of-bounds access leaves its own
    # allocation (torch reads only whether the variable is set)
    uncached=()
    [[ $tool == memcheck ]] && uncached=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    stage "sanitizer_$tool" 60 "${uncached[@]}" compute-sanitizer --tool "$tool" --error-exitcode 99 \
      --print-limit 20 "$PYTHON" scripts/sanitize_kernels.py
  done
else
  summary "$(printf '%-14s NOT RUN   (compute-sanitizer not on PATH)' sanitizer)"
  FAILED=1
fi
# shellcheck disable=SC2046
stage op_cpu 120 "$PYTHON" $(pytest_args op_cpu 90 8) -m "not slow" tests \
  --ignore=tests/test_cuda.py --ignore=tests/test_triton.py

# 3. apo-bench, one section per stage, each into its own folder (a timeout loses one section only).
for section in op precond train lowprec; do
  stage "bench_$section" 150 "$PYTHON" -m apo_kernels.bench --no-progress --sections "$section" \
    --out "$RUN/apo_bench_$section"
done

# 4. Pack everything into one archive (+ the summary as a small text file).
summary "total $(elapsed)s; $([[ $FAILED == 0 ]] && echo 'all stages passed' || echo 'SOME STAGES FAILED OR DID NOT RUN')"
DEST=${OUT:-$ROOT/bench/results}
mkdir -p "$DEST"
tar -czf "$DEST/gpu_all-$SLUG-$DATE.tar.gz" -C "$ROOT/bench/results" "$NAME"
cp "$SUMMARY" "$DEST/gpu_all-summary.txt"
echo "results: $RUN; archive: $DEST/gpu_all-$SLUG-$DATE.tar.gz"
exit $FAILED
