"""CPU kernels (Numba, cached on disk) over int32 bit-pattern arrays.

Every kernel takes C-contiguous int32 arrays holding float32 bit patterns and calls the
scalar definitions of :mod:`pam.bits`, so the CPU and CUDA kernels compute the same bits.

Reductions (matmul and its backward) accumulate in float32, one output element at a time,
in increasing order of the reduced index: the result does not depend on the thread count.
Parallelism is over output rows (most kernels are serial ``nogil`` range kernels split
over threads by :mod:`pam.kernels.threads`; the L-Mul forward, the general inf/NaN matmul
paths and the convolutions use ``parallel=True``); vectorization is across output columns (an elementwise
``acc[j] += p[j]``, which needs no reassociation). The PAM matmul and its exact gradients
keep a small tile of such accumulators in registers over the whole reduced range
(pam.kernels.vec8 eight-lane values) and stream the operand that varies along the output
columns from a packed copy of 16-column strips.

Each matmul kernel scans its operands once (O(inputs)) and, when no inf/NaN is present and
the exponent ranges rule out overflow and underflow, takes an int32 fast path in which one
PAM product is one wrapping 32-bit integer addition (8 lanes per vpaddd); zero operands are
skipped or masked to +0, which is exact because the accumulators start at +0.0. Otherwise
the general path calls bits.mul_bits / bits.mul_slope_bits per product. Both give the same
bits; tests/test_kernels_cpu.py checks them against NumPy references and against each other.

Families and formats: ``matmul_lmul`` is ``matmul`` with L-Mul products (bits.lmul_bits;
the L-Mul constant c in the ``off`` slot): the same range check, the same accumulation
order, the same vectorized fast path with a branch-free integer carry correction per
product (``_lprod``); ``mul_lmul`` (``_bs``, ``_as``) is its elementwise form,
``pow2_part`` the exact L-Mul slope and ``quantize`` the rounding of float32 to an operand
format (bits.quantize_bits). tests/test_families.py checks them.
"""
import threading

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .. import bits, optim_bits, rows_bits
from ..bits import jitable
from . import threads, vec8

# Kernels (called from Python, cached on disk) get no C entry point (``no_cfunc_wrapper``:
# only first-class function values use one; Numba would build, optimize and emit it for
# every compiled signature, cold-start time). The helpers that only kernels call are
# ``bits.jitable`` definitions: compiled into their callers, with no entry point of their
# own; the few that tests or the CUDA module call from Python stay kernels.
_JIT = dict(parallel=True, cache=True, nogil=True, no_cfunc_wrapper=True)

# Columns handled per pass of the matmul kernels: a tile of acc rows stays in L1.
COL_TILE = 1024
# Rows of the left operand that share one pass over a tile of the right operand.
ROW_BLOCK = 4
# Rows of the exact-backward outputs per parallel task (they share each packed strip).
GRAD_ROW_BLOCK = 16

ONE = bits.ONE
MANT_MASK = bits.MANT_MASK
EXP_MASK = bits.EXP_MASK
ABS_MASK = bits.ABS_MASK
MIN_NORMAL = bits.MIN_NORMAL
INF = bits.INF
NOT_MANT = -8388608          # ~MANT_MASK as a signed integer: clears the 23 mantissa bits
TWO31 = 2147483648           # 2^31: adding it modulo 2^32 flips the sign bit


# --------------------------------------------------------------------------- elementwise
# Elementwise kernels are serial (compiled without parallel=True): they are memory-bound,
# waking the thread pool cost more than it saved at every size measured on 2 cores
# (100k elements: 33 us parallel vs 15 us serial; 4M: 2.1 ms vs 0.6 ms), and serial
# kernels compile several times faster (cold start). ``<op>_bs`` takes its second operand
# as a 1-element array (a scalar broadcast without a copy), ``<op>_as`` its first.
_SERIAL = dict(cache=True, nogil=True, no_cfunc_wrapper=True)


@njit(**_SERIAL)
def mul(a, b, off, out):
    for i in range(a.size):
        out[i] = bits.mul_bits(a[i], b[i], off)


@njit(**_SERIAL)
def mul_bs(a, s, off, out):
    sb = s[0]
    for i in range(a.size):
        out[i] = bits.mul_bits(a[i], sb, off)


@njit(**_SERIAL)
def mul_as(s, b, off, out):
    sa = s[0]
    for i in range(b.size):
        out[i] = bits.mul_bits(sa, b[i], off)


@njit(**_SERIAL)
def div(a, b, off, out):
    for i in range(a.size):
        out[i] = bits.div_bits(a[i], b[i], off)


@njit(**_SERIAL)
def div_bs(a, s, off, out):
    sb = s[0]
    for i in range(a.size):
        out[i] = bits.div_bits(a[i], sb, off)


@njit(**_SERIAL)
def div_as(s, b, off, out):
    sa = s[0]
    for i in range(b.size):
        out[i] = bits.div_bits(sa, b[i], off)


@njit(**_SERIAL)
def mul_slope(a, b, off, out):
    for i in range(a.size):
        out[i] = bits.mul_slope_bits(a[i], b[i], off)


@njit(**_SERIAL)
def mul_slope_bs(a, s, off, out):
    sb = s[0]
    for i in range(a.size):
        out[i] = bits.mul_slope_bits(a[i], sb, off)


@njit(**_SERIAL)
def mul_slope_as(s, b, off, out):
    sa = s[0]
    for i in range(b.size):
        out[i] = bits.mul_slope_bits(sa, b[i], off)


@njit(**_SERIAL)
def div_slope_num(a, b, off, out):
    for i in range(a.size):
        out[i] = bits.div_slope_num_bits(a[i], b[i], off)


@njit(**_SERIAL)
def div_slope_num_bs(a, s, off, out):
    sb = s[0]
    for i in range(a.size):
        out[i] = bits.div_slope_num_bits(a[i], sb, off)


@njit(**_SERIAL)
def div_slope_num_as(s, b, off, out):
    sa = s[0]
    for i in range(b.size):
        out[i] = bits.div_slope_num_bits(sa, b[i], off)


@njit(**_SERIAL)
def div_slope_den(a, b, off, out):
    for i in range(a.size):
        out[i] = bits.div_slope_den_bits(a[i], b[i], off)


@njit(**_SERIAL)
def div_slope_den_bs(a, s, off, out):
    sb = s[0]
    for i in range(a.size):
        out[i] = bits.div_slope_den_bits(a[i], sb, off)


@njit(**_SERIAL)
def div_slope_den_as(s, b, off, out):
    sa = s[0]
    for i in range(b.size):
        out[i] = bits.div_slope_den_bits(sa, b[i], off)


@njit(**_SERIAL)
def _check_lmul_constant(c):
    if c < 0 or c >= bits.TWO23:
        raise ValueError("L-Mul constant c must be in [0, 2^23) (see bits.lmul_constant)")


@njit(**_SERIAL)
def mul_lmul(a, b, c, out):
    """out = L-Mul(a, b; c) elementwise (bits.lmul_bits); ``_bs`` / ``_as``: scalar operand."""
    _check_lmul_constant(c)
    for i in range(a.size):
        out[i] = bits.lmul_bits(a[i], b[i], c)


@njit(**_SERIAL)
def mul_lmul_bs(a, s, c, out):
    _check_lmul_constant(c)
    sb = s[0]
    for i in range(a.size):
        out[i] = bits.lmul_bits(a[i], sb, c)


@njit(**_SERIAL)
def mul_lmul_as(s, b, c, out):
    _check_lmul_constant(c)
    sa = s[0]
    for i in range(b.size):
        out[i] = bits.lmul_bits(sa, b[i], c)


@njit(**_SERIAL)
def pow2_part(x, out):
    """out = sign(x) 2^E(x) elementwise (bits.pow2_part_bits): the exact L-Mul slope."""
    for i in range(x.size):
        out[i] = bits.pow2_part_bits(x[i])


@njit(**_SERIAL)
def quantize(x, fmt, flush, out):
    """out = x rounded to operand format ``fmt`` (bits.quantize_bits), flat int32 arrays."""
    if fmt < 0 or fmt >= bits.N_FORMATS:
        raise ValueError("quantize: fmt must be a format code 0..4 "
                         "(float32, bfloat16, float16, e4m3, e5m2)")
    mbits, emin_field, max_pat, over_pat = bits.format_params(fmt)
    for i in range(x.size):
        out[i] = bits.quantize_core_bits(x[i], mbits, emin_field, max_pat, over_pat, flush)


@njit(**_SERIAL)
def exp2(y, out):
    for i in range(y.size):
        out[i] = bits.exp2_bits(y[i])


@njit(**_SERIAL)
def log2(x, out):
    for i in range(x.size):
        out[i] = bits.log2_bits(x[i])


@njit(**_SERIAL)
def exp2_slope(y, out):
    for i in range(y.size):
        out[i] = bits.exp2_slope_bits(y[i])


@njit(**_SERIAL)
def log2_slope(x, out):
    for i in range(x.size):
        out[i] = bits.log2_slope_bits(x[i])


# --------------------------------------------------------------------------- matmul
# Fast paths. Each matmul kernel first scans its operands (O(inputs)) with ``_stats``. When
# no operand holds an inf or NaN and the exponent ranges guarantee that no product of two
# normal numbers overflows or underflows, every PAM product of normal operands is one
# wrapping int32 addition of bit patterns (the sign bit of the sum is the xor of the signs,
# because the magnitude part stays inside [MIN_NORMAL, INF)). Products with a zero or
# subnormal factor are +-0 and adding +-0 to an accumulator that started at +0.0 changes
# nothing (round-to-nearest never produces -0 from +0 + x), so they are skipped (scalar
# side) or masked to +0 (vector side). Otherwise the general kernels below, which call
# bits.mul_bits / bits.mul_slope_bits for every product, are used. Both paths accumulate
# each output element in float32 in increasing order of the reduced index.


@njit(**_SERIAL)
def _stats(x):
    """(has_inf_or_nan, has_zero_or_subnormal, min normal |bits|, max |bits|) of int32 ``x``.

    The minimum is INF when ``x`` holds no normal number.
    """
    flat = x.reshape(-1)
    lo = INF
    hi = 0
    zmin = INF
    for i in range(flat.size):
        u = flat[i] & ABS_MASK
        hi = max(hi, u)
        zmin = min(zmin, u)
        lo = min(lo, u if u >= MIN_NORMAL else INF)
    return hi >= INF, zmin < MIN_NORMAL, lo, hi


@njit(**_SERIAL)
def _zero_mask(x):
    """int32 array shaped like ``x``: 0 where x is zero or subnormal, -1 (all ones) elsewhere."""
    mask = np.empty(x.shape, np.int32)
    fx = x.reshape(-1)
    fm = mask.reshape(-1)
    for i in range(fx.size):
        fm[i] = 0 if (fx[i] & ABS_MASK) < MIN_NORMAL else -1
    return mask


@jitable
def _floor_exp(x):
    """x with its 23 low (mantissa) bits cleared."""
    return x & NOT_MANT


@njit(**_SERIAL)
def _mul_fast_ok(lo_a, hi_a, lo_b, hi_b, off):
    """True when PAM of any two normal operands with these |bits| ranges is normal."""
    return lo_a + lo_b - ONE + off >= MIN_NORMAL and hi_a + hi_b - ONE + off < INF


@njit(**_SERIAL)
def _fast_ok(lo_a, hi_a, lo_b, hi_b, off, lmul):
    """``_mul_fast_ok`` for PAM; for L-Mul (off = c) a product of normals lies between
    2^(Ea + Eb) (exponent field Ea + Eb - 127) and the PAM sum with off = c, so the
    exponent fields of the smallest magnitudes bound it from below."""
    if lmul:
        return _mul_fast_ok(lo_a & EXP_MASK, hi_a, lo_b & EXP_MASK, hi_b, 0) and \
            _mul_fast_ok(lo_a, hi_a, lo_b, hi_b, off)
    return _mul_fast_ok(lo_a, hi_a, lo_b, hi_b, off)


@njit(**_SERIAL)
def _slope_fast_ok(lo_g, hi_g, lo_y, hi_y, off):
    """True when, for normal g, y and any x, PAM(g, slope(x, y)) is normal and the slope too.

    slope(x, y) has the exponent field of Mx + |bits(y)| + off, Mx in [0, MANT_MASK].
    """
    s_lo = lo_y + off
    s_hi = hi_y + MANT_MASK + off
    return (s_lo >= MIN_NORMAL and s_hi < INF
            and lo_g + _floor_exp(s_lo) - ONE >= MIN_NORMAL
            and hi_g + _floor_exp(s_hi) - ONE < INF)


@jitable
def _signed_const(u, negative):
    """int32 constant u (+ 2^31 when ``negative``), wrapped: adding it flips the sign bit."""
    return np.int32(u + TWO31 if negative else u)


# Inner loops: acc[j] += f32(p_0[j]) + ... in sequence (four rounded additions, increasing
# reduced index), vectorized across j. The int32(...) truncation makes the additions wrap in
# 32 bits and lets LLVM use 8-lane vpaddd.
@jitable
def _add4(acc, x0, x1, x2, x3, c0, c1, c2, c3, w):
    for j in range(w):
        s = acc[j]
        s += bits.bits_to_f32(np.int32(x0[j] + c0))
        s += bits.bits_to_f32(np.int32(x1[j] + c1))
        s += bits.bits_to_f32(np.int32(x2[j] + c2))
        s += bits.bits_to_f32(np.int32(x3[j] + c3))
        acc[j] = s


