"""Fused composite kernels (pam.fused / pam.nn.functional) against the composite chains of
PAM ops they replace, kept here as the reference: same bits, forward and backward."""
import numpy as np
import pytest
import torch
from numba import njit

import pam
from pam import fused
from pam import ops as P
from pam.functional import GELU_KNOTS, GELU_SLOPE_CHANGES, LOG2_E
from pam import bits, rows_bits
from pam.kernels import cpu

F32 = np.finfo(np.float32)


def gelu_composite(x, backward="exact"):
    """pam.nn.functional.gelu before fusion: sum_j PAM(relu(x - k_j), d_j)."""
    y = None
    for k, d in zip(GELU_KNOTS, GELU_SLOPE_CHANGES):
        h = P.mul(torch.relu(x - k), d, backward=backward)
        y = h if y is None else y + h
    return y


def _inputs():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-40, F32.tiny, np.inf, -np.inf, np.nan,
                            F32.max, -F32.max, 1e30, -1e30, 2.2813, -2.81858] + list(GELU_KNOTS),
                           dtype=torch.float32)
    return torch.cat([special, torch.rand(3000, generator=g) * 12 - 6,
                      torch.randn(500, generator=g) * 1e-3])


def _same(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _assert_gelu_equals_composite(x, grad, backward):
    """pam.nn.functional.gelu's output and input gradient (for output gradient ``grad``)
    have the bits of the composite's."""
    xf = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    yf = pam.nn.functional.gelu(xf, backward=backward)
    yc = gelu_composite(xc, backward=backward)
    assert _same(yf, yc)
    yf.backward(grad)
    yc.backward(grad)
    assert _same(xf.grad, xc.grad)


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_gelu_fused_equals_composite(backward):
    x = _inputs()
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(x.shape, generator=g) * 3
    grad[:3] = torch.tensor([0.0, np.inf, np.nan])
    _assert_gelu_equals_composite(x, grad, backward)


@pytest.mark.parametrize("threads", [1, 2])
def test_gelu_blocks_and_thread_parts_equal_composite(threads):
    """Many kernel blocks (GELU_BLOCK elements each, the last one partial) split between
    threads: every block's slice starts at its own offset, special values included."""
    import numba

    from pam.kernels import cpu
    base = _inputs()
    n = max(cpu.FUSED_PARALLEL_MIN, 3 * cpu.GELU_BLOCK) + 123
    x = base.repeat(n // base.numel() + 1)[:n].contiguous()
    x[cpu.GELU_BLOCK - 2:cpu.GELU_BLOCK + 2] = torch.tensor([np.nan, -0.0, np.inf, 1e-40])
    g = torch.randn(n, generator=torch.Generator().manual_seed(2))
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        y = fused.gelu_forward(x)
        gx = fused.gelu_backward(g, x)
    finally:
        numba.set_num_threads(before)
    xc = x.clone().requires_grad_()
    yc = gelu_composite(xc)
    yc.backward(g)
    assert _same(y, yc)
    assert _same(gx, xc.grad)


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_gelu_finite_blocks_equal_composite(backward):
    """Blocks without inf / NaN run the kernels' shorter finite terms: edge values (zeros,
    subnormals, the largest floats, knots, x - k landing near the smallest normal, tiny
    and huge gradients) in finite blocks, next to a block holding a NaN, same bits."""
    from pam.kernels import cpu
    tiny = float(F32.tiny)
    edge = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, tiny, -tiny, 2 * tiny, F32.max,
            -F32.max, 1e30, -1e30] + list(GELU_KNOTS)
    edge += [k + d for k in GELU_KNOTS for d in (tiny, 1e-7, -1e-7, 2.0 ** -20)]
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.tensor(edge, dtype=torch.float32),
                   torch.rand(2 * cpu.GELU_BLOCK, generator=g) * 12 - 6])
    grad = torch.randn(x.shape, generator=g)
    grad[:8] = torch.tensor([0.0, -0.0, 1e-45, -1e-40, tiny, -tiny, float(F32.max),
                             -float(F32.max)])
    grad[8:200] = grad[8:200] * 1e-37                       # products flush to zero
    x[-5] = np.nan                                          # the last block: general terms
    _assert_gelu_equals_composite(x, grad, backward)
    first = slice(0, cpu.GELU_BLOCK)                       # a finite block, both inputs
    assert cpu._finite_bits(x[first].view(torch.int32).numpy())
    assert cpu._finite_bits(grad[first].view(torch.int32).numpy())


