"""Scalar definitions of the fused optimizer updates, on bit patterns (one element).

The per-element chain is written branch-free in int32 lanes (``sel``, ``mul32_bits``,
``div0_bits``, ``log2_sel_bits``, ``exp2_sel_bits``, ``half_bits``: each the bits of the
:mod:`pam.bits` function it names), so the CPU loops vectorize.

Like :mod:`pam.bits`, every function is ``jitable`` (:func:`pam.bits.jitable`): the CPU kernels
(:mod:`pam.kernels.cpu`) and the CUDA kernels (:mod:`pam.kernels.cuda`) compile these same
lines, so they agree bit for bit. They restate, element by element, the sequence of PAM
ops that :class:`pam.optim.AdamW` and :class:`pam.optim.SGD` used to issue as separate
kernels (products are ``bits.mul_bits``, quotients ``bits.div_bits``, square roots
pa_exp2(PAM(pa_log2(x), 0.5)), sums and differences float32 additions), so a fused step
gives the same bits as that chain. Scalars shared by a whole parameter group (bias
corrections, step size, decay factor) are computed once on the host, see
:func:`adamw_scalars`.
"""
import numpy as np

from . import bits
from .bits import jitable

# flags of adamw_update
ADAMW_MAXIMIZE = 1
ADAMW_DECAY = 2
ADAMW_AMSGRAD = 4
# flags of sgd_update
SGD_MAXIMIZE = 1
SGD_DECAY = 2
SGD_MOMENTUM = 4
SGD_FIRST = 8          # the momentum buffer starts as the (decayed) gradient
SGD_DAMPENING = 16
SGD_NESTEROV = 32

HALF = 0x3F000000      # bits of 0.5f


@jitable(forceinline=True)
def add_bits(ia, ib):
    """float32 a + b (round to nearest even) on bit patterns."""
    return bits.f32_to_bits(bits.bits_to_f32(ia) + bits.bits_to_f32(ib))


@jitable(forceinline=True)
def sub_bits(ia, ib):
    """float32 a - b (round to nearest even) on bit patterns."""
    return bits.f32_to_bits(bits.bits_to_f32(ia) - bits.bits_to_f32(ib))


@jitable(forceinline=True)
def neg_bits(ia):
    """-a: the sign bit flipped (also for zeros and NaN, as torch's neg)."""
    return np.int64(np.int32(np.int64(ia) ^ bits.SIGN))


# Branch-free forms. The optimizer kernels run every element through the same chain, so
# their per-element code is written with selects in int32 lanes (no early returns), which
# LLVM vectorizes on CPU; each gives the same bits as the pam.bits function it names
# (tests/test_optim_bits.py compares them on special and random patterns). No int32
# intermediate overflows (the CUDA simulator computes in NumPy int32).
_I_ABS = np.int32(bits.ABS_MASK)
_I_SIGN = np.int32(bits.SIGN)
_I_INF = np.int32(bits.INF)
_I_QNAN = np.int32(bits.QNAN)
_I_ONE = np.int32(bits.ONE)
_I_MIN = np.int32(bits.MIN_NORMAL)
_I_ZERO = np.int32(0)


@jitable(forceinline=True)
def sel(c, a, b):
    """a if c else b (int32), as bit masks: data flow, never a branch (a Python
    conditional expression is a branch in Numba IR, which LLVM does not always turn
    back into a select; a branch in the loop body stops vectorization)."""
    mask = np.int32(-np.int32(c))
    return np.int32(b ^ ((a ^ b) & mask))


OFF_MIN = bits.MIN_NORMAL - bits.ONE       # offset constants of normal float32 offsets
OFF_MAX = 0x7F7FFFFF - bits.ONE


@jitable
def check_offset(off):
    """Raise unless ``off`` is an offset constant mul32_bits handles (a normal float32
    offset, as pam.dispatch.offset_constant returns)."""
    if off < OFF_MIN or off > OFF_MAX:
        raise ValueError("off must be the constant of a normal float32 offset "
                         "(pam.dispatch.offset_constant)")