@jitable
def _add4x2(acc0, acc1, x0, x1, x2, x3, c0, c1, c2, c3, d0, d1, d2, d3, w):
    for j in range(w):
        y0 = x0[j]
        y1 = x1[j]
        y2 = x2[j]
        y3 = x3[j]
        s = acc0[j]
        s += bits.bits_to_f32(np.int32(y0 + c0))
        s += bits.bits_to_f32(np.int32(y1 + c1))
        s += bits.bits_to_f32(np.int32(y2 + c2))
        s += bits.bits_to_f32(np.int32(y3 + c3))
        acc0[j] = s
        s = acc1[j]
        s += bits.bits_to_f32(np.int32(y0 + d0))
        s += bits.bits_to_f32(np.int32(y1 + d1))
        s += bits.bits_to_f32(np.int32(y2 + d2))
        s += bits.bits_to_f32(np.int32(y3 + d3))
        acc1[j] = s


@jitable
def _add4x2m(acc0, acc1, x0, x1, x2, x3, m0, m1, m2, m3, c0, c1, c2, c3, d0, d1, d2, d3, w):
    for j in range(w):
        y0 = x0[j]
        y1 = x1[j]
        y2 = x2[j]
        y3 = x3[j]
        k0 = m0[j]
        k1 = m1[j]
        k2 = m2[j]
        k3 = m3[j]
        s = acc0[j]
        s += bits.bits_to_f32(np.int32((y0 + c0) & k0))
        s += bits.bits_to_f32(np.int32((y1 + c1) & k1))
        s += bits.bits_to_f32(np.int32((y2 + c2) & k2))
        s += bits.bits_to_f32(np.int32((y3 + c3) & k3))
        acc0[j] = s
        s = acc1[j]
        s += bits.bits_to_f32(np.int32((y0 + d0) & k0))
        s += bits.bits_to_f32(np.int32((y1 + d1) & k1))
        s += bits.bits_to_f32(np.int32((y2 + d2) & k2))
        s += bits.bits_to_f32(np.int32((y3 + d3) & k3))
        acc1[j] = s


@jitable
def _add4m(acc, x0, x1, x2, x3, m0, m1, m2, m3, c0, c1, c2, c3, w):
    for j in range(w):
        s = acc[j]
        s += bits.bits_to_f32(np.int32((x0[j] + c0) & m0[j]))
        s += bits.bits_to_f32(np.int32((x1[j] + c1) & m1[j]))
        s += bits.bits_to_f32(np.int32((x2[j] + c2) & m2[j]))
        s += bits.bits_to_f32(np.int32((x3[j] + c3) & m3[j]))
        acc[j] = s


@jitable
def _add1(acc, x0, m0, use_mask, c0, w):
    if use_mask:
        for j in range(w):
            acc[j] += bits.bits_to_f32(np.int32((x0[j] + c0) & m0[j]))
    else:
        for j in range(w):
            acc[j] += bits.bits_to_f32(np.int32(x0[j] + c0))


def _make_mm_fast_block(use_mask):
    """``_mm_fast_block`` (zero mask M of B applied when ``use_mask``) with ``use_mask`` a
    compile-time constant: the masked and unmasked inner loops compile separately."""
    @njit(**_SERIAL)
    def _mm_fast_block(acc, B, M, cs, nz, nz4, k, j0, w):
        """acc[r, :w] = sum_t PAM(a[r, t], B[t, j0:j0+w]) for the rows r of one row block.

        cs[r, t]: int32 constant |bits(a)| - ONE + off (+2^31 for negative a); nz[r, t]: a normal.
        M: zero mask of B (used when ``use_mask``).
        """
        rows = acc.shape[0]
        j1 = j0 + w
        k4 = k - k % 4
        for t in range(0, k4, 4):
            x0 = B[t, j0:j1]
            x1 = B[t + 1, j0:j1]
            x2 = B[t + 2, j0:j1]
            x3 = B[t + 3, j0:j1]
            m0 = M[t, j0:j1]
            m1 = M[t + 1, j0:j1]
            m2 = M[t + 2, j0:j1]
            m3 = M[t + 3, j0:j1]
            r = 0
            while r + 2 <= rows:
                c = cs[r]
                d = cs[r + 1]
                if nz4[r, t >> 2] and nz4[r + 1, t >> 2]:
                    if use_mask:
                        _add4x2m(acc[r], acc[r + 1], x0, x1, x2, x3, m0, m1, m2, m3,
                                 c[t], c[t + 1], c[t + 2], c[t + 3], d[t], d[t + 1], d[t + 2],
                                 d[t + 3], w)
                    else:
                        _add4x2(acc[r], acc[r + 1], x0, x1, x2, x3, c[t], c[t + 1], c[t + 2],
                                c[t + 3], d[t], d[t + 1], d[t + 2], d[t + 3], w)
                else:
                    for q in range(r, r + 2):
                        for u in range(t, t + 4):
                            if nz[q, u]:
                                _add1(acc[q], B[u, j0:j1], M[u, j0:j1], use_mask, cs[q, u], w)
                r += 2
            for r in range(r, rows):
                c = cs[r]
                z = nz[r]
                if nz4[r, t >> 2]:
                    if use_mask:
                        _add4m(acc[r], x0, x1, x2, x3, m0, m1, m2, m3,
                               c[t], c[t + 1], c[t + 2], c[t + 3], w)
                    else:
                        _add4(acc[r], x0, x1, x2, x3, c[t], c[t + 1], c[t + 2], c[t + 3], w)
                else:
                    for u in range(t, t + 4):
                        if z[u]:
                            _add1(acc[r], B[u, j0:j1], M[u, j0:j1], use_mask, c[u], w)
        for u in range(k4, k):
            for r in range(rows):
                if nz[r, u]:
                    _add1(acc[r], B[u, j0:j1], M[u, j0:j1], use_mask, cs[r, u], w)
    return _mm_fast_block


_mm_fast_block = _make_mm_fast_block(False)
_mm_fast_block_m = _make_mm_fast_block(True)


# L-Mul fast path. With the per-row constants c = |bits(a)| - ONE + off (+2^31 for negative
# a, as in PAM) and e = Ma + off - 2^23, the product of normal operands is the PAM sum
# y + c corrected in the carry case: t = max(My + e, 0) = s - 2^23 (or 0 without carry)
# and the mantissa t becomes rne(t / 2), i.e. the sum drops by t - rne(t / 2) =
# (t >> 1) + (1 if t % 4 == 1 else 0) (checked for every t < 2^24 in the tests).
# Branch-free integer ops, vectorized across j like the PAM loops.
@jitable(forceinline=True)
def _lprod(y, c, e):
    # int32 truncations at each step let LLVM keep 8 lanes of 32 bits (vpaddd, vpmaxsd).
    t = max(np.int32((y & MANT_MASK) + e), np.int32(0))
    d = np.int32((t >> 1) + (1 if (t & 3) == 1 else 0))
    return np.int32(np.int32(y + c) - d)


@jitable
def _ladd4x2(acc0, acc1, x0, x1, x2, x3, c0, c1, c2, c3, d0, d1, d2, d3, e0, e1, e2, e3,
             f0, f1, f2, f3, w):
    for j in range(w):
        y0 = x0[j]
        y1 = x1[j]
        y2 = x2[j]
        y3 = x3[j]
        s = acc0[j]
        s += bits.bits_to_f32(np.int32(_lprod(y0, c0, e0)))
        s += bits.bits_to_f32(np.int32(_lprod(y1, c1, e1)))
        s += bits.bits_to_f32(np.int32(_lprod(y2, c2, e2)))
        s += bits.bits_to_f32(np.int32(_lprod(y3, c3, e3)))
        acc0[j] = s
        s = acc1[j]
        s += bits.bits_to_f32(np.int32(_lprod(y0, d0, f0)))
        s += bits.bits_to_f32(np.int32(_lprod(y1, d1, f1)))
        s += bits.bits_to_f32(np.int32(_lprod(y2, d2, f2)))
        s += bits.bits_to_f32(np.int32(_lprod(y3, d3, f3)))
        acc1[j] = s


@jitable
def _ladd4x2m(acc0, acc1, x0, x1, x2, x3, m0, m1, m2, m3, c0, c1, c2, c3, d0, d1, d2, d3,
              e0, e1, e2, e3, f0, f1, f2, f3, w):
    for j in range(w):
        y0 = x0[j]
        y1 = x1[j]
        y2 = x2[j]
        y3 = x3[j]
        k0 = m0[j]
        k1 = m1[j]
        k2 = m2[j]
        k3 = m3[j]
        s = acc0[j]
        s += bits.bits_to_f32(np.int32(_lprod(y0, c0, e0) & k0))
        s += bits.bits_to_f32(np.int32(_lprod(y1, c1, e1) & k1))
        s += bits.bits_to_f32(np.int32(_lprod(y2, c2, e2) & k2))
        s += bits.bits_to_f32(np.int32(_lprod(y3, c3, e3) & k3))
        acc0[j] = s
        s = acc1[j]
        s += bits.bits_to_f32(np.int32(_lprod(y0, d0, f0) & k0))
        s += bits.bits_to_f32(np.int32(_lprod(y1, d1, f1) & k1))
        s += bits.bits_to_f32(np.int32(_lprod(y2, d2, f2) & k2))
        s += bits.bits_to_f32(np.int32(_lprod(y3, d3, f3) & k3))
        acc1[j] = s


@jitable
def _ladd4(acc, x0, x1, x2, x3, c0, c1, c2, c3, e0, e1, e2, e3, w):
    for j in range(w):
        s = acc[j]
        s += bits.bits_to_f32(np.int32(_lprod(x0[j], c0, e0)))
        s += bits.bits_to_f32(np.int32(_lprod(x1[j], c1, e1)))
        s += bits.bits_to_f32(np.int32(_lprod(x2[j], c2, e2)))
        s += bits.bits_to_f32(np.int32(_lprod(x3[j], c3, e3)))
        acc[j] = s


@jitable
def _ladd4m(acc, x0, x1, x2, x3, m0, m1, m2, m3, c0, c1, c2, c3, e0, e1, e2, e3, w):
    for j in range(w):
        s = acc[j]
        s += bits.bits_to_f32(np.int32(_lprod(x0[j], c0, e0) & m0[j]))
        s += bits.bits_to_f32(np.int32(_lprod(x1[j], c1, e1) & m1[j]))
        s += bits.bits_to_f32(np.int32(_lprod(x2[j], c2, e2) & m2[j]))
        s += bits.bits_to_f32(np.int32(_lprod(x3[j], c3, e3) & m3[j]))
        acc[j] = s


@jitable
def _ladd1(acc, x0, m0, use_mask, c0, e0, w):
    if use_mask:
        for j in range(w):
            acc[j] += bits.bits_to_f32(np.int32(_lprod(x0[j], c0, e0) & m0[j]))
    else:
        for j in range(w):
            acc[j] += bits.bits_to_f32(np.int32(_lprod(x0[j], c0, e0)))


def _make_lmm_fast_block(use_mask):
    """``_lmm_fast_block`` with ``use_mask`` a compile-time constant (see
    _make_mm_fast_block)."""
    @njit(**_SERIAL)
    def _lmm_fast_block(acc, B, M, cs, es, nz, nz4, k, j0, w):
        """acc[r, :w] = sum_t L-Mul(a[r, t], B[t, j0:j0+w]) for the rows of one row block.

        As ``_mm_fast_block`` (cs: |bits(a)| - ONE + c with the sign; nz, nz4, M, use_mask),
        plus es[r, t] = Ma + c - 2^23 for the carry correction.
        """
        rows = acc.shape[0]
        j1 = j0 + w
        k4 = k - k % 4
        for t in range(0, k4, 4):
            x0 = B[t, j0:j1]
            x1 = B[t + 1, j0:j1]
            x2 = B[t + 2, j0:j1]
            x3 = B[t + 3, j0:j1]
            m0 = M[t, j0:j1]
            m1 = M[t + 1, j0:j1]
            m2 = M[t + 2, j0:j1]
            m3 = M[t + 3, j0:j1]
            r = 0
            while r + 2 <= rows:
                c = cs[r]
                d = cs[r + 1]
                e = es[r]
                f = es[r + 1]
                if nz4[r, t >> 2] and nz4[r + 1, t >> 2]:
                    if use_mask:
                        _ladd4x2m(acc[r], acc[r + 1], x0, x1, x2, x3, m0, m1, m2, m3,
                                  c[t], c[t + 1], c[t + 2], c[t + 3], d[t], d[t + 1], d[t + 2],
                                  d[t + 3], e[t], e[t + 1], e[t + 2], e[t + 3], f[t], f[t + 1],
                                  f[t + 2], f[t + 3], w)
                    else:
                        _ladd4x2(acc[r], acc[r + 1], x0, x1, x2, x3, c[t], c[t + 1], c[t + 2],
                                 c[t + 3], d[t], d[t + 1], d[t + 2], d[t + 3], e[t], e[t + 1],
                                 e[t + 2], e[t + 3], f[t], f[t + 1], f[t + 2], f[t + 3], w)
                else:
                    for q in range(r, r + 2):
                        for u in range(t, t + 4):
                            if nz[q, u]:
                                _ladd1(acc[q], B[u, j0:j1], M[u, j0:j1], use_mask, cs[q, u],
                                       es[q, u], w)
                r += 2
            for r in range(r, rows):
                c = cs[r]
                e = es[r]
                z = nz[r]
                if nz4[r, t >> 2]:
                    if use_mask:
                        _ladd4m(acc[r], x0, x1, x2, x3, m0, m1, m2, m3,
                                c[t], c[t + 1], c[t + 2], c[t + 3], e[t], e[t + 1], e[t + 2],
                                e[t + 3], w)
                    else:
                        _ladd4(acc[r], x0, x1, x2, x3, c[t], c[t + 1], c[t + 2], c[t + 3],
                               e[t], e[t + 1], e[t + 2], e[t + 3], w)
                else:
                    for u in range(t, t + 4):
                        if z[u]:
                            _ladd1(acc[r], B[u, j0:j1], M[u, j0:j1], use_mask, c[u], e[u], w)
        for u in range(k4, k):
            for r in range(rows):
                if nz[r, u]:
                    _ladd1(acc[r], B[u, j0:j1], M[u, j0:j1], use_mask, cs[r, u], es[r, u], w)
    return _lmm_fast_block


