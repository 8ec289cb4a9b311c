"""Scalar semantics of piecewise-affine float32 arithmetic, on bit patterns.

This module is the single source of truth. Every function is a plain Python function
registered with :func:`jitable` (``numba.extending.register_jitable``), so the same lines
compile into the CPU kernels (``numba.njit``) and the CUDA kernels (``numba.cuda.jit``, also
under the CUDA simulator). CPU and CUDA results are bit-identical because they run the
same definitions.

Conventions
-----------
* A float32 is handled as its bit pattern, a signed int32 widened to int64 for the
  arithmetic (Numba widens int32 + int32 to int64 anyway). Results are returned as int64
  values inside the int32 range, so storing them into an int32 array never wraps.
* ``off`` is an offset folded into the integer constant: ``bits(offset) - 0x3F800000``
  (0 means no offset).
* Zero and subnormal inputs count as zero; a result whose magnitude pattern falls below
  the smallest normal (0x00800000) is a zero of the result's sign; at or above 0x7F800000
  it is an infinity of the result's sign. IEEE rules for zeros, infinities and NaN
  otherwise. No float multiplication or division is used anywhere.
"""
import math

import numpy as np
from numba.extending import register_jitable


def jitable(fn=None, **options):
    """``numba.extending.register_jitable(**options)`` without a C entry point: the
    decorator of every scalar and row definition (here, in :mod:`pam.optim_bits`,
    :mod:`pam.rows_bits`, :mod:`pam.xent_bits`) and of the CPU kernels' inner helpers.

    A definition compiles into the kernels that call it (CPU and CUDA) and runs as plain
    Python when called from Python. Numba would also build a C-callable wrapper for every
    compiled signature of every such function (``no_cfunc_wrapper`` False) and optimize
    and emit machine code for it, though only first-class function values use one: on a
    cold start that was about a tenth of the compile CPU (validation/README.md section
    9c). The CUDA target compiles device functions without host wrappers and ignores the
    option. ``@jitable`` or ``@jitable(forceinline=True)`` (any register_jitable option)."""
    options.setdefault("no_cfunc_wrapper", True)
    if fn is None:
        return register_jitable(**options)
    return register_jitable(**options)(fn)

ONE = 0x3F800000          # bits of 1.0f
MANT_MASK = 0x007FFFFF
EXP_MASK = 0x7F800000
ABS_MASK = 0x7FFFFFFF
MIN_NORMAL = 0x00800000   # bits of the smallest normal float32
INF = 0x7F800000
QNAN = 0x7FC00000
SIGN = -2147483648        # the sign bit as a (negative) int64 value inside the int32 range


@jitable(inline="always")
def f32_to_bits(x):
    """Bit pattern of float32 ``x`` as an int64 value in the int32 range."""
    return np.int64(np.float32(x).view(np.int32))


@jitable(inline="always")
def bits_to_f32(i):
    """The float32 whose bit pattern is ``i`` (an integer in the int32 range)."""
    return np.int32(i).view(np.float32)


# forceinline=True (LLVM-level inlining on CPU and CUDA), not inline="always" (Numba
# IR-level): numba-cuda 0.30 fails to compile IR-inlined functions that branch (mul_bits:
# TypingError "xor(omitted...)"; div_bits: AssertionError in postproc). CPU code and speed
# are unchanged (the matmul inner loop still inlines and vectorizes).
@jitable(forceinline=True)
def _sign_of_product(ia, ib):
    """SIGN if exactly one of the two patterns has its sign bit set, else 0."""
    return SIGN if (ia ^ ib) < 0 else 0


@jitable(forceinline=True)
def _finish(mag, sign):
    """Flush below-normal magnitudes to zero, saturate to infinity, attach the sign."""
    if mag < MIN_NORMAL:
        return np.int64(sign)
    if mag >= INF:
        return np.int64(INF | sign)
    return np.int64(mag | sign)


@jitable
def offset_bits(offset):
    """The integer constant that folds a PAM offset (a positive normal float32)."""
    return f32_to_bits(offset) - ONE


