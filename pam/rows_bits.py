"""Scalar definitions of the fused composite ops (pam.functional), on bit patterns.

Like :mod:`pam.bits`, every function is ``register_jitable`` and compiled into both the CPU
(:mod:`pam.kernels.cpu`, :mod:`pam.kernels.cpu_rows`) and the CUDA (:mod:`pam.kernels.cuda`,
:mod:`pam.kernels.cuda_rows`) kernels. Each restates, for one element or one row, the chain
of PAM ops and float32 additions that the composite definition issued as separate kernels,
in the same order (the backward in the order autograd runs the composite's pieces and
accumulates their gradients), so the fused kernel gives the same bits.

GELU is elementwise and gives the composite's bits exactly. The row ops (softmax,
log_softmax, layer norm) change one thing: every row sum (forward, and the reductions of
broadcast gradients in backward) is a float32 sum from +0 in increasing index, where the
composite used torch's vectorized sum (whose order is neither portable nor the CUDA
order); layer norm's weight and bias gradients sum over rows in increasing row index.
tests/test_rows.py and tests/test_rows_ln.py compare the kernels with the composites run
with such sequential sums, bit for bit. Against the torch-order composites (random rows,
see validation/README.md, section 11), max |new - old| / max |old| is below 5e-7 for the
forwards (softmax: at most 8 ulp) and 1.3e-6 for the approximate gradients; exact
gradients differ by less than 6e-7 except layer norm's input gradient, by up to 5e-4 of
the largest (a power-of-two slope flips where a re-rounded sum crosses a binade).

Per-element work inside the rows is written in the int32 select forms (the
:mod:`pam.optim_bits` ones and those below) so that the CPU loops vectorize; each row
sum is a separate sequential loop.
"""
import math

import numpy as np
from numba.extending import register_jitable

from . import bits
from .optim_bits import (_I_ABS, _I_INF, _I_MIN, _I_QNAN, _I_SIGN, _I_ZERO, div0_bits,
                         exp2_floor_sel, exp2_sel_bits, mul32_bits, sel)


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
    """floor(max_j PAM(x_j, log2 e; off)) over the row, 0 when that max is not finite or a
    product is NaN (the first of equal maxima, so a zero max keeps the sign of the first
    zero, as a running float32 ``v > m`` scan from -inf).

    The scan runs on order-preserving integer keys of the products (bits ^ 0x7FFFFFFF for
    negative ones) with selects, so it vectorizes; ``off`` must be an offset constant of
    pam.dispatch.offset_constant (the products are optim_bits.mul32_bits)."""
    kmax = np.int32(-2147483648)
    nan = np.int32(0)
    for j in range(n):
        v = np.int32(mul32_bits(x[base + j], LOG2_E_BITS, off))
        isnan = np.int32(np.int32(v & np.int32(bits.ABS_MASK)) > np.int32(bits.INF))
        key = np.int32(v ^ np.int32(np.int32(v >> 31) & np.int32(bits.ABS_MASK)))
        key = sel(isnan != 0, np.int32(-2147483648), key)
        kmax = key if key > kmax else kmax
        nan = nan | isnan
    if n == 0 or nan != 0:
        return np.float32(0.0)
    mb = np.int32(kmax ^ np.int32(np.int32(kmax >> 31) & np.int32(bits.ABS_MASK)))
    m = bits.bits_to_f32(mb)
    if m == np.float32(np.inf) or m == np.float32(-np.inf):
        return np.float32(0.0)
    if m == np.float32(0.0):
        for j in range(n):
            v = np.int32(mul32_bits(x[base + j], LOG2_E_BITS, off))
            if bits.bits_to_f32(v) == np.float32(0.0):
                return _floor_f32(bits.bits_to_f32(v))
    return _floor_f32(m)


@register_jitable
def _softmax_row_exp(x, out, base, n, off, m):
    """out[j] = e_j = pa_exp2(PAM(x_j, log2 e; off) - m); returns s = e_0 + e_1 + ...
    (float32 from +0, increasing j)."""
    for j in range(n):
        out[base + j] = _softmax_e(x[base + j], off, m)
    return _seq_sum(out, base, n, False)


