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


def fast_tiles(tx, ty, tm, tn):
    """The FAST_* constants of pam.kernels.cuda for a tx x ty thread block of tm x tn outputs."""
    threads = tx * ty
    c = dict(FAST_TX=tx, FAST_TY=ty, FAST_TM=tm, FAST_TN=tn, FAST_BM=ty * tm, FAST_BN=tx * tn,
             FAST_THREADS=threads, FAST_BM_PADDED=ty * tm + K.FAST_PAD,
             _FAST_R_LOADS=ty * tm * K.FAST_BK // threads,
             _FAST_C_LOADS=K.FAST_BK * tx * tn // threads,
             _FAST_R_STRIDE=threads // K.FAST_BK, _FAST_C_STRIDE=threads // (tx * tn))
    assert threads % K.FAST_BK == 0 and threads % c["FAST_BN"] == 0
    assert c["FAST_BM"] * K.FAST_BK % threads == 0
    return c


PRODUCTION_TILES = {name: getattr(K, name) for name in fast_tiles(16, 16, 8, 8)}
assert PRODUCTION_TILES == fast_tiles(K.FAST_TX, K.FAST_TY, K.FAST_TM, K.FAST_TN)


@pytest.fixture(autouse=True)
def small_fast_tiles(monkeypatch):
    """Fast matmul kernels with 8 x 2 threads of 3 x 1 outputs (6 x 8 output tiles).

    The simulator runs one OS thread per CUDA thread and reads the module's constants when
    a kernel runs: small blocks keep tests fast and make every shape span several tiles.
    test_fast_paths_production_tiles runs the production configuration.
    """
    for name, value in fast_tiles(8, 2, 3, 1).items():
        monkeypatch.setattr(K, name, value)
    monkeypatch.setattr(K, "RANGE_STATS_THREADS", 8)


@pytest.fixture
def production_tiles(monkeypatch):
    for name, value in PRODUCTION_TILES.items():
        monkeypatch.setattr(K, name, value)


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
MATMUL_SHAPES = [(1, 1, 1, 1), (2, 17, 13, 5), (1, 21, 19, 23), (1, 16, 32, 16),
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
    a = mixed_matrix(rng, (2, 9, 17))
    b = mixed_matrix(rng, (2, 17, 18))
    for off in OFFSETS[1:2]:
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
    """The first rows of the golden product (rows are independent: a row of the output
    needs only its row of a, so the slice keeps every bit; its 29 columns span two tiles)."""
    g = np.load(GOLDEN)
    rows = 8
    got = run_matmul(K, np.ascontiguousarray(g["mat_a"][None, :rows]), g["mat_b"][None], 0)[0]
    assert_same_bits(got, g["matmul"][:rows])


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
    ((1, 1, 1, 1), 0.0, OFFSETS), ((1, 17, 19, 5), 0.0, OFFSETS[:1]),
    ((1, 19, 9, 17), 0.15, OFFSETS[1:2]), ((2, 6, 17, 3), 0.3, OFFSETS[1:2])],
    ids=["1x1x1x1", "1x17x19x5", "1x19x9x17-special", "2x6x17x3-special"])
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


# --------------------------------------------------------------------------- fast paths
@pytest.fixture
def chosen_paths(monkeypatch):
    """Records the kernel each reduction call runs: a fast kernel's name, or None (general)."""
    paths = []
    real = K._fast_path

    def spy(name, flat, off, stream):
        paths.append(real(name, flat, off, stream))
        return paths[-1]
    monkeypatch.setattr(K, "_fast_path", spy)
    return paths


def relu_like(rng, shape, scale_exp=6):
    """Normals times powers of two, about half of them +0 (ReLU outputs), a few -0 and
    subnormals (which count as zero)."""
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-scale_exp, scale_exp, shape))
         ).astype(np.float32)
    x[rng.random(shape) < 0.45] = 0.0
    x[rng.random(shape) < 0.05] = -0.0
    x[rng.random(shape) < 0.05] = np.float32(3e-39) * np.float32(rng.choice([-1, 1]))
    return x


def normals(rng, shape, scale_exp=6):
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-scale_exp, scale_exp, shape))
            ).astype(np.float32)