@jitable(forceinline=True)
def mul_bits(ia, ib, off):
    """PAM(a, b; offset): bits(|c|) = bits(|a|) + bits(|b|) - 0x3F800000 + off.

    0 * inf and NaN inputs give NaN; inf * nonzero gives a signed infinity. Written with
    selects rather than early returns so that LLVM vectorizes the matmul inner loop.
    """
    ia = np.int64(ia)
    ib = np.int64(ib)
    sign = SIGN if (ia ^ ib) < 0 else 0
    ua = ia & ABS_MASK
    ub = ib & ABS_MASK
    r = ua + ub - ONE + off
    mag = INF if r >= INF else r
    zero_in = (ua < MIN_NORMAL) | (ub < MIN_NORMAL)
    inf_in = (ua == INF) | (ub == INF)
    mag = INF if inf_in else mag
    mag = 0 if (zero_in | (mag < MIN_NORMAL)) else mag
    nan = (ua > INF) | (ub > INF) | (zero_in & inf_in)
    return np.int64(QNAN) if nan else np.int64(mag | sign)


@jitable
def div_bits(ia, ib, off):
    """PAD(a, b; offset): bits(|c|) = bits(|a|) - bits(|b|) + 0x3F800000 - off.

    0/0 and inf/inf give NaN; x/0 is a signed infinity; x/inf and 0/x are signed zeros.
    """
    ia = np.int64(ia)
    ib = np.int64(ib)
    sign = _sign_of_product(ia, ib)
    ua = ia & ABS_MASK
    ub = ib & ABS_MASK
    if ua > INF or ub > INF:
        return np.int64(QNAN)
    a_zero = ua < MIN_NORMAL
    b_zero = ub < MIN_NORMAL
    if ua == INF:
        if ub == INF:
            return np.int64(QNAN)
        return np.int64(INF | sign)
    if ub == INF:
        return np.int64(sign)
    if b_zero:
        if a_zero:
            return np.int64(QNAN)
        return np.int64(INF | sign)
    if a_zero:
        return np.int64(sign)
    return _finish(ua - ub + ONE - off, sign)


@jitable
def _power_of_two_bits(mag_pattern, sign):
    """Sign-carrying power of two whose exponent field is that of ``mag_pattern``.

    Patterns below the smallest normal flush to a signed zero, at or above the infinity
    pattern saturate to a signed infinity.
    """
    if mag_pattern < MIN_NORMAL:
        return np.int64(sign)
    if mag_pattern >= INF:
        return np.int64(INF | sign)
    return np.int64((mag_pattern & EXP_MASK) | sign)


@jitable
def mul_slope_bits(ia, ib, off):
    """Exact derivative of PAM(a, b; offset) with respect to ``a``.

    Equals sign(b) * 2^(Eb + carry) (times the offset's power of two), where carry is 1
    when Ma + Mb (+ offset mantissa) reaches 1: always a power of two. At a zero or
    subnormal ``a`` the one-sided limit from the normal range (Ma = 0) is used, so that a
    weight that is exactly zero still receives a gradient. Zero ``b`` gives a zero slope.
    """
    ia = np.int64(ia)
    ib = np.int64(ib)
    sign = SIGN if ib < 0 else 0
    ua = ia & ABS_MASK
    ub = ib & ABS_MASK
    if ua > INF or ub > INF:
        return np.int64(QNAN)
    if ub == INF:
        return np.int64(INF | sign)
    if ub < MIN_NORMAL:
        return np.int64(sign)
    ma = ua & MANT_MASK if ua >= MIN_NORMAL else 0
    # |PAM(1.Ma, b)| carries exactly the exponent E(c) - E(a) of the slope.
    return _power_of_two_bits(ma + ub + off, sign)


@jitable
def div_slope_num_bits(ia, ib, off):
    """Exact derivative of PAD(a, b; offset) with respect to the numerator ``a``.

    sign(b) * 2^(E(c) - E(a)); at a zero ``a`` the one-sided limit (Ma = 0) is used.
    Infinite ``b`` gives zero; zero ``b`` gives infinity.
    """
    ia = np.int64(ia)
    ib = np.int64(ib)
    sign = SIGN if ib < 0 else 0
    ua = ia & ABS_MASK
    ub = ib & ABS_MASK
    if ua > INF or ub > INF:
        return np.int64(QNAN)
    if ub == INF:
        return np.int64(sign)
    if ub < MIN_NORMAL:
        return np.int64(INF | sign)
    ma = ua & MANT_MASK if ua >= MIN_NORMAL else 0
    # |PAD(1.Ma, b)| = (ONE + Ma) - ub + ONE - off carries the exponent E(c) - E(a).
    return _power_of_two_bits(ma + ONE - ub + ONE - off, sign)