@register_jitable(forceinline=True)
def _softmax_e(xj, off, m):
    return exp2_sel_bits(_b(_f(mul32_bits(xj, LOG2_E_BITS, off)) - m))


@register_jitable
def softmax_row_forward(x, out, base, n, off, safe):
    """One row of the PA softmax: PAD(e_j, s) with e_j = pa_exp2(PAM(x_j, log2 e) - m),
    s = e_0 + e_1 + ... (float32, increasing j); ``safe``: a zero sum counts as 1.

    Per-element work in the select forms (vectorized on CPU); the second pass recomputes
    e_j from x (LLVM does not vectorize Numba loops that read and write one array).
    """
    m = softmax_row_shift(x, base, n, off)
    s = _softmax_row_exp(x, out, base, n, off, m)
    if safe and s == np.float32(0.0):
        s = np.float32(1.0)
    sb = _b(s)
    for j in range(n):
        out[base + j] = div0_bits(_softmax_e(x[base + j], off, m), sb)


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


def _softmax_row_backward_variant(exact):
    """:func:`softmax_row_backward` with ``exact`` fixed (a captured Python bool: Numba
    prunes the branches on it, so a kernel calling one variant compiles only its passes)."""
    @register_jitable
    def softmax_row_backward_variant(x, g, out, base, n, off, safe):
        m = softmax_row_shift(x, base, n, off)
        s = _softmax_row_exp(x, out, base, n, off, m)
        zero_sum = safe and s == np.float32(0.0)
        if zero_sum:
            s = np.float32(1.0)
        sb = _b(s)
        if exact:
            for j in range(n):
                e = _softmax_e(x[base + j], off, m)
                out[base + j] = mul32_bits(g[base + j], div_slope_den0_sel(e, sb), 0)
        else:
            for j in range(n):
                e = _softmax_e(x[base + j], off, m)
                t = div0_bits(mul32_bits(g[base + j], div0_bits(e, sb), 0), sb)
                out[base + j] = np.int32(t ^ _I_SIGN)
        gs = _seq_sum(out, base, n, False)
        if zero_sum:
            gs = np.float32(0.0)
        if exact:
            for j in range(n):
                zb = _b(_f(mul32_bits(x[base + j], LOG2_E_BITS, off)) - m)
                e = exp2_sel_bits(zb)
                ge = _b(_f(mul32_bits(g[base + j], div_slope_num0_sel(e, sb), 0)) + gs)
                gz = mul32_bits(ge, exp2_slope_sel(zb, e), 0)
                out[base + j] = mul32_bits(gz, mul_slope_sel(x[base + j], LOG2_E_BITS, off),
                                           0)
        else:
            for j in range(n):
                e = _softmax_e(x[base + j], off, m)
                ge = _b(_f(div0_bits(g[base + j], sb)) + gs)
                gz = mul32_bits(ge, mul32_bits(e, LN_2_BITS, 0), 0)
                out[base + j] = mul32_bits(gz, LOG2_E_BITS, off)
    return softmax_row_backward_variant


softmax_row_backward_exact = _softmax_row_backward_variant(True)
softmax_row_backward_approx = _softmax_row_backward_variant(False)


@register_jitable
def softmax_row_backward(x, g, out, base, n, off, safe, exact):
    """Input gradient of softmax_row_forward for output gradient ``g`` (one row).

    The chain rule through the composite's pieces (pam.ops): PAD's gradients w.r.t. e_j
    and s (exact slopes or, ``exact`` False, PAD(g, s) and -PAD(PAM(g, p), s)), the
    s-gradient summed in increasing j and zeroed where ``safe`` replaced s = 0, then
    pa_exp2's and PAM(x, log2 e)'s gradients (exact slopes, or PAM(g, PAM(e, ln 2)) and
    PAM(g, log2 e; off)). Per-element work in the select forms; ``out`` holds scratch
    between the passes (each pass recomputes e_j from x), the input gradient at the end.
    """
    if exact:
        softmax_row_backward_exact(x, g, out, base, n, off, safe)
    else:
        softmax_row_backward_approx(x, g, out, base, n, off, safe)