def all_three(a, b, grad, off):
    """(matmul, grad w.r.t. a, grad w.r.t. b) on CUDA and on the CPU: six arrays."""
    return (run_matmul(K, a, b, off), *run_grads(K, a, b, grad, off),
            run_matmul(cpu, a, b, off), *run_grads(cpu, a, b, grad, off))


# (P, n, k, m, offset index) against 6 x 8 output tiles and 8-deep reduction steps: partial
# tiles in every dimension, a reduction that is only a tail (k < 8), only full steps
# (k = 16), and both.
FAST_SHAPES = [(1, 13, 11, 9, 0), (2, 7, 5, 9, 1), (1, 6, 16, 8, 2), (3, 1, 9, 1, 1)]


# Data kind -> the fast kernels picked for (matmul, left gradient, right gradient).
FAST_KINDS = {
    "normal": ["matmul_fast", "matmul_exact_grad_left_fast", "matmul_exact_grad_right_fast"],
    "zeros": ["matmul_fast_zeros", "matmul_exact_grad_left_fast_zeros",
              "matmul_exact_grad_right_fast_zeros"],
    "grad_zeros": ["matmul_fast", "matmul_exact_grad_left_fast_grad_zeros",
                   "matmul_exact_grad_right_fast_grad_zeros"],
}


