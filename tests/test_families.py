"""Kernels of the arithmetic families (L-Mul) and operand formats (quantize) on CPU.

Every kernel is compared bit for bit (int32 patterns; any NaN matches any NaN) with the
slow exact references of tests/reference.py (Fractions and integers, independent of the
kernels' bit tricks): ``round_to_format_ref``, ``lmul_ref``, ``pow2_part_ref``,
``lmul_matmul_ref``. Operands: edge cases of each format (zeros, subnormals, the smallest
subnormal and half of it, ties at every half-ulp, the largest finite value and the
overflow boundary, inf, NaN, negatives) plus random bit patterns and values (hypothesis).
The quantize kernel is also checked against torch's own casts (exact RNE integer code).
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as R
from pam import bits, dispatch
from pam import library as L
from pam.kernels import cpu

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered",
                                        "ignore:invalid value encountered")
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FORMATS = list(range(bits.N_FORMATS))
# fmt code -> (mantissa bits, exponent of the smallest normal, largest finite value)
PARAMS = {0: (23, -126, float(np.finfo(np.float32).max)), 1: (7, -126, 3.3895313892515355e38),
          2: (10, -14, 65504.0), 3: (3, -6, 448.0), 4: (2, -14, 57344.0)}
TORCH_DTYPES = {1: torch.bfloat16, 2: torch.float16, 3: torch.float8_e4m3fn,
                4: torch.float8_e5m2}


def f32(x):
    return np.asarray(x, np.float32)


def assert_same_bits(got, expected, what=""):
    got, expected = f32(got), f32(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    same = R.same_bits(got, expected)
    bad = np.argwhere(~same)
    assert bad.size == 0, (f"{what}: {len(bad)} of {same.size} differ, first at "
                           f"{bad[:3].tolist()}: got {got[tuple(bad[0])]!r}, "
                           f"expected {expected[tuple(bad[0])]!r}")


def edge_values(fmt):
    """Edge cases of format ``fmt`` and their float32 neighbours, both signs."""
    m, emin, vmax = PARAMS[fmt]
    sub = np.ldexp(1.0, emin - m)                    # smallest subnormal
    ulp_max = np.ldexp(1.0, int(np.floor(np.log2(vmax))) - m)   # exact: vmax is 2^e (2 - 2^-m)
    base = [0.0, sub, sub / 2, 3 * sub / 2, 5 * sub / 2, sub / 4, 3 * sub / 4,
            np.ldexp(1.0, emin) - sub, np.ldexp(1.0, emin) - sub / 2, np.ldexp(1.0, emin),
            vmax, vmax + ulp_max / 2, vmax + ulp_max / 4, vmax + ulp_max, 2 * vmax,
            1.0, 1.0 + np.ldexp(1.0, -m - 1), 1.0 + 3 * np.ldexp(1.0, -m - 1),
            1.5 + np.ldexp(1.0, -m - 1), 3.0, 1e-45, 1e-40, 1.17549435e-38, 3.4028235e38,
            np.inf, np.nan, 1e30, 1e-30, 0.1, 123.456, 1000.0]
    x = np.array([v for v in base if np.isnan(v) or abs(v) <= 3.4028235e38], np.float64)
    x = x.astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)),
                        np.nextafter(x, np.float32(0))])
    return np.concatenate([x, -x]).astype(np.float32)


def random_values(rng, n):
    """Values over every format's range (normals, subnormals, overflow) and raw bit patterns."""
    v = (rng.uniform(1, 2, n) * np.ldexp(1.0, rng.integers(-160, 128, n))
         * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    near = (rng.uniform(-1, 1, n) * np.ldexp(1.0, rng.integers(-26, 18, n))).astype(np.float32)
    raw = rng.integers(-2 ** 31, 2 ** 31, n, dtype=np.int64).astype(np.int32).view(np.float32)
    return np.concatenate([v, near, raw])


def k_quantize(x, fmt, flush):
    x = f32(x)
    out = np.empty(x.size, np.int32)
    cpu.quantize(np.ascontiguousarray(x).reshape(-1).view(np.int32), fmt, int(flush), out)
    return out.view(np.float32).reshape(x.shape)


def k_lmul(a, b, c):
    out = np.empty(a.size, np.int32)
    cpu.mul_lmul(a.view(np.int32), b.view(np.int32), c, out)
    return out.view(np.float32)


# --------------------------------------------------------------------------- quantize
def test_reference_round_to_format_examples():
    """The reference itself on hand-checked values (written as exact binary fractions)."""
    cases = [(2, 65519.0, 65504.0), (2, 65520.0, np.inf), (2, 2.0 ** -25, 0.0),
             (2, 1.5 * 2.0 ** -25, 2.0 ** -24), (3, 464.0, 448.0), (3, np.inf, 448.0),
             (3, 1.0625, 1.0), (3, 1.1875, 1.25), (4, 61440.0, np.inf), (4, 61439.0, 57344.0),
             (1, 1.0 + 2.0 ** -8, 1.0), (1, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -6)]
    for fmt, x, want in cases:
        got = R.round_to_format_ref(np.float32(x), fmt)
        assert got == np.float32(want) or (np.isnan(want) and np.isnan(got)), (fmt, x, got)
        neg = R.round_to_format_ref(np.float32(-x), fmt)
        assert neg == -np.float32(want), (fmt, -x, neg)
    assert R.round_to_format_ref(np.float32(2.0 ** -20), 2, flush=True) == 0.0
    assert np.signbit(R.round_to_format_ref(np.float32(-2.0 ** -20), 2, flush=True))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flush", [False, True])
def test_quantize_edge_cases(fmt, flush):
    x = np.concatenate([edge_values(f) for f in FORMATS])
    assert_same_bits(k_quantize(x, fmt, flush), R.round_to_format_ref(x, fmt, flush),
                     f"quantize fmt={fmt} flush={flush}")


@SETTINGS
@given(fmt=st.sampled_from(FORMATS), flush=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_quantize_random(fmt, flush, seed):
    x = random_values(np.random.default_rng(seed), 100)
    assert_same_bits(k_quantize(x, fmt, flush), R.round_to_format_ref(x, fmt, flush),
                     f"quantize fmt={fmt} flush={flush}")


@pytest.mark.parametrize("fmt", sorted(TORCH_DTYPES))
def test_quantize_matches_torch_casts(fmt):
    """torch's casts round to nearest even in integer code; e4m3: torch may give NaN on
    overflow where we saturate, so only finite torch results are compared there (the
    saturation is checked against the reference above). NaN inputs: any NaN."""
    rng = np.random.default_rng(fmt)
    x = np.concatenate([random_values(rng, 100000),
                        np.concatenate([edge_values(f) for f in FORMATS])])
    expected = torch.from_numpy(x).to(TORCH_DTYPES[fmt]).float().numpy()
    got = k_quantize(x, fmt, False)
    keep = ~np.isnan(expected) | np.isnan(x)
    assert_same_bits(got[keep], expected[keep], f"quantize vs torch fmt={fmt}")


def test_quantize_results_are_in_the_format():
    """Rounding twice changes nothing, and every finite result fits the format's width."""
    x = random_values(np.random.default_rng(7), 20000)
    for fmt in FORMATS:
        m = PARAMS[fmt][0]
        once = k_quantize(x, fmt, False)
        assert_same_bits(k_quantize(once, fmt, False), once, f"idempotent fmt={fmt}")
        normal = np.isfinite(once) & (np.abs(once) >= np.ldexp(1.0, PARAMS[fmt][1]))
        low = once[normal].view(np.int32) & ((1 << (23 - m)) - 1)
        assert not low.any(), fmt


def test_quantize_rejects_unknown_format():
    x = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="format code"):
        cpu.quantize(x, 5, 0, x.copy())
    with pytest.raises(ValueError, match="format code"):
        L.quantize(torch.zeros(3), 7)
    with pytest.raises(ValueError, match="format code"):
        L.quantize(torch.zeros(3), True)


# --------------------------------------------------------------------------- pow2_part
def test_pow2_part():
    x = np.concatenate([edge_values(f) for f in FORMATS]
                       + [random_values(np.random.default_rng(3), 3000)])
    out = np.empty(x.size, np.int32)
    cpu.pow2_part(x.view(np.int32), out)
    assert_same_bits(out.view(np.float32), R.pow2_part_ref(x), "pow2_part")
    assert_same_bits(L.pow2_part(torch.from_numpy(x)).numpy(), R.pow2_part_ref(x), "L.pow2_part")


# --------------------------------------------------------------------------- L-Mul
@pytest.mark.parametrize("mant_bits, c", [(23, 1 << 19), (10, 1 << 19), (7, 1 << 19),
                                          (4, 1 << 20), (3, 1 << 20), (2, 1 << 21),
                                          (1, 1 << 22)])
def test_lmul_constant(mant_bits, c):
    assert bits.lmul_constant(mant_bits) == c
    assert c == 2 ** 23 // 2 ** R.lmul_l(mant_bits)


def _lmul_operands(fmt, rng, n):
    """Operands in format ``fmt`` (rounded with the reference), edge cases included."""
    edge = edge_values(fmt)
    x = np.concatenate([edge, random_values(rng, n)])
    return R.round_to_format_ref(x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lmul_edge_pairs(fmt):
    """All pairs of edge operands of the format (and of float32), each format's constant."""
    m = bits.FORMAT_MANT_BITS[fmt]
    c = int(bits.lmul_constant(m))
    e = np.unique(np.concatenate([R.round_to_format_ref(edge_values(fmt), fmt),
                                  edge_values(0)[::3]]).view(np.int32)).view(np.float32)
    a, b = (np.ascontiguousarray(v.ravel()) for v in np.meshgrid(e, e))
    assert_same_bits(k_lmul(a, b, c), R.lmul_ref(a, b, m), f"mul_lmul fmt={fmt}")


@SETTINGS
@given(fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2 ** 32 - 1))
def test_lmul_random(fmt, seed):
    rng = np.random.default_rng(seed)
    m = bits.FORMAT_MANT_BITS[fmt]
    c = int(bits.lmul_constant(m))
    a = R.round_to_format_ref(random_values(rng, 60), fmt)
    b = R.round_to_format_ref(random_values(rng, 60), fmt)
    b = b[rng.permutation(b.size)]
    assert_same_bits(k_lmul(a, b, c), R.lmul_ref(a, b, m), f"mul_lmul fmt={fmt}")


def test_lmul_carry_cases_against_pam():
    """Without a mantissa carry L-Mul is PAM with off = c; with one it is not, and its
    mantissa is half the integer adder's (rounded to even), its exponent one higher."""
    rng = np.random.default_rng(11)
    a = (rng.uniform(1, 2, 4000) * np.ldexp(1.0, rng.integers(-20, 20, 4000))).astype(np.float32)
    b = (rng.uniform(1, 2, 4000) * np.ldexp(1.0, rng.integers(-20, 20, 4000))).astype(np.float32)
    c = 1 << 19
    got = k_lmul(a, b, c).view(np.int32).astype(np.int64)
    ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
    adder = ia + ib - bits.ONE + c                       # the integer adder (PAM, off = c)
    s = (ia & bits.MANT_MASK) + (ib & bits.MANT_MASK) + c
    carry = s >= 1 << 23
    assert carry.any() and (~carry).any()
    assert (got[~carry] == adder[~carry]).all()
    t = s[carry] - (1 << 23)
    half = t // 2 + ((t % 2 == 1) & ((t // 2) % 2 == 1))
    assert (got[carry] >> 23 == (ia[carry] >> 23) + (ib[carry] >> 23) - 127 + 1).all()
    assert (got[carry] & bits.MANT_MASK == half).all()
    assert (got[carry] != adder[carry]).any()


def test_lmul_scalar_operand_kernels():
    rng = np.random.default_rng(5)
    a = R.round_to_format_ref(random_values(rng, 200), 1)
    c = 1 << 19
    for s in (np.float32(1.75), np.float32(-3.0), np.float32(0.0), np.float32(np.inf)):
        sa = np.array([s], np.float32)
        out = np.empty(a.size, np.int32)
        cpu.mul_lmul_bs(a.view(np.int32), sa.view(np.int32), c, out)
        assert_same_bits(out.view(np.float32), R.lmul_ref(a, s, 7), "mul_lmul_bs")
        cpu.mul_lmul_as(sa.view(np.int32), a.view(np.int32), c, out)
        assert_same_bits(out.view(np.float32), R.lmul_ref(s, a, 7), "mul_lmul_as")


def test_lmul_rejects_bad_constant():
    x = np.zeros(3, np.int32)
    for c in (-1, 1 << 23):
        with pytest.raises(ValueError, match="L-Mul constant"):
            cpu.mul_lmul(x, x, c, x.copy())
        with pytest.raises(ValueError, match="L-Mul constant"):
            cpu.matmul_lmul(x.reshape(1, 1, 3), x.reshape(1, 3, 1), c,
                            np.empty((1, 1, 1), np.float32))


# --------------------------------------------------------------------------- matmul_lmul
REGIMES = ("normal", "zeros", "special", "wide")


def mm_operand(rng, shape, regime, fmt):
    x = (rng.standard_normal(shape) * np.ldexp(1.0, int(rng.integers(-6, 6)))).astype(np.float32)
    if regime == "zeros":
        x[rng.random(shape) < 0.35] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
        x[rng.random(shape) < 0.05] = np.float32(3e-39)
    elif regime == "special" and x.size:
        pick = rng.random(shape) < 0.15
        x[pick] = rng.choice(np.array([np.inf, -np.inf, np.nan, 0.0, 1e-40], np.float32),
                             size=int(pick.sum()))
    elif regime == "wide":
        x = (rng.uniform(1, 2, shape) * np.ldexp(1.0, rng.integers(-130, 128, shape))
             * rng.choice([-1.0, 1.0], shape)).astype(np.float32)
    return np.ascontiguousarray(R.round_to_format_ref(x, fmt))


def k_matmul_lmul(a, b, c, path=None):
    """Through the public kernel, or straight through one path ("fast" or "general")."""
    out = np.full((1, a.shape[0], b.shape[1]), np.nan, np.float32)
    A, B = a[None].view(np.int32), b[None].view(np.int32)
    if path is None:
        cpu.matmul_lmul(A, B, c, out)
    elif path == "general":
        cpu._matmul_general(A, B, c, True, out)
    else:
        zeros = ((B & bits.ABS_MASK) < bits.MIN_NORMAL).any()
        cpu._matmul_fast_lmul_m(A, B, cpu._zero_mask(B), c, out) if zeros else \
            cpu._matmul_fast_lmul(A, B, B, c, out)
    return out[0]


dims = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 13, 17])