@jitable(forceinline=True)
def mul32_bits(ia, ib, off):
    """bits.mul_bits(ia, ib, off) (PAM) with selects, in int32, for the offsets of
    pam.dispatch.offset_constant (off + 0x3F800000 the bits of a normal float32): the
    magnitude sum is formed as |a| + (|b| - 1 + off) with a saturation test first, so no
    int32 intermediate overflows."""
    ia = np.int32(ia)
    ib = np.int32(ib)
    sign = np.int32((ia ^ ib) & _I_SIGN)
    ua = np.int32(ia & _I_ABS)
    ub = np.int32(ib & _I_ABS)
    uac = sel(ua > _I_INF, _I_INF, ua)
    t = np.int32(sel(ub > _I_INF, _I_INF, ub) + np.int32(off - bits.ONE))
    room = np.int32(_I_INF - uac)
    over = t >= room
    mag = np.int32(uac + sel(over, room, t))
    zero_in = (ua < _I_MIN) | (ub < _I_MIN)
    inf_in = (ua == _I_INF) | (ub == _I_INF)
    mag = sel(inf_in, _I_INF, mag)
    mag = sel(zero_in | (mag < _I_MIN), _I_ZERO, mag)
    nan = (ua > _I_INF) | (ub > _I_INF) | (zero_in & inf_in)
    return sel(nan, _I_QNAN, np.int32(mag | sign))


@jitable(forceinline=True)
def div0_bits(ia, ib):
    """bits.div_bits(ia, ib, 0) (PAD without offset) with selects, in int32."""
    ia = np.int32(ia)
    ib = np.int32(ib)
    sign = np.int32((ia ^ ib) & _I_SIGN)
    ua = np.int32(ia & _I_ABS)
    ub = np.int32(ib & _I_ABS)
    d = np.int32(ua - ub)                       # bits(|a|) - bits(|b|), no overflow
    over = d >= np.int32(bits.INF - bits.ONE)
    mag = np.int32(sel(over, np.int32(bits.INF - bits.ONE), d) + _I_ONE)
    mag = sel(d < np.int32(bits.MIN_NORMAL - bits.ONE), _I_ZERO, mag)
    a_zero = ua < _I_MIN
    b_zero = ub < _I_MIN
    a_inf = ua == _I_INF
    b_inf = ub == _I_INF
    mag = sel(a_zero | b_inf, _I_ZERO, mag)
    mag = sel(b_zero | a_inf, _I_INF, mag)
    nan = (ua > _I_INF) | (ub > _I_INF) | (a_inf & b_inf) | (a_zero & b_zero)
    return sel(nan, _I_QNAN, np.int32(mag | sign))


@jitable(forceinline=True)
def log2_sel_bits(ix):
    """bits.log2_bits(ix) (pa_log2) with selects, in int32."""
    ix = np.int32(ix)
    ux = np.int32(ix & _I_ABS)
    d = np.int32(ux - _I_ONE)
    rounded = np.int32(bits.f32_to_bits(np.float32(d)))
    r = sel(d == _I_ZERO, _I_ZERO, np.int32(rounded - np.int32(23 << 23)))
    r = sel(ux == _I_INF, _I_INF, r)
    r = sel(ix < _I_ZERO, _I_QNAN, r)
    r = sel(ux < _I_MIN, np.int32(bits.INF | bits.SIGN), r)
    return sel(ux > _I_INF, _I_QNAN, r)


@jitable(forceinline=True)
def exp2_floor_sel(iy):
    """(y, yc, n) for pa_exp2's argument bits ``iy``: y, yc = y where -200 <= y < 128 (else
    0), n = floor(yc) by truncation and a correction (exact in that range), with selects."""
    iy = np.int32(iy)
    y = bits.bits_to_f32(iy)
    inside = (y >= np.float32(-200.0)) & (y < np.float32(128.0))
    yc = bits.bits_to_f32(sel(inside, iy, _I_ZERO))
    t = np.int32(yc)                            # truncation toward zero
    return y, yc, np.int32(t - np.int32(np.float32(t) > yc))


