"""Slow, obvious NumPy references for PAM arithmetic (the golden semantics), for tests."""
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