# --------------------------------------------------------------------------- select forms
# Per-element pieces of the log_softmax and layer-norm rows in int32 lanes with selects
# (no branches), as pam.optim_bits' forms, so the CPU row loops vectorize; each gives the
# bits of the pam.bits function it names (tests/test_rows_ln.py compares them on edge and
# random patterns). Intermediates that could leave the int32 range are int64.
_I_EXP = np.int32(bits.EXP_MASK)


@register_jitable(forceinline=True)
def _f(i):
    return bits.bits_to_f32(i)


@register_jitable(forceinline=True)
def _b(v):
    return np.int32(bits.f32_to_bits(v))


@register_jitable(forceinline=True)
def _pow2_sel(p, sign):
    """bits._power_of_two_bits(p, sign) for an int64 pattern ``p``, with selects."""
    r = np.int32(np.int32(p & bits.EXP_MASK) | sign)
    r = sel(p >= bits.INF, np.int32(_I_INF | sign), r)
    return sel(p < bits.MIN_NORMAL, sign, r)


@register_jitable(forceinline=True)
def mul_slope_sel(ia, ib, off):
    """bits.mul_slope_bits(ia, ib, off) with selects."""
    ia = np.int32(ia)
    ib = np.int32(ib)
    sign = np.int32(ib & _I_SIGN)
    ua = np.int32(ia & _I_ABS)
    ub = np.int32(ib & _I_ABS)
    ma = sel(ua >= _I_MIN, np.int32(ua & np.int32(bits.MANT_MASK)), _I_ZERO)
    r = _pow2_sel(np.int64(ma) + np.int64(ub) + np.int64(off), sign)
    r = sel(ub < _I_MIN, sign, r)
    r = sel(ub == _I_INF, np.int32(_I_INF | sign), r)
    return sel((ua > _I_INF) | (ub > _I_INF), _I_QNAN, r)


@register_jitable(forceinline=True)
def div_slope_num0_sel(ia, ib):
    """bits.div_slope_num_bits(ia, ib, 0) with selects."""
    ia = np.int32(ia)
    ib = np.int32(ib)
    sign = np.int32(ib & _I_SIGN)
    ua = np.int32(ia & _I_ABS)
    ub = np.int32(ib & _I_ABS)
    ma = sel(ua >= _I_MIN, np.int32(ua & np.int32(bits.MANT_MASK)), _I_ZERO)
    r = _pow2_sel(np.int64(ma) + 2 * bits.ONE - np.int64(ub), sign)
    r = sel(ub < _I_MIN, np.int32(_I_INF | sign), r)
    r = sel(ub == _I_INF, sign, r)
    return sel((ua > _I_INF) | (ub > _I_INF), _I_QNAN, r)


@register_jitable(forceinline=True)
def div_slope_den0_sel(ia, ib):
    """bits.div_slope_den_bits(ia, ib, 0) with selects."""
    ia = np.int32(ia)
    ib = np.int32(ib)
    sign = np.int32((ia & _I_SIGN) ^ _I_SIGN)
    ua = np.int32(ia & _I_ABS)
    ub = np.int32(ib & _I_ABS)
    uc = np.int64(ua) - np.int64(ub) + bits.ONE
    field = (uc >> 23) - np.int64(ub >> 23) + 127
    r = _pow2_sel(field << 23, sign)
    r = sel(uc >= bits.INF, np.int32(_I_INF | sign), r)
    r = sel(uc < bits.MIN_NORMAL, sign, r)
    r = sel(ua == _I_INF, np.int32(_I_INF | sign), r)
    r = sel((ua < _I_MIN) | (ub == _I_INF), sign, r)
    return sel((ua > _I_INF) | (ub > _I_INF) | (ub < _I_MIN), _I_QNAN, r)


