"""Things specific to the compiled module apo_kernels._C (the public API is tested in test_op.py).

Calls torch.ops.apo.* directly, below the Python dispatch layer: the op schemas, masked outputs,
the grouped op's parallel path and its schedule, dtypes, strided inputs, zero-size dims. Also the
build's record of the torch it was built against, and what importing under another torch does.
"""
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from apo_kernels import _native_build
from apo_kernels.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]

try:
    importlib.import_module("apo_kernels._C")
    NATIVE_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    NATIVE_ERROR = str(exc)

needs_native = pytest.mark.skipif(NATIVE_ERROR is not None, reason=f"apo_kernels._C not built: {NATIVE_ERROR}")

op = torch.ops.apo if NATIVE_ERROR is None else None
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
MASKS = [(True, True, True, True), (False, True, True, True), (True, False, False, False),
         (False, False, True, False), (False, False, False, False)]


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def make_layer(m, n, batch=(), dtype=torch.float64, transposed=False, gen=None):
    """(dY, G, A, S, B) in `dtype` plus the float64 copies the oracle uses (same rounding)."""
    def r(rows, cols):
        if transposed:  # stored transposed: the kernel sees strided views
            return torch.randn(*batch, cols, rows, dtype=torch.float64, generator=gen).mT
        return torch.randn(*batch, rows, cols, dtype=torch.float64, generator=gen)
    xs = [r(m, n), r(m, n), r(m, m) / max(m, 1) ** 0.5, r(m, n), r(n, n) / max(n, 1) ** 0.5]
    xs = [x.to(dtype) for x in xs]
    return xs, [x.double() for x in xs]


@needs_native
def test_schemas_match_contract():
    schemas = {name: str(getattr(op, name).default._schema) for name in (
        "precondition", "precondition_backward", "precondition_grouped", "precondition_grouped_backward")}
    # A or B None: an identity factor
    assert schemas["precondition"] == "apo::precondition(Tensor grad, Tensor? A, Tensor S, Tensor? B) -> Tensor"
    assert schemas["precondition_backward"] == (
        "apo::precondition_backward(Tensor grad_out, Tensor grad, Tensor? A, Tensor S, Tensor? B, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)")
    assert schemas["precondition_grouped"] == (
        "apo::precondition_grouped(Tensor[] grads, Tensor?[] As, Tensor[] Ss, Tensor?[] Bs) -> Tensor[]")
    assert schemas["precondition_grouped_backward"] == (
        "apo::precondition_grouped_backward(Tensor[] grad_outs, Tensor[] grads, Tensor?[] As, "
        "Tensor[] Ss, Tensor?[] Bs, bool[4] output_mask) -> (Tensor[], Tensor[], Tensor[], Tensor[])")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("apo::precondition", "CPU")


@needs_native
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (17, 129), (3, 5, 9)], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["contig", "transposed"])
def test_single_op_matches_reference(shape, dtype, transposed):
    *batch, m, n = shape
    (dy, g, a, s, b), (dy64, g64, a64, s64, b64) = make_layer(m, n, tuple(batch), dtype, transposed)
    tol = TOL[dtype]
    y = op.precondition(g, a, s, b)
    assert y.dtype == dtype and y.shape == g.shape and y.is_contiguous()
    assert rel_err(y, ref.precondition(g64, a64, s64, b64)) <= tol
    want = ref.precondition_backward(dy64, g64, a64, s64, b64)
    got = op.precondition_backward(dy, g, a, s, b, [True] * 4)
    for k in range(4):
        assert got[k].dtype == dtype and got[k].shape == want[k].shape and got[k].is_contiguous()
        assert rel_err(got[k], want[k]) <= tol, ("dG", "dA", "dS", "dB")[k]


@needs_native
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_masked_outputs_are_empty(mask):
    (dy, g, a, s, b), x64 = make_layer(6, 4, dtype=torch.float32)
    want = ref.precondition_backward(*x64, mask)
    got = op.precondition_backward(dy, g, a, s, b, list(mask))
    for k in range(4):
        if mask[k]:
            assert rel_err(got[k], want[k]) <= 1e-5
        else:  # contract: masked off = empty (0,) tensor of the same dtype/device, not undefined
            assert got[k].shape == (0,) and got[k].dtype == g.dtype
    layers = [make_layer(m, n, dtype=torch.float32)[0] for m, n in [(3, 5), (8, 2)]]
    dys, gs, as_, ss, bs = map(list, zip(*layers))
    lists = op.precondition_grouped_backward(dys, gs, as_, ss, bs, list(mask))
    for k in range(4):
        assert len(lists[k]) == (2 if mask[k] else 0)