@jitable(forceinline=True)
def exp2_sel_bits(iy):
    """bits.exp2_bits(iy) (pa_exp2) with selects, in int32: floor by truncation and a
    correction (exact for |y| <= 200)."""
    iy = np.int32(iy)
    y, yc, n = exp2_floor_sel(iy)
    frac = yc - np.float32(n)
    one_plus = np.float32(1.0) + frac
    r = np.int32(np.int32(bits.f32_to_bits(one_plus)) + np.int32(n << np.int32(23)))
    r = sel(r < _I_MIN, _I_ZERO, r)
    r = sel((r >= _I_INF) | (y >= np.float32(128.0)), _I_INF, r)
    r = sel(y < np.float32(-200.0), _I_ZERO, r)
    return sel(np.int32(iy & _I_ABS) > _I_INF, _I_QNAN, r)


@jitable(forceinline=True)
def half_bits(ia):
    """bits.mul_bits(ia, HALF, 0): PAM by 0.5, exact, in int32 (rows_bits.mul_pow2_bits)."""
    ia = np.int32(ia)
    sign = np.int32(ia & _I_SIGN)
    ua = np.int32(ia & _I_ABS)
    mag = sel(ua == _I_INF, _I_INF, np.int32(ua - np.int32(1 << 23)))
    mag = sel(ua < np.int32(2 * bits.MIN_NORMAL), _I_ZERO, mag)   # input or result < normal
    return sel(ua > _I_INF, _I_QNAN, np.int32(mag | sign))


@jitable(forceinline=True)
def sqrt_bits(ix):
    """pa_sqrt(x) = pa_exp2(PAM(pa_log2(x), 0.5)), as :func:`pam.sqrt`."""
    return exp2_sel_bits(half_bits(log2_sel_bits(ix)))


@jitable(forceinline=True)
def max_bits(ia, ib):
    """torch.maximum(a, b) on bit patterns: NaN if either is NaN (a's NaN first)."""
    ia = np.int32(ia)
    ib = np.int32(ib)
    fa = bits.bits_to_f32(ia)
    fb = bits.bits_to_f32(ib)
    return sel((fa == fa) & ((fb != fb) | (fb > fa)), ib, ia)


@jitable(forceinline=True)
def adamw_update(ip, ig, im, iv, imx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps,
                 off, flags):
    """One AdamW element update; returns the new bits of (p, m, v, max_v).

    g = -g if maximize; p -= PAM(p, decay) if decay; m = PAM(m, b1) + PAM(g, 1 - b1);
    v = PAM(v, b2) + PAM(PAM(g, g), 1 - b2); max_v = max(max_v, v) and v' = max_v if
    amsgrad else v; p -= PAM(PAD(m, PAD(pa_sqrt(v'), sqrt_bc2) + eps), step_size).
    ``off`` goes to the products with tensor operands, as in :class:`pam.optim.AdamW`;
    the quotients take none. ``decay``, ``b1``... are float32 bit patterns.
    """
    if flags & ADAMW_MAXIMIZE:
        ig = neg_bits(ig)
    if flags & ADAMW_DECAY:
        ip = sub_bits(ip, mul32_bits(ip, decay, off))
    m = add_bits(mul32_bits(im, b1, off), mul32_bits(ig, omb1, off))
    gg = mul32_bits(ig, ig, off)
    v = add_bits(mul32_bits(iv, b2, off), mul32_bits(gg, omb2, off))
    mx = np.int64(imx)
    vv = v
    if flags & ADAMW_AMSGRAD:
        mx = max_bits(mx, v)
        vv = mx
    denom = add_bits(div0_bits(sqrt_bits(vv), sbc2), eps)
    upd = mul32_bits(div0_bits(m, denom), step_size, off)
    return sub_bits(ip, upd), m, v, mx