def test_gelu_one_launch_per_pass(monkeypatch):
    calls = []
    orig = pam.dispatch.launch
    monkeypatch.setattr(pam.dispatch, "launch",
                        lambda name, *a: (calls.append(name), orig(name, *a))[1])
    x = torch.randn(4, 5, requires_grad=True)
    pam.nn.functional.gelu(x).sum().backward()
    assert calls == ["gelu_forward", "gelu_backward"]


def test_gelu_entry_points_without_autograd():
    x = torch.randn(3, 4)
    assert _same(fused.gelu_forward(x), gelu_composite(x))
    assert fused.gelu_forward(torch.empty(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="grad shape"):
        fused.gelu_backward(torch.ones(2), x)
    with pytest.raises(ValueError, match="backward must be"):
        fused.gelu_backward(x, x, "exactly")


def test_gelu_parallel_path_matches_serial():
    n = cpu.FUSED_PARALLEL_MIN + 5
    x = (torch.rand(n, generator=torch.Generator().manual_seed(2)) * 8 - 4)
    y = fused.gelu_forward(x)
    head = fused.gelu_forward(x[:1000].clone())
    assert _same(y[:1000], head)


def _edge_bits():
    """int32 patterns: zeros, subnormals, normals near the flush and overflow limits,
    infinities, NaNs (two payloads), and random patterns of both signs."""
    special = np.array([0, 1, 0x007FFFFF, 0x00800000, 0x00800001, 0x00FFFFFF, 0x01000000,
                        0x3F800000, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F800000, 0x7F800001,
                        0x7FC00000, 0x7FFFFFFF], dtype=np.int64)
    rnd = np.random.default_rng(7).integers(0, 1 << 31, 2000)
    mags = np.concatenate([special, rnd])
    return np.concatenate([mags, mags | (1 << 31)]).astype(np.uint32).view(np.int32)


@njit
def _pow2_vs_general(a, ds):
    bad = 0
    for j in range(ds.size):
        ed, sd = rows_bits.pow2_parts(ds[j])
        for i in range(a.size):
            if rows_bits.mul_pow2_bits(a[i], ed, sd) != bits.mul_bits(a[i], ds[j], 0):
                bad += 1
    return bad


def test_mul_pow2_bits_equals_mul_bits():
    """The int32 power-of-two PAM of the CPU GELU kernels against bits.mul_bits, over
    every +-2^e with 2^-126 <= 2^e <= 1 and edge-case operands."""
    e = np.arange(-126, 1)
    ds = np.concatenate([(e + 127) << 23, ((e + 127) << 23) | (1 << 31)])
    ds = ds.astype(np.uint32).view(np.int32)
    assert all(rows_bits.is_pow2_at_most_one(int(d)) for d in ds)
    assert _pow2_vs_general(_edge_bits(), ds) == 0


def test_gelu_kernels_refuse_non_power_of_two_slopes():
    x = np.zeros(4, np.int32)
    knots = np.zeros(2, np.int32)
    for bad in (1.5, 2.0, 0.0, 0.75):
        slopes = np.array([0.5, bad], np.float32).view(np.int32)
        assert not rows_bits.is_pow2_at_most_one(int(slopes[1]))
        with pytest.raises(ValueError, match="power of two"):
            cpu.gelu_forward(x, knots, slopes, np.empty(4, np.int32))
        with pytest.raises(ValueError, match="power of two"):
            cpu.gelu_backward(x, x, knots, slopes, True, np.empty(4, np.int32))


def test_gelu_parallel_backward_matches_serial():
    n = cpu.FUSED_PARALLEL_MIN + 5
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, generator=g) * 8 - 4
    gr = torch.randn(n, generator=g)
    for mode in ("exact", "approx"):
        y = fused.gelu_backward(gr, x, mode)
        assert _same(y[-1000:], fused.gelu_backward(gr[-1000:].clone(), x[-1000:].clone(), mode))


# --------------------------------------------------------------------------- softmax
def _seq_sum_last(t):
    """Sum over the last dimension in increasing index order (float32), keepdim."""
    s = t[..., :1].clone()
    for j in range(1, t.shape[-1]):
        s = s + t[..., j:j + 1]
    return s


def softmax_composite(x, dim, offset, backward, safe):
    """pam.nn.functional's softmax chain with the row sums taken in increasing index order
    (the fused definition) in the forward and in PAD's reduced gradient."""
    from pam.functional import _shifted_log2
    x = x.movedim(dim, -1)
    z = _shifted_log2(x, -1, offset, backward)
    e = P.exp2(z, backward=backward)
    s = _seq_sum_last(e)
    if safe:
        s = torch.where(s == 0, torch.ones_like(s), s)
    return P.div(e, s, backward=backward).movedim(-1, dim)