@needs_native
@pytest.mark.parametrize("m,n,batch", [(0, 5, ()), (5, 0, ()), (0, 0, ()), (3, 4, (0,))], ids=str)
def test_zero_size_dims(m, n, batch):
    (dy, g, a, s, b), _ = make_layer(m, n, batch, torch.float32)
    assert op.precondition(g, a, s, b).shape == g.shape
    dg, da, ds, db = op.precondition_backward(dy, g, a, s, b, [True] * 4)
    assert (dg.shape, da.shape, ds.shape, db.shape) == (g.shape, a.shape, s.shape, b.shape)
    for t in (da, db):  # a zero-size contraction must give zeros, not garbage
        assert not t.any()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_parallel_path(dtype):
    """Enough layers of uneven sizes (and one above the 'big layer' threshold) to exercise the
    largest-first dynamic schedule across threads; results must land at the right index."""
    gen = torch.Generator().manual_seed(0)
    sizes = [(1, 1), (7, 1), (300, 600), (64, 64)] + [
        tuple(torch.randint(2, 70, (2,), generator=gen).tolist()) for _ in range(24)]
    layers = [make_layer(m, n, dtype=dtype, transposed=i % 3 == 0, gen=gen) for i, (m, n) in enumerate(sizes)]
    dys, gs, as_, ss, bs = map(list, zip(*(x for x, _ in layers)))
    d64, g64, a64, s64, b64 = map(list, zip(*(x64 for _, x64 in layers)))
    tol = TOL[dtype]
    ys = op.precondition_grouped(gs, as_, ss, bs)
    for y, want in zip(ys, ref.precondition_grouped(g64, a64, s64, b64), strict=True):
        assert y.shape == want.shape and rel_err(y, want) <= tol
    mask = (False, True, True, True)
    got = op.precondition_grouped_backward(dys, gs, as_, ss, bs, list(mask))
    want = ref.precondition_grouped_backward(d64, g64, a64, s64, b64, mask)
    assert got[0] == []
    for k in (1, 2, 3):
        for x, w in zip(got[k], want[k], strict=True):
            assert x.shape == w.shape and rel_err(x, w) <= tol


@needs_native
def test_grouped_single_thread_matches_parallel():
    layers = [make_layer(m, 9, dtype=torch.float32)[0][1:] for m in range(1, 20)]
    gs, as_, ss, bs = map(list, zip(*layers))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = op.precondition_grouped(gs, as_, ss, bs)
    finally:
        torch.set_num_threads(threads)
    parallel = op.precondition_grouped(gs, as_, ss, bs)
    for x, y in zip(serial, parallel, strict=True):
        torch.testing.assert_close(x, y)


@needs_native
def test_kernel_internals_record_no_graph():
    # Called below autograd, as the Python layer does. The grouped op's worker threads do not
    # inherit that TLS, so the kernel must exclude autograd itself or its GEMMs record a graph.
    layers = [make_layer(m, 5, dtype=torch.float32)[0][1:] for m in range(1, 17)]
    gs, as_, ss, bs = map(list, zip(*layers))
    for a in as_:
        a.requires_grad_()
    with torch._C._AutoDispatchBelowAutograd():
        ys = op.precondition_grouped(gs, as_, ss, bs)
        y = op.precondition(gs[0], as_[0], ss[0], bs[0])
    assert all(t.grad_fn is None and not t.requires_grad for t in ys + [y])


# ------------------------------------------------------------------------------------------------
# the torch version the build recorded, and importing under another torch
# ------------------------------------------------------------------------------------------------
REINSTALL = "pip install --no-build-isolation -e ."


