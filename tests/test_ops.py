"""Properties of the PAM ops through their torch entry points (CPU)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import pam
import reference as ref

EDGE = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1.5, -1.5, 3.0, float("inf"), float("-inf"),
        float("nan"), 1e-45, -1e-45, 1e-40, 1.1754944e-38, -1.1754944e-38, 3.4028235e38,
        -3.4028235e38, 1e30, 1e-30, 65504.0, 0.7, -0.3]
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
f32_any = st.one_of(f32, st.sampled_from(EDGE))
normal_f32 = st.floats(min_value=2.0 ** -60, max_value=2.0 ** 60, width=32).flatmap(
    lambda x: st.sampled_from([x, -x]))
arrays = hnp.arrays(np.float32, st.integers(1, 40), elements=f32_any)


def T(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))


def bits_equal(x, y):
    return bool(ref.same_bits(np.asarray(x), np.asarray(y)).all())


# --------------------------------------------------------------------------- forward
@settings(max_examples=60, deadline=None)
@given(arrays, st.data())
def test_mul_matches_reference_and_commutes(a, data):
    b = data.draw(hnp.arrays(np.float32, a.shape, elements=f32_any))
    c = pam.mul(T(a), T(b)).numpy()
    assert bits_equal(c, ref.pam(a, b))
    assert bits_equal(c, pam.mul(T(b), T(a)).numpy())


@settings(max_examples=60, deadline=None)
@given(arrays, st.data())
def test_offset_matches_reference(a, data):
    b = data.draw(hnp.arrays(np.float32, a.shape, elements=f32_any))
    assert bits_equal(pam.mul(T(a), T(b), offset=1.0552).numpy(), ref.pam(a, b, 1.0552))


@settings(max_examples=100, deadline=None)
@given(normal_f32, st.integers(-20, 20))
def test_exact_when_operand_is_power_of_two(a, e):
    p = np.float32(2.0 ** e)
    want = np.float32(a) * p
    assert bits_equal(pam.mul(T([a]), T([p])).numpy(), [want])
    assert bits_equal(pam.mul(T([p]), T([a])).numpy(), [want])
    assert bits_equal(pam.div(T([a]), T([p])).numpy(), [np.float32(a) / p])


def test_ratio_bounds_and_sign_rules():
    rng = np.random.default_rng(0)
    a = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.integers(-40, 40, 200_000)).astype(np.float32)
    b = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.integers(-40, 40, 200_000)).astype(np.float32)
    sa = rng.choice([-1, 1], a.size).astype(np.float32)
    sb = rng.choice([-1, 1], a.size).astype(np.float32)
    c = pam.mul(T(a * sa), T(b * sb)).numpy().astype(np.float64)
    ratio = c / (a.astype(np.float64) * b * sa * sb)
    assert ratio.min() >= 8 / 9 - 1e-7 and ratio.max() <= 1.0
    assert np.all(np.sign(c) == sa * sb)
    q = pam.div(T(a * sa), T(b * sb)).numpy().astype(np.float64)
    qratio = q / (a.astype(np.float64) / b * sa * sb)
    assert qratio.min() >= 1.0 and qratio.max() <= 9 / 8 + 1e-7
    assert np.all(np.sign(q) == sa * sb)


def test_special_values():
    inf, nan = float("inf"), float("nan")
    c = pam.mul(T([0.0, -0.0, inf, inf, 1e-40, 3e38, 1e-30]),
                T([inf, 2.0, -2.0, 0.0, 5.0, 3e38, 1e-30])).numpy()
    assert np.isnan(c[0]) and np.isnan(c[3])
    assert c[1] == 0 and np.signbit(c[1])
    assert c[2] == -inf
    assert c[4] == 0 and not np.signbit(c[4])      # subnormal counts as zero
    assert c[5] == inf                              # overflow saturates
    assert c[6] == 0                                # underflow flushes
    q = pam.div(T([1.0, 0.0, inf, -3.0, 2.0]), T([0.0, 0.0, inf, inf, -0.0])).numpy()
    assert q[0] == inf and np.isnan(q[1]) and np.isnan(q[2])
    assert q[3] == 0 and np.signbit(q[3]) and q[4] == -inf
    assert np.isnan(pam.mul(T([nan]), T([1.0])).numpy()[0])


def test_exp2_log2_definitions():
    y = np.array([-3.5, -1.0, 0.0, 0.25, 1.75, 10.3, 127.9, 128.0, -126.5, -150.0,
                  float("-inf"), float("inf")], np.float32)
    got = pam.exp2(T(y)).numpy()
    # Expected bits from exact operations only: y - floor(y) and 1 + frac in float32 (the
    # definition's one rounding), then an exact scaling by 2^floor(y) in float64 (np.ldexp);
    # NumPy's float32 exp2 is not exact on every CPU (exp2(127.0) can be one ulp off).
    finite = np.isfinite(y)
    fl = np.floor(np.where(finite, y, 0)).astype(np.float32)
    t = (np.float32(1) + (np.where(finite, y, 0) - fl)).astype(np.float32)
    scaled = np.ldexp(t.astype(np.float64), fl.astype(np.int32))
    scaled = np.where(finite, scaled, np.where(y > 0, np.inf, 0.0))
    scaled = np.where(scaled < np.finfo(np.float32).tiny, 0.0, scaled)
    with np.errstate(over="ignore"):
        want = scaled.astype(np.float32)            # >= 2^128 rounds to inf
    assert bits_equal(got, want)
    x = np.array([1.0, 2.0, 3.0, 0.75, 1e-3, 1e30, 0.0, -1.0, float("inf")], np.float32)
    got = pam.log2(T(x)).numpy()
    # E + M is exact in float64 (x = m 2^ex, m in [0.5, 1), by np.frexp); the definition
    # rounds it once to float32, as the cast does.
    m, ex = np.frexp(x[:6].astype(np.float64))
    want = ((ex - 1) + (2 * m - 1)).astype(np.float32)
    assert bits_equal(got[:6], want)
    assert got[6] == -np.inf and np.isnan(got[7]) and got[8] == np.inf


def _rel(got, want):
    return (got.double() - want.double()) / want.double()


def test_composites_error_bounds_measured():
    """Bounds measured on these grids (documented in pam.ops docstrings), with margin."""
    x = torch.linspace(0.01, 10, 100_000)
    y = torch.linspace(-5, 5, 100_000)
    r = _rel(pam.sqrt(x), x.sqrt())
    assert r.min() >= -1e-6 and r.max() <= 0.0607 + 1e-3
    r = _rel(pam.exp(y), y.exp())
    assert r.min() >= -0.29 - 0.01 and r.max() <= 0.426 + 0.01
    assert (pam.log(x) - x.log()).abs().max() <= 0.345 + 0.005
    r = _rel(pam.pow(x, 1.5), x.pow(1.5))
    assert r.min() >= -0.293 - 0.01 and r.max() <= 0.999 + 0.01
    four = torch.tensor([4.0, 16.0, 0.25])
    assert torch.equal(pam.sqrt(four), four.sqrt())   # exact at even powers of two
    assert pam.sqrt(torch.tensor([0.0])).item() == 0.0


# --------------------------------------------------------------------------- backward
def _segment_neighbour(a, b):
    """a + (a few ulps) that stays in the same PAM segment as a (same exponent, same carry)."""
    ia, ib = int(ref.bits(a)), int(ref.bits(b))
    ma, mb = ia & 0x7FFFFF, ib & 0x7FFFFF
    carry = (ma + mb) >= (1 << 23)
    step = 4
    limit = (1 << 23) - mb if not carry else (1 << 23)
    if ma + step >= limit:
        step = -4
    return np.int32(ia + step).view(np.float32)


@settings(max_examples=200, deadline=None)
@given(normal_f32, normal_f32)
def test_exact_backward_is_slope_and_finite_difference(a, b):
    a32, b32 = np.float32(a), np.float32(b)
    ta = T([a32]).requires_grad_()
    tb = T([b32]).requires_grad_()
    pam.mul(ta, tb).backward()
    assert ta.grad.item() == ref.pam_slope(a32, b32)
    assert tb.grad.item() == ref.pam_slope(b32, a32)
    a2 = _segment_neighbour(a32, b32)
    c1, c2 = ref.pam(a32, b32), ref.pam(a2, b32)
    if np.isfinite(c1) and np.isfinite(c2) and c1 != 0 and c2 != 0:
        fd = (np.float64(c2) - np.float64(c1)) / (np.float64(a2) - np.float64(a32))
        assert fd == ta.grad.item()


@settings(max_examples=40, deadline=None)
@given(normal_f32, normal_f32)
@example(float(np.float32(1e-8)), 2.0 ** 50)   # slope 2^-127 flushes to -0, like results
def test_div_exact_backward_is_finite_difference(a, b):
    a32, b32 = np.float32(a), np.float32(b)
    ta = T([a32]).requires_grad_()
    tb = T([b32]).requires_grad_()
    c = pam.div(ta, tb)
    c.backward()
    c1 = np.float64(c.item())
    if not (np.isfinite(c1) and abs(c1) > 1e-37 and abs(c1) < 1e37):
        return
    for which, x, g in (("a", a32, ta.grad.item()), ("b", b32, tb.grad.item())):
        ix = int(ref.bits(x))
        for step in (3, -3):
            x2 = np.int32(ix + step).view(np.float32)
            args = (x2, b32) if which == "a" else (a32, x2)
            c2 = np.float64(pam.div(T([args[0]]), T([args[1]])).item())
            # same segment <=> the result moves by exactly |step| units in the last place
            same_x_segment = (int(ref.bits(x2)) >> 23) == (ix >> 23)
            i1, i2 = int(ref.bits(np.float32(c1))), int(ref.bits(np.float32(c2)))
            if same_x_segment and abs(i2 - i1) == 3 and (i2 >> 23) == (i1 >> 23):
                fd = (c2 - c1) / (np.float64(x2) - np.float64(x))
                with np.errstate(over="ignore"):
                    want = np.float32(fd)              # inf if 2^E overflows
                if abs(want) < np.finfo(np.float32).tiny:
                    want = np.copysign(np.float32(0), want)   # slopes flush like results
                assert want == g and np.signbit(want) == np.signbit(g), (which, a32, b32, fd, g)
                break


@settings(max_examples=100, deadline=None)
@given(st.floats(-100, 100, width=32), st.floats(2.0 ** -20, 2.0 ** 20, width=32))
def test_exp2_log2_exact_backward(y, x):
    ty = T([y]).requires_grad_()
    pam.exp2(ty).backward()
    assert ty.grad.item() == math.ldexp(1.0, math.floor(y))
    tx = T([x]).requires_grad_()
    pam.log2(tx).backward()
    assert tx.grad.item() == math.ldexp(1.0, 1 - math.frexp(float(np.float32(x)))[1])


def test_approx_backward_is_pam_with_other_operand():
    torch.manual_seed(0)
    a = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    g = torch.randn(5, 7)
    pam.mul(a, b, backward="approx").backward(g)
    assert torch.equal(a.grad.view(torch.int32), pam.mul(g, b.detach().expand(5, 7)).view(torch.int32))
    want_b = pam.mul(g, a.detach()).sum(0)
    assert torch.equal(b.grad.view(torch.int32), want_b.view(torch.int32))


def test_exact_backward_reduces_broadcast_dims():
    a = torch.randn(4, 1, 3, requires_grad=True)
    b = torch.randn(5, 3, requires_grad=True)
    pam.mul(a, b).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    slope = torch.from_numpy(ref.pam_slope(b.detach().numpy()[None], a.detach().numpy())).float()
    assert torch.equal(b.grad, slope.sum(0))


# --------------------------------------------------------------------------- matmul
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 9), st.integers(1, 9), st.integers(0, 2 ** 31))
def test_matmul_matches_reference(n, k, m, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal((k, m)).astype(np.float32)
    a[rng.random(a.shape) < 0.1] = 0.0
    assert bits_equal(pam.matmul(T(a), T(b)).numpy(), ref.matmul(a, b))
    assert bits_equal(pam.matmul(T(a), T(b), offset=1.0552).numpy(), ref.matmul(a, b, 1.0552))


@pytest.mark.parametrize("sa,sb", [((3,), (3,)), ((3,), (3, 4)), ((2, 3), (3,)),
                                   ((5, 2, 3), (3, 4)), ((2, 3), (5, 3, 4)),
                                   ((2, 1, 2, 3), (4, 3, 5)), ((1, 2, 3), (6, 3, 2))])
def test_matmul_shapes_follow_torch(sa, sb):
    torch.manual_seed(1)
    a, b = torch.randn(sa), torch.randn(sb)
    c = pam.matmul(a, b)
    assert c.shape == torch.matmul(a, b).shape
    # each batch entry equals the 2-D product
    a2 = a.reshape(-1, *a.shape[-2:]) if a.dim() > 1 else a[None]
    if a.dim() >= 2 and b.dim() == 2:
        want = torch.stack([pam.matmul(x, b) for x in a2]).reshape(c.shape)
        assert torch.equal(c.view(torch.int32), want.view(torch.int32))


def test_matmul_non_contiguous_and_empty():
    torch.manual_seed(2)
    a = torch.randn(6, 4).t()
    b = torch.randn(5, 6)[:, ::1].t()
    assert torch.equal(pam.matmul(a, b).view(torch.int32),
                       pam.matmul(a.contiguous(), b.contiguous()).view(torch.int32))
    assert pam.matmul(torch.randn(0, 3), torch.randn(3, 2)).shape == (0, 2)
    z = pam.matmul(torch.randn(2, 0), torch.randn(0, 3))
    assert z.shape == (2, 3) and torch.all(z == 0)
    assert pam.mul(torch.randn(0, 3), torch.randn(3)).shape == (0, 3)


def _ref_exact_grads(a, b, g):
    n, k = a.shape
    m = b.shape[1]
    ga = np.zeros((n, k), np.float32)
    gb = np.zeros((k, m), np.float32)
    for j in range(m):
        ga = (ga + ref.pam(g[:, j:j + 1], ref.pam_slope(a, b[:, j][None, :]).astype(np.float32))
              ).astype(np.float32)
    for i in range(n):
        gb = (gb + ref.pam(g[i][None, :], ref.pam_slope(b, a[i][:, None]).astype(np.float32))
              ).astype(np.float32)
    return ga, gb


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7), st.integers(0, 2 ** 31))
def test_matmul_exact_backward_matches_reference(n, k, m, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal((k, m)).astype(np.float32)
    g = rng.standard_normal((n, m)).astype(np.float32)
    ta, tb = T(a).requires_grad_(), T(b).requires_grad_()
    pam.matmul(ta, tb).backward(T(g))
    ga, gb = _ref_exact_grads(a, b, g)
    assert bits_equal(ta.grad.numpy(), ga)
    assert bits_equal(tb.grad.numpy(), gb)


def test_matmul_approx_backward_is_pam_matmul_with_transpose():
    torch.manual_seed(3)
    a = torch.randn(2, 5, 4, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(2, 5, 3)
    pam.matmul(a, b, backward="approx").backward(g)
    assert torch.equal(a.grad.view(torch.int32), pam.matmul(g, b.detach().t()).view(torch.int32))
    want_b = pam.matmul(a.detach().reshape(-1, 4).t(), g.reshape(-1, 3))
    assert torch.equal(b.grad.view(torch.int32), want_b.view(torch.int32))


def test_linear_matches_matmul_plus_bias():
    torch.manual_seed(4)
    x, w, bias = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    y = pam.linear(x, w, bias)
    assert torch.equal(y, pam.matmul(x, w.t()) + bias)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    pam.linear(xg, wg).sum().backward()
    assert xg.grad.shape == x.shape and wg.grad.shape == w.shape


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("family", ["pam", "pam_offset", "lmul"])
@pytest.mark.parametrize("shape", [(3, 5, 33), (33,), (2, 0, 33)])
def test_linear_is_one_node_with_the_composite_bits(backward, family, shape):
    """pam.linear is one autograd node (x, weight and bias its direct inputs); its output
    and the gradients of x, weight and bias have the bits of the composite
    pam.matmul(x, weight.t()) + bias under autograd."""
    g = torch.Generator().manual_seed(5)
    x0, w0, b0 = torch.randn(*shape, generator=g), torch.randn(17, 33, generator=g), \
        torch.randn(17, generator=g)
    if x0.numel():
        x0[..., :4] = 0.0                                  # zeros: the masked kernels
    go = torch.randn(*shape[:-1], 17, generator=g)
    outs = []
    for fused in (True, False):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        if fused:
            y = pam.linear(x, w, b, backward=backward, family=family)
            assert {type(f).__name__ for f, _ in y.grad_fn.next_functions} == {"AccumulateGrad"}
        else:
            y = pam.matmul(x, w.t(), backward=backward, family=family) + b
        y.backward(go)
        outs.append((y.detach(), x.grad, w.grad, b.grad))
    for got, want in zip(*outs):
        assert got.shape == want.shape and bits_equal(got, want)


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="a must have dtype torch.float32"):
        pam.mul(x.double(), x)
    with pytest.raises(TypeError, match="b must have dtype torch.float32"):
        pam.mul(x, x.int())
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        pam.mul([1.0], x)
    with pytest.raises(ValueError, match="cannot be broadcast"):
        pam.mul(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="matmul shapes do not match"):
        pam.matmul(torch.randn(2, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="backward must be one of"):
        pam.mul(x, x, backward="fast")
    with pytest.raises(ValueError, match="offset must be a positive"):
        pam.mul(x, x, offset=-1.0)
    with pytest.raises(ValueError, match="in_features"):
        pam.linear(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        pam.linear(torch.randn(2, 5), torch.randn(4, 5), torch.randn(3))
    with pytest.raises(ValueError, match="b must be on a CPU or CUDA device"):
        pam.mul(x, torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="a on cpu, b on meta"):
        pam.dispatch.check_same_device(a=x, b=torch.randn(3, device="meta"))


@pytest.mark.parametrize("leaf", [True, False])
@pytest.mark.parametrize("zeros", [False, True])
def test_linear_reads_weight_in_place_same_bits(leaf, zeros):
    """pam.linear passes weight.t() to the CPU kernels without a copy and, for a leaf
    weight, gets its exact gradient as the transpose of a contiguous tensor (so
    weight.grad is contiguous): output and every gradient have the bits of pam.matmul on
    contiguous copies of the operands (a 3-D input: batch dimensions folded into rows;
    zeros: ReLU-like input, the masked kernels)."""
    torch.manual_seed(3)
    x0 = torch.randn(2, 7, 19)
    if zeros:
        x0 = torch.relu(x0)
    w0 = torch.randn(21, 19)
    x = x0.clone().requires_grad_()
    w_leaf = w0.clone().requires_grad_()
    w = w_leaf if leaf else w_leaf * 1.0
    y = pam.linear(x, w)
    g = torch.randn(y.shape)
    y.backward(g)
    xr = x0.clone().requires_grad_()
    wtr = w0.t().contiguous().requires_grad_()
    yr = pam.matmul(xr, wtr)
    yr.backward(g)
    assert bits_equal(y.detach(), yr.detach())
    assert bits_equal(x.grad, xr.grad)
    assert bits_equal(w_leaf.grad, wtr.grad.t())
    assert w_leaf.grad.is_contiguous()