@SETTINGS
@given(n=dims, k=st.sampled_from([0, 1, 3, 4, 5, 8, 9, 17]), m=dims,
       ra=st.sampled_from(REGIMES), rb=st.sampled_from(REGIMES),
       fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2 ** 32 - 1))
def test_matmul_lmul_matches_reference(n, k, m, ra, rb, fmt, seed):
    rng = np.random.default_rng(seed)
    a, b = mm_operand(rng, (n, k), ra, fmt), mm_operand(rng, (k, m), rb, fmt)
    mb = bits.FORMAT_MANT_BITS[fmt]
    c = int(bits.lmul_constant(mb))
    expected = R.lmul_matmul_ref(a, b, mb)
    assert_same_bits(k_matmul_lmul(a, b, c), expected, "matmul_lmul")
    assert_same_bits(k_matmul_lmul(a, b, c, "general"), expected, "general path")
    if ra in ("normal", "zeros") and rb in ("normal", "zeros") and k:
        assert_same_bits(k_matmul_lmul(a, b, c, "fast"), expected, "fast path")


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_lmul_fast_path_large(fmt):
    """Shapes beyond the kernel's row block and column tile, zeros in both operands: the
    fast path (taken: no specials, moderate exponents) equals the general path."""
    rng = np.random.default_rng(fmt)
    a = mm_operand(rng, (11, 70), "zeros", fmt)
    b = mm_operand(rng, (70, cpu.COL_TILE + 37), "zeros", fmt)
    c = int(bits.lmul_constant(bits.FORMAT_MANT_BITS[fmt]))
    assert_same_bits(k_matmul_lmul(a, b, c), k_matmul_lmul(a, b, c, "general"), "fast")
    assert_same_bits(k_matmul_lmul(a, b, c, "fast"), k_matmul_lmul(a, b, c, "general"), "fast")
    a, b = np.ascontiguousarray(a[:3, :9]), np.ascontiguousarray(b[:9, :5])
    assert_same_bits(k_matmul_lmul(a, b, c),
                     R.lmul_matmul_ref(a, b, bits.FORMAT_MANT_BITS[fmt]), "ref")


