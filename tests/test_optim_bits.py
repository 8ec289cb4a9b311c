"""The branch-free scalar forms of pam.optim_bits give the bits of the pam.bits functions
they replace, on special patterns and on random ones (compiled and in pure Python)."""
import numpy as np
import pytest
from numba import njit

from pam import bits, optim_bits as OB

SPECIALS = np.array([0, bits.SIGN, 1, bits.MIN_NORMAL - 1, bits.MIN_NORMAL, bits.ONE,
                     bits.ONE + 1, bits.ONE - 1, 0x3F000000, 0x40000000, 0x42FE0000,
                     0x42FF0000, 0x43000000, 0x43480000, 0xC3480000 - (1 << 32),
                     0xC3490000 - (1 << 32), 0xC3478000 - (1 << 32), 0x7F7FFFFF,
                     bits.INF - 1, bits.INF, bits.INF + 1, bits.QNAN, bits.ABS_MASK,
                     0x00400000, 0x4B000000, 0x4B7FFFFF, 0x34000000],
                    dtype=np.int64)
SPECIALS = np.concatenate([SPECIALS, SPECIALS | bits.SIGN]).astype(np.int64)
SPECIALS = np.where(SPECIALS >= 1 << 31, SPECIALS - (1 << 32), SPECIALS).astype(np.int32)


def _patterns(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    # log-uniform-ish normal floats in the range the optimizer sees, both signs
    exps = rng.integers(0x20, 0xA0, n // 2, dtype=np.int64) << 23
    typical = (exps | rng.integers(0, 1 << 23, n // 2)).astype(np.int32)
    typical[::2] |= np.int32(bits.SIGN)
    return np.concatenate([SPECIALS, raw, typical])


@njit
def _unary_both(x, which):
    out = np.empty((2, x.size), np.int64)
    for i in range(x.size):
        if which == 0:
            out[0, i] = OB.log2_sel_bits(x[i])
            out[1, i] = bits.log2_bits(x[i])
        elif which == 1:
            out[0, i] = OB.exp2_sel_bits(x[i])
            out[1, i] = bits.exp2_bits(x[i])
        elif which == 2:
            out[0, i] = OB.half_bits(x[i])
            out[1, i] = bits.mul_bits(x[i], OB.HALF, 0)
        else:
            out[0, i] = OB.sqrt_bits(x[i])
            out[1, i] = bits.exp2_bits(bits.mul_bits(bits.log2_bits(x[i]), OB.HALF, 0))
    return out


@njit
def _binary_both(a, b, which):
    out = np.empty((2, a.size), np.int64)
    for i in range(a.size):
        if which >= 2:
            off = OFFSETS[which - 2]
            out[0, i] = OB.mul32_bits(a[i], b[i], off)
            out[1, i] = bits.mul_bits(a[i], b[i], off)
        elif which == 0:
            out[0, i] = OB.div0_bits(a[i], b[i])
            out[1, i] = bits.div_bits(a[i], b[i], 0)
        else:
            out[0, i] = OB.max_bits(a[i], b[i])
            fa = bits.bits_to_f32(a[i])
            fb = bits.bits_to_f32(b[i])
            if fa != fa:
                out[1, i] = a[i]
            elif fb != fb:
                out[1, i] = b[i]
            else:
                out[1, i] = b[i] if fb > fa else a[i]
    return out


@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["log2", "exp2", "half", "sqrt"])
def test_unary_branch_free_forms_match(which):
    x = _patterns()
    if which == 1:                             # exp2 inputs: mostly in [-210, 130]
        rng = np.random.default_rng(1)
        y = rng.uniform(-210, 130, 100_000).astype(np.float32).view(np.int32)
        x = np.concatenate([x, y])
    got, want = _unary_both(x, which)
    bad = np.flatnonzero(np.int32(got) != np.int32(want))
    assert bad.size == 0, [hex(int(x[i]) & 0xFFFFFFFF) for i in bad[:5]]


# offsets of pam.dispatch.offset_constant: none, 1.0552, the smallest and largest normal
OFFSETS = (0, int(np.float32(1.0552).view(np.int32)) - bits.ONE, bits.MIN_NORMAL - bits.ONE,
           0x7F7FFFFF - bits.ONE, int(np.float32(0.5).view(np.int32)) - bits.ONE)


@pytest.mark.parametrize("which", range(2 + len(OFFSETS)),
                         ids=["div", "max"] + [f"mul_off{k}" for k in range(len(OFFSETS))])
def test_binary_branch_free_forms_match(which):
    x = _patterns()
    a = np.concatenate([np.repeat(SPECIALS, SPECIALS.size), x])
    b = np.concatenate([np.tile(SPECIALS, SPECIALS.size), np.roll(x, 7)])
    got, want = _binary_both(a, b, which)
    bad = np.flatnonzero(np.int32(got) != np.int32(want))
    assert bad.size == 0, [(hex(int(a[i]) & 0xFFFFFFFF), hex(int(b[i]) & 0xFFFFFFFF))
                           for i in bad[:5]]


def test_pure_python_forms_match_on_specials():
    """Under the CUDA simulator the forms run as Python on NumPy int32 scalars: same bits,
    and no int32 overflow warning (an error here)."""
    with np.errstate(over="raise"):
        for x in SPECIALS:
            assert OB.log2_sel_bits(x) == np.int32(bits.log2_bits(x))
            assert OB.exp2_sel_bits(x) == np.int32(bits.exp2_bits(x))
            assert OB.sqrt_bits(x) == np.int32(
                bits.exp2_bits(bits.mul_bits(bits.log2_bits(x), OB.HALF, 0)))
            for y in SPECIALS[::3]:
                assert OB.div0_bits(x, y) == np.int32(bits.div_bits(x, y, 0))
                for off in OFFSETS:
                    assert OB.mul32_bits(x, y, off) == np.int32(bits.mul_bits(x, y, off))