@jitable
def div_slope_den_bits(ia, ib, off):
    """Exact derivative of PAD(a, b; offset) with respect to the denominator ``b``.

    -sign(a) * 2^(E(c) - E(b)): raising bits(|b|) by one lowers bits(|c|) by one.
    Zero where the quotient is zero (zero ``a`` or infinite ``b``); NaN at zero ``b``.
    """
    ia = np.int64(ia)
    ib = np.int64(ib)
    sign = 0 if ia < 0 else SIGN
    ua = ia & ABS_MASK
    ub = ib & ABS_MASK
    if ua > INF or ub > INF or ub < MIN_NORMAL:
        return np.int64(QNAN)
    if ua < MIN_NORMAL or ub == INF:
        return np.int64(sign)
    if ua == INF:
        return np.int64(INF | sign)
    uc = ua - ub + ONE - off
    if uc < MIN_NORMAL:
        return np.int64(sign)
    if uc >= INF:
        return np.int64(INF | sign)
    # 2^(E(c) - E(b)) has exponent field E(c) + 127 - (E(b) + 127) + 127.
    field = (uc >> 23) - (ub >> 23) + 127
    return _power_of_two_bits(field << 23, sign)


@jitable
def log2_bits(ix):
    """pa_log2(x) = E + M read from the bit pattern: float32 of (bits(x) - 0x3F800000) / 2^23.

    Rounded once (nearest even) by the integer-to-float conversion; the division by 2^23
    is an exact exponent decrement. 0 and subnormals give -inf, x < 0 gives NaN, +inf
    gives +inf, NaN gives NaN.
    """
    ix = np.int64(ix)
    ux = ix & ABS_MASK
    if ux > INF:
        return np.int64(QNAN)
    if ux < MIN_NORMAL:
        return np.int64(INF | SIGN)
    if ix < 0:
        return np.int64(QNAN)
    if ux == INF:
        return np.int64(INF)
    d = ux - ONE
    if d == 0:
        return np.int64(0)
    rounded = f32_to_bits(np.float32(d))
    return rounded - (23 << 23)


@jitable
def exp2_bits(iy):
    """pa_exp2(y) = 2^floor(y) * fl32(1 + (y - floor(y))).

    The subtraction is exact and the addition rounded once. Results below the smallest
    normal are +0, too large ones +inf; -inf gives +0, +inf gives +inf, NaN gives NaN.
    """
    iy = np.int64(iy)
    uy = iy & ABS_MASK
    if uy > INF:
        return np.int64(QNAN)
    y = bits_to_f32(iy)
    if y >= np.float32(128.0):
        return np.int64(INF)
    if y < np.float32(-200.0):
        return np.int64(0)
    n = np.int64(math.floor(y))
    frac = y - np.float32(n)
    t = np.float32(1.0) + frac
    r = f32_to_bits(t) + (n << 23)
    if r < MIN_NORMAL:
        return np.int64(0)
    if r >= INF:
        return np.int64(INF)
    return r


@jitable
def exp2_slope_bits(iy):
    """Exact derivative of pa_exp2 at y: 2^floor(y) (0 where the result flushes to 0)."""
    iy = np.int64(iy)
    uy = iy & ABS_MASK
    if uy > INF:
        return np.int64(QNAN)
    y = bits_to_f32(iy)
    if y >= np.float32(128.0):
        return np.int64(INF)
    if y < np.float32(-200.0):
        return np.int64(0)
    n = np.int64(math.floor(y))
    if exp2_bits(iy) == 0:
        return np.int64(0)
    field = n + 127
    if field <= 0:
        return np.int64(0)
    if field >= 255:
        return np.int64(INF)
    return field << 23