@register_jitable(forceinline=True)
def exp2_slope_sel(iy, e):
    """bits.exp2_slope_bits(iy) with selects, given e = bits.exp2_bits(iy)."""
    iy = np.int32(iy)
    y, _, n = exp2_floor_sel(iy)
    field = np.int32(n + np.int32(127))
    r = sel(field >= np.int32(255), _I_INF, np.int32(np.int32(field & 255) << 23))
    r = sel((field <= _I_ZERO) | (np.int32(e) == _I_ZERO), _I_ZERO, r)
    r = sel(y < np.float32(-200.0), _I_ZERO, r)
    r = sel(y >= np.float32(128.0), _I_INF, r)
    return sel(np.int32(iy & _I_ABS) > _I_INF, _I_QNAN, r)


@register_jitable(forceinline=True)
def _seq_sum(a, base, n, neg):
    """a[base] + a[base + 1] + ... as float32 from +0 in increasing index (of -a_j when
    ``neg``)."""
    s = np.float32(0.0)
    if neg:
        for j in range(n):
            s += -_f(a[base + j])
    else:
        for j in range(n):
            s += _f(a[base + j])
    return s


# --------------------------------------------------------------------------- log_softmax rows
@register_jitable
def log_softmax_row_sum(x, out, base, n, off):
    """First pass of a log_softmax row: m = softmax_row_shift, z_j = PAM(x_j, log2 e; off)
    - m; returns (m, s) with s = pa_exp2(z_0) + pa_exp2(z_1) + ... (float32 from +0,
    increasing j). ``out`` holds pa_exp2(z_j) afterwards."""
    m = softmax_row_shift(x, base, n, off)
    for j in range(n):
        zj = _f(mul32_bits(x[base + j], LOG2_E_BITS, off)) - m
        out[base + j] = exp2_sel_bits(_b(zj))
    return m, _seq_sum(out, base, n, False)


@register_jitable
def log_softmax_row_forward(x, out, base, n, off):
    """One row of the PA log-softmax: PAD(z_j - pa_log2(s), log2 e) with z and s of
    log_softmax_row_sum (the composite pam.nn.functional.log_softmax of earlier versions
    with its row sum taken from +0 in increasing index)."""
    m, s = log_softmax_row_sum(x, out, base, n, off)
    lse = _f(bits.log2_bits(_b(s)))
    for j in range(n):
        zj = _f(mul32_bits(x[base + j], LOG2_E_BITS, off)) - m
        out[base + j] = div0_bits(_b(zj - lse), LOG2_E_BITS)


def _log_softmax_row_backward_variant(exact):
    """:func:`log_softmax_row_backward` with ``exact`` fixed (a captured Python bool: Numba
    prunes the branches on it, so a kernel calling one variant compiles only its passes)."""
    @register_jitable
    def log_softmax_row_backward_variant(x, g, out, base, n, off):
        m, s = log_softmax_row_sum(x, out, base, n, off)
        sb = _b(s)
        lse = _f(bits.log2_bits(sb))
        if exact:
            for j in range(n):
                zj = _f(mul32_bits(x[base + j], LOG2_E_BITS, off)) - m
                out[base + j] = mul32_bits(g[base + j], div_slope_num0_sel(_b(zj - lse),
                                                                           LOG2_E_BITS), 0)
        else:
            for j in range(n):
                out[base + j] = div0_bits(g[base + j], LOG2_E_BITS)
        glb = _b(_seq_sum(out, base, n, True))
        # the last pass recomputes t_j rather than reading it back from ``out``: LLVM does not
        # vectorize Numba loops that read and write the same array
        if exact:
            gs = bits.mul_bits(glb, bits.log2_slope_bits(sb), 0)
            for j in range(n):
                zj = _b(_f(mul32_bits(x[base + j], LOG2_E_BITS, off)) - m)
                t = mul32_bits(g[base + j],
                               div_slope_num0_sel(_b(_f(zj) - lse), LOG2_E_BITS), 0)
                ge = mul32_bits(gs, exp2_slope_sel(zj, exp2_sel_bits(zj)), 0)
                gz = _b(_f(t) + _f(ge))
                out[base + j] = mul32_bits(gz, mul_slope_sel(x[base + j], LOG2_E_BITS, off),
                                           0)
        else:
            gs = bits.div_bits(glb, bits.mul_bits(sb, LN_2_BITS, 0), 0)
            for j in range(n):
                zj = _b(_f(mul32_bits(x[base + j], LOG2_E_BITS, off)) - m)
                t = div0_bits(g[base + j], LOG2_E_BITS)
                ge = mul32_bits(gs, mul32_bits(exp2_sel_bits(zj), LN_2_BITS, 0), 0)
                gz = _b(_f(t) + _f(ge))
                out[base + j] = mul32_bits(gz, LOG2_E_BITS, off)
    return log_softmax_row_backward_variant


