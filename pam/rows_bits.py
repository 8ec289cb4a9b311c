"""Scalar definitions of the fused composite ops (pam.functional), on bit patterns.

Like :mod:`pam.bits`, every function is ``register_jitable`` and compiled into both the CPU
(:mod:`pam.kernels.cpu`) and the CUDA (:mod:`pam.kernels.cuda`) kernels. Each restates,
for one element, the chain of PAM ops and float32 additions that the composite definition
in :mod:`pam.functional` issues as separate kernels, in the same order, so the fused kernel
gives the same bits (tests/test_rows.py compares them).
"""
import math

import numpy as np
from numba.extending import register_jitable

from . import bits


@register_jitable(forceinline=True)
def _relu_f32(t):
    """torch.relu on a float32 that is never -0: NaN stays NaN, t <= 0 gives +0."""
    if t != t or t > np.float32(0.0):
        return t
    return np.float32(0.0)


@register_jitable(forceinline=True)
def gelu_term_bits(ix, kb, db):
    """PAM(relu(x - k), d) for one knot k and slope change d (bit patterns)."""
    r = _relu_f32(bits.bits_to_f32(ix) - bits.bits_to_f32(kb))
    return bits.mul_bits(bits.f32_to_bits(r), db, 0)


@register_jitable(forceinline=True)
def gelu_grad_term_bits(ix, ig, kb, db, exact):
    """One knot's contribution to the GELU input gradient: PAM(g, s) where
    relu(x - k) > 0 (or is NaN), else +0; s the exact slope of PAM(r, d) w.r.t. r
    (``exact``; equal to d except at NaN) or d."""
    r = _relu_f32(bits.bits_to_f32(ix) - bits.bits_to_f32(kb))
    if exact:
        s = bits.mul_slope_bits(bits.f32_to_bits(r), db, 0)
    else:
        s = np.int64(db)
    if r != r or r > np.float32(0.0):
        return bits.mul_bits(ig, s, 0)
    return np.int64(0)


@register_jitable(forceinline=True)
def add_f32_bits(ia, ib):
    """float32 a + b on bit patterns."""
    return bits.f32_to_bits(bits.bits_to_f32(ia) + bits.bits_to_f32(ib))


@register_jitable(forceinline=True)
def pow2_parts(db):
    """(ed, sd) for a power of two d = +-2^e with |d| <= 1 (bits ``db``, mantissa 0):
    ed = bits(|d|) - bits(1.0) <= 0 and sd its sign bit; the arguments of mul_pow2_bits."""
    return np.int32((db & bits.ABS_MASK) - bits.ONE), np.int32(db & bits.SIGN)


@register_jitable(forceinline=True)
def is_pow2_at_most_one(db):
    """True when bits ``db`` are a normal power of two of magnitude at most 1."""
    u = db & bits.ABS_MASK
    return (u & bits.MANT_MASK) == 0 and bits.MIN_NORMAL <= u <= bits.ONE


@register_jitable(forceinline=True)
def mul_pow2_bits(ia, ed, sd):
    """PAM(a, d; 0) for d = +-2^e, |d| <= 1, given as pow2_parts(bits(d)): the same bits as
    ``bits.mul_bits(ia, bits(d), 0)`` (a NaN gives the canonical QNAN, zeros and
    subnormals a signed zero, inf a signed inf, results below the smallest normal a signed
    zero) in int32 arithmetic only (ed <= 0, so bits(|a|) + ed cannot overflow), which
    vectorizes twice as wide as mul_bits' int64 form. Used by the CPU GELU kernels."""
    ia = np.int32(ia)
    sign = np.int32((ia ^ sd) & np.int32(bits.SIGN))
    ua = np.int32(ia & np.int32(bits.ABS_MASK))
    mag = np.int32(ua + ed)
    mag = np.int32(bits.INF) if ua == np.int32(bits.INF) else mag
    mag = np.int32(0) if (ua < np.int32(bits.MIN_NORMAL)) | (mag < np.int32(bits.MIN_NORMAL)) else mag
    return np.int32(bits.QNAN) if ua > np.int32(bits.INF) else np.int32(mag | sign)


@register_jitable
def gelu_forward_bits(ix, knots, slopes):
    """Piecewise-affine GELU: y = sum_j PAM(relu(x - k_j), d_j), j ascending, float32 sums.

    ``knots`` and ``slopes`` hold the float32 bit patterns of pam.functional.GELU_KNOTS and
    GELU_SLOPE_CHANGES (every d_j a power of two, so each product is exact).
    """
    y = gelu_term_bits(ix, knots[0], slopes[0])
    for j in range(1, knots.size):
        y = add_f32_bits(y, gelu_term_bits(ix, knots[j], slopes[j]))
    return y


@register_jitable
def gelu_backward_bits(ix, ig, knots, slopes, exact):
    """Input gradient of gelu_forward_bits as autograd computes the composite: the
    gelu_grad_term_bits of every knot, summed in float32 from the last knot to the first
    (the order in which autograd accumulates them)."""
    n = knots.size
    acc = gelu_grad_term_bits(ix, ig, knots[n - 1], slopes[n - 1], exact)
    for jj in range(1, n):
        j = n - 1 - jj
        acc = add_f32_bits(acc, gelu_grad_term_bits(ix, ig, knots[j], slopes[j], exact))
    return acc


# --------------------------------------------------------------------------- softmax rows
LOG2_E_BITS = 0x3FB8AA3B       # float32(log2 e)
LN_2_BITS = 0x3F317218         # float32(ln 2)


