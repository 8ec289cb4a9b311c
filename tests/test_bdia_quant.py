"""bdia_pam.quant: the 2^-l grid, exact conversions, the BDIA combine step, bit packing."""
from fractions import Fraction

import numpy as np
import pytest
import torch

import pam
from hypothesis import given, settings, strategies as st

from bdia_pam import quant
from bdia_pam.quant import GridRangeError

SETTINGS = settings(max_examples=40, deadline=None)


def bits(t):
    return t.contiguous().view(torch.int32)


def ref_round(v: Fraction) -> int:
    return round(v)  # Python rounds Fractions half to even


float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


def NoFloatMul():
    """The project's audit mode: raises on any float multiply-family aten op."""
    return pam.audit.no_float_multiply()


@SETTINGS
@given(st.lists(float32s, min_size=1, max_size=30), st.integers(1, 20))
def test_to_grid_matches_exact_reference(values, l):
    x = torch.tensor(values, dtype=torch.float32)
    limit = Fraction(2) ** (24 - l)
    exact = [ref_round(Fraction(v) * 2 ** l) for v in values]
    if any(abs(e) >= 2 ** 24 for e in exact):
        with pytest.raises(GridRangeError, match="input"):
            quant.to_grid(x, l)
        return
    X = quant.to_grid(x, l)
    assert X.tolist() == exact
    back = quant.from_grid(X, l)
    assert [Fraction(float(v)) for v in back] == [Fraction(e, 2 ** l) for e in exact]
    assert all(abs(Fraction(float(v))) < limit for v in back)


def test_to_grid_ties_to_even_and_range_error():
    l = 3
    x = torch.tensor([1 / 16, 3 / 16, -1 / 16, -3 / 16, 5 / 16])  # exact halves of 2^-3
    assert quant.to_grid(x, l).tolist() == [0, 2, 0, -2, 2]
    limit = quant.grid_limit(l)
    assert limit == 2.0 ** 21
    with pytest.raises(GridRangeError, match=r"my tensor.*2\^21"):
        quant.to_grid(torch.tensor([limit]), l, "my tensor")
    with pytest.raises(GridRangeError):
        quant.to_grid(torch.tensor([float("nan")]), l)
    with pytest.raises(GridRangeError):
        quant.to_grid(torch.tensor([float("inf")]), l)
    assert quant.to_grid(torch.tensor([limit - 2.0 ** -3]), l).item() == 2 ** 24 - 1
    with pytest.raises(TypeError, match="floating-point"):
        quant.to_grid(torch.tensor([1, 2]), l)
    with pytest.raises(GridRangeError):
        quant.from_grid(torch.tensor([2 ** 24]), l)


@pytest.mark.parametrize("bad", [0, 21, -1, 9.0, True, "9", None])
def test_frac_bits_validation(bad):
    with pytest.raises((TypeError, ValueError), match="frac_bits"):
        quant.check_frac_bits(bad)


@SETTINGS
@given(st.lists(float32s, min_size=1, max_size=20), st.integers(-30, 30))
def test_ldexp_exact_is_the_float_product(values, e):
    x = torch.tensor(values, dtype=torch.float32)
    with np.errstate(over="ignore"):
        expected = torch.from_numpy(x.numpy() * np.float32(2.0 ** e))
    assert torch.equal(bits(quant.ldexp_exact(x, e)), bits(expected))


def test_ldexp_exact_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -3e-39])
    y = quant.ldexp_exact(x, -1)
    assert torch.equal(bits(y[:4]), bits(x[:4]))
    assert torch.equal(bits(y[4:]), bits(x[4:] * 0.5))


@SETTINGS
@given(st.lists(st.tuples(st.integers(-2 ** 22, 2 ** 22), float32s.filter(lambda v: abs(v) < 1e3),
                          st.booleans()), min_size=1, max_size=30),
       st.integers(1, 12))
def test_bdia_combine_is_one_exact_rounding(rows, l):
    X = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    h = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    gp = torch.tensor([r[2] for r in rows])
    expected = []
    for Xi, hi, pos in rows:
        g = Fraction(1, 2) if pos else Fraction(-1, 2)
        v = (1 - g) * Xi + (1 + g) * Fraction(float(np.float32(hi))) * 2 ** l
        expected.append(ref_round(v))
    assert quant.bdia_combine(X, h, gp, l).tolist() == expected


def test_bdia_combine_ties_and_tiny_fractions():
    # V/2 exactly at .5: ties to even; a tiny positive h breaks the tie upward
    X = torch.tensor([3, 5, -1, -3, 1, 1], dtype=torch.int64)
    h = torch.tensor([0, 0, 0, 0, 0, 2.0 ** -40], dtype=torch.float32)
    gp = torch.ones(6, dtype=torch.bool)
    assert quant.bdia_combine(X, h, gp, 9).tolist() == [2, 2, 0, -2, 0, 1]
    with pytest.raises(GridRangeError, match=r"block 7.*largest finite \|x\| = 1e\+30"):
        quant.bdia_combine(X, torch.full((6,), 1e30), gp, 9, "block 7")
    with pytest.raises(GridRangeError):
        quant.bdia_combine(X, torch.full((6,), float("nan")), gp, 9, "block 7")