log_softmax_row_backward_exact = _log_softmax_row_backward_variant(True)
log_softmax_row_backward_approx = _log_softmax_row_backward_variant(False)


@register_jitable
def log_softmax_row_backward(x, g, out, base, n, off, exact):
    """Input gradient of log_softmax_row_forward for output gradient ``g`` (one row): the
    chain rule through the composite's pieces, as autograd runs it.

    t_j = PAD's gradient of g_j w.r.t. z_j - lse (exact: PAM(g, 2^k slope), approx:
    PAD(g, log2 e)); g_lse = sum of -t_j (from +0, increasing j); g_s = pa_log2's gradient
    (exact slope, or PAD(g_lse, PAM(s, ln 2))); g_z = t_j + pa_exp2's gradient of g_s
    (exact slope, or PAM(g_s, PAM(e_j, ln 2))); then PAM(x, log2 e; off)'s gradient (exact
    slope, or PAM(g_z, log2 e; off)). ``out`` holds scratch between the passes.
    """
    if exact:
        log_softmax_row_backward_exact(x, g, out, base, n, off)
    else:
        log_softmax_row_backward_approx(x, g, out, base, n, off)


# --------------------------------------------------------------------------- layer_norm rows
HALF_BITS = 0x3F000000         # float32(0.5)
LN_WEIGHT = 1                  # flags of the layer_norm rows: a weight is given
LN_BIAS = 2                    # a bias is given
LN_EXACT = 4                   # backward: exact slopes (else the approximate rule)


@register_jitable
def layer_norm_row_stats(x, out, base, n, nb, eps_b, off, stats, sb):
    """Row statistics of the PA layer norm as float32 bit patterns in stats[sb:sb + 9]:
    S0 = sum x_j, mu0 = PAD(S0, N); when N is not a power of two two refinements
    S_r = sum (x_j - mu_{r-1}), mu_r = mu_{r-1} + PAD(S_r, N) (r = 1, 2; else
    S1 = S2 = 0, mu2 = mu1 = mu0); V = sum PAM(xc_j, xc_j; off) with xc_j = x_j - mu2;
    ve = PAD(V, N) + eps (float32); std = pa_exp2(PAM(pa_log2(ve), 0.5)) (pam.pow(ve,
    0.5)). Every sum float32 from +0 in increasing j; ``nb``, ``eps_b``: the bits of
    float32(N) and float32(eps). stats = [S0, mu0, S1, mu1, S2, mu2, V, ve, std];
    ``out`` is scratch."""
    s = _seq_sum(x, base, n, False)
    stats[sb + 0] = _b(s)
    mu = _f(bits.div_bits(_b(s), nb, 0))
    stats[sb + 1] = _b(mu)
    stats[sb + 2] = 0
    stats[sb + 3] = _b(mu)
    stats[sb + 4] = 0
    stats[sb + 5] = _b(mu)
    if n & (n - 1):
        for r in range(2):
            s = np.float32(0.0)
            for j in range(n):
                s += _f(x[base + j]) - mu
            mu = mu + _f(bits.div_bits(_b(s), nb, 0))
            stats[sb + 2 + 2 * r] = _b(s)
            stats[sb + 3 + 2 * r] = _b(mu)
    for j in range(n):
        xc = _b(_f(x[base + j]) - mu)
        out[base + j] = mul32_bits(xc, xc, off)
    v = _seq_sum(out, base, n, False)
    stats[sb + 6] = _b(v)
    ve = _f(bits.div_bits(_b(v), nb, 0)) + _f(eps_b)
    stats[sb + 7] = _b(ve)
    stats[sb + 8] = bits.exp2_bits(bits.mul_bits(bits.log2_bits(_b(ve)), HALF_BITS, 0))