# --------------------------------------------------------------------------- library
def test_library_entry_points():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(random_values(rng, 300))
    for fmt in FORMATS:
        for flush in (False, True):
            want = R.round_to_format_ref(x.numpy(), fmt, flush)
            assert_same_bits(L.quantize(x, fmt, flush).numpy(), want, "L.quantize")
            assert_same_bits(L._quantize_op(x, fmt, flush).numpy(), want, "custom op")
    a = torch.from_numpy(mm_operand(rng, (2, 5, 6), "normal", 1))
    b = torch.from_numpy(mm_operand(rng, (2, 6, 3), "zeros", 1))
    c = int(bits.lmul_constant(7))
    got = L.matmul3(a, b, c, kind="lmul")
    op = L._matmul_op(a, b, c, "lmul")
    for p in range(2):
        want = R.lmul_matmul_ref(a[p].numpy(), b[p].numpy(), 7)
        assert_same_bits(got[p].numpy(), want, "L.matmul3 lmul")
        assert_same_bits(op[p].numpy(), want, "custom op lmul")
    assert_same_bits(L.matmul3(a, b, 0).numpy(), L._matmul_op(a, b, 0, "pam").numpy(), "pam")
    u, v = a.reshape(-1)[:12], b.reshape(-1)[:12]
    assert_same_bits(L.binary_map("mul_lmul", u, v, c).numpy(),
                     R.lmul_ref(u.numpy(), v.numpy(), 7), "binary_map mul_lmul")
    assert_same_bits(L.binary_map("mul_lmul", u, v[:1].reshape(()), c).numpy(),
                     R.lmul_ref(u.numpy(), v[0].numpy(), 7), "mul_lmul_bs")
    with pytest.raises(ValueError, match="kind must be one of"):
        L.matmul3(a, b, 0, kind="float")
    with pytest.raises(ValueError, match="exact backward has PAM kernels only"):
        L.conv_grad_input(a[None], a[None], a[None], [1, 1], [0, 0], [1, 1], 1, True, c,
                          kind="lmul")
    assert dispatch.kernel_suffix("lmul") == "_lmul"