@SETTINGS
@given(st.lists(st.integers(-2 ** 23, 2 ** 23), min_size=1, max_size=40), st.data())
def test_gamma_term_inverts(values, data):
    X = torch.tensor(values, dtype=torch.int64)
    gp = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    s = quant.parity(X)
    assert set(s.tolist()) <= {0, 1}
    T = quant.gamma_term(X, s, gp)
    for Ti, Xi, si, pos in zip(T.tolist(), values, s.tolist(), gp.tolist()):
        assert Fraction(Ti) == (Fraction(1, 2) if pos else Fraction(-1, 2)) * (Xi + si)
    assert torch.equal(quant.gamma_term_inverse(T, s, gp), X)


@SETTINGS
@given(st.lists(st.integers(0, 1), min_size=0, max_size=100))
def test_pack_unpack_roundtrip(values):
    b = torch.tensor(values, dtype=torch.int64)
    packed = quant.pack_bits(b)
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert packed.numel() == (len(values) + 7) // 8
    for j, byte in enumerate(packed.tolist()):  # bit i of byte j is element 8j + i
        for i in range(8):
            e = values[8 * j + i] if 8 * j + i < len(values) else 0
            assert (byte >> i) & 1 == e
    assert quant.unpack_bits(packed, len(values)).tolist() == values


def test_unpack_errors():
    with pytest.raises(TypeError, match="uint8"):
        quant.unpack_bits(torch.zeros(2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="fewer"):
        quant.unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


def test_checksum_detects_any_single_change():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(-2 ** 23, 2 ** 23, (3, 50), generator=g)
    c = quant.checksum(X)
    assert quant.checksum(X.clone()) == c
    for idx in [(0, 0), (1, 17), (2, 49)]:
        for delta in (1, -1, 2 ** 23):
            Y = X.clone()
            Y[idx] += delta
            assert quant.checksum(Y) != c
    assert quant.checksum(X.flip(1)) != c  # position dependent


def test_no_float_multiply_in_grid_ops():
    x = torch.randn(64) * 100
    h = torch.randn(64)
    gp = torch.rand(64) < 0.5
    with NoFloatMul():
        X = quant.to_grid(x, 9)
        quant.from_grid(X, 9)
        R = quant.bdia_combine(X, h, gp, 9)
        s = quant.parity(X)
        quant.gamma_term_inverse(quant.gamma_term(X, s, gp), s, gp)
        quant.residual_step(X, h, 9, "x")
        quant.checksum(R)
        quant.unpack_bits(quant.pack_bits(s), 64)
        quant.ldexp_exact(h, -1)
    with pytest.raises(pam.audit.FloatMultiplyError):
        with NoFloatMul():
            x * 2.0


@pytest.mark.parametrize("l", [1, 9, 20])
def test_from_grid_float32_is_the_exact_value(l):
    """from_grid's float32 path (exponent edit of the int32 view) gives X 2^-l exactly for
    every |X| < 2^24, zero and the extremes included (against Fractions)."""
    g = torch.Generator().manual_seed(l)
    X = torch.randint(-2 ** 24 + 1, 2 ** 24, (2000,), generator=g)
    X[:6] = torch.tensor([0, 1, -1, 2 ** 24 - 1, -(2 ** 24 - 1), 2 ** 23])
    got = quant.from_grid(X, l)
    assert got.dtype == torch.float32
    assert [Fraction(float(v)) for v in got] == [Fraction(int(x), 2 ** l) for x in X]
    assert bits(got[:1]).item() == 0                    # +0, not a denormal pattern


def test_grid_functions_bypass_the_mode_layers_with_the_same_results(monkeypatch):
    """Under pam.arithmetic() the grid functions run with the mode's layers off (they do
    only integer and exact float64 work): the function layer sees none of their torch calls,
    the results are those computed outside the mode, and an audit inside still sees (and
    passes) every op."""
    from pam.mode import functions as layer1
    seen = []
    orig = layer1._FunctionLayer.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return orig(self, func, types, args, kwargs)

    g = torch.Generator().manual_seed(5)
    X = torch.randint(-2 ** 20, 2 ** 20, (4, 8), generator=g)
    h = torch.randn(4, 8, generator=g) * 30
    gp = torch.tensor([True, False, True, False]).view(4, 1)
    outside = (quant.bdia_combine(X, h, gp, 9), quant.from_grid(X, 9), quant.to_grid(h, 9),
               quant.residual_step(X, h, 9, "block"))
    monkeypatch.setattr(layer1._FunctionLayer, "__torch_function__", spy)
    with pam.arithmetic(), NoFloatMul():
        inside = (quant.bdia_combine(X, h, gp, 9), quant.from_grid(X, 9), quant.to_grid(h, 9),
                  quant.residual_step(X, h, 9, "block"))
        seen_by_grid_functions = len(seen)
        probe = torch.ones(2) + 1          # the spy does see ops run under the mode
    assert seen_by_grid_functions == 0
    assert len(seen) > 0 and probe.tolist() == [2.0, 2.0]
    for a, b in zip(outside, inside):
        assert a.dtype == b.dtype and torch.equal(a, b)