@jitable
def log2_slope_bits(ix):
    """Exact derivative of pa_log2 at x > 0: 2^-E(x) (the rounding of E + M ignored).

    Zero and subnormal x give +inf, negative x and NaN give NaN, +inf gives 0.
    """
    ix = np.int64(ix)
    ux = ix & ABS_MASK
    if ux > INF or (ix < 0 and ux >= MIN_NORMAL):
        return np.int64(QNAN)
    if ux < MIN_NORMAL:
        return np.int64(INF)
    if ux == INF:
        return np.int64(0)
    field = 254 - (ux >> 23)
    if field <= 0:
        return np.int64(0)
    if field >= 255:
        return np.int64(INF)
    return field << 23


@jitable
def mul_f32(a, b, off):
    """PAM on float32 values (convenience for kernels that hold floats)."""
    return bits_to_f32(mul_bits(f32_to_bits(a), f32_to_bits(b), off))


# =========================================================================== families
# L-Mul (Luo & Sun 2024) and the rounding of float32 operands to narrow formats. Both are
# integer arithmetic on the bit patterns, like everything above.
TWO23 = 1 << 23            # the hidden bit of a float32 significand
SIGN_EXP_MASK = SIGN | EXP_MASK


@jitable
def lmul_constant(mant_bits):
    """c = 2^(23 - l) for L-Mul on operands with ``mant_bits`` mantissa bits.

    l = m for m <= 3, 3 for m = 4, 4 for m > 4 (Luo & Sun's l(m)): float32, bfloat16 and
    float16 give 2^19, e4m3 (m = 3) gives 2^20, e5m2 (m = 2) gives 2^21.
    """
    if mant_bits <= 3:
        l = mant_bits
    elif mant_bits == 4:
        l = 3
    else:
        l = 4
    return np.int64(1) << (23 - l)


@jitable(forceinline=True)
def lmul_bits(ia, ib, c):
    """L-Mul(a, b): (1 + Ma + Mb + 2^-l) 2^(Ea + Eb) on bit patterns, c = 2^(23 - l).

    With s = Ma + Mb + c (23-bit mantissa fields, 0 <= c < 2^23): if s < 2^23 the result
    is bits(|a|) + bits(|b|) - 0x3F800000 + c (PAM with off = c); otherwise the value
    (2^23 + s) 2^(Ea + Eb - 23) has exponent field Ea + Eb - 127 + 1 and mantissa field
    (s - 2^23) / 2 rounded to nearest even (only float32 operands can make it odd). An
    integer adder would give mantissa s - 2^23 instead: that is PAM with offset 1 + 2^-l,
    not this function. Zero and subnormal inputs count as zero, results below the smallest
    normal are signed zeros, at or above the infinity pattern signed infinities; 0 * inf
    and NaN inputs give NaN. Selects, not early returns (the matmul loop vectorizes).
    """
    ia = np.int64(ia)
    ib = np.int64(ib)
    sign = SIGN if (ia ^ ib) < 0 else 0
    ua = ia & ABS_MASK
    ub = ib & ABS_MASK
    r = ua + ub - ONE + c
    # t = s - 2^23 when the mantissa sum carries, else 0; the carry case replaces the
    # mantissa t by its half rounded to nearest even: r - t + rne(t / 2).
    t = max((ua & MANT_MASK) + (ub & MANT_MASK) + c - TWO23, 0)
    r = r - t + ((t + ((t >> 1) & 1)) >> 1)
    mag = INF if r >= INF else r
    zero_in = (ua < MIN_NORMAL) | (ub < MIN_NORMAL)
    inf_in = (ua == INF) | (ub == INF)
    mag = INF if inf_in else mag
    mag = 0 if (zero_in | (mag < MIN_NORMAL)) else mag
    nan = (ua > INF) | (ub > INF) | (zero_in & inf_in)
    return np.int64(QNAN) if nan else np.int64(mag | sign)


