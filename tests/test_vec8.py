"""pam.kernels.vec8: each eight-lane operation against NumPy on int32 bit patterns."""
import numpy as np
from numba import njit

from pam.kernels import vec8


@njit(cache=True)
def _ops(x, y, i, s, out_i, out_f, acc):
    """out_i rows: x + y, x & y, splat(s); out_f rows: acc + bits(x), load/store round trip."""
    u = vec8.load_i8(x, i)
    v = vec8.load_i8(y, i)
    w = vec8.add_i8(u, v)
    f = vec8.fadd_bits(vec8.load_f8(acc, i), w)
    z = vec8.fadd_bits(vec8.zero_f8(), vec8.and_i8(u, v))
    vec8.store_f8(out_f, 0, f)
    vec8.store_f8(out_f, 8, z)
    vec8.store_f8(out_f, 16, vec8.fadd_bits(vec8.zero_f8(), vec8.splat_i8(s)))
    vec8.store_f8(out_f, 24, vec8.fadd_bits(vec8.zero_f8(), w))
    vec8.store_f8(out_i.view(np.float32), 0, vec8.load_f8(acc, i))


def test_lanes_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(-2 ** 31, 2 ** 31, 19, dtype=np.int64).astype(np.int32)
    y = rng.integers(-2 ** 31, 2 ** 31, 19, dtype=np.int64).astype(np.int32)
    x[3], y[3] = 2 ** 31 - 1, 1                                    # wraps
    acc = rng.standard_normal(19).astype(np.float32)
    for i in (0, 3, 11):                                            # unaligned offsets too
        out_i = np.zeros(8, np.int32)
        out_f = np.full(32, np.nan, np.float32)
        _ops(x, y, i, -123456789, out_i, out_f, acc)
        s = (x[i:i + 8].astype(np.int64) + y[i:i + 8]).astype(np.uint32).view(np.int32)
        fs = s.view(np.float32)
        with np.errstate(all="ignore"):
            expect_f = (acc[i:i + 8] + fs).astype(np.float32)
        got = out_f.view(np.int32)
        nan = np.isnan(expect_f) & np.isnan(out_f[:8])
        assert ((got[:8] == expect_f.view(np.int32)) | nan).all()
        zf = (x[i:i + 8] & y[i:i + 8]).view(np.float32)
        with np.errstate(all="ignore"):
            expect_z = (np.float32(0) + zf).astype(np.float32)
        nan = np.isnan(expect_z) & np.isnan(out_f[8:16])
        assert ((got[8:16] == expect_z.view(np.int32)) | nan).all()
        assert (got[16:24] == np.int32(-123456789)).all()          # a normal float: 0 + x = x
        assert (out_i == acc[i:i + 8].view(np.int32)).all()


def test_fadd_rounds_to_nearest_even_per_lane():
    """1 + 2^-24 (a tie) rounds to 1, 1 + 3 * 2^-24 to 1 + 2^-22: float32 adds, not float64."""
    @njit
    def add(acc, v, out):
        vec8.store_f8(out, 0, vec8.fadd_bits(vec8.load_f8(acc, 0), vec8.load_i8(v, 0)))

    acc = np.ones(8, np.float32)
    v = np.array([2.0 ** -24, 3 * 2.0 ** -24, -2.0 ** -25, 0.0, -0.0, 1.0, np.ldexp(1.0, -149),
                  -1.0], np.float32)
    out = np.empty(8, np.float32)
    add(acc, v.view(np.int32), out)
    expect = np.array([1.0, 1.0 + 2.0 ** -22, 1.0, 1.0, 1.0, 2.0, 1.0, 0.0], np.float32)
    assert (out.view(np.int32) == expect.view(np.int32)).all()


@njit(cache=True)
def _compare_ops(x, y, out, red):
    """out rows: x > y, min, max, unsigned min, and x stored back; red: the horizontal
    signed min, signed max and unsigned min of x."""
    u = vec8.load_i8(x, 0)
    v = vec8.load_i8(y, 0)
    vec8.store_i8(out, 0, vec8.gt_i8(u, v))
    vec8.store_i8(out, 8, vec8.min_i8(u, v))
    vec8.store_i8(out, 16, vec8.max_i8(u, v))
    vec8.store_i8(out, 24, vec8.umin_i8(u, v))
    vec8.store_i8(out, 32, u)
    red[0] = vec8.hmin_i8(u)
    red[1] = vec8.hmax_i8(u)
    red[2] = vec8.humin_i8(u)


def test_compare_min_max_match_numpy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.integers(-2 ** 31, 2 ** 31, 8, dtype=np.int64).astype(np.int32)
        y = rng.integers(-2 ** 31, 2 ** 31, 8, dtype=np.int64).astype(np.int32)
        y[:2] = x[:2]                                               # ties
        x[2], y[2] = -1, 1                                          # sign matters
        out = np.zeros(40, np.int32)
        red = np.zeros(3, np.int64)
        _compare_ops(x, y, out, red)
        assert (out[:8] == np.where(x > y, -1, 0)).all()
        assert (out[8:16] == np.minimum(x, y)).all()
        assert (out[16:24] == np.maximum(x, y)).all()
        assert (out[24:32] == np.minimum(x.view(np.uint32), y.view(np.uint32)).view(np.int32)).all()
        assert (out[32:] == x).all()
        assert red.tolist() == [x.min(), x.max(), int(x.view(np.uint32).min())]


@njit(cache=True)
def _transpose_block(src, i, si, dst, j, sj):
    vec8.transpose8(src, i, si, dst, j, sj)


def test_transpose8_moves_each_element():
    """An 8 x 8 block at an odd offset and row stride, into int32 and into float32 (bit
    patterns kept, NaN payloads included); everything outside the block untouched."""
    rng = np.random.default_rng(2)
    src = rng.integers(-2 ** 31, 2 ** 31, 200, dtype=np.int64).astype(np.int32)
    for dtype in (np.int32, np.float32):
        dst = np.full(150, 7, np.int32)
        _transpose_block(src, 5, 19, dst.view(dtype), 3, 12)
        expect = np.full(150, 7, np.int32)
        for r in range(8):
            for c in range(8):
                expect[3 + c * 12 + r] = src[5 + r * 19 + c]
        assert (dst == expect).all()