def test_matmul_lmul_range_check_sees_double_carry_underflow():
    """Ma + Mb + c >= 2^24: the PAM sum's exponent field is 2 above Ea + Eb - 127, L-Mul's
    only 1, so a PAM-style range check would pass products that underflow to zero."""
    x = np.float32(1.97 * 2.0 ** -64)
    a = np.full((3, 5), x, np.float32)
    b = np.full((5, 4), x, np.float32)
    b[0, 0] = np.float32(2.0 ** 60)             # one normal product per output column 0
    c = 1 << 19
    expected = R.lmul_matmul_ref(a, b, 23)
    assert (expected[:, 1:] == 0).all() and (expected[:, 0] != 0).all()
    assert_same_bits(k_matmul_lmul(a, b, c), expected, "matmul_lmul underflow")


def test_scalar_helpers():
    """lmul_scalar / quantize_scalar (pure Python on the bit patterns) equal the kernels."""
    rng = np.random.default_rng(8)
    x = random_values(rng, 40)
    y = random_values(rng, 40)
    for fmt in FORMATS:
        q = R.round_to_format_ref(x, fmt, True)
        got = np.array([L.quantize_scalar(float(v), fmt, True) for v in x], np.float32)
        assert_same_bits(got, q, "quantize_scalar")
    c = 1 << 20
    got = np.array([L.lmul_scalar(float(u), float(v), c) for u, v in zip(x, y)], np.float32)
    assert_same_bits(got, R.lmul_ref(x, y, 3), "lmul_scalar")


def test_carry_correction_identity():
    """The fast paths' carry correction: t - rne(t / 2) = (t >> 1) + (t % 4 == 1) for
    every mantissa excess t < 2^24 (rne: round half to even)."""
    t = np.arange(1 << 24, dtype=np.int64)
    q, odd = t >> 1, t & 1
    rne_half = q + (odd & q & 1)                  # a tie rounds to the even neighbour
    assert ((t - rne_half) == (t >> 1) + ((t & 3) == 1)).all()