@jitable(forceinline=True)
def pow2_part_bits(ix):
    """sign(x) 2^E(x): the sign and exponent fields of x, mantissa cleared.

    Zero and subnormal x give a zero of x's sign, +-inf gives +-inf, NaN gives NaN
    (0x7FC00000). The exact slope of L-Mul: d lmul(a, b) / da = pow2_part(b).
    """
    ix = np.int64(ix)
    nan = (ix & ABS_MASK) > INF
    return np.int64(QNAN) if nan else np.int64(ix & SIGN_EXP_MASK)


# Operand formats: code -> name, and the parameters of each in float32 terms.
FMT_FLOAT32, FMT_BFLOAT16, FMT_FLOAT16, FMT_E4M3, FMT_E5M2 = 0, 1, 2, 3, 4
FORMAT_NAMES = ("float32", "bfloat16", "float16", "e4m3", "e5m2")
# Mantissa bits of each format (index = fmt code).
FORMAT_MANT_BITS = (23, 7, 10, 3, 2)
N_FORMATS = len(FORMAT_NAMES)


@jitable(forceinline=True)
def format_params(fmt):
    """(mantissa bits, float32 exponent field of the smallest normal, largest finite
    float32 pattern, pattern that overflow and infinity give) of operand format ``fmt``
    (codes FMT_*); the last is INF, or the largest finite pattern where the format
    saturates (e4m3)."""
    if fmt == FMT_BFLOAT16:
        return 7, 1, 0x7F7F0000, INF               # 3.3895e38
    if fmt == FMT_FLOAT16:
        return 10, 127 - 14, 0x477FE000, INF       # 65504
    if fmt == FMT_E4M3:
        return 3, 127 - 6, 0x43E00000, 0x43E00000  # 448, OCP E4M3FN satfinite
    if fmt == FMT_E5M2:
        return 2, 127 - 14, 0x47600000, INF        # 57344
    return 23, 1, 0x7F7FFFFF, INF                  # float32


@jitable
def quantize_bits(ix, fmt, flush):
    """Round float32 ``ix`` to operand format ``fmt``: the float32 holding the result exactly.

    Round to nearest, ties to even, on the significand with integer arithmetic only, in the
    target's own grid: its mantissa width for normals and its gradual subnormals (fixed
    ulp 2^(emin - m)) below its smallest normal; values at most half the smallest subnormal
    become a zero of their sign (exactly half: a tie, to the even zero). Overflow (a
    rounded magnitude above the largest finite value) and +-inf give +-inf, except e4m3,
    which saturates both to +-448. float32 (fmt 0) is the identity. NaN gives the quiet NaN
    0x7FC00000 (the sign is not kept) in every format. ``flush`` (0/1): results that are
    subnormal in the target format (float32 subnormals for fmt 0) become a zero of their
    sign. Codes: 0 float32, 1 bfloat16, 2 float16, 3 e4m3, 4 e5m2.
    """
    mbits, emin_field, max_pat, over_pat = format_params(fmt)
    return quantize_core_bits(ix, mbits, emin_field, max_pat, over_pat, flush)


@jitable(forceinline=True)
def quantize_core_bits(ix, mbits, emin_field, max_pat, over_pat, flush):
    """``quantize_bits`` with the format's parameters (``format_params``) given: kernels
    look them up once per call, and the select-only body vectorizes."""
    ix = np.int64(ix)
    sign = ix & SIGN
    u = ix & ABS_MASK
    # u = (e - 1) 2^23 + sig with e = max(E, 1) and sig the significand (hidden bit set for
    # normals), so rounding sig to a multiple of 2^d rounds the value; carries propagate
    # into the exponent field by themselves. q = 0 only for d > 23: the value rounds to 0.
    e = max(u >> 23, 1)
    sig = (u & MANT_MASK) | (TWO23 if u >= MIN_NORMAL else 0)
    d = min(23 - mbits + max(emin_field - e, 0), 25)
    half = (np.int64(1) << d) >> 1
    q = sig >> d
    rem = sig - (q << d)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1) & (d > 0))
    q = q + (1 if up else 0)
    r = ((e - 1) << 23) + (q << d)
    r = 0 if q == 0 else r
    r = over_pat if r > max_pat else r
    r = 0 if (flush != 0) & (r < (emin_field << 23)) else r
    r = over_pat if u == INF else r
    return np.int64(QNAN) if u > INF else np.int64(r | sign)
