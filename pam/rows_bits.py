"""Scalar definitions of the fused composite ops (pam.functional), on bit patterns.

Like :mod:`pam.bits`, every function is ``register_jitable`` and compiled into both the CPU
(:mod:`pam.kernels.cpu`) and the CUDA (:mod:`pam.kernels.cuda`) kernels. Each restates,
for one element, the chain of PAM ops and float32 additions that the composite definition
in :mod:`pam.functional` issues as separate kernels, in the same order, so the fused kernel
gives the same bits (tests/test_rows.py compares them).
"""
import numpy as np
from numba.extending import register_jitable

from . import bits


@register_jitable(forceinline=True)
def _relu_f32(t):
    """torch.relu on a float32 that is never -0: NaN stays NaN, t <= 0 gives +0."""
    if t != t or t > np.float32(0.0):
        return t
    return np.float32(0.0)


@register_jitable
def gelu_forward_bits(ix, knots, slopes):
    """Piecewise-affine GELU: y = sum_j PAM(relu(x - k_j), d_j), j ascending, float32 sums.

    ``knots`` and ``slopes`` hold the float32 bit patterns of pam.functional.GELU_KNOTS and
    GELU_SLOPE_CHANGES (every d_j a power of two, so each product is exact).
    """
    x = bits.bits_to_f32(ix)
    y = np.int64(0)
    for j in range(knots.size):
        r = _relu_f32(x - bits.bits_to_f32(knots[j]))
        h = bits.mul_bits(bits.f32_to_bits(r), slopes[j], 0)
        if j == 0:
            y = h
        else:
            y = bits.f32_to_bits(bits.bits_to_f32(y) + bits.bits_to_f32(h))
    return y


@register_jitable
def gelu_backward_bits(ix, ig, knots, slopes, exact):
    """Input gradient of gelu_forward_bits as autograd computes the composite.

    Branch j contributes PAM(g, s_j) where relu(x - k_j) > 0 (or is NaN), else +0, with
    s_j the exact slope of PAM(r_j, d_j) w.r.t. r_j (``exact``; equal to d_j except at
    NaN) or d_j itself; the contributions are summed in float32 from the last knot to the
    first (the order in which autograd accumulates them).
    """
    x = bits.bits_to_f32(ix)
    acc = np.int64(0)
    n = knots.size
    for jj in range(n):
        j = n - 1 - jj
        r = _relu_f32(x - bits.bits_to_f32(knots[j]))
        rb = bits.f32_to_bits(r)
        if exact:
            s = bits.mul_slope_bits(rb, slopes[j], 0)
        else:
            s = np.int64(slopes[j])
        if r != r or r > np.float32(0.0):
            gr = bits.mul_bits(ig, s, 0)
        else:
            gr = np.int64(0)
        if jj == 0:
            acc = gr
        else:
            acc = bits.f32_to_bits(bits.bits_to_f32(acc) + bits.bits_to_f32(gr))
    return acc
