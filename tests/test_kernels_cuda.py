"""CUDA kernels (pam.kernels.cuda) against the CPU kernels, bit for bit.

Runs under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1, as tox sets it) or on a GPU.
Kernels get NumPy int32 bit-pattern arrays (the simulator does not understand torch
tensors); results are compared as bit patterns, any NaN matching any NaN. Shapes stay small:
the simulator runs one OS thread per CUDA thread.

test_ptx_has_no_float_multiply compiles every kernel to PTX in a subprocess without the
simulator; it needs NVVM (numba-cuda[cu12]) and is skipped where NVVM is missing. Point
PAM_PTX_PYTHON at an interpreter that has numba-cuda[cu12] to run it here (torch is not
needed there).
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba_cuda",
                    reason="numba-cuda is not installed (pip install 'bdia-pam[cuda]')")

from numba import cuda  # noqa: E402

if not cuda.is_available():
    pytest.skip("no CUDA GPU and the CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 "
                "before numba is imported)", allow_module_level=True)

from pam import dispatch  # noqa: E402
from pam.kernels import cpu  # noqa: E402
from pam.kernels import cuda as K  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "testdata" / "pam_golden.npz"

BINARY = ["mul", "div", "mul_slope", "div_slope_num", "div_slope_den"]
UNARY = ["exp2", "log2", "exp2_slope", "log2_slope"]
OFFSETS = [0, dispatch.offset_constant(1.0552), dispatch.offset_constant(0.75)]

F32 = np.finfo(np.float32)
SPECIAL = np.array([
    0.0, -0.0, 1.0, -1.0, 2.0, -0.5, 1.5, -1.75, 3.0, 0.1, -7.3,
    F32.tiny, -F32.tiny, F32.tiny * 2, 1.17e-38,            # smallest normals
    1e-45, -1e-45, 5.9e-39, -1.1e-38,                        # subnormals (count as zero)
    F32.max, -F32.max, 3e38, 1.9e38, 1e-37, -2e-38, 2.0 ** -126, 2.0 ** 127, 2.0 ** -100,
    2.0 ** 64, 127.99, 128.0, -126.5, -149.0, -200.0, -201.0, 1e20, -1e-20,
    np.inf, -np.inf, np.nan, -np.nan,
], dtype=np.float32)


def bits(x):
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.int32)


def assert_same_bits(got, expected):
    """Bit patterns equal (got, expected: int32 or float32 arrays); any NaN matches any NaN."""
    got = np.asarray(got).view(np.float32)
    expected = np.asarray(expected).view(np.float32)
    assert got.shape == expected.shape
    same = (got.view(np.int32) == expected.view(np.int32)) | (np.isnan(got) & np.isnan(expected))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, (f"{bad.size} of {same.size} differ, first at {bad[:5]}: "
                           f"got {got.ravel()[bad[:5]]}, expected {expected.ravel()[bad[:5]]}")


def random_floats(rng, size):
    """Half random bit patterns (every class: NaN, inf, subnormal, huge, tiny), half normals."""
    raw = rng.integers(-2 ** 31, 2 ** 31, size=size // 2, dtype=np.int64).astype(np.int32)
    normal = (rng.standard_normal(size - size // 2)
              * np.ldexp(1.0, rng.integers(-20, 20, size - size // 2))).astype(np.float32)
    return np.concatenate([raw.view(np.float32), normal])


def mixed_matrix(rng, shape, special_fraction=0.1):
    """Random normals with a sprinkle of special values (zeros, subnormals, inf, NaN, huge)."""
    x = rng.standard_normal(shape).astype(np.float32)
    mask = rng.random(shape) < special_fraction
    x[mask] = rng.choice(SPECIAL, size=int(mask.sum()))
    return x


@pytest.fixture
def few_blocks(monkeypatch):
    """Launch at most 2 elementwise blocks, so each thread walks the grid-stride loop."""
    monkeypatch.setattr(K, "ELEMENTWISE_MAX_BLOCKS", 2)


# --------------------------------------------------------------------------- elementwise
def run_binary(backend, name, a, b, off):
    out = np.full(a.shape, 0x12345678, dtype=np.int32)
    getattr(backend, name)(a, b, off, out)
    return out


def run_unary(backend, name, x):
    out = np.full(x.shape, 0x12345678, dtype=np.int32)
    getattr(backend, name)(x, out)
    return out


@pytest.mark.parametrize("name", BINARY)
def test_binary_special_pairs(name, few_blocks):
    a, b = np.meshgrid(SPECIAL, SPECIAL, indexing="ij")
    a, b = bits(a.ravel()), bits(b.ravel())
    for off in OFFSETS:
        assert_same_bits(run_binary(K, name, a, b, off), run_binary(cpu, name, a, b, off))


@pytest.mark.parametrize("name", BINARY)
def test_binary_random(name, few_blocks):
    rng = np.random.default_rng(sum(map(ord, name)))
    a, b = bits(random_floats(rng, 1000)), bits(random_floats(rng, 1000)[::-1])
    for off in OFFSETS:
        assert_same_bits(run_binary(K, name, a, b, off), run_binary(cpu, name, a, b, off))


@pytest.mark.parametrize("name", UNARY)
def test_unary_special_and_random(name, few_blocks):
    rng = np.random.default_rng(sum(map(ord, name)))
    # exp2 is interesting in [-200, 128]; also cover every bit-pattern class.
    x = np.concatenate([SPECIAL, random_floats(rng, 500),
                        rng.uniform(-210, 130, 500).astype(np.float32),
                        np.arange(-160, 130, 0.75, dtype=np.float32)])
    assert_same_bits(run_unary(K, name, bits(x)), run_unary(cpu, name, bits(x)))


@pytest.mark.parametrize("name", BINARY)
def test_scalar_operand_kernels_match_cpu(name, few_blocks):
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    x = bits(random_floats(rng, 64))
    for sval in bits(SPECIAL[::9]):
        s = np.array([sval], np.int32)
        for off in OFFSETS[:2]:
            for sfx in ("_bs", "_as"):
                args = (x, s) if sfx == "_bs" else (s, x)
                got = np.full(x.shape, 0x12345678, np.int32)
                want = np.full(x.shape, 0x12345678, np.int32)
                getattr(K, name + sfx)(*args, off, got)
                getattr(cpu, name + sfx)(*args, off, want)
                assert_same_bits(got, want)


def test_elementwise_one_block_per_element():
    """Default launch (no grid-stride repetition), size not a multiple of the block."""
    rng = np.random.default_rng(1)
    a, b = bits(random_floats(rng, 300)), bits(random_floats(rng, 300))
    assert_same_bits(run_binary(K, "mul", a, b, 0), run_binary(cpu, "mul", a, b, 0))
    assert_same_bits(run_unary(K, "exp2", a[:1]), run_unary(cpu, "exp2", a[:1]))


def test_elementwise_empty_is_a_no_op():
    empty = np.empty(0, np.int32)
    K.mul(empty, empty, 0, empty)
    K.log2(empty, empty)


@pytest.mark.skipif(not GOLDEN.exists(), reason=f"{GOLDEN} not present")
def test_golden_elementwise(few_blocks):
    g = np.load(GOLDEN)
    a, b = bits(g["a"]), bits(g["b"])
    assert_same_bits(run_binary(K, "mul", a, b, 0), g["mul"])
    assert_same_bits(run_binary(K, "div", a, b, 0), g["div"])
    assert_same_bits(run_binary(K, "mul", a, b, dispatch.offset_constant(1.0552)),
                     g["mul_offset_1_0552"])
    assert_same_bits(run_unary(K, "log2", bits(g["log2_x"])), g["log2"])
    y = g["exp2_y"]
    got = run_unary(K, "exp2", bits(y)).view(np.float32)
    # The golden generator returns 0 for finite y >= 2^31 (its integer floor overflows),
    # against its own README; pam returns +inf there (see tests/test_golden.py).
    quirk = np.isfinite(y) & (y >= 2.0 ** 31)
    assert_same_bits(got[~quirk], g["exp2"][~quirk])
    assert np.all(np.isposinf(got[quirk]))


# --------------------------------------------------------------------------- matmul
def run_matmul(backend, a, b, off):
    P, n, _ = a.shape
    out = np.full((P, n, b.shape[2]), np.nan, dtype=np.float32)
    backend.matmul(bits(a), bits(b), off, out)
    return out


# (P, n, k, m): not multiples of the tile, exact multiples, degenerate and k == 0.
MATMUL_SHAPES = [(1, 1, 1, 1), (2, 17, 33, 5), (1, 37, 53, 29), (1, 16, 32, 16),
                 (3, 5, 1, 18), (1, 4, 0, 3)]


@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_random(shape):
    P, n, k, m = shape
    rng = np.random.default_rng(n * 1000 + k * 10 + m)
    a = rng.standard_normal((P, n, k)).astype(np.float32)
    b = rng.standard_normal((P, k, m)).astype(np.float32)
    got = run_matmul(K, a, b, 0)
    assert_same_bits(got, run_matmul(cpu, a, b, 0))
    if k == 0:
        assert not got.any()


def test_matmul_special_values_and_offset():
    rng = np.random.default_rng(7)
    a = mixed_matrix(rng, (2, 13, 21))
    b = mixed_matrix(rng, (2, 21, 18))
    for off in OFFSETS[:2]:
        got = run_matmul(K, a, b, off)
        assert_same_bits(got, run_matmul(cpu, a, b, off))
    assert np.isnan(got).any() and np.isfinite(got).any()   # the cases were exercised


def test_matmul_accumulates_in_increasing_k_order():
    """1e8 + 1 - 1e8 ... : a different summation order would give a different float32 sum."""
    k = 20
    a = np.ones((1, 1, k), np.float32)
    b = np.ones((1, k, 1), np.float32)
    b[0, 0, 0] = 1e8
    b[0, 1:, 0] = 1.0
    b[0, -1, 0] = -1e8
    # Sequential float32: 1e8 + 1 + ... stays 1e8 (each +1 is lost), then -1e8 gives 0.
    assert run_matmul(K, a, b, 0)[0, 0, 0] == 0.0
    assert run_matmul(cpu, a, b, 0)[0, 0, 0] == 0.0


def test_matmul_batch_grid_stride(monkeypatch):
    """More batches than blocks along z: each block walks several batches."""
    monkeypatch.setattr(K, "_MAX_GRID_YZ", 2)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 3, 7)).astype(np.float32)
    b = rng.standard_normal((5, 7, 4)).astype(np.float32)
    assert_same_bits(run_matmul(K, a, b, 0), run_matmul(cpu, a, b, 0))


@pytest.mark.skipif(not GOLDEN.exists(), reason=f"{GOLDEN} not present")
def test_golden_matmul():
    g = np.load(GOLDEN)
    got = run_matmul(K, g["mat_a"][None], g["mat_b"][None], 0)[0]
    assert_same_bits(got, g["matmul"])


# --------------------------------------------------------------------------- exact backward
def run_grads(backend, a, b, grad, off):
    """(grad w.r.t. a, grad w.r.t. b) of matmul(a, b), via the exact-backward kernels."""
    ga = np.full(a.shape, np.nan, dtype=np.float32)
    gb = np.full(b.shape, np.nan, dtype=np.float32)
    bt = np.ascontiguousarray(b.transpose(0, 2, 1))
    at = np.ascontiguousarray(a.transpose(0, 2, 1))
    backend.matmul_exact_grad_left(bits(a), bits(bt), bits(grad), off, ga)
    backend.matmul_exact_grad_right(bits(at), bits(b), bits(grad), off, gb)
    return ga, gb


@pytest.mark.parametrize("shape,special,offsets", [
    ((1, 1, 1, 1), 0.0, OFFSETS), ((2, 17, 33, 5), 0.0, OFFSETS[:1]),
    ((1, 19, 20, 21), 0.15, OFFSETS[1:2]), ((2, 6, 17, 3), 0.3, OFFSETS[:2])],
    ids=["1x1x1x1", "2x17x33x5", "1x19x20x21-special", "2x6x17x3-special"])
def test_exact_backward(shape, special, offsets):
    P, n, k, m = shape
    rng = np.random.default_rng(n + k + m)
    a = mixed_matrix(rng, (P, n, k), special)
    b = mixed_matrix(rng, (P, k, m), special)
    grad = mixed_matrix(rng, (P, n, m), special)
    for off in offsets:
        got_a, got_b = run_grads(K, a, b, grad, off)
        want_a, want_b = run_grads(cpu, a, b, grad, off)
        assert_same_bits(got_a, want_a)
        assert_same_bits(got_b, want_b)


def test_exact_backward_matches_definition():
    """Small case against the formula written out with the pam.bits scalar functions."""
    from pam import bits as B
    rng = np.random.default_rng(11)
    a = rng.standard_normal((1, 3, 4)).astype(np.float32)
    b = rng.standard_normal((1, 4, 5)).astype(np.float32)
    grad = rng.standard_normal((1, 3, 5)).astype(np.float32)
    got_a, got_b = run_grads(K, a, b, grad, 0)
    ia, ib, ig = bits(a)[0], bits(b)[0], bits(grad)[0]
    for i in range(3):
        for t in range(4):
            acc = np.float32(0.0)
            for j in range(5):
                slope = B.mul_slope_bits(ia[i, t], ib[t, j], 0)
                acc = np.float32(acc + B.bits_to_f32(B.mul_bits(ig[i, j], slope, 0)))
            assert got_a[0, i, t].view(np.int32) == np.float32(acc).view(np.int32)
    for t in range(4):
        for j in range(5):
            acc = np.float32(0.0)
            for i in range(3):
                slope = B.mul_slope_bits(ib[t, j], ia[i, t], 0)
                acc = np.float32(acc + B.bits_to_f32(B.mul_bits(ig[i, j], slope, 0)))
            assert got_b[0, t, j].view(np.int32) == np.float32(acc).view(np.int32)


# --------------------------------------------------------------------------- argument errors
def test_errors_name_the_argument():
    x = np.zeros(4, np.int32)
    with pytest.raises(TypeError, match=r"\bb must have dtype int32"):
        K.mul(x, np.zeros(4, np.float32), 0, x)
    with pytest.raises(ValueError, match="a, b and out must have one shape"):
        K.mul(x, x, 0, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"\bx must be 1-D"):
        K.exp2(np.zeros((2, 2), np.int32), x)
    with pytest.raises(TypeError, match=r"\ba must be a torch CUDA tensor or a NumPy array"):
        K.mul([0, 0, 0, 0], x, 0, x)
    with pytest.raises(ValueError, match=r"\bout must be C-contiguous"):
        K.log2(x, np.zeros(8, np.int32)[::2])
    a3 = np.zeros((1, 2, 3), np.int32)
    with pytest.raises(TypeError, match=r"\bout must have dtype float32"):
        K.matmul(a3, np.zeros((1, 3, 4), np.int32), 0, np.zeros((1, 2, 4), np.int32))
    with pytest.raises(ValueError, match=r"matmul expects a \(P, n, k\)"):
        K.matmul(a3, np.zeros((1, 2, 4), np.int32), 0, np.zeros((1, 2, 4), np.float32))
    with pytest.raises(ValueError, match="matmul_exact_grad_left expects"):
        K.matmul_exact_grad_left(a3, np.zeros((1, 4, 2), np.int32), np.zeros((1, 2, 4), np.int32),
                                 0, np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="matmul_exact_grad_right expects"):
        K.matmul_exact_grad_right(np.zeros((1, 3, 2), np.int32), np.zeros((1, 3, 4), np.int32),
                                  np.zeros((1, 3, 4), np.int32), 0,
                                  np.zeros((1, 3, 4), np.float32))


def test_cpu_torch_tensor_is_rejected():
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\ba must be a CUDA tensor"):
        K.mul(t, t, 0, t)


def test_same_names_as_cpu_backend():
    for name in BINARY + UNARY + ["matmul", "matmul_exact_grad_left", "matmul_exact_grad_right"]:
        assert callable(getattr(K, name))
        assert name in K.KERNEL_FUNCTIONS


def test_without_numba_cuda_import_works_and_launch_explains():
    """Importing needs no numba-cuda; using a kernel without it names the extra to install."""
    script = textwrap.dedent("""
        import sys
        sys.modules["numba_cuda"] = None       # as if numba-cuda were not installed
        import numpy as np
        from pam.kernels import cuda as K
        assert not K.available()
        x = np.zeros(3, np.int32)
        try:
            K.mul(x, x, 0, x)
        except ImportError as e:
            assert "bdia-pam[cuda]" in str(e), e
            print("RAISED")
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "RAISED" in proc.stdout, proc.stdout + proc.stderr[-3000:]


