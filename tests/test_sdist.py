"""The source distribution: built from this tree, installed into a fresh virtual environment, used.

The sdist is made with the CUDA kernels switched off (as on a CPU-only machine) and must still carry
every native source (.cu, .cuh, ...); the install into the fresh venv builds the C++ CPU kernels from
it (APO_KERNELS_SKIP_CUDA=1 keeps that short), and the installed package must load its native module,
report the cpu backend available, and compute with it. Nothing is downloaded: torch and the build
tools come from the running environment, and pip runs with --no-index.
"""
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE_SUFFIXES = {".h", ".cuh", ".cu", ".cpp"}

pytestmark = pytest.mark.slow  # ~1-2 min on 2 cores: one compile of csrc/ops.cpp


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, made through setuptools' PEP 517 hook (what pip and `python -m build` call) from a
    copy of the checkout's files, as from a fresh clone: in a working tree, setuptools would also
    add every file listed by an earlier build's *.egg-info/SOURCES.txt."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to tell the project's files from build outputs")
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    src = tmp_path_factory.mktemp("checkout")
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():  # listed but deleted in the working tree: not part of it
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, APO_KERNELS_SKIP_CUDA="1")
    proc = run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                "print(build_meta.build_sdist(sys.argv[1]))", str(out)], cwd=src, env=env)
    return out / proc.stdout.strip().splitlines()[-1]


def test_sdist_holds_every_native_source(sdist):
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    native = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in NATIVE_SUFFIXES}
    assert any(n.endswith(".cu") for n in native) and any(n.endswith(".cuh") for n in native)
    wanted = native | {"csrc/build_config.txt", "CMakeLists.txt", "README.md", "setup.py", "pyproject.toml",
                       "MANIFEST.in", "apo_kernels/__init__.py"}
    assert not wanted - names, f"missing from {top}: {sorted(wanted - names)}"
    built = [n for n in names if n.endswith((".so", ".pyd")) or n.endswith("_build_info.py")]
    assert not built, f"build outputs in the sdist: {built}"


def test_sdist_installs_into_fresh_venv(sdist, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # torch, setuptools and pip come from the running environment. `venv --system-site-packages`
    # would only reach the base interpreter's packages, not those of a venv we run in, so a .pth
    # file adds this interpreter's site-packages after the fresh venv's own.
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (purelib / "running_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    env = dict(os.environ, APO_KERNELS_SKIP_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               PATH=os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), os.environ["PATH"]]))
    env.pop("PYTHONPATH", None)
    run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", "--no-build-isolation",
         "--no-deps", "--ignore-installed", str(sdist)], cwd=tmp_path, env=env)

    check = """if True:
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import apo_kernels, apo_kernels._C
        import torch
        from apo_kernels.ops import reference
        g, a, s, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((5, 3), (5, 5), (5, 3), (3, 3)))
        y = apo_kernels.precondition(g, a, s, b, backend="cpu")
        print(json.dumps({
            "package": apo_kernels.__file__, "native": apo_kernels._C.__file__,
            "backends": apo_kernels.backends(),
            "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
            "error": (y - reference.precondition(g, a, s, b)).abs().max().item(),
        }))
    """
    out = json.loads(run([str(python), "-c", check], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    site_packages = str(purelib)
    assert out["package"].startswith(site_packages) and out["native"].startswith(site_packages), out
    assert out["backends"]["cpu"].startswith("available"), out["backends"]
    assert out["warnings"] == [], out["warnings"]
    assert out["error"] <= 1e-12, out["error"]
