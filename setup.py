"""Build of apo-kernels' native module `apo_kernels._C` (CPU always, CUDA when possible).

    pip install --no-build-isolation -e ".[test]"     # torch must already be installed

Sources, compile flags, include dirs and the default GPU archs are in csrc/build_config.txt, which
CMakeLists.txt reads too. Each build also writes apo_kernels/_build_info.py (the torch version it was
built against) next to the module, so that importing it under another torch warns instead of failing.

Build environment variables:
    APO_KERNELS_SKIP_CUDA=1   build the CPU kernels only, even with a CUDA torch and nvcc present
    APO_KERNELS_REQUIRE_CUDA=1  fail instead of falling back to a CPU-only build (GPU machines, CI)
    TORCH_CUDA_ARCH_LIST      CUDA archs to compile for (default: cuda_arch_list in csrc/build_config.txt)
    CUDA_HOME                 CUDA toolkit to use (otherwise the one of nvcc on PATH)
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
BUILD_CONFIG = "csrc/build_config.txt"
BUILD_INFO = "_build_info.py"  # written next to apo_kernels._C by every build (git-ignored)


def _log(msg: str) -> None:
    print(f"apo-kernels setup: {msg}", file=sys.stderr)


def read_build_config(path: str = os.path.join(ROOT, BUILD_CONFIG)) -> dict[str, list[str]]:
    """`key = value ...` lines of csrc/build_config.txt as {key: [values]}."""
    config = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip().isidentifier():
                raise ValueError(f"{path}:{number}: expected `key = value ...`, got {line!r}")
            config[key.strip()] = value.split()
    return config


CONFIG = read_build_config()


def sources(key: str) -> list[str]:
    """The files of a source list of the build config, expanded from its globs. Relative to ROOT:
    setuptools rejects absolute paths in an editable build's SOURCES.txt."""
    return sorted({path for pattern in CONFIG[key] for path in glob.glob(pattern, root_dir=ROOT)})


CPU_SOURCES = sources("cpu_sources")
CUDA_SOURCES = sources("cuda_sources")


def _has_cuda_headers(toolkit: str) -> bool:
    return os.path.exists(os.path.join(toolkit, "include", "cuda_runtime.h"))


def _resolve_cuda_home() -> None:
    """Set CUDA_HOME when torch's own guess of the toolkit would be wrong: nvcc on PATH is a wrapper.

    Without CUDA_HOME/CUDA_PATH, torch takes the toolkit to be dirname(dirname(which nvcc)). For a
    wrapper script such as /usr/local/bin/nvcc (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) that is
    /usr/local, which has no CUDA headers, so the build cannot succeed. Only then is nvcc asked where
    it really lives (`--dryrun` prints `_HERE_=<toolkit>/bin` for the binary that actually runs), and
    CUDA_HOME is set to that toolkit if it has the headers. A user's CUDA_HOME/CUDA_PATH, or an nvcc
    whose toolkit torch finds by itself, is left alone. Must run before torch.utils.cpp_extension is
    imported, which reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or _has_cuda_headers(os.path.dirname(os.path.dirname(nvcc))):
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ _HERE_="):
            toolkit = os.path.dirname(line.split("=", 1)[1].strip())
            if _has_cuda_headers(toolkit):
                _log(f"nvcc on PATH ({nvcc}) runs {toolkit}/bin/nvcc; using CUDA_HOME={toolkit}")
                os.environ["CUDA_HOME"] = toolkit
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
        return f"no CUDA sources ({' '.join(CONFIG['cuda_sources'])})"
    return None


def nvidia_wheel_includes() -> list[str]:
    """The nvidia_include_dirs of the build config that exist in the installed nvidia-* wheels."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    site_dirs = {os.path.dirname(p) for p in spec.submodule_search_locations}
    patterns = [p.replace("{cuda_major}", major) for p in CONFIG["nvidia_include_dirs"]]
    return sorted(d for site in site_dirs for p in patterns for d in glob.glob(os.path.join(site, p)))


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
    # APO_KERNELS_PYTHON_MODULE: the Python module init of csrc/ops.cpp, which the CMake build leaves out.
    # The C++ standard is left to torch (C++20 since torch 2.10; its headers refuse C++17).
    cxx_flags = CONFIG["cxx_flags"] + ["-DAPO_KERNELS_PYTHON_MODULE"] + omp_compile
    common = dict(
        name="apo_kernels._C",
        include_dirs=[os.path.join(ROOT, d) for d in CONFIG["include_dirs"]],
        extra_link_args=omp_link,
        py_limited_api=True,  # no pybind11: one abi3 wheel serves every CPython >= 3.10
    )
    reason = cuda_skip_reason()
    if reason is not None and os.environ.get("APO_KERNELS_REQUIRE_CUDA", "0") == "1":
        raise RuntimeError(f"apo-kernels setup: APO_KERNELS_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if reason is not None:
        _log(f"building the CPU kernels only ({reason})")
        return [CppExtension(sources=CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}, **common)]

    from torch.utils.cpp_extension import CUDAExtension

    # Arch list via the env var only: torch drops TORCH_CUDA_ARCH_LIST if any nvcc flag names an arch.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", " ".join(CONFIG["cuda_arch_list"]))
    _log(f"building CPU + CUDA kernels ({', '.join(CUDA_SOURCES)}) for "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    common["include_dirs"] += nvidia_wheel_includes()
    return [
        CUDAExtension(
            sources=CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags, "nvcc": CONFIG["nvcc_flags"] + ["-DAPO_KERNELS_PYTHON_MODULE"]},
            **common,
        )
    ]


class BuildExtensionRecordingTorch(BuildExtension.with_options(use_ninja=True)):
    """BuildExtension that also writes apo_kernels/_build_info.py next to the built module: the torch
    version it was compiled against, which apo_kernels compares with the running torch at import."""

    def run(self):
        super().run()
        path = self._build_info_path()
        self.mkpath(os.path.dirname(path))
        with open(path, "w", encoding="utf-8") as f:
            f.write("# Written by setup.py when it built apo_kernels._C (not in version control).\n"
                    f"TORCH_VERSION = {str(torch.__version__)!r}\n")

    def get_outputs(self):
        return super().get_outputs() + [self._build_info_path()]

    def _build_info_path(self) -> str:
        # Beside _C: the source tree for --inplace and editable installs, else build_lib.
        return os.path.join(os.path.dirname(self.get_ext_fullpath("apo_kernels._C")), BUILD_INFO)


setup(
    name="apo-kernels",
    version="0.1.0",
    description="Fused structured-preconditioner op (APO) for PyTorch: C++/CUDA/Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["apo_kernels", "apo_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionRecordingTorch},
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
