"""CPU kernels (Numba, parallel, cached) over int32 bit-pattern arrays.

Every kernel takes C-contiguous int32 arrays holding float32 bit patterns and calls the
scalar definitions of :mod:`pam.bits`, so the CPU and CUDA kernels compute the same bits.

Reductions (matmul and its backward) accumulate in float32, one output element at a time,
in increasing order of the reduced index: the result does not depend on the thread count.
Parallelism is over output rows; vectorization is across output columns (an elementwise
``acc[j] += p[j]``, which needs no reassociation).
"""
import numpy as np
from numba import njit, prange

from .. import bits

_JIT = dict(parallel=True, cache=True, nogil=True)

# Columns handled per pass of the matmul kernels: a tile of acc rows stays in L1.
COL_TILE = 512
# Rows of the left operand that share one pass over a tile of the right operand.
ROW_BLOCK = 4


# --------------------------------------------------------------------------- elementwise
@njit(**_JIT)
def mul(a, b, off, out):
    for i in prange(a.size):
        out[i] = bits.mul_bits(a[i], b[i], off)


@njit(**_JIT)
def div(a, b, off, out):
    for i in prange(a.size):
        out[i] = bits.div_bits(a[i], b[i], off)


@njit(**_JIT)
def mul_slope(a, b, off, out):
    for i in prange(a.size):
        out[i] = bits.mul_slope_bits(a[i], b[i], off)


@njit(**_JIT)
def div_slope_num(a, b, off, out):
    for i in prange(a.size):
        out[i] = bits.div_slope_num_bits(a[i], b[i], off)


@njit(**_JIT)
def div_slope_den(a, b, off, out):
    for i in prange(a.size):
        out[i] = bits.div_slope_den_bits(a[i], b[i], off)


@njit(**_JIT)
def exp2(y, out):
    for i in prange(y.size):
        out[i] = bits.exp2_bits(y[i])


@njit(**_JIT)
def log2(x, out):
    for i in prange(x.size):
        out[i] = bits.log2_bits(x[i])


@njit(**_JIT)
def exp2_slope(y, out):
    for i in prange(y.size):
        out[i] = bits.exp2_slope_bits(y[i])


@njit(**_JIT)
def log2_slope(x, out):
    for i in prange(x.size):
        out[i] = bits.log2_slope_bits(x[i])


# --------------------------------------------------------------------------- matmul
@njit(**_JIT)
def matmul(a, b, off, out):
    """out[p, i, j] = sum_t PAM(a[p, i, t], b[p, t, j]), float32, t increasing.

    a: (batch, n, k) int32, b: (batch, k, m) int32, out: (batch, n, m) float32.
    """
    batch, n, k = a.shape
    m = b.shape[2]
    row_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for task in prange(batch * row_blocks):
        p = task // row_blocks
        i0 = (task - p * row_blocks) * ROW_BLOCK
        i1 = min(i0 + ROW_BLOCK, n)
        acc = np.empty((ROW_BLOCK, COL_TILE), np.float32)
        for j0 in range(0, m, COL_TILE):
            j1 = min(j0 + COL_TILE, m)
            w = j1 - j0
            acc[:, :w] = 0.0
            for t in range(k):
                brow = b[p, t, j0:j1]
                for r in range(i1 - i0):
                    ai = a[p, i0 + r, t]
                    accr = acc[r]
                    for j in range(w):
                        accr[j] += bits.bits_to_f32(bits.mul_bits(ai, brow[j], off))
            for r in range(i1 - i0):
                out[p, i0 + r, j0:j1] = acc[r, :w]


@njit(**_JIT)
def matmul_exact_grad_left(a, bt, grad, off, out):
    """Exact gradient w.r.t. the left operand of ``matmul``.

    out[p, i, t] = sum_j PAM(grad[p, i, j], slope_a(a[p, i, t], b[p, t, j])), j increasing,
    where slope_a is the exact power-of-two derivative of PAM w.r.t. its first operand.
    a: (batch, n, k), bt: (batch, m, k) (b transposed), grad: (batch, n, m) int32.
    """
    batch, n, k = a.shape
    m = bt.shape[1]
    for task in prange(batch * n):
        p = task // n
        i = task - p * n
        arow = a[p, i]
        acc = np.zeros(k, np.float32)
        for j in range(m):
            g = grad[p, i, j]
            brow = bt[p, j]
            for t in range(k):
                slope = bits.mul_slope_bits(arow[t], brow[t], off)
                acc[t] += bits.bits_to_f32(bits.mul_bits(g, slope, 0))
        out[p, i, :] = acc


@njit(**_JIT)
def matmul_exact_grad_right(at, b, grad, off, out):
    """Exact gradient w.r.t. the right operand of ``matmul``.

    out[p, t, j] = sum_i PAM(grad[p, i, j], slope_a(b[p, t, j], a[p, i, t])), i increasing
    (PAM is symmetric, so the slope w.r.t. b is slope_a with the operands swapped).
    at: (batch, k, n) (a transposed), b: (batch, k, m), grad: (batch, n, m) int32.
    """
    batch, k, n = at.shape
    m = b.shape[2]
    for task in prange(batch * k):
        p = task // k
        t = task - p * k
        brow = b[p, t]
        acc = np.zeros(m, np.float32)
        for i in range(n):
            ai = at[p, t, i]
            grow = grad[p, i]
            for j in range(m):
                slope = bits.mul_slope_bits(brow[j], ai, off)
                acc[j] += bits.bits_to_f32(bits.mul_bits(grow[j], slope, 0))
        out[p, t, :] = acc
