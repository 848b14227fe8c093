#!/usr/bin/env bash
# Everything that needs a GPU, in one script (≤ 10 minutes: the main path's stage time limits sum to 600 s):
#   build the CUDA extension, run the whole test suite, run apo-bench (full) and the pytest-benchmark
#   suites, and copy the results -- with the device name and date -- into $OUT (or bench/results/).
#
#     bash scripts/gpu_all.sh                  # from the repo root, on the GPU machine
#     OUT=/some/dir bash scripts/gpu_all.sh
#
# Made for the lent GPU machines: torch 2.11 + triton 3.6 preinstalled, NO network. Nothing is
# downloaded; if a ./.whl/ wheelhouse was carried along, missing pure-Python tools (rich, matplotlib,
# pytest-benchmark, hypothesis, ...) are installed from it with --no-index. apo-bench degrades
# without rich/matplotlib (plain tables, no plots). Every stage has its own time limit and the
# script carries on past a failing stage, so one failure never hides the other results; the exit
# status is that of the first failing stage. Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
DATE=$(date +%Y-%m-%d)
DEV=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)
SLUG=$(echo "$DEV" | tr '[:upper:]' '[:lower:]' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
DEST=${OUT:-$ROOT/bench/results}
RUN="$DEST/gpu-$SLUG-$DATE"
mkdir -p "$RUN"
LOG="$RUN/gpu_all.log"
STATUS=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/build/cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/cache/inductor}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1

log() { echo "[gpu_all $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log everything, remember the first failure
  local name=$1 limit=$2; shift 2
  log "== $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > >(tee -a "$LOG" "$RUN/$name.log") 2>&1
  local rc=$?
  log "== $name: rc=$rc in $(( $(date +%s) - t ))s"
  if [[ $rc -ne 0 && $STATUS -eq 0 ]]; then STATUS=$rc; fi
  echo "$name rc=$rc seconds=$(( $(date +%s) - t ))" >> "$RUN/stages.txt"
  return 0
}

{
  echo "device: $DEV"
  echo "date: $(date -Iseconds)"
  echo "host: $(hostname)"
  echo "python: $PYTHON ($("$PYTHON" -V 2>&1))"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
} | tee "$RUN/env.txt"

# 0. Optional offline wheelhouse for the pure-Python tools (never the network).
if [[ -d .whl ]]; then
  stage wheels 30 "$PYTHON" -m pip install -q --no-index --find-links .whl \
    rich matplotlib pytest pytest-benchmark hypothesis numpy curvlinops-for-pytorch
fi

# 1. Build the native extension for this GPU only (fast): CPU kernels + CUDA kernels.
CAP=$("$PYTHON" -c 'import torch; c=torch.cuda.get_device_capability(0); print(f"{c[0]}.{c[1]}")' 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
stage build 160 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
if ! "$PYTHON" -c 'import apo_kernels._C' 2>/dev/null; then
  stage build_inplace 100 "$PYTHON" setup.py build_ext --inplace
fi
stage backends 20 "$PYTHON" -c 'import apo_kernels, json; print(json.dumps(apo_kernels.backends(), indent=1))'

# 2. The whole test suite (GPU tests run here; -rs lists every skip with its reason).
stage tests 140 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/

# 3. apo-bench, full GPU run (every section), then the pytest-benchmark suites.
stage apo_bench 190 "$PYTHON" -m apo_kernels.bench --no-progress --out "$RUN/apo_bench"
if "$PYTHON" -c 'import pytest_benchmark' 2>/dev/null; then
  stage pytest_bench 60 "$PYTHON" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$RUN/pytest_bench.json" --benchmark-columns=min,median,max,rounds
else
  log "pytest-benchmark not installed: bench/ suites skipped"
fi

# 4. Results, named by device and date, next to the logs.
if [[ -f "$RUN/apo_bench/results.json" ]]; then
  cp "$RUN/apo_bench/results.json" "$DEST/gpu-$SLUG-$DATE.json"
  cp "$RUN/apo_bench/summary.md" "$DEST/gpu-$SLUG-$DATE.md"
fi
log "done in $(( $(date +%s) - T0 ))s, status $STATUS; results in $RUN"
exit $STATUS
