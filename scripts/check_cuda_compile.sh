#!/usr/bin/env bash
# Compile check of the CUDA kernels without a GPU, through the build users get: `setup.py build_ext`
# with the sources, flags and GPU archs of csrc/build_config.txt (default 8.0 9.0+PTX, or
# TORCH_CUDA_ARCH_LIST), into build/cuda_check/ (the in-tree apo_kernels/_C is not touched).
#
#     scripts/check_cuda_compile.sh            # uses .venv/bin/python if present, else python3
#     PYTHON=/path/to/python scripts/check_cuda_compile.sh
#
# Always a full rebuild (so every warning is seen), with nvcc's NVCC_APPEND_FLAGS adding
# `-Xptxas -v -Xcompiler -Wall`. Fails on any compile error and on any warning that points into
# our csrc/ (warnings from torch's headers do not count) or comes from ptxas. Prints the kernels
# that spill registers (information, not a failure). The full log: build/cuda_check/build.log.
# Needs nvcc and a CUDA build of torch; MAX_JOBS (default 2) bounds the parallel compiles.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# torch runs ninja from PATH: prefer the one installed next to this Python.
PATH="$(dirname "$PYTHON"):$PATH"

OUT="$ROOT/build/cuda_check"
LOG="$OUT/build.log"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "check_cuda_compile: setup.py build_ext -> $OUT (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
if ! APO_KERNELS_REQUIRE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas -v -Xcompiler -Wall" \
    "$PYTHON" setup.py build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp" >"$LOG" 2>&1; then
  grep -E -i -B2 -A8 "error" "$LOG" | tail -n 150 >&2 || tail -n 80 "$LOG" >&2
  echo "check_cuda_compile: FAILED to build (full log: $LOG)" >&2
  exit 1
fi

# Which kernels spill (ptxas -v prints the entry function, then its spill stores/loads).
awk -F"'" '/Compiling entry function/ { kernel = $2 " (" $4 ")" }
     /bytes spill stores/ { split($0, f, " "); if (f[5] > 0 || f[9] > 0)
       printf "check_cuda_compile: %s spills %s bytes (stores), %s bytes (loads)\n", kernel, f[5], f[9] }' "$LOG"

status=0
# Paths in the log are absolute; strip the root so that only our own sources match csrc/.
if sed -e "s|$ROOT/||g" "$LOG" | grep -E "^csrc/.*[Ww]arning|^ptxas warning" >&2; then
  echo "check_cuda_compile: warnings in our sources (above; full log: $LOG)" >&2
  status=1
fi
kernels=$(grep -c "Compiling entry function" "$LOG" || true)
(( status == 0 )) && echo "check_cuda_compile: OK (${kernels} kernel images compiled, no warnings; log: $LOG)"
exit "$status"
