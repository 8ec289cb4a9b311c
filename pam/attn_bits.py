"""Scalar definitions of the fused attention core (pam.functional's SDPA), on bit patterns.

Like :mod:`pam.rows_bits`, every function is ``pam.bits.jitable`` and compiled into both
the CPU (:mod:`pam.kernels.cpu_attn`) and the CUDA (:mod:`pam.kernels.cuda_attn`) kernels.
Together with the softmax row definitions of :mod:`pam.rows_bits` they restate the
composite ``pam.nn.functional._attention`` (no dropout, family "pam") operation by
operation, so the fused kernels give its bits:

* q = PAM(query, scale) (no offset: the scale is a product by a constant);
* scores[i, j] = sum_e PAM(q[i, e], k[j, e]; off), float32 from +0 in increasing e (the
  PAM matmul's definition); then the causal mask (j > i) and a bool mask (False) replace a
  score by -inf (``torch.where``), a float mask is added (float32 add);
* the PA softmax of each row with ``safe`` (rows_bits.softmax_row_forward);
* out[i, c] = sum_j PAM(p[i, j], v[j, c]; off), j increasing.

Backward (the composite's pieces in autograd's order, each sum float32 from +0 in increasing
index): g_p[i, j] = sum_c T(go[i, c], p[i, j], v[j, c]) (c increasing), the softmax row
backward, where-masked entries of the score gradient g_s set to +0 (``torch.where``'s
backward), then dq[i, e] = sum_j T(g_s[i, j], q[i, e], k[j, e]), dk[j, e] = sum_i
T(g_s[i, j], k[j, e], q[i, e]), dv[j, c] = sum_i T(go[i, c], v[j, c], p[i, j]) and
dquery = the scale product's gradient of dq. T = :func:`grad_term`: the exact matmul
gradient term PAM(g, slope(a, b; off)) or the approximate PAM(g, b; off) (PAM is symmetric,
so this is each matmul's approximate gradient whichever operand ``b`` is).

Skipping zeros. Adding a signed zero to a float32 sum that started at +0 never changes
it, and a PAM with a zero factor is a signed zero unless the other factor is inf or NaN.
So a kernel may skip a product term it knows is a zero times a finite number. Entries
masked by ``torch.where`` have score -inf, probability +0 and score gradient +0; when every
operand of a head is *bounded* (:func:`bounded_bits`: |x| < 2^32, so every slope is finite
and the probability gradients at masked entries, which the softmax backward multiplies by
a zero slope, cannot overflow), skipping the masked terms gives the same bits. The CPU
kernels skip them (causal attention: about half the work); heads with larger, infinite or
NaN values, and float masks, take every term, as the composite does.
"""
import numpy as np

from . import bits
from .bits import jitable
from .optim_bits import _I_ABS, mul32_bits, sel
from .rows_bits import mul_slope_sel

MASK_NONE = 0          # no attn_mask
MASK_BOOL = 1          # bool attn_mask (given as int32 0 / 1): False -> -inf
MASK_FLOAT = 2         # float attn_mask (given as its bits): added to the scores
BOUND_BITS = 0x4F800000          # bits of 2^32: heads with every |operand| below it skip
NEG_INF_BITS = np.int32(-8388608)    # 0xFF800000, float32 -inf


@jitable(forceinline=True)
def scale_bits(x, scb):
    """q = PAM(x, scale; no offset), ``scb`` the scale's bits (pam.ops.mul's forward)."""
    return mul32_bits(x, scb, 0)


@jitable(forceinline=True)
def scale_grad_bits(g, x, scb, exact):
    """Gradient of PAM(x, scale) w.r.t. x for output gradient g: PAM(g, slope(x, scale))
    (``exact``) or PAM(g, scale) (pam.ops.mul's backward)."""
    if exact:
        return mul32_bits(g, mul_slope_sel(x, scb, 0), 0)
    return mul32_bits(g, scb, 0)


@jitable(forceinline=True)
def grad_term(g, a, b, off, exact):
    """One term of a PAM matmul's gradient w.r.t. the operand ``a`` of the product
    PAM(a, b; off), for output gradient ``g``: PAM(g, slope(a, b; off)) (``exact``: the
    matmul's exact gradient) or PAM(g, b; off) (approximate, the matmul of the gradient
    with the other operand)."""
    if exact:
        return mul32_bits(g, mul_slope_sel(a, b, off), 0)
    return mul32_bits(g, b, off)


@jitable(forceinline=True)
def where_masked(i, j, causal, mode, mask, mbase):
    """True where the composite replaces score (i, j) by -inf with ``torch.where``: the
    causal mask (j > i) or a False entry of a bool mask (``mask[mbase + j]`` == 0)."""
    if causal and j > i:
        return True
    return mode == MASK_BOOL and mask[mbase + j] == 0


@jitable(forceinline=True)
def masked_score_bits(sb, i, j, causal, mode, mask, mbase):
    """The composite's masking of one raw score (bits ``sb``): -inf where
    :func:`where_masked`, then plus the float mask entry when ``mode`` is MASK_FLOAT."""
    r = np.int32(sb)
    if where_masked(i, j, causal, mode, mask, mbase):
        r = NEG_INF_BITS
    if mode == MASK_FLOAT:
        r = np.int32(bits.f32_to_bits(bits.bits_to_f32(r) + bits.bits_to_f32(mask[mbase + j])))
    return r


@jitable(forceinline=True)
def abs_max(x, base, n, m):
    """max(m, max_j |bits| of x[base + j]) over n entries (NaN patterns are the largest)."""
    for j in range(n):
        a = np.int32(x[base + j] & _I_ABS)
        m = a if a > m else m
    return m


@jitable(forceinline=True)
def bounded_bits(m):
    """True when ``m`` (an :func:`abs_max` of a head's operands) is below 2^32: then the
    masked terms are zeros times finite numbers and may be skipped (module docstring)."""
    return m < np.int32(BOUND_BITS)


@jitable(forceinline=True)
def is_zero_bits(x):
    """True for +0 and -0 (bit patterns)."""
    return np.int32(x & _I_ABS) == np.int32(0)


@jitable(forceinline=True)
def sel_zero(keep, x):
    """x where ``keep``, else +0 (int32 select)."""
    return sel(keep, np.int32(x), np.int32(0))