# --------------------------------------------------------------------------- PTX
PTX_SCRIPT = textwrap.dedent(r"""
    import importlib.util, json, re, sys, types
    root = sys.argv[1]
    # Load pam.bits and pam.kernels.cuda without pam/__init__ (which imports torch).
    for name, path in [("pam", "pam"), ("pam.kernels", "pam/kernels")]:
        mod = types.ModuleType(name)
        mod.__path__ = [f"{root}/{path}"]
        sys.modules[name] = mod
    from numba import cuda, types as nt
    if not cuda.is_available():
        # compile_ptx asks the current device for its compute capability when it compiles
        # the called device functions; without a GPU, answer for an sm_90 (H100).
        import numba.cuda.dispatcher as D
        D.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    try:
        cuda.compile_ptx(lambda x: None, (nt.int32[::1],), cc=(9, 0))
    except Exception as e:
        print(f"NVVM unavailable: {type(e).__name__}: {e}")
        sys.exit(77)
    from pam.kernels import cuda as K
    i1, i3 = nt.int32[::1], nt.int32[:, :, ::1]
    f3, off = nt.float32[:, :, ::1], nt.int64
    sigs = {n: (i1, i1, off, i1) for n in
            ["mul", "div", "mul_slope", "div_slope_num", "div_slope_den"]}
    sigs.update({n: (i1, i1) for n in ["exp2", "log2", "exp2_slope", "log2_slope"]})
    sigs.update({n + sfx: (i1, i1, off, i1) for n in
                 ["mul", "div", "mul_slope", "div_slope_num", "div_slope_den"]
                 for sfx in ("_bs", "_as")})
    sigs.update(getattr(K, "PTX_SIGNATURES", lambda nt: {})(nt))
    sigs["matmul"] = (i3, i3, off, f3)
    sigs["matmul_exact_grad_left"] = sigs["matmul_exact_grad_right"] = (i3, i3, i3, off, f3)
    report = {}
    for name, sig in sigs.items():
        try:
            ptx, _ = cuda.compile_ptx(K.KERNEL_FUNCTIONS[name], sig, cc=(9, 0))
        except Exception as e:
            report[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            continue
        ops = sorted(set(re.findall(r"\b(?:mul|div|fma|mad|rcp|add)\.[a-z0-9.]*f(?:32|64)\b", ptx)))
        report[name] = {"float_ops": ops, "calls": ptx.count("call.uni")}
    print("REPORT" + json.dumps(report))
""")


@pytest.mark.slow
def test_ptx_has_no_float_multiply():
    """Every kernel compiles to PTX for sm_90 with no float mul/div/fma (needs NVVM)."""
    python = os.environ.get("PAM_PTX_PYTHON", sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([python, "-c", PTX_SCRIPT, str(ROOT)], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip().splitlines()[-1][:300])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    report = json.loads(line[len("REPORT"):])
    assert sorted(report) == sorted(K.KERNEL_FUNCTIONS)
    for name, r in report.items():
        assert "error" not in r, f"{name} does not compile: {r['error']}"
        bad = [op for op in r["float_ops"] if not op.startswith("add.")]
        assert not bad, f"{name} emits float multiply/divide/fma: {bad}"
    # The reductions accumulate with float adds: the regular expression does see float ops.
    for name in ["matmul", "matmul_exact_grad_left", "matmul_exact_grad_right"]:
        assert any(op.startswith("add.") for op in report[name]["float_ops"]), report[name]
