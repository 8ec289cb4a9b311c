"""CUDA kernels of the families and operand formats against the CPU ones, bit for bit.

Runs under the CUDA simulator (small shapes, the small fast tiles of test_kernels_cuda) or
on a GPU: quantize, pow2_part, mul_lmul (and its scalar-operand forms), matmul_lmul on its
fast (register-tiled, L-Mul mode) and general paths.
"""
import numpy as np
import pytest

pytest.importorskip("numba_cuda",
                    reason="numba-cuda is not installed (pip install 'bdia-pam[cuda]')")

from test_kernels_cuda import (  # noqa: E402,F401  (fixtures used by name)
    assert_same_bits, chosen_paths, few_blocks, mixed_matrix, normals, production_tiles,
    random_floats, relu_like, small_fast_tiles)

import reference as R  # noqa: E402
from pam import bits  # noqa: E402
from pam.kernels import cpu  # noqa: E402
from pam.kernels import cuda as K  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered",
                                        "ignore:invalid value encountered")
C_FMT = {fmt: int(bits.lmul_constant(bits.FORMAT_MANT_BITS[fmt])) for fmt in range(5)}


def operands(rng, n, fmt):
    x = np.concatenate([random_floats(rng, n), R.round_to_format_ref(
        np.array([448.0, 464.0, 65520.0, 2.0 ** -25, 2.0 ** -10, 1.0 + 2.0 ** -4], np.float32),
        fmt)])
    return np.ascontiguousarray(x.astype(np.float32)).view(np.int32)


@pytest.mark.parametrize("fmt", range(5))
def test_quantize_and_pow2_part(fmt, few_blocks):
    x = operands(np.random.default_rng(fmt), 600, fmt)
    for flush in (0, 1):
        got, want = np.empty_like(x), np.empty_like(x)
        K.quantize(x, fmt, flush, got)
        cpu.quantize(x, fmt, flush, want)
        assert_same_bits(got, want)
    got, want = np.empty_like(x), np.empty_like(x)
    K.pow2_part(x, got)
    cpu.pow2_part(x, want)
    assert_same_bits(got, want)


@pytest.mark.parametrize("fmt", range(5))
def test_mul_lmul(fmt, few_blocks):
    rng = np.random.default_rng(10 + fmt)
    q = np.empty(606, np.int32)
    cpu.quantize(operands(rng, 600, fmt), fmt, 0, q)
    a, b = q, np.ascontiguousarray(q[rng.permutation(q.size)])
    c = C_FMT[fmt]
    got, want = np.empty_like(a), np.empty_like(a)
    K.mul_lmul(a, b, c, got)
    cpu.mul_lmul(a, b, c, want)
    assert_same_bits(got, want)
    s = b[:1].copy()
    K.mul_lmul_bs(a, s, c, got)
    cpu.mul_lmul_bs(a, s, c, want)
    assert_same_bits(got, want)
    K.mul_lmul_as(s, b, c, got)
    cpu.mul_lmul_as(s, b, c, want)
    assert_same_bits(got, want)


def test_errors():
    x = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="format code"):
        K.quantize(x, 5, 0, x.copy())
    with pytest.raises(ValueError, match="L-Mul constant"):
        K.mul_lmul(x, x, 1 << 23, x.copy())
    with pytest.raises(ValueError, match="matmul_lmul expects"):
        K.matmul_lmul(x.reshape(1, 2, 2), x.reshape(1, 4, 1), 0, np.zeros((1, 2, 1), np.float32))


def run_matmul_lmul(backend, a, b, c):
    out = np.full((a.shape[0], a.shape[1], b.shape[2]), np.nan, np.float32)
    backend.matmul_lmul(a.view(np.int32), b.view(np.int32), c, out)
    return out


def quantized(x, fmt):
    q = np.empty(x.size, np.int32)
    cpu.quantize(np.ascontiguousarray(x).reshape(-1).view(np.int32), fmt, 0, q)
    return q.view(np.float32).reshape(x.shape)


# (P, n, k, m) against the small fast tiles (6 x 8 outputs, 8-deep steps): partial tiles,
# a tail-only reduction, full steps only, both.
SHAPES = [(1, 13, 11, 9), (2, 7, 5, 9), (1, 6, 16, 8)]


@pytest.mark.parametrize("shape, fmt", [(SHAPES[0], 0), (SHAPES[1], 3), (SHAPES[2], 1),
                                        (SHAPES[1], 4)], ids=str)
@pytest.mark.parametrize("kind", ["normal", "zeros"])
def test_matmul_lmul_fast(shape, kind, fmt, chosen_paths):
    P, n, k, m = shape
    rng = np.random.default_rng(n * 100 + k * 10 + m + fmt)
    make = relu_like if kind == "zeros" else normals
    a, b = quantized(make(rng, (P, n, k)), fmt), quantized(make(rng, (P, k, m)), fmt)
    if kind == "zeros":
        a[0, 0, 0] = b[0, -1, -1] = 0.0
    else:                 # values that rounded to zero in a narrow format
        a[a == 0] = 1.0
        b[b == 0] = -1.0
    got = run_matmul_lmul(K, a, b, C_FMT[fmt])
    assert_same_bits(got, run_matmul_lmul(cpu, a, b, C_FMT[fmt]))
    assert chosen_paths == ["matmul_lmul_fast" + ("_zeros" if kind == "zeros" else "")]
    assert np.isfinite(got).all() and got.any()


@pytest.mark.parametrize("case", ["specials", "overflow", "double_carry_underflow"])
def test_matmul_lmul_general(case, chosen_paths):
    rng = np.random.default_rng(len(case))
    a, b = normals(rng, (1, 7, 11)), normals(rng, (1, 11, 9))
    if case == "specials":
        a, b = mixed_matrix(rng, a.shape, 0.2), mixed_matrix(rng, b.shape, 0.2)
    elif case == "overflow":
        a[0, 0, :] = np.float32(2.0 ** 70)
        b[0, :, 0] = np.float32(-(2.0 ** 70))
    else:    # PAM's range check would pass these; L-Mul's products underflow
        a[:] = np.float32(1.97 * 2.0 ** -64)
        b[:] = np.float32(1.97 * 2.0 ** -64)
    got = run_matmul_lmul(K, a, b, C_FMT[0])
    assert_same_bits(got, run_matmul_lmul(cpu, a, b, C_FMT[0]))
    assert chosen_paths == [None]


def test_matmul_lmul_production_tiles(production_tiles, chosen_paths):
    rng = np.random.default_rng(9)
    a, b = relu_like(rng, (1, 3, 11)), relu_like(rng, (1, 11, 5))
    a[0, 0, 0] = 0.0
    got = run_matmul_lmul(K, a, b, C_FMT[0])
    assert_same_bits(got, run_matmul_lmul(cpu, a, b, C_FMT[0]))
    assert chosen_paths == ["matmul_lmul_fast_zeros"]