@pytest.fixture
def sequential_reduce(monkeypatch):
    def reduce_to(grad, shape):
        if grad.shape == shape:
            return grad
        assert shape[-1] == 1 and grad.shape[:-1] == shape[:-1], (grad.shape, shape)
        return _seq_sum_last(grad)
    monkeypatch.setattr(P, "_reduce_to", reduce_to)


class FusedSoftmax(torch.autograd.Function):
    """pam.fused's softmax entry points under autograd (as a dispatch mode would use them)."""

    @staticmethod
    def forward(ctx, x, dim, offset, backward, safe):
        y, stats = fused.softmax_forward(x, dim, offset, safe, stats=True)
        ctx.save_for_backward(x, stats)
        ctx.args = (dim, offset, safe, backward)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, stats = ctx.saved_tensors
        dim, offset, safe, backward = ctx.args
        return (fused.softmax_backward(grad, x, dim, offset, safe, backward, stats=stats),
                *[None] * 4)


def _softmax_inputs():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 9, generator=g) * 3
    x[0, 0] = float("-inf")                          # a fully masked row
    x[0, 1, :4] = float("-inf")
    x[1, 2, 3] = float("nan")
    x[2, 0, 1] = float("inf")
    x[3, 1, :] = 0.0
    x[4, 4, :] = 1e-40                               # subnormals count as zero
    x[5, 0, 2] = 1e30
    return x


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("dim,offset,safe", [(-1, None, False), (1, 1.0552, False),
                                             (-1, None, True)])
def test_softmax_fused_equals_composite(sequential_reduce, backward, dim, offset, safe):
    x = _softmax_inputs()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    xf = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    yf = FusedSoftmax.apply(xf, dim, offset, backward, safe)
    yc = softmax_composite(xc, dim, offset, backward, safe)
    same = (yf.view(torch.int32) == yc.view(torch.int32)) | (yf.isnan() & yc.isnan())
    assert bool(same.all())
    yf.backward(grad)
    yc.backward(grad)
    same = ((xf.grad.view(torch.int32) == xc.grad.view(torch.int32))
            | (xf.grad.isnan() & xc.grad.isnan()))
    assert bool(same.all())


@pytest.mark.parametrize("dim,offset,safe", [(-1, None, False), (1, 1.0552, True)])
def test_softmax_stats_are_the_row_shift_and_sum(dim, offset, safe):
    """The forward's row statistics: m = floor(max PAM(x, log2 e)) (0 if not finite) and
    s = the sequential sum of pa_exp2(PAM(x, log2 e) - m), before the safe replacement; the
    backward without them (computed by a forward launch) gives the same bits."""
    x = _softmax_inputs()
    y, stats = fused.softmax_forward(x, dim, offset, safe, stats=True)
    assert _same(y, fused.softmax_forward(x, dim, offset, safe))
    xm = x.movedim(dim, -1)
    assert stats.dtype == torch.float32 and stats.shape == (*xm.shape[:-1], 2)
    xl = P.mul(xm, LOG2_E, offset=offset)
    m = xl.amax(dim=-1, keepdim=True)              # NaN in a row with a NaN product
    m = torch.where(torch.isfinite(m), torch.floor(m), torch.zeros_like(m))
    s = _seq_sum_last(P.exp2(xl - m))
    assert _same(stats[..., :1], m)
    got = stats[..., 1:]
    assert bool(((got.view(torch.int32) == s.view(torch.int32)) | (got.isnan() & s.isnan()))
                .all())
    if dim == -1:                                   # the masked row, the NaN row
        assert bool((s == 0).any() and s.isnan().any())
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for backward in ("exact", "approx"):
        with_stats = fused.softmax_backward(grad, x, dim, offset, safe, backward, stats=stats)
        without = fused.softmax_backward(grad, x, dim, offset, safe, backward)
        assert _same(with_stats, without)


@njit
def _softmax_both_forms(x, n, off, safe):
    """(row form out, stats; lane form out, m, s) of SOFTMAX_LANES rows of length n (x is
    row-major (W, n) int32 bits)."""
    W = rows_bits.SOFTMAX_LANES
    row_out = np.empty(W * n, np.int32)
    row_stats = np.empty(2 * W, np.int32)
    for r in range(W):
        rows_bits.softmax_row_forward(x, row_out, r * n, n, off, safe, row_stats, 2 * r)
    xt = np.empty(W * n, np.int32)
    for r in range(W):
        for j in range(n):
            xt[W * j + r] = x[r * n + j]
    lane_out = np.empty(W * n, np.int32)
    m = np.empty(W, np.float32)
    s = np.empty(W, np.float32)
    scratch = [np.empty(W, np.int32) for _ in range(3)]
    rows_bits.softmax_lanes_forward(xt, lane_out, n, off, safe, m, s, scratch[0],
                                    scratch[1], scratch[2])
    return row_out, row_stats, lane_out, m, s