@pytest.fixture
def recorded_torch(monkeypatch):
    """Sets the torch version the build recorded (apo_kernels._build_info.TORCH_VERSION)."""
    def record(version):
        info = types.ModuleType("apo_kernels._build_info")
        if version is not None:
            info.TORCH_VERSION = version
        monkeypatch.setitem(sys.modules, "apo_kernels._build_info", info)
    return record


@needs_native
def test_build_records_the_running_torch():
    """setup.py wrote _build_info.py beside _C, with the torch this test runs under."""
    assert _native_build.built_against_torch() == str(torch.__version__)


def test_other_torch_warns_with_both_versions(recorded_torch):
    recorded_torch("0.0.1+elsewhere")
    with pytest.warns(RuntimeWarning) as caught:
        reason = _native_build.check_torch_version(REINSTALL)
    message = str(caught[0].message)
    for text in ("torch 0.0.1+elsewhere", f"torch {torch.__version__} is running", REINSTALL):
        assert text in reason and text in message


@pytest.mark.parametrize("version", [str(torch.__version__), None], ids=["same-torch", "nothing-recorded"])
def test_same_or_unrecorded_torch_is_quiet(recorded_torch, recwarn, version):
    recorded_torch(version)
    assert _native_build.check_torch_version(REINSTALL) is None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_import_under_other_torch_reports_the_reason():
    """A fresh interpreter whose build record names another torch: importing apo_kernels warns once,
    does not load _C, and backends() gives the reason for cpu (and cuda, with a CUDA torch)."""
    script = """if True:
        import json, sys, types, warnings
        info = types.ModuleType("apo_kernels._build_info")
        info.TORCH_VERSION = "0.0.1+elsewhere"
        sys.modules["apo_kernels._build_info"] = info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import apo_kernels
        print(json.dumps({"warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                          "backends": apo_kernels.backends(), "loaded": "apo_kernels._C" in sys.modules}))
    """
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and "torch 0.0.1+elsewhere" in out["warnings"][0], out["warnings"]
    assert not out["loaded"]
    devices = ["cpu"] + (["cuda"] if torch.version.cuda is not None else [])
    for name in devices:
        status = out["backends"][name]
        assert status.startswith("unavailable") and "torch 0.0.1+elsewhere" in status and REINSTALL in status, status
    assert out["backends"]["reference"].startswith("available")


# ------------------------------------------------------------------------------------------------
# setup.py: the toolkit of an nvcc wrapper
# ------------------------------------------------------------------------------------------------


def _fake_toolkit(root: Path) -> Path:
    """A toolkit with the header setup.py looks for and an nvcc that, like the real one, prints
    `_HERE_=<its own bin dir>` for --dryrun."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\necho "#\\$ _HERE_=$(dirname "$(readlink -f "$0")")" >&2\n')
    nvcc.chmod(0o755)
    return root


@pytest.mark.skipif(torch.version.cuda is None, reason="setup.py looks for a CUDA toolkit only with a CUDA torch")
@pytest.mark.parametrize("layout", ["wrapper-script", "symlink", "real-toolkit", "user-cuda-home"])
def test_setup_cuda_home_only_where_torch_would_guess_wrong(tmp_path, layout):
    """torch takes CUDA_HOME = dirname(dirname(which nvcc)). setup.py sets CUDA_HOME only where that
    dir has no CUDA headers (a wrapper script, a symlink from elsewhere) and the nvcc that runs knows
    the toolkit; a real toolkit on PATH or a user's CUDA_HOME is left alone."""
    toolkit = _fake_toolkit(tmp_path / "cuda-99.0")
    elsewhere = tmp_path / "usr" / "bin"
    elsewhere.mkdir(parents=True)
    if layout == "wrapper-script":
        (elsewhere / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
        (elsewhere / "nvcc").chmod(0o755)
    elif layout == "symlink":
        (elsewhere / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "APO_KERNELS_SKIP_CUDA")}
    on_path = toolkit / "bin" if layout == "real-toolkit" else elsewhere
    env["PATH"] = f"{on_path}{os.pathsep}{env.get('PATH', '')}"
    if layout == "user-cuda-home":
        env["CUDA_HOME"] = str(toolkit)
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    overridden = f"using CUDA_HOME={toolkit}" in proc.stderr
    assert overridden == (layout in ("wrapper-script", "symlink")), proc.stderr[-3000:]
