#!/usr/bin/env bash
# Create (or reuse) a virtual environment and build apo-kernels into it.
#
#   bash scripts/setup_env.sh            # .venv with the CUDA 13 torch build (CUDA kernels compiled)
#   TORCH_SPEC=torch==2.13.0 VENV=.venv-cpu bash scripts/setup_env.sh   # CPU-only torch
#
# Works on a machine without a GPU: with the CUDA torch the CUDA extension still compiles and links.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1090
source "$VENV/bin/activate"   # puts the venv's ninja first on PATH, where torch looks for it

# Keep compiler caches inside the project so runs do not share global state.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/build/cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/cache/triton}
export MAX_JOBS=${MAX_JOBS:-2}

python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "$TORCH_SPEC" numpy ninja pybind11
# torch's CUDA build brings its pinned Triton; the CPU build brings none.
python -c 'import triton' 2>/dev/null || python -m pip install -q "triton>=3.6"
# "$TORCH_SPEC" again: the extras' dependencies (torchvision via backpack) must not move torch to
# another version after the extension was built against this one
python -m pip install -q --no-build-isolation -e ".[test,bench,paper]" "$TORCH_SPEC"
python -c 'import apo_kernels, json; print(json.dumps(apo_kernels.backends(), indent=1))'