@pytest.mark.parametrize("shape", FAST_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("kind", sorted(FAST_KINDS))
def test_fast_paths_bit_identical(shape, kind, chosen_paths):
    """Zeros everywhere (ReLU outputs) mask whole products; zeros only in grad (the exact
    backward's additive operand) take the cheaper grad-zeros kernels."""
    P, n, k, m, o = shape
    rng = np.random.default_rng(n * 100 + k * 10 + m + len(kind))
    a = (relu_like if kind == "zeros" else normals)(rng, (P, n, k))
    b = (relu_like if kind == "zeros" else normals)(rng, (P, k, m))
    grad = (normals if kind == "normal" else relu_like)(rng, (P, n, m))
    if kind == "zeros":   # a zero in each operand whatever the random draw
        a[0, 0, 0] = b[0, -1, -1] = 0.0
    if kind != "normal":
        grad[0, 0, -1] = 0.0
    got_mm, got_ga, got_gb, want_mm, want_ga, want_gb = all_three(a, b, grad, OFFSETS[o])
    assert_same_bits(got_mm, want_mm)
    assert_same_bits(got_ga, want_ga)
    assert_same_bits(got_gb, want_gb)
    assert chosen_paths == FAST_KINDS[kind]
    assert np.isfinite(got_mm).all() and got_mm.any()


@pytest.mark.parametrize("case", ["inf", "nan", "overflow", "underflow", "specials"])
def test_general_path_when_the_range_check_fails(case, chosen_paths):
    """Any inf/NaN, or exponent ranges that let a product overflow or underflow, take the
    general kernels; the bits still match the CPU."""
    rng = np.random.default_rng(len(case))
    P, n, k, m = 1, 7, 11, 9
    a, b, grad = normals(rng, (P, n, k)), normals(rng, (P, k, m)), normals(rng, (P, n, m))
    if case == "inf":
        b[0, 3, 4] = -np.inf
    elif case == "nan":
        grad[0, 2, 2] = np.nan
        a[0, 1, 1] = np.nan
    elif case == "overflow":     # 2^70 * 2^70 overflows: products saturate to inf
        a[0, 0, :] = np.float32(2.0 ** 70)
        b[0, :, 0] = np.float32(-(2.0 ** 70))
        grad[0, 0, :] = np.float32(2.0 ** 100)
    elif case == "underflow":    # 2^-70 * 2^-70 underflows: products flush to zero
        a[0, 1, :] = np.float32(2.0 ** -70)
        b[0, :, 2] = np.float32(2.0 ** -70)
        grad[0, 1, :] = np.float32(2.0 ** -120)
    else:
        a, b, grad = (mixed_matrix(rng, x.shape, 0.2) for x in (a, b, grad))
    got_mm, got_ga, got_gb, want_mm, want_ga, want_gb = all_three(a, b, grad, OFFSETS[1])
    assert_same_bits(got_mm, want_mm)
    assert_same_bits(got_ga, want_ga)
    assert_same_bits(got_gb, want_gb)
    assert chosen_paths == [None, None, None]
    if case == "overflow":
        assert np.isinf(got_mm[0, 0, 0])
    if case == "underflow":
        assert np.isfinite(got_mm).all()


def test_fast_path_gradient_edges(chosen_paths):
    """Zero and subnormal entries of the operand whose mantissa enters the slope (a for
    the left gradient, b for the right) use the one-sided limit, not a mask; a zero grad
    row and a zero column of b give exact zeros."""
    rng = np.random.default_rng(5)
    a, b, grad = normals(rng, (1, 9, 10)), normals(rng, (1, 10, 7)), normals(rng, (1, 9, 7))
    a[0, 2, :] = 0.0
    a[0, 3, 3] = np.float32(-1e-40)
    b[0, :, 1] = 0.0
    grad[0, 4, :] = 0.0
    got_mm, got_ga, got_gb, want_mm, want_ga, want_gb = all_three(a, b, grad, 0)
    assert_same_bits(got_ga, want_ga)
    assert_same_bits(got_gb, want_gb)
    assert_same_bits(got_mm, want_mm)
    assert chosen_paths == ["matmul_fast_zeros", "matmul_exact_grad_left_fast_zeros",
                            "matmul_exact_grad_right_fast_zeros"]
    assert not got_ga[0, 4].any() and got_ga[0, 2].all()


def test_fast_path_only_zero_operands(chosen_paths):
    """All-zero operands (no normal number: the range check sees min normal = INF)."""
    a = np.zeros((1, 3, 9), np.float32)
    b = np.ones((1, 9, 4), np.float32)
    got = run_matmul(K, a, b, 0)
    assert got.view(np.int32).tolist() == np.zeros((1, 3, 4), np.int32).tolist()
    assert chosen_paths == ["matmul_fast_zeros"]


def test_range_stats_kernel():
    x = bits(np.array([1.5, -2.0, 0.0, -1e-40, 3e38, -1e-30], np.float32))
    stats = K._range_stats([x, x[:2], np.array([0x7FC00000, -1], np.int32),
                            np.empty(0, np.int32)], cuda.default_stream())
    u = x & 0x7FFFFFFF
    assert stats[0] == (False, True, int(u[u >= 0x00800000].min()), int(u.max()))
    assert stats[1] == (False, False, int(u[:2].min()), int(u[:2].max()))
    assert stats[2] == (True, False, 0x7F800000, 0x7FFFFFFF)   # NaN is not normal
    assert stats[3] == (False, False, 0x7F800000, 0)


def test_fast_paths_production_tiles(production_tiles, chosen_paths):
    """The production block (16 x 16 threads of 8 x 8 outputs): one partial tile with a full
    reduction step and a tail, zeros masked, an offset."""
    rng = np.random.default_rng(9)
    a, b, grad = relu_like(rng, (1, 3, 11)), relu_like(rng, (1, 11, 5)), relu_like(rng, (1, 3, 5))
    a[0, 0, 0] = b[0, 0, 0] = grad[0, 0, 0] = 0.0
    got_mm, got_ga, got_gb, want_mm, want_ga, want_gb = all_three(a, b, grad, OFFSETS[1])
    assert_same_bits(got_mm, want_mm)
    assert_same_bits(got_ga, want_ga)
    assert_same_bits(got_gb, want_gb)
    assert chosen_paths == ["matmul_fast_zeros", "matmul_exact_grad_left_fast_zeros",
                            "matmul_exact_grad_right_fast_zeros"]


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


def test_every_kernel_has_a_signature():
    """Tools (validation/cuda_sass.py) compile every kernel from SIGNATURES."""
    assert sorted(K.SIGNATURES) == sorted(K.KERNEL_FUNCTIONS)
    assert all(isinstance(sig, tuple) and sig for sig in K.SIGNATURES.values())


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
    report = {}
    for name, sig in K.SIGNATURES.items():
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
    for name in [n + suffix for n in ["matmul", "matmul_exact_grad_left",
                                      "matmul_exact_grad_right"]
                 for suffix in ["", "_fast", "_fast_zeros"]]:
        assert any(op.startswith("add.") for op in report[name]["float_ops"]), report[name]
