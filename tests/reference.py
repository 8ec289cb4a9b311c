"""Slow, obvious NumPy references for PAM arithmetic (the golden semantics), for tests."""
from fractions import Fraction

import numpy as np

ONE = 0x3F800000
MIN_NORMAL = 0x00800000
INF = 0x7F800000


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)


def from_bits(i):
    return np.asarray(i, dtype=np.int64).astype(np.uint32).view(np.float32)


def pam(a, b, offset=None):
    """PAM(a, b) following ../shared/testdata/README.md, elementwise, as float32."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ia, ib = bits(a), bits(b)
    off = 0 if offset is None else int(bits(np.float32(offset))) - ONE
    sign = (ia ^ ib) & 0x80000000
    ua, ub = ia & 0x7FFFFFFF, ib & 0x7FFFFFFF
    r = ua + ub - ONE + off
    mag = np.where(r < MIN_NORMAL, 0, np.where(r >= INF, INF, r))
    a_zero, b_zero = ua < MIN_NORMAL, ub < MIN_NORMAL
    a_inf, b_inf = ua == INF, ub == INF
    mag = np.where(a_zero | b_zero, 0, mag)
    mag = np.where(a_inf | b_inf, INF, mag)
    out = from_bits(mag | sign)
    nan = np.isnan(a) | np.isnan(b) | ((a_inf | b_inf) & (a_zero | b_zero))
    return np.where(nan, np.float32(np.nan), out).astype(np.float32)


def pam_slope(a, b):
    """Exact derivative of PAM(a, b) w.r.t. a for normal a and b: sign(b) 2^(Eb + carry)."""
    ia, ib = bits(a), bits(b)
    carry = ((ia & 0x7FFFFF) + (ib & 0x7FFFFF)) >= (1 << 23)
    exp_b = ((ib >> 23) & 0xFF) - 127
    return np.where(ib < 0, -1.0, 1.0) * np.ldexp(1.0, exp_b + carry)


def matmul(a, b, offset=None):
    """C[i, j] = sum_k PAM(a[i, k], b[k, j]) accumulated in float32, k increasing."""
    n, k = a.shape
    acc = np.zeros((n, b.shape[1]), np.float32)
    for t in range(k):
        acc = (acc + pam(a[:, t:t + 1], b[t:t + 1, :], offset)).astype(np.float32)
    return acc


def same_bits(got, expected):
    """Elementwise: equal bit patterns, or both NaN."""
    got = np.asarray(got, np.float32)
    expected = np.asarray(expected, np.float32)
    return (got.view(np.int32) == expected.view(np.int32)) | (np.isnan(got) & np.isnan(expected))


# --------------------------------------------------------------------------- families
# Operand formats: (mantissa bits, exponent of the smallest normal, largest finite value,
# saturate on overflow), by format code (pam.bits.FORMAT_NAMES). Values are exact
# fractions built from integers; no library rounding or transcendental function is used.
FORMATS = {
    0: (23, -126, (2 - Fraction(1, 2 ** 23)) * 2 ** 127, False),   # float32
    1: (7, -126, (2 - Fraction(1, 2 ** 7)) * 2 ** 127, False),     # bfloat16
    2: (10, -14, Fraction(65504), False),                          # float16
    3: (3, -6, Fraction(448), True),                               # e4m3 (OCP E4M3FN)
    4: (2, -14, Fraction(57344), False),                           # e5m2
}
QNAN_BITS = 0x7FC00000


def _exponent(v):
    """floor(log2(v)) of a positive Fraction, by integer bit lengths."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    while Fraction(2) ** e > v:
        e -= 1
    while Fraction(2) ** (e + 1) <= v:
        e += 1
    return e


def _to_f32_bits(sign, v):
    """Bit pattern (Python int, int32 range) of the float32 equal to sign * v (v exact)."""
    return int(np.float32(float(v)).view(np.int32)) | (-2 ** 31 if sign else 0)


def _round_one(ix, fmt, flush):
    ix = int(ix)
    u = ix & 0x7FFFFFFF
    sign = ix < 0
    mbits, emin, vmax, saturate = FORMATS[fmt]
    if u > INF:
        return QNAN_BITS
    if u == INF:
        return _to_f32_bits(sign, vmax) if saturate else INF | (-2 ** 31 if sign else 0)
    v = Fraction(float(np.int32(ix).view(np.float32))) * (-1 if sign else 1)
    if v == 0:
        r = Fraction(0)
    else:
        ulp = Fraction(2) ** (max(_exponent(v), emin) - mbits)
        r = round(v / ulp) * ulp                      # Fraction round: half to even
    if r > vmax:
        if not saturate:
            return INF | (-2 ** 31 if sign else 0)
        r = vmax
    if flush and r < Fraction(2) ** emin:
        r = Fraction(0)
    return _to_f32_bits(sign, r)