@jitable(forceinline=True)
def sgd_update(ip, ig, ibuf, lr, wd, mom, omd, off, flags):
    """One SGD element update; returns the new bits of (p, momentum buffer).

    g = -g if maximize; g += PAM(p, wd) if decay; with momentum: buf = g at the first
    step, else buf = PAM(buf, mom) + (PAM(g, 1 - dampening) if dampening else g);
    g = g + PAM(buf, mom) if nesterov else buf; p -= PAM(g, lr).
    """
    if flags & SGD_MAXIMIZE:
        ig = neg_bits(ig)
    if flags & SGD_DECAY:
        ig = add_bits(ig, mul32_bits(ip, wd, off))
    buf = np.int64(ibuf)
    if flags & SGD_MOMENTUM:
        if flags & SGD_FIRST:
            buf = np.int64(ig)
        else:
            scaled = mul32_bits(buf, mom, off)
            if flags & SGD_DAMPENING:
                buf = add_bits(scaled, mul32_bits(ig, omd, off))
            else:
                buf = add_bits(scaled, ig)
        if flags & SGD_NESTEROV:
            ig = add_bits(ig, mul32_bits(buf, mom, off))
        else:
            ig = buf
    return sub_bits(ip, mul32_bits(ig, lr, off)), buf


# --------------------------------------------------------------------------- host scalars
def f32_bits(x):
    """Bit pattern (Python int) of float32(x)."""
    return int(np.float32(x).view(np.int32))


def pow_bits(ibase, iexp):
    """pam.pow on scalars: pa_exp2(PAM(pa_log2(base), exp))."""
    return int(bits.exp2_bits(bits.mul_bits(bits.log2_bits(ibase), iexp, 0)))


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """Group constants of one AdamW step, as the bit patterns adamw_update takes.

    bc_i = 1 - pa_exp2(PAM(pa_log2(beta_i), t)) (float32), step_size = PAD(lr, bc1),
    sqrt_bc2 = pa_sqrt(bc2), decay = PAM(lr, weight_decay); 1 - beta is a float64
    subtraction rounded to float32 (as the Python number handed to pam.mul). Returns
    (decay, b1, 1 - b1, b2, 1 - b2, step_size, sqrt_bc2, eps).
    """
    one = np.float32(1.0)
    t = f32_bits(step)
    bc1 = f32_bits(one - bits.bits_to_f32(pow_bits(f32_bits(beta1), t)))
    bc2 = f32_bits(one - bits.bits_to_f32(pow_bits(f32_bits(beta2), t)))
    step_size = int(bits.div_bits(f32_bits(lr), bc1, 0))
    sbc2 = int(bits.exp2_bits(bits.mul_bits(bits.log2_bits(bc2), HALF, 0)))
    decay = int(bits.mul_bits(f32_bits(lr), f32_bits(weight_decay), 0))
    return (decay, f32_bits(beta1), f32_bits(1.0 - beta1), f32_bits(beta2),
            f32_bits(1.0 - beta2), step_size, sbc2, f32_bits(eps))


# --------------------------------------------------------------------------- unbiased AdamW
# PAM(g, g; offset 1.0552) is unbiased for squares: its mean ratio to g^2 over log-uniform
# mantissas is 1.0000 (0.9618 without the offset).
UNBIASED_SQUARE_OFFSET = 1.0552
# 1 / E[PAM(PAD(a, pa_sqrt(b)), k) / (k a / sqrt(b))] over log-uniform a, b, k (measured on
# 2M samples: the chain is 1.91 % low on average); folded into the host step size.
UPDATE_COMPENSATION = 1.0195
_FIX = 64                                   # fractional bits of the host fixed-point powers
SQRT2_MANT = 0x3504F3                       # mantissa field of float32(sqrt(2))