@pytest.mark.parametrize("n", [1, 3, 5, 17])
@pytest.mark.parametrize("safe", [False, True])
def test_softmax_lane_form_equals_row_form(n, safe):
    """rows_bits.softmax_lanes_forward (the attention lane kernel's softmax) gives each
    lane the bits and statistics of softmax_row_forward: random rows, a fully masked row
    (-inf: zero sum), rows with a NaN, an inf, zeros of both signs as the maximum (the
    shift's rescan), subnormals and huge values, with and without an offset."""
    W = rows_bits.SOFTMAX_LANES
    g = np.random.default_rng(n)
    x = (g.standard_normal((W, n)) * 3).astype(np.float32)
    x[1] = -np.inf
    x[2, 0] = np.nan
    x[3, -1] = np.inf
    x[4] = -np.abs(x[4])
    x[4, n // 2] = -0.0
    x[5] = np.where(np.arange(n) % 2 == 0, 0.0, -0.0)
    x[6] = 1e-40
    x[7] = x[7] * 1e37
    x[8, 0] = -np.inf
    for off in (0, int(np.float32(1.0552).view(np.int32)) - bits.ONE):
        row_out, row_stats, lane_out, m, s = _softmax_both_forms(
            x.view(np.int32).reshape(-1), n, off, safe)
        assert np.array_equal(lane_out.reshape(n, W).T.reshape(-1), row_out)
        assert np.array_equal(m.view(np.int32), row_stats[0::2])
        assert np.array_equal(s.view(np.int32), row_stats[1::2])


def test_softmax_backward_refuses_mismatched_stats():
    x = torch.randn(4, 7)
    _, stats = fused.softmax_forward(x, stats=True)
    with pytest.raises(ValueError, match="stats must have shape"):
        fused.softmax_backward(x, x, stats=stats[:3])
    with pytest.raises(ValueError, match="stats must have shape"):
        fused.softmax_backward(x, x, dim=0, stats=stats)
    with pytest.raises(TypeError, match="stats"):
        fused.softmax_backward(x, x, stats=stats.double())


def test_softmax_one_launch_per_pass_and_edge_shapes(monkeypatch):
    calls = []
    orig = pam.dispatch.launch
    monkeypatch.setattr(pam.dispatch, "launch",
                        lambda name, *a: (calls.append(name), orig(name, *a))[1])
    x = torch.randn(4, 7, requires_grad=True)
    FusedSoftmax.apply(x, 0, None, "exact", False).sum().backward()
    assert calls == ["softmax_forward", "softmax_backward"]
    assert fused.softmax_forward(torch.empty(0, 3)).shape == (0, 3)
    assert fused.softmax_forward(torch.tensor(2.0), dim=0).item() == 1.0
    with pytest.raises(ValueError, match="grad shape"):
        fused.softmax_backward(torch.ones(3), x.detach())


def test_softmax_matches_torch_order_sum_closely():
    """The fused definition (sequential sums) against the earlier torch-order composite:
    only the rounding of the row sums differs (measured max 1 ulp-scale here)."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6)) * 3
    from pam.functional import _shifted_log2
    z = _shifted_log2(x, -1, None, "exact")
    e = P.exp2(z)
    old = P.div(e, e.sum(dim=-1, keepdim=True))
    new = fused.softmax_forward(x)
    rel = ((new - old).abs() / old.abs().clamp_min(1e-30)).max().item()
    assert rel < 2e-6



@njit
def _slope_given_mismatches(ys):
    bad = 0
    for i in range(ys.size):
        e = bits.exp2_bits(ys[i])
        if rows_bits.exp2_slope_given_bits(ys[i], e) != bits.exp2_slope_bits(ys[i]):
            bad += 1
    return bad


def test_exp2_slope_given_equals_exp2_slope():
    """The softmax backward's pa_exp2 slope from a known pa_exp2 value, against
    bits.exp2_slope_bits: edge patterns plus y around the flush and overflow limits."""
    near = np.concatenate([np.arange(-151.0, -121.0, 0.125), np.arange(-210.0, -190.0, 0.5),
                           np.arange(120.0, 130.0, 0.25), np.arange(-3.0, 3.0, 0.0625)])
    ys = np.concatenate([_edge_bits(), near.astype(np.float32).view(np.int32)])
    assert _slope_given_mismatches(ys) == 0
