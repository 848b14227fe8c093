"""Build of apo-kernels' native module `apo_kernels._C` (CPU always, CUDA when possible).

    pip install --no-build-isolation -e ".[test]"     # torch must already be installed

Build environment variables:
    APO_KERNELS_SKIP_CUDA=1   build the CPU kernels only, even with a CUDA torch and nvcc present
    APO_KERNELS_REQUIRE_CUDA=1  fail instead of falling back to a CPU-only build (GPU machines, CI)
    TORCH_CUDA_ARCH_LIST      CUDA archs to compile for (default here "8.0;9.0")
    CUDA_HOME                 CUDA toolkit to use (otherwise nvcc on PATH / the usual places)
    MAX_JOBS                  parallel compile jobs (ninja); nvcc needs ~1-2 GB per job
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# Relative source paths: setuptools rejects absolute ones in an editable build's SOURCES.txt.
CPU_SOURCES = ["csrc/ops.cpp"]
CUDA_SOURCES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _log(msg: str) -> None:
    print(f"apo-kernels setup: {msg}", file=sys.stderr)


def _resolve_cuda_home() -> None:
    """Point CUDA_HOME at the real toolkit when nvcc on PATH is a wrapper script.

    torch takes CUDA_HOME = dirname(dirname(which nvcc)); for a wrapper such as /usr/local/bin/nvcc
    that is /usr/local, which has neither the CUDA headers nor libcudart, and linking fails. nvcc
    itself knows where it lives (`--dryrun` prints _HERE_=<toolkit>/bin). Must run before
    torch.utils.cpp_extension is imported, which reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ _HERE_="):
            real = os.path.dirname(line.split("=", 1)[1].strip())
            if os.path.exists(os.path.join(real, "include", "cuda_runtime.h")):
                _log(f"nvcc on PATH is a wrapper; using CUDA_HOME={real}")
                os.environ["CUDA_HOME"] = real
            return


if torch.version.cuda is not None and os.environ.get("APO_KERNELS_SKIP_CUDA", "0") != "1":
    _resolve_cuda_home()
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402  (after CUDA_HOME)


def cuda_skip_reason() -> str | None:
    """Why the CUDA kernels are not built, or None to build them.

    Decided from the torch build and the toolkit, never from torch.cuda.is_available(): a build box
    without a GPU must still produce the CUDA extension.
    """
    if os.environ.get("APO_KERNELS_SKIP_CUDA", "0") == "1":
        return "APO_KERNELS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    # Imported only now: with a CPU torch nothing CUDA-related is touched at build time.
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not CUDA_SOURCES:
        return "no csrc/cuda/*.cu sources"
    return None


def nvidia_wheel_includes() -> list[str]:
    """Header dirs of the nvidia-* pip wheels (cuBLAS etc.), which torch's CUDA wheels link against.

    CUDA 13 wheels put everything under nvidia/cu13/include; older ones under nvidia/<lib>/include.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += glob.glob(os.path.join(base, f"cu{major}", "include"))
        dirs += glob.glob(os.path.join(base, "cublas", "include"))
    return sorted(set(dirs))


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP when torch's CPU parallel backend is OpenMP. ATen's
    at::parallel_for opens its `#pragma omp parallel` region inline in the header, so without them
    the per-layer loop of the grouped CPU op silently runs on one thread (csrc/ops.cpp refuses to
    compile that way). On macOS, Apple clang takes OpenMP via the preprocessor and links the
    libomp that torch ships in torch/lib."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return [], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-L" + os.path.join(os.path.dirname(torch.__file__), "lib"), "-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def extensions():
    omp_compile, omp_link = openmp_flags()
    cxx_flags = ["-O3", "-g0", "-DAPO_KERNELS_PYTHON_MODULE"] + omp_compile
    # The C++ standard is left to torch (C++20 since torch 2.10; its headers refuse C++17).
    common = dict(
        name="apo_kernels._C",
        py_limited_api=True,  # no pybind11: one abi3 wheel serves every CPython >= 3.10
    )
    reason = cuda_skip_reason()
    if reason is not None and os.environ.get("APO_KERNELS_REQUIRE_CUDA", "0") == "1":
        raise RuntimeError(f"apo-kernels setup: APO_KERNELS_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if reason is not None:
        _log(f"building the CPU kernels only ({reason})")
        return [CppExtension(sources=CPU_SOURCES, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=omp_link, **common)]

    from torch.utils.cpp_extension import CUDAExtension

    # Arch list via the env var only: torch drops TORCH_CUDA_ARCH_LIST if any nvcc flag names an arch.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    _log(f"building CPU + CUDA kernels ({', '.join(CUDA_SOURCES)}) for "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [
        CUDAExtension(
            sources=CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_wheel_includes(),
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-DAPO_KERNELS_PYTHON_MODULE", "--expt-relaxed-constexpr"],
            },
            extra_link_args=omp_link,
            **common,
        )
    ]


setup(
    name="apo-kernels",
    version="0.1.0",
    description="Fused structured-preconditioner op (APO) for PyTorch: C++/CUDA/Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["apo_kernels", "apo_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-benchmark", "hypothesis", "numpy", "curvlinops-for-pytorch>=3.0,<4"],
        "bench": ["matplotlib", "rich", "pytest-benchmark", "pytorch-optimizer"],
        # python/reproduce.py: the paper's experiments (data generated or bundled, never downloaded)
        "paper": ["scikit-learn", "mnist1d", "matplotlib", "rich", "pytorch-optimizer"],
    },
    entry_points={"console_scripts": ["apo-bench = apo_kernels.bench.__main__:main"]},
    # Tag the wheel abi3 to match py_limited_api above (torch compiles with Py_LIMITED_API=3.10).
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