@register_jitable
def _floor_f32(m):
    """torch.floor on a finite float32 (values of magnitude >= 2^23 are integers)."""
    if m >= np.float32(8388608.0) or m <= np.float32(-8388608.0):
        return m
    return np.float32(math.floor(m))         # math.floor: numba-cuda has no np.floor ufunc


@register_jitable
def softmax_row_shift(x, base, n, off):
    """floor(max_j PAM(x_j, log2 e; off)) over the row, 0 when that max is not finite."""
    m = np.float32(-np.inf)
    nan = False
    for j in range(n):
        v = bits.bits_to_f32(bits.mul_bits(x[base + j], LOG2_E_BITS, off))
        if v != v:
            nan = True
        elif v > m:
            m = v
    if nan or m == np.float32(np.inf) or m == np.float32(-np.inf):
        return np.float32(0.0)
    return _floor_f32(m)


@register_jitable
def softmax_row_forward(x, out, base, n, off, safe):
    """One row of the PA softmax: PAD(e_j, s) with e_j = pa_exp2(PAM(x_j, log2 e) - m),
    s = e_0 + e_1 + ... (float32, increasing j); ``safe``: a zero sum counts as 1.

    ``out`` holds e_j after the first pass, the probabilities after the second.
    """
    m = softmax_row_shift(x, base, n, off)
    s = np.float32(0.0)
    for j in range(n):
        z = bits.bits_to_f32(bits.mul_bits(x[base + j], LOG2_E_BITS, off)) - m
        e = bits.exp2_bits(bits.f32_to_bits(z))
        out[base + j] = e
        s += bits.bits_to_f32(e)
    if safe and s == np.float32(0.0):
        s = np.float32(1.0)
    sb = bits.f32_to_bits(s)
    for j in range(n):
        out[base + j] = bits.div_bits(out[base + j], sb, 0)


@register_jitable(forceinline=True)
def exp2_slope_given_bits(iy, e):
    """bits.exp2_slope_bits(iy) when ``e`` = bits.exp2_bits(iy) is already known (the same
    cases in the same order, without recomputing pa_exp2)."""
    iy = np.int64(iy)
    if (iy & bits.ABS_MASK) > bits.INF:
        return np.int64(bits.QNAN)
    y = bits.bits_to_f32(iy)
    if y >= np.float32(128.0):
        return np.int64(bits.INF)
    if y < np.float32(-200.0) or e == 0:
        return np.int64(0)
    field = np.int64(math.floor(y)) + 127
    if field <= 0:
        return np.int64(0)
    if field >= 255:
        return np.int64(bits.INF)
    return field << 23


@register_jitable
def softmax_row_backward(x, g, out, base, n, off, safe, exact):
    """Input gradient of softmax_row_forward for output gradient ``g`` (one row).

    The chain rule through the composite's pieces (pam.ops): PAD's gradients w.r.t. e_j
    and s (exact slopes or, ``exact`` False, PAD(g, s) and -PAD(PAM(g, p), s)), the
    s-gradient summed in increasing j and zeroed where ``safe`` replaced s = 0, then
    pa_exp2's and PAM(x, log2 e)'s gradients (exact slopes, or PAM(g, PAM(e, ln 2)) and
    PAM(g, log2 e; off)). ``out`` holds e_j between the passes (pa_exp2 is evaluated once
    per element), the input gradient at the end.
    """
    m = softmax_row_shift(x, base, n, off)
    s = np.float32(0.0)
    for j in range(n):
        z = bits.bits_to_f32(bits.mul_bits(x[base + j], LOG2_E_BITS, off)) - m
        e = bits.exp2_bits(bits.f32_to_bits(z))
        out[base + j] = e
        s += bits.bits_to_f32(e)
    zero_sum = safe and s == np.float32(0.0)
    if zero_sum:
        s = np.float32(1.0)
    sb = bits.f32_to_bits(s)
    gs = np.float32(0.0)
    for j in range(n):
        e = np.int64(out[base + j])
        if exact:
            t = bits.mul_bits(g[base + j], bits.div_slope_den_bits(e, sb, 0), 0)
        else:
            p = bits.div_bits(e, sb, 0)
            t = bits.div_bits(bits.mul_bits(g[base + j], p, 0), sb, 0) ^ bits.SIGN
        gs += bits.bits_to_f32(t)
    if zero_sum:
        gs = np.float32(0.0)
    for j in range(n):
        e = np.int64(out[base + j])
        if exact:
            ge = bits.mul_bits(g[base + j], bits.div_slope_num_bits(e, sb, 0), 0)
        else:
            ge = bits.div_bits(g[base + j], sb, 0)
        ge = bits.f32_to_bits(bits.bits_to_f32(ge) + gs)
        xl = bits.mul_bits(x[base + j], LOG2_E_BITS, off)
        if exact:
            zb = bits.f32_to_bits(bits.bits_to_f32(xl) - m)
            gz = bits.mul_bits(ge, exp2_slope_given_bits(zb, e), 0)
            out[base + j] = bits.mul_bits(gz, bits.mul_slope_bits(x[base + j], LOG2_E_BITS,
                                                                  off), 0)
        else:
            gz = bits.mul_bits(ge, bits.mul_bits(e, LN_2_BITS, 0), 0)
            out[base + j] = bits.mul_bits(gz, LOG2_E_BITS, off)