@jitable(forceinline=True)
def adamw_update_unbiased(ip, ig, im, iv, imx, decay, c1, c2, k_step, eps_s, off, sq_off,
                          flags):
    """One element of the unbiased AdamW variant; returns the new bits of (p, m, v, max_v).

    m += PAM(g - m, c1) and v += PAM(PAM(g, g; sq_off) - v, c2) with c1, c2 powers of two
    (the products are exact, so the moments are exact EMAs of g and of an unbiased square);
    p -= PAM(PAD(m, pa_sqrt(v') + eps_s), k_step) with k_step and eps_s from
    :func:`adamw_unbiased_scalars`. Weight decay, maximize and amsgrad as adamw_update.
    """
    if flags & ADAMW_MAXIMIZE:
        ig = neg_bits(ig)
    if flags & ADAMW_DECAY:
        ip = sub_bits(ip, mul32_bits(ip, decay, off))
    m = add_bits(im, mul32_bits(sub_bits(ig, im), c1, 0))
    sq = mul32_bits(ig, ig, sq_off)
    v = add_bits(iv, mul32_bits(sub_bits(sq, iv), c2, 0))
    mx = np.int64(imx)
    vv = v
    if flags & ADAMW_AMSGRAD:
        mx = max_bits(mx, v)
        vv = mx
    denom = add_bits(sqrt_bits(vv), eps_s)
    upd = mul32_bits(div0_bits(m, denom), k_step, off)
    return sub_bits(ip, upd), m, v, mx


def snap_power_of_two(x):
    """The power of two nearest to float32(x) > 0 in the log domain (integer bit test)."""
    ix = f32_bits(x)
    if not 0 < ix < bits.INF:
        raise ValueError(f"expected a positive finite number, got {x!r}")
    exp_field = ix >> 23
    if ix & bits.MANT_MASK >= SQRT2_MANT:
        exp_field += 1
    return exp_field << 23


def _pow_fixed(k, t):
    """(1 - 2^-k)^t as an integer with _FIX fractional bits (square-and-multiply, integer
    arithmetic, truncating; relative error below t 2^-60)."""
    one = 1 << _FIX
    base = one - (one >> k) if k <= _FIX else one
    result = one
    while t:
        if t & 1:
            result = (result * base) >> _FIX
        base = (base * base) >> _FIX
        t >>= 1
    return result


def _to_f32_bits(frac):
    return f32_bits(float(frac))


def adamw_unbiased_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """Group constants of the unbiased AdamW variant, as float32 bit patterns.

    c_i = 1 - beta_i snapped to the nearest power of two (the effective betas are 1 - c_i);
    bc_i = 1 - (1 - c_i)^t in 64-bit fixed point; k_step = lr sqrt(bc2) / bc1 *
    UPDATE_COMPENSATION and eps_s = eps sqrt(bc2), in exact rational and integer arithmetic
    (no float multiply), rounded to float32 (via float64). Returns
    (decay, c1, c2, k_step, eps_s); decay = PAM(lr, weight_decay) as in adamw_scalars.
    """
    from fractions import Fraction
    from math import isqrt
    t = int(step)
    if t != step or t < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    c1, c2 = snap_power_of_two(1.0 - beta1), snap_power_of_two(1.0 - beta2)
    k1, k2 = 127 - (c1 >> 23), 127 - (c2 >> 23)
    one = 1 << _FIX
    bc1 = Fraction(one - _pow_fixed(k1, t), one)
    bc2_fix = one - _pow_fixed(k2, t)
    sbc2 = Fraction(isqrt(bc2_fix << _FIX), one)          # sqrt(bc2), 64 fractional bits
    if bc1 == 0 or sbc2 == 0:
        raise ValueError("bias correction underflowed (beta too close to 1)")
    k_step = (Fraction(float(np.float32(lr))) * sbc2 / bc1
              * Fraction(float(np.float32(UPDATE_COMPENSATION))))
    eps_s = Fraction(float(np.float32(eps))) * sbc2
    decay = int(bits.mul_bits(f32_bits(lr), f32_bits(weight_decay), 0))
    return decay, c1, c2, _to_f32_bits(k_step), _to_f32_bits(eps_s)