def _layer_norm_row_forward_variant(has_w, has_b):
    """:func:`layer_norm_row_forward` with LN_WEIGHT (``has_w``) and LN_BIAS (``has_b``)
    fixed: Python bools the generated function captures, so Numba prunes the branches on
    them before typing and a kernel calling one variant compiles only its own loop."""
    @register_jitable
    def layer_norm_row_forward_variant(x, w, b, out, base, n, nb, eps_b, off, stats, sb):
        layer_norm_row_stats(x, out, base, n, nb, eps_b, off, stats, sb)
        mu = _f(stats[sb + 5])
        std = stats[sb + 8]
        if has_w:
            if has_b:
                for j in range(n):
                    y = mul32_bits(div0_bits(_b(_f(x[base + j]) - mu), std), w[j], off)
                    out[base + j] = _b(_f(y) + _f(b[j]))
            else:
                for j in range(n):
                    out[base + j] = mul32_bits(div0_bits(_b(_f(x[base + j]) - mu), std),
                                               w[j], off)
        elif has_b:
            for j in range(n):
                out[base + j] = _b(_f(div0_bits(_b(_f(x[base + j]) - mu), std)) + _f(b[j]))
        else:
            for j in range(n):
                out[base + j] = div0_bits(_b(_f(x[base + j]) - mu), std)
    return layer_norm_row_forward_variant


# the four variants of layer_norm_row_forward (flags & (LN_WEIGHT | LN_BIAS))
layer_norm_row_forward_plain = _layer_norm_row_forward_variant(False, False)
layer_norm_row_forward_w = _layer_norm_row_forward_variant(True, False)
layer_norm_row_forward_b = _layer_norm_row_forward_variant(False, True)
layer_norm_row_forward_wb = _layer_norm_row_forward_variant(True, True)


@register_jitable
def layer_norm_row_forward(x, w, b, out, base, n, nb, eps_b, off, flags, stats, sb):
    """One row of the PA layer norm (pam.nn.functional.layer_norm of earlier versions with
    its row sums taken from +0 in increasing index): y_j = PAD(x_j - mu2, std), then
    PAM(y_j, w_j; off) when ``flags`` has LN_WEIGHT, then + b_j (float32) when it has
    LN_BIAS; mu2, std from layer_norm_row_stats (``stats[sb:sb + 9]``). Runs the variant
    ``layer_norm_row_forward_<plain|w|b|wb>`` the flags select (the CPU kernels call the
    variants directly, one kernel per variant)."""
    if (flags & LN_WEIGHT) != 0:
        if (flags & LN_BIAS) != 0:
            layer_norm_row_forward_wb(x, w, b, out, base, n, nb, eps_b, off, stats, sb)
        else:
            layer_norm_row_forward_w(x, w, b, out, base, n, nb, eps_b, off, stats, sb)
    elif (flags & LN_BIAS) != 0:
        layer_norm_row_forward_b(x, w, b, out, base, n, nb, eps_b, off, stats, sb)
    else:
        layer_norm_row_forward_plain(x, w, b, out, base, n, nb, eps_b, off, stats, sb)


@register_jitable(forceinline=True)
def _pad_grad_num_exact(g, a, d):
    """Gradient of PAD(a, d) w.r.t. a for incoming g: PAM(g, exact slope)."""
    return bits.mul_bits(g, bits.div_slope_num_bits(a, d, 0), 0)


@register_jitable(forceinline=True)
def _pad_grad_num_approx(g, a, d):
    """Gradient of PAD(a, d) w.r.t. a for incoming g, approximate rule: PAD(g, d)."""
    return bits.div_bits(g, d, 0)