_lmm_fast_block = _make_lmm_fast_block(False)
_lmm_fast_block_m = _make_lmm_fast_block(True)


@jitable
def _lmul_row_consts(arow, c, es):
    """es[t] = Ma + c - 2^23 of the L-Mul fast path for the left-operand row ``arow``."""
    for t in range(arow.size):
        es[t] = np.int32((np.int64(arow[t]) & MANT_MASK) + c - bits.TWO23)


@jitable
def _mm_row_consts(arows, off):
    """(cs, nz, nz4) of the fast paths for the left-operand rows ``arows`` (rows, k):
    cs[r, t] = |bits(a)| - ONE + off (+2^31 for negative a), nz[r, t] = a is normal,
    nz4[r, q] = the four a[r, 4q .. 4q + 3] are normal."""
    rows, k = arows.shape
    cs = np.empty((rows, k), np.int32)
    nz = np.empty((rows, k), np.bool_)
    for r in range(rows):
        for t in range(k):
            ia = np.int64(arows[r, t])
            ua = ia & ABS_MASK
            nz[r, t] = ua >= MIN_NORMAL
            cs[r, t] = _signed_const(ua - ONE + off, ia < 0)
    nz4 = np.empty((rows, k // 4), np.bool_)
    for r in range(rows):
        for t in range(0, k - k % 4, 4):
            nz4[r, t >> 2] = nz[r, t] and nz[r, t + 1] and nz[r, t + 2] and nz[r, t + 3]
    return cs, nz, nz4


# The L-Mul fast path, with and without the zero mask of b, is two dispatchers (the mask is
# a compile-time constant, not a runtime flag): each compiles only its own inner loops, on
# its first use; a PAM run compiles neither. (The PAM fast path is the register-blocked
# ``_matmul_fast`` further down; the L-Mul product's carry correction keeps these
# accumulator-row loops.)
def _make_matmul_fast_lmul(use_mask):
    """The parallel L-Mul fast-path kernel ``(a, b, M, c, out)`` of ``matmul_lmul``; M is the
    zero mask of b when ``use_mask`` (unused otherwise: pass b)."""
    # Only a bool is captured (the cache key hashes the captured values; the blocks are
    # named as globals) and the branches on it are pruned at compile time.
    @njit(**_JIT)
    def _matmul_fast_lmul(a, b, M, off, out):
        batch, n, k = a.shape
        m = b.shape[2]
        row_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
        for task in prange(batch * row_blocks):
            p = task // row_blocks
            i0 = (task - p * row_blocks) * ROW_BLOCK
            rows = min(i0 + ROW_BLOCK, n) - i0
            cs, nz, nz4 = _mm_row_consts(a[p, i0:i0 + rows], off)
            acc = np.empty((rows, COL_TILE), np.float32)
            Bp = b[p]
            Mp = M[p]
            es = np.empty((rows, k), np.int32)
            for r in range(rows):
                _lmul_row_consts(a[p, i0 + r], off, es[r])
            for j0 in range(0, m, COL_TILE):
                w = min(COL_TILE, m - j0)
                acc[:, :w] = 0.0
                if use_mask:
                    _lmm_fast_block_m(acc, Bp, Mp, cs, es, nz, nz4, k, j0, w)
                else:
                    _lmm_fast_block(acc, Bp, Mp, cs, es, nz, nz4, k, j0, w)
                for r in range(rows):
                    out[p, i0 + r, j0:j0 + w] = acc[r, :w]
    return _matmul_fast_lmul


_matmul_fast_lmul = _make_matmul_fast_lmul(False)
_matmul_fast_lmul_m = _make_matmul_fast_lmul(True)


@njit(**_JIT)
def _matmul_general(a, b, off, lmul, out):
    """General path of ``matmul`` (bits.mul_bits) or, with ``lmul``, of ``matmul_lmul``."""
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
                    if lmul:
                        for j in range(w):
                            accr[j] += bits.bits_to_f32(bits.lmul_bits(ai, brow[j], off))
                    else:
                        for j in range(w):
                            accr[j] += bits.bits_to_f32(bits.mul_bits(ai, brow[j], off))
            for r in range(i1 - i0):
                out[p, i0 + r, j0:j1] = acc[r, :w]


# The public matmul kernels are Python functions: the O(inputs) range check is a compiled
# scan (below), then the path is chosen here, so each path is a dispatcher of its own that
# compiles on its first use (a run without inf/NaN never compiles the general paths; a PAM
# run never compiles the L-Mul ones). Each dispatcher gets one signature: C-contiguous
# int32 operands, a float32 result, int64 scalars, a bool mask flag.
# The range scans of the matmul plans: the operands' flat elements in chunks of SCAN_CHUNK,
# each chunk's partial extremes computed 8 lanes at a time (``_scan_range``), the chunks
# split between threads from SCAN_PARALLEL_MIN elements, then merged per operand.
SCAN_CHUNK = 1 << 14
SCAN_PARALLEL_MIN = 1 << 16
TWO32 = 1 << 32


@threads.splittable
def _scan_range(x0, x1, x2, n0, n1, out, lo, hi):
    """Scan tasks lo <= task < hi over the flat C-contiguous int32 arrays x0, x1, x2 cut in
    chunks of SCAN_CHUNK elements (tasks [0, n0) are x0's chunks, [n0, n0 + n1) x1's, the
    rest x2's): out[task] = (max |bits|, min |bits|, min over normal |bits| of
    |bits| - MIN_NORMAL as an unsigned 32-bit value, 2^32 - MIN_NORMAL or more when the
    chunk has no normal number), |bits| = bits & ABS_MASK."""
    absm = vec8.splat_i8(ABS_MASK)
    shift = vec8.splat_i8(-MIN_NORMAL)
    for task in range(lo, hi):
        x = x0 if task < n0 else (x1 if task < n0 + n1 else x2)
        c = task if task < n0 else (task - n0 if task < n0 + n1 else task - n0 - n1)
        i0 = c * SCAN_CHUNK
        i1 = min(i0 + SCAN_CHUNK, x.size)
        v8 = i0 + (i1 - i0) // 8 * 8
        top = vec8.splat_i8(0)
        bottom = vec8.splat_i8(ABS_MASK)
        low = vec8.splat_i8(-1)
        for i in range(i0, v8, 8):
            u = vec8.and_i8(vec8.load_i8(x, i), absm)
            top = vec8.max_i8(top, u)
            bottom = vec8.min_i8(bottom, u)
            low = vec8.umin_i8(low, vec8.add_i8(u, shift))
        t = vec8.hmax_i8(top)
        b = vec8.hmin_i8(bottom)
        w = vec8.humin_i8(low)
        for i in range(v8, i1):
            u = np.int64(vec8.get_i32(x, i)) & ABS_MASK
            t = max(t, u)
            b = min(b, u)
            w = min(w, (u - MIN_NORMAL) % TWO32)
        out[task, 0] = t
        out[task, 1] = b
        out[task, 2] = w


@njit(**_SERIAL)
def _scan_merge(out, lo, hi):
    """(has_inf_or_nan, has_zero_or_subnormal, min normal |bits|, max |bits|) of the
    operand whose ``_scan_range`` chunks are out[lo:hi] (as ``_stats``; INF for the
    minimum when there is none below INF, (False, False, INF, 0) for no chunk)."""
    t = 0
    b = INF
    w = TWO32 - 1
    for c in range(lo, hi):
        t = max(t, out[c, 0])
        b = min(b, out[c, 1])
        w = min(w, out[c, 2])
    return t >= INF, b < MIN_NORMAL, min(w + MIN_NORMAL, INF), t


def _scan(x0, x1, x2=None):
    """The chunk extremes of ``_scan_range`` for two or three int32 operands (any layout:
    a non-contiguous one is scanned from a contiguous copy) and the task ranges of each in
    them: (out, ((lo, hi) per operand))."""
    flats = [np.ascontiguousarray(x).reshape(-1) for x in (x0, x1, x1 if x2 is None else x2)]
    sizes = [flats[0].size, flats[1].size, 0 if x2 is None else flats[2].size]
    counts = [-(-size // SCAN_CHUNK) for size in sizes]
    out = np.empty((sum(counts), 3), np.int64)
    threads.run(_scan_range, len(out), sum(sizes), SCAN_PARALLEL_MIN, *flats, counts[0],
                counts[1], out)
    edges = [0, counts[0], counts[0] + counts[1], len(out)]
    return out, [(edges[i], edges[i + 1]) for i in range(3)]


@njit(**_SERIAL)
def _matmul_decide(out, a0, a1, b0, b1, off, lmul):
    """(fast, za, zb) of ``_matmul_plan`` from the operands' merged chunk scans."""
    sa, za, lo_a, hi_a = _scan_merge(out, a0, a1)
    sb, zb, lo_b, hi_b = _scan_merge(out, b0, b1)
    return not (sa or sb) and _fast_ok(lo_a, hi_a, lo_b, hi_b, off, lmul), za, zb


def _matmul_plan(a, b, off, lmul):
    """(fast, za, zb): whether the int32 fast path of a (L-Mul when ``lmul``) matmul of a, b
    applies, and whether a, b hold zeros or subnormals."""
    out, ((a0, a1), (b0, b1), _) = _scan(a, b)
    return _matmul_decide(out, a0, a1, b0, b1, off, lmul)


_NO_BIAS = np.zeros(1, np.int32)       # the bias argument of a matmul without one (unread)


def _add_bias(out, bias):
    """out += bias along the last dimension (float32 adds, out first), when given."""
    if bias is not None:
        np.add(out, bias, out=out)


def _matmul_run(a, b, off, lmul, out, bias=None):
    """The range check, then the fast or the general path (PAM or L-Mul products), then
    + ``bias`` (in the PAM fast path's epilogue, after the others). a and b may be any
    strided views: the PAM fast path reads each operand or its transpose, whichever is
    C-contiguous (``_layout``; an approximate backward's a^T @ grad reads a in place);
    the other paths take contiguous copies."""
    if out.size == 0:
        return
    if bias is not None:
        bias = np.ascontiguousarray(bias, np.float32).reshape(-1)
        if bias.size != out.shape[2]:
            raise ValueError(f"bias must have {out.shape[2]} elements, got {bias.size}")
    if a.shape[2] == 0:
        out[:] = 0.0
        _add_bias(out, bias)
        return
    A, ta = _layout(a, None)
    B, tb = _layout(b, None)
    fast, za, zb = _matmul_plan(A, B, off, lmul)
    if not fast:
        _matmul_general(_plain(A, ta), _plain(B, tb), off, lmul, out)
        _add_bias(out, bias)
    elif not lmul:
        masked = za or zb
        batch, n, k = a.shape
        m = out.shape[2]
        xp, mp = _pack(B, tb, k, m, masked)
        if bias is None:
            strip_bias = _NO_BIAS
        else:
            strip_bias = np.zeros(xp.shape[1] * STRIP_LANES, np.int32)
            strip_bias[:m] = bias.view(np.int32)
        threads.run(_mm_range, batch * -(-n // MM_ROW_BLOCK), batch * n * k * m,
                    MATMUL_PARALLEL_MIN, A, ta, xp, mp, masked, off, strip_bias,
                    bias is not None, out)
    else:
        b = _plain(B, tb)
        if zb:
            _matmul_fast_lmul_m(_plain(A, ta), b, _zero_mask(b), off, out)
        else:
            _matmul_fast_lmul(_plain(A, ta), b, b, off, out)
        _add_bias(out, bias)


def matmul(a, b, off, out, bias=None):
    """out[p, i, j] = sum_t PAM(a[p, i, t], b[p, t, j]), float32, t increasing (+ bias[j]).

    a: (batch, n, k) int32, b: (batch, k, m) int32, out: (batch, n, m) float32 C-contiguous
    (a and b may have any strides: the fast path reads either one's transpose in place when
    that is the contiguous one). Bit-identical to accumulating bits.mul_bits products for every input
    (zeros, subnormals, inf, NaN); an int32 fast path is taken when the operands allow it.
    k = 0 gives zeros. ``bias``: None, or float32 of m elements added to each sum
    (a float32 add, the sum first: a linear layer's ``y + bias``, in the fast path's
    epilogue while the tile is in registers; ValueError for another length).
    """
    _matmul_run(a, b, off, False, out, bias)


def matmul_lmul(a, b, c, out, bias=None):
    """out[p, i, j] = sum_t L-Mul(a[p, i, t], b[p, t, j]; c), float32, t increasing.

    As ``matmul`` with bits.lmul_bits products (c = bits.lmul_constant(m), 0 <= c < 2^23,
    else ValueError): bit-identical to accumulating them for every input; one range check,
    then a vectorized int32 fast path (PAM's add plus a branch-free carry correction) when
    no special value, overflow or underflow can occur, the general path otherwise.
    ``bias`` as for ``matmul``.
    """
    _check_lmul_constant(c)
    _matmul_run(a, b, c, True, out, bias)


# Exact backward. slope(x, y) = sign(y) 2^(E(y) + carry) has the exponent field of
# Mx + |bits(y)| + off; PAM(g, slope) = |bits(g)| + that field - ONE with sign(g) xor sign(y).
# In wrapping int32 arithmetic: ((Mx + off - ONE + bits(y)) & ~MANT) + bits(g), where
# bits(y) and bits(g) carry their sign bits (adding 2^31 modulo 2^32 is an xor of signs).
# The accumulator-row loops _sl* / _sr* below serve the convolution gradients
# (pam.kernels.cpu_conv); the matmul gradients use the register-blocked tiles further down.
@jitable
def _sl4(acc, am, x0, x1, x2, x3, g0, g1, g2, g3, w):
    for t in range(w):
        y = am[t]
        s = acc[t]
        s += bits.bits_to_f32(np.int32(((y + x0[t]) & NOT_MANT) + g0))
        s += bits.bits_to_f32(np.int32(((y + x1[t]) & NOT_MANT) + g1))
        s += bits.bits_to_f32(np.int32(((y + x2[t]) & NOT_MANT) + g2))
        s += bits.bits_to_f32(np.int32(((y + x3[t]) & NOT_MANT) + g3))
        acc[t] = s


@jitable
def _sl4m(acc, am, x0, x1, x2, x3, m0, m1, m2, m3, g0, g1, g2, g3, w):
    for t in range(w):
        y = am[t]
        s = acc[t]
        s += bits.bits_to_f32(np.int32((((y + x0[t]) & NOT_MANT) + g0) & m0[t]))
        s += bits.bits_to_f32(np.int32((((y + x1[t]) & NOT_MANT) + g1) & m1[t]))
        s += bits.bits_to_f32(np.int32((((y + x2[t]) & NOT_MANT) + g2) & m2[t]))
        s += bits.bits_to_f32(np.int32((((y + x3[t]) & NOT_MANT) + g3) & m3[t]))
        acc[t] = s


@jitable
def _sl1(acc, am, x0, m0, use_mask, g0, w):
    if use_mask:
        for t in range(w):
            acc[t] += bits.bits_to_f32(np.int32((((am[t] + x0[t]) & NOT_MANT) + g0) & m0[t]))
    else:
        for t in range(w):
            acc[t] += bits.bits_to_f32(np.int32(((am[t] + x0[t]) & NOT_MANT) + g0))


@jitable
def _mantissa_const(x, off, out):
    """out[t] = Mx + off - ONE, Mx the mantissa field of x[t] (0 for zero/subnormal x)."""
    for t in range(x.size):
        ux = np.int64(x[t]) & ABS_MASK
        out[t] = np.int32((ux & MANT_MASK if ux >= MIN_NORMAL else 0) + off - ONE)


@jitable
def _sr4m(acc, bm, x0, x1, x2, x3, m0, m1, m2, m3, c0, c1, c2, c3, w):
    for j in range(w):
        y = bm[j]
        s = acc[j]
        s += bits.bits_to_f32(np.int32((((y + c0) & NOT_MANT) + x0[j]) & m0[j]))
        s += bits.bits_to_f32(np.int32((((y + c1) & NOT_MANT) + x1[j]) & m1[j]))
        s += bits.bits_to_f32(np.int32((((y + c2) & NOT_MANT) + x2[j]) & m2[j]))
        s += bits.bits_to_f32(np.int32((((y + c3) & NOT_MANT) + x3[j]) & m3[j]))
        acc[j] = s


@jitable
def _sr1(acc, bm, x0, m0, use_mask, c0, w):
    if use_mask:
        for j in range(w):
            acc[j] += bits.bits_to_f32(np.int32((((bm[j] + c0) & NOT_MANT) + x0[j]) & m0[j]))
    else:
        for j in range(w):
            acc[j] += bits.bits_to_f32(np.int32(((bm[j] + c0) & NOT_MANT) + x0[j]))


# Exact-backward and PAM-forward fast paths: register-blocked micro-kernels
# (pam.kernels.vec8). Each computes a small tile of the output (2 rows x 16 columns for
# the gradients, 4 x 16 for the forward) over the whole reduced range, its 8-lane
# accumulators (and the tile's slope constants) held in ymm registers; the tile loops are
# written out in the range kernels (a call passing arrays costs reference count updates
# that match a short tile's work), and everything around them (constants, masks, spans,
# packing, transposes, stores) runs 8 lanes at a time, which is what short reductions
# (attention's head width 32, sequence 64) are bound by. The operand that
# varies along the output columns is first packed into 16-column strips (``_pack_range``:
# contiguous per reduced index, zero-padded past the last column) so the micro-kernel
# streams it with unit stride; a strided walk down the unpacked operand (row stride 4 KiB
# at k = 1024) maps every load to the same L1 set and ran 2.5x slower. Output tiles past
# the last row are computed on copies of the last row and not stored; columns past the
# last one are computed on padding and not stored.
#
# Both exact gradients are one kernel (``_grad_range``): the right gradient, transposed,
# has the left gradient's form (see ``matmul_exact_grads``). Every operand is read in the
# layout the caller has (a matrix or its transpose, whichever is C-contiguous: a linear
# layer's weight is the transpose of its right operand; attention's k^T is the transpose
# of k), and an output is written in the layout asked for, so no transposed copy is made:
# transposed rows are gathered and written per row block with 8 x 8 block transposes.
#
# Zeros (the masked variants): a product with a zero or subnormal factor must add +0.
# The factor that is splatted per reduced index (grad's entries for the gradients) is
# folded into the constants: its NOT_MANT mask and its bits are both 0 where it is not
# normal, which makes the product 0 at no extra instruction. The packed factor's zero mask
# costs one vpand per product. Adding +0 never changes an accumulator that started at +0.0
# (round-to-nearest gives -0 only from -0 + -0), so a reduced range where every product of
# a tile is +0 is skipped: each tile runs over the span of reduced indices at which its
# splatted rows or its packed strip hold a normal number (causal attention: about half).
# The kernels are serial ``nogil`` range kernels split between threads by
# pam.kernels.threads (parfor lowering doubled their compile time).
STRIP_LANES = 16
# Reduced rows of the packed operand per packing task.
PACK_ROWS = 64
# Products from which the matmul kernels split their work between threads.
MATMUL_PARALLEL_MIN = 1 << 17
# Rows of the PAM forward's output per micro-kernel call, and per task (they share each
# packed strip).
MM_TILE_ROWS = 4
MM_ROW_BLOCK = 16


@jitable
def _normal(v):
    """True when the int32 bit pattern v is a normal number (not zero or subnormal)."""
    return (v & ABS_MASK) >= MIN_NORMAL


@threads.splittable
def _pack_range(x, trans, xp, mp, masked, lo, hi):
    """Packing tasks lo <= task < hi: the 16-column strips of X (batch, rows, cols) into xp
    (batch, strips, rows, 16), xp[p, q, u, l] = X[p, u, 16 q + l], zero past the last
    column, and when ``masked`` their zero masks into mp (-1 where the element is normal,
    0 where it is zero, subnormal or padding). X is ``x`` itself, or when ``trans`` its
    transpose (x is (batch, cols, rows), C-contiguous either way): plain rows are copied 8
    lanes at a time, transposed ones in 8 x 8 block transposes (vec8.transpose8), partial
    blocks element by element. Task p * chunks + c packs rows [PACK_ROWS c,
    PACK_ROWS (c + 1)) of batch p."""
    strips, rows = xp.shape[1], xp.shape[2]
    cols = x.shape[1] if trans else x.shape[2]
    chunks = (rows + PACK_ROWS - 1) // PACK_ROWS
    full = cols // STRIP_LANES
    absm = vec8.splat_i8(ABS_MASK)
    below = vec8.splat_i8(MIN_NORMAL - 1)
    for task in range(lo, hi):
        p = task // chunks
        u0 = (task - p * chunks) * PACK_ROWS
        u1 = min(u0 + PACK_ROWS, rows)
        if not trans:
            for u in range(u0, u1):
                s = (p * rows + u) * cols
                for q in range(full):
                    d = ((p * strips + q) * rows + u) * STRIP_LANES
                    vec8.store_i8(xp, d, vec8.load_i8(x, s + q * STRIP_LANES))
                    vec8.store_i8(xp, d + 8, vec8.load_i8(x, s + q * STRIP_LANES + 8))
                for q in range(full, strips):
                    for l in range(STRIP_LANES):
                        c = q * STRIP_LANES + l
                        xp[p, q, u, l] = vec8.get_i32(x, s + c) if c < cols else 0
        else:
            for q in range(strips):
                for l0 in range(0, STRIP_LANES, 8):
                    c0 = q * STRIP_LANES + l0
                    u = u0
                    if c0 + 8 <= cols:
                        while u + 8 <= u1:
                            vec8.transpose8(x, (p * cols + c0) * rows + u, rows, xp,
                                            ((p * strips + q) * rows + u) * STRIP_LANES + l0,
                                            STRIP_LANES)
                            u += 8
                    for uu in range(u, u1):
                        for l in range(8):
                            c = c0 + l
                            xp[p, q, uu, l0 + l] = x[p, c, uu] if c < cols else 0
        if masked:
            for q in range(strips):
                for u in range(u0, u1):
                    d = ((p * strips + q) * rows + u) * STRIP_LANES
                    for h in range(0, STRIP_LANES, 8):
                        v = vec8.load_i8(xp, d + h)
                        vec8.store_i8(mp, d + h, vec8.gt_i8(vec8.and_i8(v, absm), below))


@njit(**_SERIAL)
def _strip_span(mp, base, rows):
    """(lo, hi): the rows of a packed strip's zero mask (``rows`` rows of 16 lanes at flat
    index ``base`` of mp) from the first to the last one holding a normal lane (an empty
    range when none does); a row's 16 lanes are tested two 8-lane loads at a time."""
    lo = 0
    while lo < rows and vec8.hmin_i8(vec8.min_i8(vec8.load_i8(mp, base + lo * 16),
                                                 vec8.load_i8(mp, base + lo * 16 + 8))) == 0:
        lo += 1
    hi = rows
    while hi > lo and vec8.hmin_i8(vec8.min_i8(vec8.load_i8(mp, base + hi * 16 - 16),
                                               vec8.load_i8(mp, base + hi * 16 - 8))) == 0:
        hi -= 1
    return lo, hi


@njit(**_SERIAL)
def _live_span(z, r, count, n):
    """(lo, hi): the columns j < n from the first to one past the last at which one of the
    rows z[r], ..., z[r + count - 1] holds a negative value (a live lane of a zero mask:
    -1 or NOT_MANT; 0 elsewhere), (n, n) when none does. z: 2-D C int32 whose row width is
    a multiple of 8 and whose columns from n on hold 0. The rows are folded by a lane-wise
    minimum 8 columns at a time from either end, then the edge group is searched lane by
    lane (one function, no helpers: each compiled function costs cold-start time). The
    kernels pass ``count`` as ``np.int64(...)``: a constant would be typed as a literal and
    compile one signature per value."""
    W = z.shape[1]
    lo = 0
    hi = W
    for side in range(2):
        while lo < hi:
            j = lo if side == 0 else hi - 8
            v = vec8.load_i8(z, r * W + j)
            for c in range(1, count):
                v = vec8.min_i8(v, vec8.load_i8(z, (r + c) * W + j))
            if vec8.hmin_i8(v) < 0:
                break
            if side == 0:
                lo += 8
            else:
                hi -= 8
    # lo and hi now bound whole live groups (or meet): trim inside the edge groups.
    hi = min(hi, n)
    lo = min(lo, hi)
    for side in range(2):
        while lo < hi:
            j = lo if side == 0 else hi - 1
            live = False
            for c in range(count):
                live = live or z[r + c, j] < 0
            if live:
                break
            if side == 0:
                lo += 1
            else:
                hi -= 1
    if lo == hi:
        return n, n
    return lo, hi


@jitable
def _gather_rows(x, trans, p, i0, rows, rows_to, cols, dst):
    """dst[r, c] = X[p, i0 + min(r, rows - 1), c] for r < rows_to, c < cols (rows past the
    last repeat it), X (batch, n, cols) being ``x`` or, when ``trans``, the transpose of
    ``x`` (batch, cols, n). x: C-contiguous int32; dst: 2-D C int32, rows of at least
    ``cols``. Plain rows are copied 8 lanes at a time, transposed ones in 8 x 8 blocks
    (vec8.transpose8), the rest element by element."""
    W = dst.shape[1]
    if not trans:
        n = x.shape[1]
        for r in range(rows_to):
            s = (p * n + i0 + min(r, rows - 1)) * cols
            c8 = cols - cols % 8
            for c in range(0, c8, 8):
                vec8.store_i8(dst, r * W + c, vec8.load_i8(x, s + c))
            for c in range(c8, cols):
                dst[r, c] = vec8.get_i32(x, s + c)
        return
    n = x.shape[2]
    r0 = 0
    while r0 + 8 <= rows:
        c0 = 0
        while c0 + 8 <= cols:
            vec8.transpose8(x, (p * cols + c0) * n + i0 + r0, n, dst, r0 * W + c0, W)
            c0 += 8
        for c in range(c0, cols):
            for r in range(r0, r0 + 8):
                dst[r, c] = vec8.get_i32(x, (p * cols + c) * n + i0 + r)
        r0 += 8
    for r in range(r0, rows_to):
        i = i0 + min(r, rows - 1)
        for c in range(cols):
            dst[r, c] = vec8.get_i32(x, (p * cols + c) * n + i)


@jitable
def _slope_consts(y, rows, cols, off):
    """In place, y[r, t] = Mx + off - ONE for r < rows, t < cols, Mx the mantissa field of
    the int32 pattern y[r, t] (0 for a zero or subnormal one); 8 lanes at a time."""
    W = y.shape[1]
    mant = vec8.splat_i8(MANT_MASK)
    absm = vec8.splat_i8(ABS_MASK)
    below = vec8.splat_i8(MIN_NORMAL - 1)
    c = vec8.splat_i8(off - ONE)
    c8 = cols - cols % 8
    for r in range(rows):
        for t in range(0, c8, 8):
            v = vec8.load_i8(y, r * W + t)
            live = vec8.gt_i8(vec8.and_i8(v, absm), below)
            vec8.store_i8(y, r * W + t, vec8.add_i8(vec8.and_i8(vec8.and_i8(v, mant), live), c))
        for t in range(c8, cols):
            v = y[r, t]
            y[r, t] = np.int32((v & MANT_MASK if _normal(v) else 0) + off - ONE)


@jitable
def _fold_zero_mask(gs, ns, rows, cols):
    """In place, for r < rows, j < cols: ns[r, j] = NOT_MANT where gs[r, j] is a normal
    number, else 0 and gs[r, j] = 0 (the folded zero mask of ``_sl_tile``'s mask_g)."""
    W = gs.shape[1]
    absm = vec8.splat_i8(ABS_MASK)
    below = vec8.splat_i8(MIN_NORMAL - 1)
    nm = vec8.splat_i8(NOT_MANT)
    c8 = cols - cols % 8
    for r in range(rows):
        for j in range(0, c8, 8):
            v = vec8.load_i8(gs, r * W + j)
            live = vec8.gt_i8(vec8.and_i8(v, absm), below)
            vec8.store_i8(gs, r * W + j, vec8.and_i8(v, live))
            vec8.store_i8(ns, r * W + j, vec8.and_i8(nm, live))
        for j in range(c8, cols):
            live = _normal(gs[r, j])
            ns[r, j] = NOT_MANT if live else 0
            gs[r, j] = gs[r, j] if live else 0


@jitable
def _scatter_rows(src, rows, cols, out, p, i0):
    """out[p, c, i0 + r] = src[r, c] for r < rows, c < cols (a block of rows written into
    the transpose of a (batch, n, cols) float32 array: out is (batch, cols, n), C order);
    8 x 8 block transposes where full, element by element elsewhere."""
    W = src.shape[1]
    n = out.shape[2]
    r0 = 0
    while r0 + 8 <= rows:
        c0 = 0
        while c0 + 8 <= cols:
            vec8.transpose8(src, r0 * W + c0, W, out, (p * cols + c0) * n + i0 + r0, n)
            c0 += 8
        for c in range(c0, cols):
            for r in range(r0, r0 + 8):
                out[p, c, i0 + r] = src[r, c]
        r0 += 8
    for r in range(r0, rows):
        for c in range(cols):
            out[p, c, i0 + r] = src[r, c]


@threads.splittable
def _grad_range(y_src, y_trans, g, g_trans, xp, mp, mask_x, mask_g, off, out, out_trans,
                lo, hi):
    """Tasks lo <= task < hi of the exact gradient in left form:
    out[p, i, t] = sum_j PAM(G[p, i, j], slope(Y[p, i, t], X[p, j, t])), j increasing,
    slope the exact derivative of PAM w.r.t. its first operand (bits.mul_slope_bits).
    Y (batch, n, k) is ``y_src`` or, when ``y_trans``, its transpose; G (batch, n, red) is
    ``g`` or, when ``g_trans``, its transpose (both C-contiguous: a row block's rows are
    gathered, with 8 x 8 block transposes for a transposed one, so no transposed copy is
    made). X (batch, red, k) is given packed in xp / mp (``_pack_range``, masks when
    ``mask_x``: X holds zeros or subnormals); ``mask_g``: G holds zeros or subnormals. The
    result goes into ``out`` (batch, n, k), or when ``out_trans`` into ``out`` (batch, k,
    n) as its transpose. Task p * row_blocks + b computes output rows [GRAD_ROW_BLOCK b,
    GRAD_ROW_BLOCK (b + 1)) of batch p.

    The micro-kernel (2 rows x 16 columns over the reduced span) is written out here
    rather than called: a call passing arrays costs a reference count update per array
    (an atomic add) on entry and on exit, as much as a tile's work at red = 32. A full
    tile is stored straight into ``out`` (8-lane stores), a partial one through a scratch
    tile; with ``out_trans`` the tiles fill a row block buffer that is then written
    transposed (8 x 8 block transposes).

    Per tile: acc[u, l] = sum_j f32(((y[r + u, t0 + l] + X[j, l]) & n_u[j]) + g_u[j]),
    u = 0, 1, y the slope constants, X the packed strip, g_u = gs[r + u] a row of G's
    signed bits; ``mask_g``: n_u = ns[r + u] holds NOT_MANT, or 0 where g_u[j] is zero or
    subnormal (g_u[j] is then 0 too: the product is +0), else n_u = NOT_MANT; ``mask_x``:
    each product is also anded with X's packed zero mask."""
    strips, red = xp.shape[1], xp.shape[2]
    n = out.shape[2] if out_trans else out.shape[1]
    k = out.shape[1] if out_trans else out.shape[2]
    row_blocks = (n + GRAD_ROW_BLOCK - 1) // GRAD_ROW_BLOCK
    W = strips * STRIP_LANES
    R = red + (-red) % 8
    y = np.zeros((GRAD_ROW_BLOCK, W), np.int32)
    gs = np.zeros((GRAD_ROW_BLOCK, R), np.int32)
    ns = np.zeros((GRAD_ROW_BLOCK, R), np.int32)
    if not mask_g:
        ns[:] = NOT_MANT          # the masked-X loop reads n_u from ns either way
    spans = np.empty((GRAD_ROW_BLOCK // 2, 2), np.int64)
    block = np.empty((GRAD_ROW_BLOCK, W if out_trans else 0), np.float32)
    tile = np.empty(2 * STRIP_LANES, np.float32)
    flat = out.reshape(-1)
    nm = vec8.splat_i8(NOT_MANT)
    for task in range(lo, hi):
        p = task // row_blocks
        i0 = (task - p * row_blocks) * GRAD_ROW_BLOCK
        rows = min(i0 + GRAD_ROW_BLOCK, n) - i0
        rows2 = rows + rows % 2
        # Slope constants Mx + off - ONE (Mx: Y's mantissa field, 0 unless normal) and the
        # splatted rows of G; rows past the last repeat it.
        _gather_rows(y_src, y_trans, p, i0, rows, rows2, k, y)
        _slope_consts(y, rows2, k, off)
        _gather_rows(g, g_trans, p, i0, rows, rows2, red, gs)
        if mask_g:
            _fold_zero_mask(gs, ns, rows2, red)
        for r in range(0, rows2, 2):
            j0, j1 = _live_span(ns, r, np.int64(2), red) if mask_g else (0, red)
            spans[r // 2, 0] = j0
            spans[r // 2, 1] = j1
        for q in range(strips):
            t0 = q * STRIP_LANES
            base = (p * strips + q) * red * STRIP_LANES
            s0, s1 = _strip_span(mp, base, red) if mask_x else (0, red)
            for r in range(0, rows, 2):
                j0 = max(s0, spans[r // 2, 0])
                j1 = max(j0, min(s1, spans[r // 2, 1]))
                y00 = vec8.load_i8(y, r * W + t0)
                y01 = vec8.load_i8(y, r * W + t0 + 8)
                y10 = vec8.load_i8(y, (r + 1) * W + t0)
                y11 = vec8.load_i8(y, (r + 1) * W + t0 + 8)
                s00 = vec8.zero_f8()
                s01 = vec8.zero_f8()
                s10 = vec8.zero_f8()
                s11 = vec8.zero_f8()
                if mask_x:
                    for j in range(j0, j1):
                        i = base + j * 16
                        x0 = vec8.load_i8(xp, i)
                        x1 = vec8.load_i8(xp, i + 8)
                        m0 = vec8.load_i8(mp, i)
                        m1 = vec8.load_i8(mp, i + 8)
                        k0 = vec8.splat_i8(vec8.get_i32(ns, r * R + j))
                        k1 = vec8.splat_i8(vec8.get_i32(ns, (r + 1) * R + j))
                        c0 = vec8.splat_i8(vec8.get_i32(gs, r * R + j))
                        c1 = vec8.splat_i8(vec8.get_i32(gs, (r + 1) * R + j))
                        s00 = vec8.fadd_bits(s00, vec8.and_i8(vec8.add_i8(
                            vec8.and_i8(vec8.add_i8(y00, x0), k0), c0), m0))
                        s01 = vec8.fadd_bits(s01, vec8.and_i8(vec8.add_i8(
                            vec8.and_i8(vec8.add_i8(y01, x1), k0), c0), m1))
                        s10 = vec8.fadd_bits(s10, vec8.and_i8(vec8.add_i8(
                            vec8.and_i8(vec8.add_i8(y10, x0), k1), c1), m0))
                        s11 = vec8.fadd_bits(s11, vec8.and_i8(vec8.add_i8(
                            vec8.and_i8(vec8.add_i8(y11, x1), k1), c1), m1))
                elif mask_g:
                    for j in range(j0, j1):
                        i = base + j * 16
                        x0 = vec8.load_i8(xp, i)
                        x1 = vec8.load_i8(xp, i + 8)
                        k0 = vec8.splat_i8(vec8.get_i32(ns, r * R + j))
                        k1 = vec8.splat_i8(vec8.get_i32(ns, (r + 1) * R + j))
                        c0 = vec8.splat_i8(vec8.get_i32(gs, r * R + j))
                        c1 = vec8.splat_i8(vec8.get_i32(gs, (r + 1) * R + j))
                        s00 = vec8.fadd_bits(s00, vec8.add_i8(vec8.and_i8(vec8.add_i8(y00, x0), k0), c0))
                        s01 = vec8.fadd_bits(s01, vec8.add_i8(vec8.and_i8(vec8.add_i8(y01, x1), k0), c0))
                        s10 = vec8.fadd_bits(s10, vec8.add_i8(vec8.and_i8(vec8.add_i8(y10, x0), k1), c1))
                        s11 = vec8.fadd_bits(s11, vec8.add_i8(vec8.and_i8(vec8.add_i8(y11, x1), k1), c1))
                else:
                    for j in range(j0, j1):
                        i = base + j * 16
                        x0 = vec8.load_i8(xp, i)
                        x1 = vec8.load_i8(xp, i + 8)
                        c0 = vec8.splat_i8(vec8.get_i32(gs, r * R + j))
                        c1 = vec8.splat_i8(vec8.get_i32(gs, (r + 1) * R + j))
                        s00 = vec8.fadd_bits(s00, vec8.add_i8(vec8.and_i8(vec8.add_i8(y00, x0), nm), c0))
                        s01 = vec8.fadd_bits(s01, vec8.add_i8(vec8.and_i8(vec8.add_i8(y01, x1), nm), c0))
                        s10 = vec8.fadd_bits(s10, vec8.add_i8(vec8.and_i8(vec8.add_i8(y10, x0), nm), c1))
                        s11 = vec8.fadd_bits(s11, vec8.add_i8(vec8.and_i8(vec8.add_i8(y11, x1), nm), c1))
                if out_trans:            # whole rows of the block, padding lanes included
                    vec8.store_f8(block, r * W + t0, s00)
                    vec8.store_f8(block, r * W + t0 + 8, s01)
                    vec8.store_f8(block, (r + 1) * W + t0, s10)
                    vec8.store_f8(block, (r + 1) * W + t0 + 8, s11)
                elif t0 + STRIP_LANES <= k and r + 1 < rows:     # a full tile: straight out
                    d = (p * n + i0 + r) * k + t0
                    vec8.store_f8(flat, d, s00)
                    vec8.store_f8(flat, d + 8, s01)
                    vec8.store_f8(flat, d + k, s10)
                    vec8.store_f8(flat, d + k + 8, s11)
                else:                    # the last row or columns: through a scratch tile
                    vec8.store_f8(tile, 0, s00)
                    vec8.store_f8(tile, 8, s01)
                    vec8.store_f8(tile, 16, s10)
                    vec8.store_f8(tile, 24, s11)
                    for u in range(min(2, rows - r)):
                        for l in range(min(STRIP_LANES, k - t0)):
                            out[p, i0 + r + u, t0 + l] = tile[u * STRIP_LANES + l]
        if out_trans:
            _scatter_rows(block, rows, k, out, p, i0)


@jitable
def _mm_consts(cs, h, rows, cols, off):
    """In place, for r < rows, t < cols: cs[r, t] = bits(a) - ONE + off wrapped (|bits(a)|
    - ONE + off, + 2^31 for negative a: adding it to |bits(b)| gives the signed PAM
    product) and h[r, t] = -1 where a is normal, 0 where it is zero or subnormal, a being
    the int32 pattern cs[r, t] on entry; 8 lanes at a time."""
    W = cs.shape[1]
    absm = vec8.splat_i8(ABS_MASK)
    below = vec8.splat_i8(MIN_NORMAL - 1)
    c = vec8.splat_i8(off - ONE)
    c8 = cols - cols % 8
    for r in range(rows):
        for t in range(0, c8, 8):
            v = vec8.load_i8(cs, r * W + t)
            vec8.store_i8(h, r * W + t, vec8.gt_i8(vec8.and_i8(v, absm), below))
            vec8.store_i8(cs, r * W + t, vec8.add_i8(v, c))
        for t in range(c8, cols):
            ia = np.int64(cs[r, t])
            h[r, t] = -1 if _normal(cs[r, t]) else 0
            cs[r, t] = _signed_const((ia & ABS_MASK) - ONE + off, ia < 0)


@threads.splittable
def _mm_range(a, a_trans, xp, mp, masked, off, bias, has_bias, out, lo, hi):
    """Tasks lo <= task < hi of the PAM forward fast path: out[p, i, j] = sum_t
    PAM(A[p, i, t], b[p, t, j]), t increasing, A being ``a`` (batch, n, k) or, when
    ``a_trans``, the transpose of ``a`` (batch, k, n), with b given packed in xp / mp
    (``_pack_range``; masks when ``masked``: a or b holds zeros or subnormals); with
    ``has_bias`` then + bias[j] (a float32 add, the sum first: a linear layer's y + bias),
    ``bias`` holding the bits of the bias padded with zeros to whole strips. Task
    p * row_blocks + b computes output rows [MM_ROW_BLOCK b, MM_ROW_BLOCK (b + 1)) of
    batch p.

    Per tile (written out here, not called: see ``_grad_range``): acc[u, l] = sum_t
    f32(X[t, l] + cs[r + u, t]), t0 <= t < t1 increasing, u = 0..3, X the packed strip of
    b, cs[r + u] the constants of a row of a (``_mm_consts``); when ``masked`` each
    product is anded with X's packed zero mask and h[r + u, t] (a's): a zero or subnormal
    factor gives +0. A full tile is stored straight into ``out``, a partial one through a
    scratch tile."""
    n, k = (a.shape[2], a.shape[1]) if a_trans else (a.shape[1], a.shape[2])
    strips, m = xp.shape[1], out.shape[2]
    row_blocks = (n + MM_ROW_BLOCK - 1) // MM_ROW_BLOCK
    K = k + (-k) % 8
    cs = np.zeros((MM_ROW_BLOCK, K), np.int32)
    h = np.zeros((MM_ROW_BLOCK, K), np.int32)
    spans = np.empty((MM_ROW_BLOCK // MM_TILE_ROWS, 2), np.int64)
    tile = np.empty(MM_TILE_ROWS * STRIP_LANES, np.float32)
    flat = out.reshape(-1)
    for task in range(lo, hi):
        p = task // row_blocks
        i0 = (task - p * row_blocks) * MM_ROW_BLOCK
        rows = min(i0 + MM_ROW_BLOCK, n) - i0
        rows4 = rows + (-rows) % MM_TILE_ROWS
        _gather_rows(a, a_trans, p, i0, rows, rows4, k, cs)
        _mm_consts(cs, h, rows4, k, off)
        for r in range(0, rows4, MM_TILE_ROWS):
            t0, t1 = _live_span(h, r, np.int64(MM_TILE_ROWS), k) if masked else (0, k)
            spans[r // MM_TILE_ROWS, 0] = t0
            spans[r // MM_TILE_ROWS, 1] = t1
        for q in range(strips):
            j0 = q * STRIP_LANES
            base = (p * strips + q) * k * STRIP_LANES
            s0, s1 = _strip_span(mp, base, k) if masked else (0, k)
            for r in range(0, rows, MM_TILE_ROWS):
                t0 = max(s0, spans[r // MM_TILE_ROWS, 0])
                t1 = max(t0, min(s1, spans[r // MM_TILE_ROWS, 1]))
                s00 = vec8.zero_f8()
                s01 = vec8.zero_f8()
                s10 = vec8.zero_f8()
                s11 = vec8.zero_f8()
                s20 = vec8.zero_f8()
                s21 = vec8.zero_f8()
                s30 = vec8.zero_f8()
                s31 = vec8.zero_f8()
                if masked:
                    for t in range(t0, t1):
                        i = base + t * 16
                        x0 = vec8.load_i8(xp, i)
                        x1 = vec8.load_i8(xp, i + 8)
                        m0 = vec8.load_i8(mp, i)
                        m1 = vec8.load_i8(mp, i + 8)
                        c = vec8.splat_i8(vec8.get_i32(cs, r * K + t))
                        z = vec8.splat_i8(vec8.get_i32(h, r * K + t))
                        s00 = vec8.fadd_bits(s00, vec8.and_i8(vec8.and_i8(vec8.add_i8(x0, c), m0), z))
                        s01 = vec8.fadd_bits(s01, vec8.and_i8(vec8.and_i8(vec8.add_i8(x1, c), m1), z))
                        c = vec8.splat_i8(vec8.get_i32(cs, (r + 1) * K + t))
                        z = vec8.splat_i8(vec8.get_i32(h, (r + 1) * K + t))
                        s10 = vec8.fadd_bits(s10, vec8.and_i8(vec8.and_i8(vec8.add_i8(x0, c), m0), z))
                        s11 = vec8.fadd_bits(s11, vec8.and_i8(vec8.and_i8(vec8.add_i8(x1, c), m1), z))
                        c = vec8.splat_i8(vec8.get_i32(cs, (r + 2) * K + t))
                        z = vec8.splat_i8(vec8.get_i32(h, (r + 2) * K + t))
                        s20 = vec8.fadd_bits(s20, vec8.and_i8(vec8.and_i8(vec8.add_i8(x0, c), m0), z))
                        s21 = vec8.fadd_bits(s21, vec8.and_i8(vec8.and_i8(vec8.add_i8(x1, c), m1), z))
                        c = vec8.splat_i8(vec8.get_i32(cs, (r + 3) * K + t))
                        z = vec8.splat_i8(vec8.get_i32(h, (r + 3) * K + t))
                        s30 = vec8.fadd_bits(s30, vec8.and_i8(vec8.and_i8(vec8.add_i8(x0, c), m0), z))
                        s31 = vec8.fadd_bits(s31, vec8.and_i8(vec8.and_i8(vec8.add_i8(x1, c), m1), z))
                else:
                    for t in range(t0, t1):
                        i = base + t * 16
                        x0 = vec8.load_i8(xp, i)
                        x1 = vec8.load_i8(xp, i + 8)
                        c = vec8.splat_i8(vec8.get_i32(cs, r * K + t))
                        s00 = vec8.fadd_bits(s00, vec8.add_i8(x0, c))
                        s01 = vec8.fadd_bits(s01, vec8.add_i8(x1, c))
                        c = vec8.splat_i8(vec8.get_i32(cs, (r + 1) * K + t))
                        s10 = vec8.fadd_bits(s10, vec8.add_i8(x0, c))
                        s11 = vec8.fadd_bits(s11, vec8.add_i8(x1, c))
                        c = vec8.splat_i8(vec8.get_i32(cs, (r + 2) * K + t))
                        s20 = vec8.fadd_bits(s20, vec8.add_i8(x0, c))
                        s21 = vec8.fadd_bits(s21, vec8.add_i8(x1, c))
                        c = vec8.splat_i8(vec8.get_i32(cs, (r + 3) * K + t))
                        s30 = vec8.fadd_bits(s30, vec8.add_i8(x0, c))
                        s31 = vec8.fadd_bits(s31, vec8.add_i8(x1, c))
                if has_bias:
                    b0 = vec8.load_i8(bias, j0)
                    b1 = vec8.load_i8(bias, j0 + 8)
                    s00 = vec8.fadd_bits(s00, b0)
                    s01 = vec8.fadd_bits(s01, b1)
                    s10 = vec8.fadd_bits(s10, b0)
                    s11 = vec8.fadd_bits(s11, b1)
                    s20 = vec8.fadd_bits(s20, b0)
                    s21 = vec8.fadd_bits(s21, b1)
                    s30 = vec8.fadd_bits(s30, b0)
                    s31 = vec8.fadd_bits(s31, b1)
                if j0 + STRIP_LANES <= m and r + MM_TILE_ROWS <= rows:   # full: straight out
                    d = (p * n + i0 + r) * m + j0
                    vec8.store_f8(flat, d, s00)
                    vec8.store_f8(flat, d + 8, s01)
                    vec8.store_f8(flat, d + m, s10)
                    vec8.store_f8(flat, d + m + 8, s11)
                    vec8.store_f8(flat, d + 2 * m, s20)
                    vec8.store_f8(flat, d + 2 * m + 8, s21)
                    vec8.store_f8(flat, d + 3 * m, s30)
                    vec8.store_f8(flat, d + 3 * m + 8, s31)
                else:                    # the last rows or columns: through a scratch tile
                    vec8.store_f8(tile, 0, s00)
                    vec8.store_f8(tile, 8, s01)
                    vec8.store_f8(tile, 16, s10)
                    vec8.store_f8(tile, 24, s11)
                    vec8.store_f8(tile, 32, s20)
                    vec8.store_f8(tile, 40, s21)
                    vec8.store_f8(tile, 48, s30)
                    vec8.store_f8(tile, 56, s31)
                    for u in range(min(MM_TILE_ROWS, rows - r)):
                        for l in range(min(STRIP_LANES, m - j0)):
                            out[p, i0 + r + u, j0 + l] = tile[u * STRIP_LANES + l]


@njit(**_SERIAL)
def _grads_decide(out, a0, a1, b0, b1, g0, g1, off):
    """The tuple of ``_grads_plan`` from the operands' merged chunk scans."""
    sa, za, lo_a, hi_a = _scan_merge(out, a0, a1)
    sb, zb, lo_b, hi_b = _scan_merge(out, b0, b1)
    sg, zg, lo_g, hi_g = _scan_merge(out, g0, g1)
    ok = not (sa or sb or sg)
    return (ok and _slope_fast_ok(lo_g, hi_g, lo_b, hi_b, off),
            ok and _slope_fast_ok(lo_g, hi_g, lo_a, hi_a, off), za, zb, zg)


def _grads_plan(a, b, grad, off):
    """(fast_a, fast_b, za, zb, zg) for the exact matmul gradients: whether the int32
    fast path of the left / right gradient applies (no inf/NaN in a, b, grad, and
    ``_slope_fast_ok`` for grad's range and that of the operand whose exponents enter the
    slopes: b for the left gradient, a for the right one), and whether a, b, grad hold
    zeros/subnormals. a and b may be given transposed (the scans see the same values)."""
    out, ((a0, a1), (b0, b1), (g0, g1)) = _scan(a, b, grad)
    return _grads_decide(out, a0, a1, b0, b1, g0, g1, off)


_WORK = threading.local()


def _strip_work(batch, rows, cols, masked):
    """Per-thread int32 scratch for the packed 16-column strips of a (batch, rows, cols)
    matrix (and their masks when ``masked``), as the views (xp, mp) of ``_pack_range``;
    mp is xp again when not ``masked``. The buffer is kept and reused across calls (grown
    when too small): a fresh multi-MB array costs its page faults on every call (2.4 ms per
    4 MB here, as much as packing it), so each thread holds the largest one it has needed."""
    shape = (batch, -(-cols // STRIP_LANES), rows, STRIP_LANES)
    size = batch * shape[1] * rows * STRIP_LANES
    work = getattr(_WORK, "strips", None)
    if work is None or work.size < 2 * size:
        work = _WORK.strips = np.empty(max(2 * size, 1), np.int32)
    xp = work[:size].reshape(shape)
    return xp, (work[size:2 * size].reshape(shape) if masked else xp)


def _pack(x, trans, rows, cols, masked):
    """The packed strips (xp, mp) of X (batch, rows, cols): x, or when ``trans`` x is
    X's transpose (see ``_pack_range``)."""
    batch = x.shape[0]
    xp, mp = _strip_work(batch, rows, cols, masked)
    threads.run(_pack_range, batch * -(-rows // PACK_ROWS), batch * rows * cols,
                MATMUL_PARALLEL_MIN, x, trans, xp, mp, masked)
    return xp, mp


def _layout(x, xt):
    """(arr, trans): a C-contiguous int32 array holding the 3-D matrix X given as ``x``
    (any strides, or None) or as its transpose ``xt``: X itself (trans False) or X's
    transpose (trans True), whichever is contiguous already; a contiguous copy of X only
    when neither is."""
    if x is None:
        arr, trans = _layout(xt, None)
        return arr, not trans
    if x.flags.c_contiguous:
        return x, False
    if x.transpose(0, 2, 1).flags.c_contiguous:
        return x.transpose(0, 2, 1), True
    return np.ascontiguousarray(x), False


def _plain(arr, trans):
    """The matrix given by ``_layout``'s (arr, trans) as a C-contiguous array."""
    return np.ascontiguousarray(arr.transpose(0, 2, 1)) if trans else arr


def _grad_tiles(y_src, y_trans, x_src, x_trans, g, g_trans, mask_x, mask_g, off, out,
               out_trans):
    """``_grad_range`` over all of its output (batch, n, k): ``out``, or when
    ``out_trans`` the transpose of ``out`` (batch, k, n). X (batch, red, k) is packed from
    ``x_src`` (transposed when ``x_trans``), then the row blocks are split between
    threads."""
    batch = out.shape[0]
    n, k = (out.shape[2], out.shape[1]) if out_trans else (out.shape[1], out.shape[2])
    red = x_src.shape[2] if x_trans else x_src.shape[1]
    xp, mp = _pack(x_src, x_trans, red, k, mask_x)
    threads.run(_grad_range, batch * -(-n // GRAD_ROW_BLOCK), batch * n * k * red,
                MATMUL_PARALLEL_MIN, y_src, y_trans, g, g_trans, xp, mp, mask_x, mask_g, off,
                out, out_trans)


def matmul_exact_grads(a, bt, at, b, grad, off, out_a, out_b):
    """Both exact gradients of ``matmul`` (``matmul_exact_grad_left`` into ``out_a`` and
    ``matmul_exact_grad_right`` into ``out_b``) with one range scan of the operands and
    the output gradient for the two. Each operand may be given either way: a (batch, n, k)
    or its transpose at, b (batch, k, m) or its transpose bt (pass None for the other),
    with any strides; the fast path reads whichever of the two layouts is C-contiguous, so
    a linear layer's a = x and bt = weight are read in place. ``out_b`` may be the
    transpose of a C-contiguous array (then written in place, row by row of b^T). Pass None
    for an output not wanted. Same bits as the two functions."""
    want_a = out_a is not None and out_a.size > 0
    want_b = out_b is not None and out_b.size > 0
    if not (want_a or want_b):
        return
    A, ta = _layout(a, at)                       # A: a, or at when ta
    B, tb = _layout(b, bt)                       # B: b, or bt when tb
    grad = np.ascontiguousarray(grad)
    fast_a, fast_b, za, zb, zg = _grads_plan(A, B, grad, off)
    if want_a:
        o = out_a if out_a.flags.c_contiguous else np.empty(out_a.shape, np.float32)
        if fast_a:     # out_a[i, t] = sum_j f(a[i, t], bt[j, t], grad[i, j])
            _grad_tiles(A, ta, B, not tb, grad, False, zb, zg, off, o, False)
        else:
            _grad_left_general(_plain(A, ta), _plain(B, not tb), grad, off, o)
        if o is not out_a:
            out_a[...] = o
    if want_b:
        if fast_b:     # out_b^T[j, t] = sum_i f(bt[j, t], a[i, t], grad[i, j]): left form
            if out_b.transpose(0, 2, 1).flags.c_contiguous:
                _grad_tiles(B, not tb, A, ta, grad, True, za, zg, off,
                            out_b.transpose(0, 2, 1), False)
                return
            o = out_b if out_b.flags.c_contiguous else np.empty(out_b.shape, np.float32)
            _grad_tiles(B, not tb, A, ta, grad, True, za, zg, off, o, True)
        else:
            o = out_b if out_b.flags.c_contiguous else np.empty(out_b.shape, np.float32)
            _grad_right_general(_plain(A, not ta), _plain(B, tb), grad, off, o)
        if o is not out_b:
            out_b[...] = o


def matmul_exact_grad_left(a, bt, grad, off, out):
    """Exact gradient w.r.t. the left operand of ``matmul``.

    out[p, i, t] = sum_j PAM(grad[p, i, j], slope_a(a[p, i, t], b[p, t, j])), j increasing,
    where slope_a is the exact power-of-two derivative of PAM w.r.t. its first operand
    (bits.mul_slope_bits). a: (batch, n, k), bt: (batch, m, k) (b transposed),
    grad: (batch, n, m) int32; out: (batch, n, k) float32. An empty j range gives zeros.
    The general path (any inf/NaN or range issue) compiles on first use only.
    """
    matmul_exact_grads(a, bt, None, None, grad, off, out, None)


def matmul_exact_grad_right(at, b, grad, off, out):
    """Exact gradient w.r.t. the right operand of ``matmul``.

    out[p, t, j] = sum_i PAM(grad[p, i, j], slope_a(b[p, t, j], a[p, i, t])), i increasing
    (PAM is symmetric, so the slope w.r.t. b is slope_a with the operands swapped).
    at: (batch, k, n) (a transposed), b: (batch, k, m), grad: (batch, n, m) int32;
    out: (batch, k, m) float32. An empty i range gives zeros. As for the left gradient,
    the general path compiles on first use only.
    """
    matmul_exact_grads(None, None, at, b, grad, off, None, out)


@njit(**_JIT)
def _grad_left_general(a, bt, grad, off, out):
    """General path of ``matmul_exact_grad_left``.

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
def _grad_right_general(at, b, grad, off, out):
    """General path of ``matmul_exact_grad_right``.

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


# =========================================================================== fused
# Fused kernels: one launch per call, the scalar definitions in pam.optim_bits
# (optimizers). Each range loop runs over sliced views (``range(n)`` with a non-negative
# index: LLVM vectorizes the branch-free per-element code; ``range(lo, hi)`` would keep
# Numba's negative-index wraparound in the address and stop it). The ``*_table`` kernels
# update a list of tensors in place without concatenating them: they take a table of
# the tensors' addresses and sizes (see _array_at) and split it into chunks of at most
# FUSED_CHUNK elements. The fused kernels are serial ``nogil`` kernels over a range of
# elements, chunks, blocks or rows, split between threads from FUSED_PARALLEL_MIN elements
# by pam.kernels.threads (the public names are Python functions doing that split).
FUSED_PARALLEL_MIN = 1 << 16
FUSED_CHUNK = 1 << 15
# The softmax and log-softmax rows cost about SOFTMAX_WORK elementwise operations per
# element (one thread: ~7.8 ns per element of (4096, 64) against ~1.5 for the elementwise
# kernels FUSED_PARALLEL_MIN is set for) and ROW_WORK more per row (short rows, such as
# attention over 5 tokens, cost ~20 ns per element): their size against FUSED_PARALLEL_MIN
# is row_work(...), so that a (2560, 5) softmax (0.27 ms on one thread) is shared too.
SOFTMAX_WORK = 5
ROW_WORK = 64


def row_work(size, rows, per_element=SOFTMAX_WORK):
    """The size of a row kernel's job in elementwise operations (see SOFTMAX_WORK)."""
    return per_element * size + ROW_WORK * rows


@intrinsic
def _int32_pointer(typingctx, address):
    """The integer ``address`` as a pointer to int32 (LLVM inttoptr)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.CPointer(types.int32)(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return sig, codegen


@jitable
def _array_at(address, n):
    """The int32 array of ``n`` elements at ``address`` (memory owned by the caller)."""
    return carray(_int32_pointer(address), (n,))


@njit(**_SERIAL)
def _chunk_table(sizes, chunk):
    """(tensor, lo, hi) rows splitting every size into pieces of at most ``chunk``."""
    count = 0
    for s in sizes:
        count += (s + chunk - 1) // chunk
    table = np.empty((count, 3), np.int64)
    r = 0
    for t in range(sizes.size):
        for lo in range(0, sizes[t], chunk):
            table[r, 0] = t
            table[r, 1] = lo
            table[r, 2] = min(lo + chunk, sizes[t])
            r += 1
    return table


def _make_adamw_range_body(amsgrad):
    """The :func:`adamw` update of the elements ``lo:hi``, with or without amsgrad (fixed:
    one kernel per choice, ``_adamw_range`` and ``_adamw_range_amsgrad``)."""
    def body(p, g, m, v, mx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off, flags,
               lo, hi):
        optim_bits.check_offset(off)
        p, g, m, v = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        if amsgrad:
            mx = mx[lo:hi]
            for i in range(p.size):
                np_, nm, nv, nmx = optim_bits.adamw_update(p[i], g[i], m[i], v[i], mx[i],
                                                           decay, b1, omb1, b2, omb2,
                                                           step_size, sbc2, eps, off, flags)
                p[i] = np_
                m[i] = nm
                v[i] = nv
                mx[i] = nmx
        else:
            for i in range(p.size):
                np_, nm, nv, nmx = optim_bits.adamw_update(p[i], g[i], m[i], v[i],
                                                           np.int32(0), decay, b1, omb1, b2,
                                                           omb2, step_size, sbc2, eps, off,
                                                           flags)
                p[i] = np_
                m[i] = nm
                v[i] = nv
    return body


_adamw_range_body = _make_adamw_range_body(False)
_adamw_range_amsgrad_body = _make_adamw_range_body(True)
_adamw_range = threads.splittable(_adamw_range_body, name="_adamw_range")
_adamw_range_amsgrad = threads.splittable(_adamw_range_amsgrad_body,
                                          name="_adamw_range_amsgrad")


def adamw(p, g, m, v, mx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off, flags):
    """In place over flat int32 arrays: p, m, v (and mx with amsgrad) <- one AdamW step.

    Every element follows pam.optim_bits.adamw_update; the scalars are float32 bit
    patterns from pam.optim_bits.adamw_scalars. ``mx`` may be any 1-element array when
    amsgrad is off. From FUSED_PARALLEL_MIN elements the elements are split between
    threads (pam.kernels.threads).
    """
    kernel = _adamw_range_amsgrad if flags & optim_bits.ADAMW_AMSGRAD else _adamw_range
    threads.run(kernel, p.size, p.size, FUSED_PARALLEL_MIN, p, g, m, v, mx, decay, b1, omb1,
                b2, omb2, step_size, sbc2, eps, off, flags)


def _make_adamw_table_rows(amsgrad):
    """The :func:`adamw` update of the chunks ``table[lo:hi]`` of :func:`adamw_table`
    (``_adamw_table_rows`` and ``_adamw_table_rows_amsgrad``)."""
    def kernel(addresses, sizes, table, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off,
               flags, lo, hi):
        optim_bits.check_offset(off)
        for r in range(lo, hi):
            t = table[r, 0]
            n = sizes[t]
            p = _array_at(addresses[0, t], n)
            g = _array_at(addresses[1, t], n)
            m = _array_at(addresses[2, t], n)
            v = _array_at(addresses[3, t], n)
            if amsgrad:
                _adamw_range_amsgrad_body(p, g, m, v, _array_at(addresses[4, t], n), decay,
                                          b1, omb1, b2, omb2, step_size, sbc2, eps, off, flags,
                                          table[r, 1], table[r, 2])
            else:
                _adamw_range_body(p, g, m, v, p, decay, b1, omb1, b2, omb2, step_size, sbc2,
                                  eps, off, flags, table[r, 1], table[r, 2])
    return threads.splittable(
        kernel, name="_adamw_table_rows_amsgrad" if amsgrad else "_adamw_table_rows")


_adamw_table_rows = _make_adamw_table_rows(False)
_adamw_table_rows_amsgrad = _make_adamw_table_rows(True)


def _table_run(kernel, addresses, sizes, *args):
    """``kernel`` over the chunk table of ``sizes`` (chunks of at most FUSED_CHUNK
    elements), split between threads from FUSED_PARALLEL_MIN elements in total."""
    table = _chunk_table(sizes, FUSED_CHUNK)
    threads.run(kernel, table.shape[0], int(sizes.sum()), FUSED_PARALLEL_MIN, addresses,
                sizes, table, *args)


def adamw_table(addresses, sizes, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off,
                flags):
    """The :func:`adamw` update in place over a list of tensors, one launch, no copies.

    ``addresses``: int64 (5, k), the data addresses of the k params, grads, exp_avgs,
    exp_avg_sqs and max_exp_avg_sqs (row 4 unused without amsgrad), each a contiguous
    float32 CPU tensor of ``sizes[j]`` elements that the caller keeps alive; distinct
    tensors must not overlap.
    """
    kernel = (_adamw_table_rows_amsgrad if flags & optim_bits.ADAMW_AMSGRAD
              else _adamw_table_rows)
    _table_run(kernel, addresses, sizes, decay, b1, omb1, b2, omb2, step_size, sbc2, eps,
               off, flags)


def _sgd_range_body(p, g, buf, lr, wd, mom, omd, off, flags, lo, hi):
    """The :func:`sgd` update of the elements ``lo:hi``."""
    optim_bits.check_offset(off)
    p, g = p[lo:hi], g[lo:hi]
    if (flags & optim_bits.SGD_MOMENTUM) != 0:
        buf = buf[lo:hi]
        for i in range(p.size):
            np_, nb = optim_bits.sgd_update(p[i], g[i], buf[i], lr, wd, mom, omd, off, flags)
            p[i] = np_
            buf[i] = nb
    else:
        for i in range(p.size):
            np_, nb = optim_bits.sgd_update(p[i], g[i], np.int32(0), lr, wd, mom, omd, off,
                                            flags)
            p[i] = np_


_sgd_range = threads.splittable(_sgd_range_body, name="_sgd_range")


def sgd(p, g, buf, lr, wd, mom, omd, off, flags):
    """In place over flat int32 arrays: p (and buf with momentum) <- one SGD step.

    Every element follows pam.optim_bits.sgd_update. ``buf`` may be any 1-element array
    without momentum.
    """
    threads.run(_sgd_range, p.size, p.size, FUSED_PARALLEL_MIN, p, g, buf, lr, wd, mom, omd,
                off, flags)


@threads.splittable
def _sgd_table_rows(addresses, sizes, table, lr, wd, mom, omd, off, flags, lo, hi):
    optim_bits.check_offset(off)
    for r in range(lo, hi):
        t = table[r, 0]
        n = sizes[t]
        p = _array_at(addresses[0, t], n)
        buf = _array_at(addresses[2, t], n) if (flags & optim_bits.SGD_MOMENTUM) != 0 else p
        _sgd_range_body(p, _array_at(addresses[1, t], n), buf, lr, wd, mom, omd, off, flags,
                        table[r, 1], table[r, 2])


def sgd_table(addresses, sizes, lr, wd, mom, omd, off, flags):
    """The :func:`sgd` update in place over a list of tensors (addresses (3, k): params,
    grads, momentum buffers, row 2 unused without momentum; see :func:`adamw_table`)."""
    _table_run(_sgd_table_rows, addresses, sizes, lr, wd, mom, omd, off, flags)


def _adamw_unbiased_range_body(p, g, m, v, mx, decay, c1, c2, k_step, eps_s, off, sq_off,
                               flags, lo, hi):
    """The :func:`adamw_unbiased` update of the elements ``lo:hi``."""
    optim_bits.check_offset(off)
    optim_bits.check_offset(sq_off)
    p, g, m, v = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    if (flags & optim_bits.ADAMW_AMSGRAD) != 0:
        mx = mx[lo:hi]
        for i in range(p.size):
            np_, nm, nv, nmx = optim_bits.adamw_update_unbiased(
                p[i], g[i], m[i], v[i], mx[i], decay, c1, c2, k_step, eps_s, off, sq_off,
                flags)
            p[i] = np_
            m[i] = nm
            v[i] = nv
            mx[i] = nmx
    else:
        for i in range(p.size):
            np_, nm, nv, nmx = optim_bits.adamw_update_unbiased(
                p[i], g[i], m[i], v[i], np.int32(0), decay, c1, c2, k_step, eps_s, off, sq_off,
                flags)
            p[i] = np_
            m[i] = nm
            v[i] = nv


_adamw_unbiased_range = threads.splittable(_adamw_unbiased_range_body,
                                           name="_adamw_unbiased_range")


def adamw_unbiased(p, g, m, v, mx, decay, c1, c2, k_step, eps_s, off, sq_off, flags):
    """In place: one step of the unbiased AdamW variant (pam.optim_bits.adamw_update_unbiased)."""
    threads.run(_adamw_unbiased_range, p.size, p.size, FUSED_PARALLEL_MIN, p, g, m, v, mx,
                decay, c1, c2, k_step, eps_s, off, sq_off, flags)


@threads.splittable
def _adamw_unbiased_table_rows(addresses, sizes, table, decay, c1, c2, k_step, eps_s, off,
                               sq_off, flags, lo, hi):
    optim_bits.check_offset(off)
    optim_bits.check_offset(sq_off)
    for r in range(lo, hi):
        t = table[r, 0]
        n = sizes[t]
        p = _array_at(addresses[0, t], n)
        mx = _array_at(addresses[4, t], n) if (flags & optim_bits.ADAMW_AMSGRAD) != 0 else p
        _adamw_unbiased_range_body(
            p, _array_at(addresses[1, t], n), _array_at(addresses[2, t], n),
            _array_at(addresses[3, t], n), mx, decay, c1, c2, k_step, eps_s, off, sq_off, flags,
            table[r, 1], table[r, 2])


def adamw_unbiased_table(addresses, sizes, decay, c1, c2, k_step, eps_s, off, sq_off, flags):
    """:func:`adamw_unbiased` in place over a list of tensors (see :func:`adamw_table`)."""
    _table_run(_adamw_unbiased_table_rows, addresses, sizes, decay, c1, c2, k_step, eps_s,
               off, sq_off, flags)


# --------------------------------------------------------------------------- fused composites
# GELU: per block of GELU_BLOCK elements, knot by knot (the same terms and float32 sums, in
# the same order per element as pam.rows_bits.gelu_forward_bits / gelu_backward_bits, with
# the loop over elements innermost so that it vectorizes). The slope changes are powers of
# two of magnitude <= 1 (checked), so each term's PAM is rows_bits.mul_pow2_bits (the same
# bits as bits.mul_bits in int32 lanes) and the sums run in a float32 block buffer. The
# loops index slices of the block from 0: an index lo + i with a runtime lo carries Numba's
# negative-index wraparound, which made LLVM load the elements one by one (2.2-2.6x slower).
# A block with no inf / NaN in its inputs (the usual case) runs shorter terms that drop
# the cases which cannot occur there (see _gelu_term_finite): 1.8x (forward) and 2.1x
# (backward) faster at 1 thread on a (16, 64, 512) activation, same bits.
GELU_BLOCK = 4096


@jitable
def _check_gelu_slopes(slopes):
    for j in range(slopes.size):
        if not rows_bits.is_pow2_at_most_one(slopes[j]):
            raise ValueError("gelu kernels: every slope change must be a power of two of "
                             "magnitude <= 1")


@jitable(forceinline=True)
def _finite_bits(v):
    """True when no int32 bit pattern in v is an inf or a NaN (a max reduction)."""
    worst = np.int32(0)
    for i in range(v.size):
        worst = max(worst, np.int32(v[i] & np.int32(ABS_MASK)))
    return worst < np.int32(INF)


@jitable(forceinline=True)
def _gelu_term_finite(xi, k, ed, sd):
    """rows_bits.gelu_term_bits for a finite x (float32 ``xi``) and a power-of-two slope
    change (``pow2_parts``): r = relu(x - k) is finite and not negative, so PAM(r, d) is
    sign(d) 0 below the smallest normal and bits(r) + ed with d's sign otherwise (the
    inf / NaN / sign cases of mul_pow2_bits cannot occur)."""
    t = xi - k
    r = t if t > np.float32(0.0) else np.float32(0.0)
    mag = np.int32(bits.f32_to_bits(r) + ed)
    return bits.bits_to_f32(sd if mag < np.int32(MIN_NORMAL) else np.int32(mag | sd))


@jitable(forceinline=True)
def _gelu_grad_term_finite(xi, gi, k, ed, sd):
    """_gelu_grad_term for a finite x and a finite gradient bit pattern ``gi`` (no NaN
    r, no inf / NaN g: mul_pow2_bits is a signed add with the flush to zero)."""
    sign = np.int32((gi ^ sd) & np.int32(bits.SIGN))
    mag = np.int32(np.int32(gi & np.int32(ABS_MASK)) + ed)
    t = sign if mag < np.int32(MIN_NORMAL) else np.int32(mag | sign)
    return bits.bits_to_f32(t if xi - k > np.float32(0.0) else np.int32(0))


@jitable
def _gelu_forward_block(x, knots, slopes, out, lo, hi, acc):
    """out[lo:hi] of gelu_forward; ``acc``: float32 scratch of at least hi - lo elements
    (the block's sums, one buffer per part rather than one allocation per block). A
    block without inf / NaN runs the shorter finite terms (same bits)."""
    xb = x[lo:hi]
    xs = xb.view(np.float32)
    kf = knots.view(np.float32)
    ys = out[lo:hi]
    m = hi - lo
    finite = _finite_bits(xb)
    ed, sd = rows_bits.pow2_parts(slopes[0])
    k = kf[0]
    if finite:
        for i in range(m):
            acc[i] = _gelu_term_finite(xs[i], k, ed, sd)
    else:
        for i in range(m):
            r = rows_bits._relu_f32(xs[i] - k)
            acc[i] = bits.bits_to_f32(rows_bits.mul_pow2_bits(bits.f32_to_bits(r), ed, sd))
    for j in range(1, knots.size):
        ed, sd = rows_bits.pow2_parts(slopes[j])
        k = kf[j]
        if finite:
            for i in range(m):
                acc[i] += _gelu_term_finite(xs[i], k, ed, sd)
        else:
            for i in range(m):
                r = rows_bits._relu_f32(xs[i] - k)
                acc[i] += bits.bits_to_f32(rows_bits.mul_pow2_bits(bits.f32_to_bits(r), ed,
                                                                   sd))
    for i in range(m):
        ys[i] = bits.f32_to_bits(acc[i])


@jitable
def _gelu_grad_term(xi, gi, k, ed, sd, exact):
    """rows_bits.gelu_grad_term_bits for a power-of-two slope change (see the block)."""
    r = xi - k
    t = rows_bits.mul_pow2_bits(gi, ed, sd)
    t = np.int32(bits.QNAN) if exact and r != r else t
    return t if (r != r or r > np.float32(0.0)) else np.int32(0)


@jitable
def _gelu_backward_block(x, grad, knots, slopes, exact, out, lo, hi, acc):
    """out[lo:hi] of gelu_backward; ``acc`` as for _gelu_forward_block (finite terms
    when neither x nor grad holds an inf / NaN in the block; ``exact`` then plays no
    part)."""
    xb = x[lo:hi]
    xs = xb.view(np.float32)
    gs = grad[lo:hi]
    kf = knots.view(np.float32)
    ys = out[lo:hi]
    m = hi - lo
    n = knots.size
    finite = _finite_bits(xb) and _finite_bits(gs)
    for jj in range(n):
        ed, sd = rows_bits.pow2_parts(slopes[n - 1 - jj])
        k = kf[n - 1 - jj]
        if finite and jj == 0:
            for i in range(m):
                acc[i] = _gelu_grad_term_finite(xs[i], gs[i], k, ed, sd)
        elif finite:
            for i in range(m):
                acc[i] += _gelu_grad_term_finite(xs[i], gs[i], k, ed, sd)
        elif jj == 0:
            for i in range(m):
                acc[i] = bits.bits_to_f32(_gelu_grad_term(xs[i], gs[i], k, ed, sd, exact))
        else:
            for i in range(m):
                acc[i] += bits.bits_to_f32(_gelu_grad_term(xs[i], gs[i], k, ed, sd,
                                                           exact))
    for i in range(m):
        ys[i] = bits.f32_to_bits(acc[i])


@threads.splittable
def _gelu_forward_blocks(x, knots, slopes, out, lo, hi):
    """:func:`gelu_forward` of the blocks ``lo:hi`` (GELU_BLOCK elements each)."""
    _check_gelu_slopes(slopes)
    n = x.size
    acc = np.empty(GELU_BLOCK, np.float32)          # the block's float32 sums
    for b in range(lo, hi):
        _gelu_forward_block(x, knots, slopes, out, b * GELU_BLOCK,
                            min(n, (b + 1) * GELU_BLOCK), acc)


@threads.splittable
def _gelu_backward_blocks(x, grad, knots, slopes, exact, out, lo, hi):
    """:func:`gelu_backward` of the blocks ``lo:hi``."""
    _check_gelu_slopes(slopes)
    n = x.size
    acc = np.empty(GELU_BLOCK, np.float32)
    for b in range(lo, hi):
        _gelu_backward_block(x, grad, knots, slopes, exact, out, b * GELU_BLOCK,
                             min(n, (b + 1) * GELU_BLOCK), acc)


def _blocks(n):
    return (n + GELU_BLOCK - 1) // GELU_BLOCK


def gelu_forward(x, knots, slopes, out):
    """out[i] = pam.rows_bits.gelu_forward_bits(x[i]) (flat int32 arrays); every slope
    change must be a power of two of magnitude <= 1 (else ValueError). Blocks split between
    threads from FUSED_PARALLEL_MIN elements."""
    threads.run(_gelu_forward_blocks, _blocks(x.size), x.size, FUSED_PARALLEL_MIN, x, knots,
                slopes, out)


def gelu_backward(x, grad, knots, slopes, exact, out):
    """out[i] = pam.rows_bits.gelu_backward_bits(x[i], grad[i]) (flat int32 arrays); the
    slope changes as for gelu_forward."""
    threads.run(_gelu_backward_blocks, _blocks(x.size), x.size, FUSED_PARALLEL_MIN, x, grad,
                knots, slopes, bool(exact), out)


# Softmax rows: a serial kernel over the rows lo:hi, split between threads from
# FUSED_PARALLEL_MIN elements (as the row kernels of pam.kernels.cpu_rows). The forward
# writes each row's statistics (m, s: rows_bits.softmax_row_forward) to ``stats``, SM_STATS
# per row; the backward reads them instead of recomputing them.
SM_STATS = rows_bits.SOFTMAX_STATS


@threads.splittable
def _softmax_forward_rows(x, out, stats, n, off, safe, lo, hi):
    optim_bits.check_offset(off)
    for r in range(lo, hi):
        rows_bits.softmax_row_forward(x, out, r * n, n, off, safe, stats, SM_STATS * r)


def _make_softmax_backward_rows(exact):
    """The softmax backward rows with ``exact`` fixed (a captured bool: the branch on it is
    pruned, so each variant compiles only its own row code; a run compiles the one it
    uses). Named ``_softmax_backward_rows_<exact|approx>`` (manifest, cache files)."""
    def kernel(x, g, stats, out, n, off, safe, lo, hi):
        optim_bits.check_offset(off)
        for r in range(lo, hi):
            if exact:
                rows_bits.softmax_row_backward_exact(x, g, out, r * n, n, off, safe, stats,
                                                     SM_STATS * r)
            else:
                rows_bits.softmax_row_backward_approx(x, g, out, r * n, n, off, safe, stats,
                                                      SM_STATS * r)
    return threads.splittable(kernel,
                              name=f"_softmax_backward_rows_{'exact' if exact else 'approx'}")


_softmax_backward_rows_exact = _make_softmax_backward_rows(True)
_softmax_backward_rows_approx = _make_softmax_backward_rows(False)


def _check_softmax_stats(x, stats, n):
    """The number of rows of length ``n`` in ``x``; ValueError unless ``stats`` holds
    SM_STATS entries per row."""
    rows = x.size // n if n else 0
    if stats.size != SM_STATS * rows:
        raise ValueError(f"stats must have {SM_STATS} entries per row ({SM_STATS * rows}), "
                         f"got {stats.size}")
    return rows


def softmax_forward(x, out, stats, n, off, safe):
    """Rows of length ``n`` of flat int32 ``x`` -> PA softmax (pam.rows_bits), and each
    row's statistics (the bits of m and s) into ``stats`` (int32, SM_STATS per row)."""
    rows = _check_softmax_stats(x, stats, n)
    threads.run(_softmax_forward_rows, rows, row_work(x.size, rows), FUSED_PARALLEL_MIN, x,
                out, stats, n, off, bool(safe))


def softmax_backward(x, g, stats, out, n, off, safe, exact):
    """Input gradient of softmax_forward for output gradient ``g`` (pam.rows_bits), given
    the ``stats`` softmax_forward wrote for ``x``."""
    rows = _check_softmax_stats(x, stats, n)
    kernel = _softmax_backward_rows_exact if exact else _softmax_backward_rows_approx
    threads.run(kernel, rows, row_work(x.size, rows), FUSED_PARALLEL_MIN, x, g, stats, out,
                n, off, bool(safe))
