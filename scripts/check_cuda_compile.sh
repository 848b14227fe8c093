#!/usr/bin/env bash
# Compile-check of the CUDA kernels (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90, without a GPU.
#
#     scripts/check_cuda_compile.sh            # uses .venv/bin/python if present, else python3
#     PYTHON=/path/to/python scripts/check_cuda_compile.sh
#
# Compiles each .cu to an object under build/cuda_check/ against the installed torch's headers, with
# the flags torch's BuildExtension passes to nvcc (C++ standard, -D__CUDA_NO_HALF_OPERATORS__ & co.,
# -DTORCH_EXTENSION_NAME, -D_GLIBCXX_USE_CXX11_ABI; -DPy_LIMITED_API is left out: no .cu file
# includes Python.h).
# Fails on any error, and on any warning from our own sources (-Werror=all-warnings would also
# trip on torch's headers, so warnings are grepped instead). Needs nvcc (CUDA_HOME/bin or PATH)
# and a CUDA build of torch (a CPU torch lacks c10/cuda/impl/cuda_cmake_macros.h).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 2
fi

# Include dirs and defines, as torch's BuildExtension computes them for this torch.
mapfile -t FLAGS < <("$PYTHON" - <<'EOF'
import glob, importlib.util, inspect, logging, os, sys
logging.disable(logging.WARNING)  # "No CUDA runtime is found" is expected on a GPU-less box
import torch
import torch.utils.cpp_extension as ce
from packaging.version import Version

if torch.version.cuda is None:
    sys.exit(f"check_cuda_compile: torch {torch.__version__} is a CPU-only build; install a CUDA torch")
if "device_type" in inspect.signature(ce.include_paths).parameters:
    incs = ce.include_paths(device_type="cuda")
else:  # torch < 2.6
    incs = ce.include_paths(cuda=True)
# cuBLAS etc. headers of the nvidia-* wheels (CUDA 13: nvidia/cu13/include).
spec = importlib.util.find_spec("nvidia")
major = torch.version.cuda.split(".")[0]
for base in (spec.submodule_search_locations if spec else []):
    incs += sorted(glob.glob(os.path.join(base, f"cu{major}", "include")))
    incs += sorted(glob.glob(os.path.join(base, "cublas", "include")))
std = "c++20" if Version(torch.__version__.split("+")[0]) >= Version("2.10") else "c++17"
flags = [f"-I{d}" for d in incs] + [f"-std={std}"] + list(ce.COMMON_NVCC_FLAGS) + [
    "-DTORCH_EXTENSION_NAME=_C",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]
print("\n".join(flags))
EOF
)

OUT="$ROOT/build/cuda_check"
mkdir -p "$OUT"
shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if (( ${#SOURCES[@]} == 0 )); then
  echo "check_cuda_compile: no csrc/cuda/*.cu sources" >&2
  exit 1
fi

status=0
for src in "${SOURCES[@]}"; do
  obj="$OUT/$(basename "${src%.cu}").o"
  log="$OUT/$(basename "${src%.cu}").log"
  echo "nvcc $src -> $obj (sm_80, sm_90)"
  if ! "$NVCC" -c "$src" -o "$obj" "${FLAGS[@]}" -I"$ROOT/csrc" \
      -O3 -Xcompiler -fPIC -Xcompiler -Wall \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      >"$log" 2>&1; then
    cat "$log" >&2
    echo "check_cuda_compile: FAILED to compile $src" >&2
    status=1
    continue
  fi
  # Warnings that point into our own sources fail the check; torch-header noise does not.
  if grep -E "(^|/)csrc/.*(warning|Warning)" "$log" >&2; then
    echo "check_cuda_compile: warnings in $src (see above)" >&2
    status=1
  fi
done
(( status == 0 )) && echo "check_cuda_compile: OK (${#SOURCES[@]} file(s))"
exit "$status"