def _layer_norm_row_backward_variant(exact, has_w):
    """:func:`layer_norm_row_backward` with LN_EXACT (``exact``) and LN_WEIGHT (``has_w``)
    fixed, as :func:`_layer_norm_row_forward_variant` (LN_BIAS plays no part in the rows)."""
    pad_grad_num = _pad_grad_num_exact if exact else _pad_grad_num_approx

    @register_jitable
    def layer_norm_row_backward_variant(x, w, g, out, gw, base, n, nb, eps_b, off, stats,
                                        sb):
        layer_norm_row_stats(x, out, base, n, nb, eps_b, off, stats, sb)
        mu = _f(stats[sb + 5])
        std = stats[sb + 8]
        # pass 1: the terms of g_std into out (and the weight terms)
        if exact and has_w:
            for j in range(n):
                y = div0_bits(_b(_f(x[base + j]) - mu), std)
                gw[base + j] = mul32_bits(g[base + j], mul_slope_sel(w[j], y, off), 0)
            for j in range(n):
                xc = _b(_f(x[base + j]) - mu)
                y = div0_bits(xc, std)
                gy = mul32_bits(g[base + j], mul_slope_sel(y, w[j], off), 0)
                out[base + j] = mul32_bits(gy, div_slope_den0_sel(xc, std), 0)
        elif exact:
            for j in range(n):
                xc = _b(_f(x[base + j]) - mu)
                out[base + j] = mul32_bits(g[base + j], div_slope_den0_sel(xc, std), 0)
        elif has_w:
            for j in range(n):
                y = div0_bits(_b(_f(x[base + j]) - mu), std)
                gw[base + j] = mul32_bits(g[base + j], y, off)
            for j in range(n):
                y = div0_bits(_b(_f(x[base + j]) - mu), std)
                gy = mul32_bits(g[base + j], w[j], off)
                out[base + j] = np.int32(div0_bits(mul32_bits(gy, y, 0), std) ^ _I_SIGN)
        else:
            for j in range(n):
                y = div0_bits(_b(_f(x[base + j]) - mu), std)
                t = div0_bits(mul32_bits(g[base + j], y, 0), std)
                out[base + j] = np.int32(t ^ _I_SIGN)
        gsb = _b(_seq_sum(out, base, n, False))
        ve = stats[sb + 7]
        lv = bits.log2_bits(ve)
        p = bits.mul_bits(lv, HALF_BITS, 0)
        if exact:
            gp = bits.mul_bits(gsb, bits.exp2_slope_bits(p), 0)
            gl = bits.mul_bits(gp, bits.mul_slope_bits(lv, HALF_BITS, 0), 0)
            gve = bits.mul_bits(gl, bits.log2_slope_bits(ve), 0)
        else:
            gp = bits.mul_bits(gsb, bits.mul_bits(std, LN_2_BITS, 0), 0)
            gl = bits.mul_bits(gp, HALF_BITS, 0)
            gve = bits.div_bits(gl, bits.mul_bits(ve, LN_2_BITS, 0), 0)
        gv = pad_grad_num(gve, stats[sb + 6], nb)
        # pass 2: gxc_j into out
        if exact and has_w:
            for j in range(n):
                xc = _b(_f(x[base + j]) - mu)
                y = div0_bits(xc, std)
                gy = mul32_bits(g[base + j], mul_slope_sel(y, w[j], off), 0)
                gxc1 = mul32_bits(gy, div_slope_num0_sel(xc, std), 0)
                a = _f(mul32_bits(gv, mul_slope_sel(xc, xc, off), 0))
                out[base + j] = _b((_f(gxc1) + a) + a)
        elif exact:
            for j in range(n):
                xc = _b(_f(x[base + j]) - mu)
                gxc1 = mul32_bits(g[base + j], div_slope_num0_sel(xc, std), 0)
                a = _f(mul32_bits(gv, mul_slope_sel(xc, xc, off), 0))
                out[base + j] = _b((_f(gxc1) + a) + a)
        elif has_w:
            for j in range(n):
                xc = _b(_f(x[base + j]) - mu)
                gxc1 = div0_bits(mul32_bits(g[base + j], w[j], off), std)
                a = _f(mul32_bits(gv, xc, off))
                out[base + j] = _b((_f(gxc1) + a) + a)
        else:
            for j in range(n):
                xc = _b(_f(x[base + j]) - mu)
                gxc1 = div0_bits(g[base + j], std)
                a = _f(mul32_bits(gv, xc, off))
                out[base + j] = _b((_f(gxc1) + a) + a)
        gmu = _seq_sum(out, base, n, True)
        if n & (n - 1):
            gs2 = _f(pad_grad_num(_b(gmu), stats[sb + 4], nb))
            acc = np.float32(0.0)
            for j in range(n):
                acc += -gs2
            gmu1 = gmu + acc
            gs1 = _f(pad_grad_num(_b(gmu1), stats[sb + 2], nb))
            acc = np.float32(0.0)
            for j in range(n):
                acc += -gs1
            gmu0 = gmu1 + acc
            gs0 = _f(pad_grad_num(_b(gmu0), stats[sb + 0], nb))
            for j in range(n):
                out[base + j] = _b(((_f(out[base + j]) + gs2) + gs1) + gs0)
        else:
            gs0 = _f(pad_grad_num(_b(gmu), stats[sb + 0], nb))
            for j in range(n):
                out[base + j] = _b(_f(out[base + j]) + gs0)
    return layer_norm_row_backward_variant