def round_to_format_ref(x, fmt, flush=False):
    """float32 array x rounded to operand format ``fmt`` (codes of pam.bits.FORMAT_NAMES):
    round to nearest, ties to even, in the format's grid (gradual subnormals), overflow to
    +-inf (e4m3: saturate to +-448, inf too), NaN -> 0x7FC00000; with ``flush``, results
    below the format's smallest normal become signed zeros. Returns float32."""
    x = np.asarray(x, np.float32)
    flat = x.reshape(-1).view(np.int32)
    out = np.array([_round_one(i, fmt, flush) for i in flat], np.int64)
    return out.astype(np.uint32).view(np.float32).reshape(x.shape)


def lmul_l(mant_bits):
    """Luo & Sun's l(m): m for m <= 3, 3 for m = 4, 4 for m > 4."""
    return mant_bits if mant_bits <= 3 else (3 if mant_bits == 4 else 4)


def _lmul_one(ia, ib, l):
    ia, ib = int(ia), int(ib)
    ua, ub = ia & 0x7FFFFFFF, ib & 0x7FFFFFFF
    sign = (ia < 0) != (ib < 0)
    a_zero, b_zero = ua < MIN_NORMAL, ub < MIN_NORMAL
    a_inf, b_inf = ua == INF, ub == INF
    if ua > INF or ub > INF or ((a_inf or b_inf) and (a_zero or b_zero)):
        return QNAN_BITS
    if a_inf or b_inf:
        return INF | (-2 ** 31 if sign else 0)
    if a_zero or b_zero:
        return -2 ** 31 if sign else 0
    xm = Fraction(ua & 0x7FFFFF, 2 ** 23)
    ym = Fraction(ub & 0x7FFFFF, 2 ** 23)
    e = (ua >> 23) - 127 + (ub >> 23) - 127
    v = (1 + xm + ym + Fraction(1, 2 ** l)) * Fraction(2) ** e
    if v < Fraction(2) ** -126:
        return -2 ** 31 if sign else 0
    if v >= Fraction(2) ** 128:
        return INF | (-2 ** 31 if sign else 0)
    # v has at most 25 significant bits: exact in a double, rounded once (nearest even)
    # to float32 by the conversion.
    return _to_f32_bits(sign, v)


def lmul_ref(a, b, mant_bits):
    """L-Mul(a, b) = (1 + xm + ym + 2^-l(m)) 2^(xe + ye) elementwise (Luo & Sun's formula),
    rounded to float32 (nearest even), with PAM's specials: zero/subnormal operands count
    as zero, results below 2^-126 are signed zeros, from 2^128 signed infinities, 0 * inf
    and NaN give NaN. float32 result."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    l = lmul_l(mant_bits)
    out = np.array([_lmul_one(i, j, l) for i, j in
                    zip(a.reshape(-1).view(np.int32), b.reshape(-1).view(np.int32))], np.int64)
    return out.astype(np.uint32).view(np.float32).reshape(a.shape)


def pow2_part_ref(x):
    """sign(x) 2^floor(log2|x|) for normal x (np.frexp and np.ldexp are exact); signed
    zero for zero/subnormal x, signed inf for inf, NaN for NaN. float32."""
    x = np.asarray(x, np.float32)
    mant, exp = np.frexp(x.astype(np.float64))
    p = np.copysign(np.ldexp(1.0, exp - 1), x).astype(np.float32)
    tiny = np.abs(x) < np.finfo(np.float32).tiny
    p = np.where(tiny, np.copysign(np.float32(0), x), p)
    p = np.where(np.isinf(x), x, p)
    return np.where(np.isnan(x), np.float32(np.nan), p).astype(np.float32)


def lmul_matmul_ref(a, b, mant_bits):
    """C[i, j] = sum_k L-Mul(a[i, k], b[k, j]) accumulated in float32, k increasing."""
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for t in range(a.shape[1]):
        acc = (acc + lmul_ref(a[:, t:t + 1], b[t:t + 1, :], mant_bits)).astype(np.float32)
    return acc