# the four variants of layer_norm_row_backward (flags & (LN_EXACT | LN_WEIGHT))
layer_norm_row_backward_approx = _layer_norm_row_backward_variant(False, False)
layer_norm_row_backward_approx_w = _layer_norm_row_backward_variant(False, True)
layer_norm_row_backward_exact = _layer_norm_row_backward_variant(True, False)
layer_norm_row_backward_exact_w = _layer_norm_row_backward_variant(True, True)


@register_jitable
def layer_norm_row_backward(x, w, g, out, gw, base, n, nb, eps_b, off, flags, stats, sb):
    """Input gradient of layer_norm_row_forward for output gradient ``g`` (one row) into
    ``out``, and the row's terms of the weight gradient into ``gw`` (when LN_WEIGHT; the
    caller sums them over rows): the chain rule through the composite's pieces in the
    order autograd runs them (LN_EXACT: exact power-of-two slopes; else the approximate
    rules of pam.ops).

    gy_j = g_j through PAM(y, w_j; off); gxc_j = PAD's numerator gradient; g_std = sum over
    j of PAD's denominator gradient (exact slope, or -PAD(PAM(gy_j, y_j), std)); through
    pam.pow (pa_exp2, PAM by 0.5, pa_log2) and PAD(V, N) to g_V; then gxc_j = (gxc_j + a_j)
    + a_j with a_j = PAM(xc, xc)'s gradient of g_V (once per operand); g_mu = sum of
    -gxc_j; through the mean: g_S2 = PAD(S2, N)'s gradient of g_mu, g_mu1 = g_mu + sum of
    N copies of -g_S2, likewise g_S1, g_mu0 and g_S0; finally
    gx_j = ((gxc_j + g_S2) + g_S1) + g_S0 (N not a power of two) or gxc_j + g_S0.
    Every sum float32 from +0 in increasing j; ``out`` holds scratch between the passes.
    """
    if (flags & LN_EXACT) != 0:
        if (flags & LN_WEIGHT) != 0:
            layer_norm_row_backward_exact_w(x, w, g, out, gw, base, n, nb, eps_b, off, stats,
                                            sb)
        else:
            layer_norm_row_backward_exact(x, w, g, out, gw, base, n, nb, eps_b, off, stats,
                                          sb)
    elif (flags & LN_WEIGHT) != 0:
        layer_norm_row_backward_approx_w(x, w, g, out, gw, base, n, nb, eps_b, off, stats,
                                         sb)
    else:
        layer_norm_row_backward_approx(x, w, g, out, gw, base, n, nb, eps_b, off, stats, sb)
