"""Fused log_softmax and layer-norm row kernels (pam.fused) against their reference: the
composite chains of pam.nn.functional run op by op with every row sum (forward, and the
reductions of broadcast gradients in backward) replaced by a float32 sum from +0 in
increasing index, the fused kernels' definition. Bits compared on int32 patterns (NaN
against NaN)."""
import numpy as np
import pytest
import torch
from numba import njit

import pam
from pam import bits, optim_bits, rows_bits
from pam import fused
from pam import ops as P
from pam.functional import LOG2_E, MEAN_REFINEMENTS


def seq_sum(t, dims=1):
    """Sum over the last ``dims`` dimensions flattened, from +0 in increasing index
    (float32), keepdim."""
    shape = t.shape
    flat = t.reshape(*shape[:t.dim() - dims], -1)
    s = torch.zeros(flat.shape[:-1] + (1,), dtype=torch.float32)
    for j in range(flat.shape[-1]):
        s = s + flat[..., j:j + 1]
    return s.reshape(*shape[:t.dim() - dims], *([1] * dims))


class SeqSum(torch.autograd.Function):
    """seq_sum over the last dimension, gradient broadcast back (as torch.sum's)."""

    @staticmethod
    def forward(ctx, t):
        ctx.shape = t.shape
        return seq_sum(t)

    @staticmethod
    def backward(ctx, g):
        return g.expand(ctx.shape).clone()


class RowSub(torch.autograd.Function):
    """x - m for m of shape (..., 1); m's gradient is seq_sum(-g) (torch: -g summed)."""

    @staticmethod
    def forward(ctx, x, m):
        return x - m

    @staticmethod
    def backward(ctx, g):
        return g, seq_sum(-g)


class ColAdd(torch.autograd.Function):
    """y + b for b of shape (n,); b's gradient sums g over the rows in increasing order."""

    @staticmethod
    def forward(ctx, y, b):
        return y + b

    @staticmethod
    def backward(ctx, g):
        return g, seq_sum(g.reshape(-1, g.shape[-1]).t()).reshape(-1)


@pytest.fixture
def sequential_reduce(monkeypatch):
    """pam.ops' reductions of broadcast gradients as sequential sums."""
    def reduce_to(grad, shape):
        if grad.shape == shape:
            return grad
        if len(shape) == grad.dim() and shape[-1] == 1 and shape[:-1] == grad.shape[:-1]:
            return seq_sum(grad)
        if len(shape) == 1 and grad.shape[-1] == shape[0]:
            return seq_sum(grad.reshape(-1, shape[0]).t()).reshape(shape)
        raise AssertionError((grad.shape, shape))
    monkeypatch.setattr(P, "_reduce_to", reduce_to)


def log_softmax_reference(x, offset, backward):
    """pam.nn.functional.log_softmax over the last dimension, sequential row sums."""
    from pam.functional import _shifted_log2
    z = _shifted_log2(x, -1, offset, backward)
    e = P.exp2(z, backward=backward)
    lse = P.log2(SeqSum.apply(e), backward=backward)
    return P.div(RowSub.apply(z, lse), LOG2_E, backward=backward)


def layer_norm_reference(x, n, weight, bias, eps, offset, backward):
    """pam.nn.functional.layer_norm over the last dimension (length n), sequential sums."""
    mu = P.div(SeqSum.apply(x), float(n), backward=backward)
    if n & (n - 1):
        for _ in range(MEAN_REFINEMENTS):
            mu = mu + P.div(SeqSum.apply(RowSub.apply(x, mu)), float(n), backward=backward)
    xc = RowSub.apply(x, mu)
    var = P.div(SeqSum.apply(P.mul(xc, xc, offset=offset, backward=backward)), float(n),
                backward=backward)
    std = P.pow(var + float(eps), 0.5, backward=backward)
    y = P.div(xc, std, backward=backward)
    if weight is not None:
        y = P.mul(y, weight, offset=offset, backward=backward)
    if bias is not None:
        y = ColAdd.apply(y, bias)
    return y


def same_bits(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    eq = (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())
    bad = (~eq).nonzero()
    assert bad.numel() == 0, (bad[:5].tolist(), a[~eq][:5].tolist(), b[~eq][:5].tolist())


def _logits(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g) * 3
    x[0] = float("-inf")                        # a fully masked row: NaN, as torch
    x[1, : n // 2] = float("-inf")
    x[2] = 0.0                                  # all equal
    x[3] = torch.randn(n, generator=g) * 40     # large spread
    x[4, 1] = 1e30
    x[5, 0] = float("nan")
    return x


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("n,offset", [(8, None), (9, None), (13, 1.0552)])
def test_log_softmax_fused_equals_reference(sequential_reduce, backward, n, offset):
    x = _logits(n)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grad[6, 2] = 0.0
    xr = x.clone().requires_grad_()
    yr = log_softmax_reference(xr, offset, backward)
    yr.backward(grad)
    same_bits(fused.log_softmax_forward(x, -1, offset), yr.detach())
    same_bits(fused.log_softmax_backward(grad, x, -1, offset, backward), xr.grad)
    # another dim: rows taken along dim 0
    same_bits(fused.log_softmax_forward(x.t().contiguous(), 0, offset), yr.detach().t())


def _ln_inputs(n):
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(6, n, generator=g) * 2 + 1
    x[0] = 0.0                                   # zeros
    x[1] = 3.25                                  # all equal (not zero)
    x[2] = torch.randn(n, generator=g) * 1e4 + 5e4   # large mean against the spread
    x[3, 0] = 1e-40
    w = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    return x, w, b


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("n,offset,affine", [(8, None, True), (12, None, True),
                                             (12, 1.0552, True), (5, None, False),
                                             (16, None, False)])
def test_layer_norm_fused_equals_reference(sequential_reduce, backward, n, offset, affine):
    x, w, b = _ln_inputs(n)
    w, b = (w, b) if affine else (None, None)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_() if affine else None
    br = b.clone().requires_grad_() if affine else None
    yr = layer_norm_reference(xr, n, wr, br, 1e-5, offset, backward)
    yr.backward(grad)
    same_bits(fused.layer_norm_forward(x, n, w, b, 1e-5, offset), yr.detach())
    gx, gw, gb = fused.layer_norm_backward(grad, x, n, w, b, 1e-5, offset, backward)
    same_bits(gx, xr.grad)
    if affine:
        same_bits(gw, wr.grad)
        same_bits(gb, br.grad)
    else:
        assert gw is None and gb is None


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_layer_norm_weight_or_bias_alone(sequential_reduce, which):
    x, w, b = _ln_inputs(12)
    w = w if which == "weight" else None
    b = b if which == "bias" else None
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
    y = layer_norm_reference(leaves[0], 12, leaves[1], leaves[2], 1e-5, None, "exact")
    y.backward(grad)
    same_bits(fused.layer_norm_forward(x, 12, w, b), y.detach())
    got = fused.layer_norm_backward(grad, x, 12, w, b)
    for g, leaf in zip(got, leaves):
        if leaf is None:
            assert g is None
        else:
            same_bits(g, leaf.grad)


def _cuda_rows():
    from pam.kernels import cuda_rows
    if not pam.kernels.cuda.available():
        pytest.skip("numba-cuda unavailable (run with NUMBA_ENABLE_CUDASIM=1)")
    return cuda_rows


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, simulated
@pytest.mark.parametrize("n", [5, 4, 12])
def test_cuda_rows_equal_cpu(n):
    """The CUDA row kernels (one thread per row) against the CPU ones on small rows, on
    bit patterns (NumPy arrays: under NUMBA_ENABLE_CUDASIM=1 the simulator runs them).
    Six rows, row 3 of edge patterns (zeros, subnormals, inf, NaN, extremes); n = 12 also
    takes the layer norm's mean refinements."""
    from pam.kernels import cpu_rows
    from pam import rows_bits as RB
    cuda_rows = _cuda_rows()
    x, w, b = _ln_inputs(n)
    rows = x.shape[0]
    x = x.numpy().view(np.int32).reshape(-1).copy()
    x[2] = np.float32(np.inf).view(np.int32)
    x[3 * n:4 * n] = _edge_bits()[::37][:n]
    w = w.numpy().view(np.int32).copy()
    b = b.numpy().view(np.int32).copy()
    g = torch.randn(x.size, generator=torch.Generator().manual_seed(3)).numpy().view(np.int32)
    off = pam.dispatch.offset_constant(1.0552)
    for exact in (True, False):
        outs = []
        for k in (cpu_rows, cuda_rows):
            o = np.empty_like(x)
            k.log_softmax_forward(x, o, n, off)
            ob = np.empty_like(x)
            k.log_softmax_backward(x, g, ob, n, off, exact)
            outs.append((o, ob))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        np.testing.assert_array_equal(outs[0][1], outs[1][1])
    nb, eps_b = fused.OB.f32_bits(float(n)), fused.OB.f32_bits(1e-5)
    for flags in (RB.LN_WEIGHT | RB.LN_BIAS | RB.LN_EXACT, RB.LN_WEIGHT, 0):
        outs = []
        for k in (cpu_rows, cuda_rows):
            y = np.empty_like(x)
            stats = np.empty(RB.LN_STATS * rows, np.int32)
            k.layer_norm_forward(x, w, b, y, stats, n, nb, eps_b, off, flags)
            gx = np.empty_like(x)
            gw = np.zeros(n, np.int32)
            gb = np.zeros(n, np.int32)
            k.layer_norm_backward(x, w, g, stats, gx, gw, gb, n, nb, off, flags)
            outs.append((y, stats, gx, gw, gb))
        for a, c in zip(*outs):
            np.testing.assert_array_equal(a, c)


def _edge_bits():
    """int32 patterns: zeros, subnormals, normals near the flush and overflow limits,
    infinities, NaNs, small integers and halves (pa_exp2's floor), and random patterns
    of both signs."""
    special = np.array([0, 1, 0x007FFFFF, 0x00800000, 0x00800001, 0x00FFFFFF, 0x01000000,
                        0x3F000000, 0x3F800000, 0x3FFFFFFF, 0x7F000000, 0x7F7FFFFF,
                        0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF], dtype=np.int64)
    near = np.concatenate([np.arange(-151.0, -121.0, 0.25), np.arange(-210.0, -190.0, 0.5),
                           np.arange(120.0, 130.0, 0.25), np.arange(-3.0, 3.0, 0.125)])
    near = near.astype(np.float32).view(np.int32).astype(np.int64) & 0x7FFFFFFF
    rnd = np.random.default_rng(7).integers(0, 1 << 31, 400)
    mags = np.concatenate([special, near, rnd])
    return np.concatenate([mags, mags | (1 << 31)]).astype(np.uint32).view(np.int32)


@njit(cache=False)
def _select_form_mismatches(a, offs):
    bad = 0
    for i in range(a.size):
        e = bits.exp2_bits(a[i])
        if rows_bits.exp2_slope_sel(a[i], e) != bits.exp2_slope_bits(a[i]):
            bad += 1
        for k in range(a.size):
            if rows_bits.div_slope_num0_sel(a[i], a[k]) != bits.div_slope_num_bits(a[i], a[k], 0):
                bad += 1
            if rows_bits.div_slope_den0_sel(a[i], a[k]) != bits.div_slope_den_bits(a[i], a[k], 0):
                bad += 1
            for o in range(offs.size):
                if rows_bits.mul_slope_sel(a[i], a[k], offs[o]) != bits.mul_slope_bits(
                        a[i], a[k], offs[o]):
                    bad += 1
    return bad


def test_select_forms_equal_bits_functions():
    """The branch-free slopes of the row kernels against the pam.bits definitions on every
    pair of edge-case and random patterns, for the offsets 0, 1.0552 and the extremes."""
    offs = np.array([0, pam.dispatch.offset_constant(1.0552),
                     optim_bits.OFF_MIN, optim_bits.OFF_MAX], np.int64)
    assert _select_form_mismatches(_edge_bits(), offs) == 0


@pytest.mark.parametrize("op,args", [
    ("log_softmax_forward", lambda: (torch.randn(3, 4), 1, 0)),
    ("log_softmax_backward", lambda: (torch.randn(3, 4), torch.randn(3, 4), 0, 1 << 19,
                                      True)),
    ("layer_norm_forward", lambda: (torch.randn(3, 4), torch.randn(4), torch.randn(4), 4,
                                    fused.OB.f32_bits(4.0), fused.OB.f32_bits(1e-5), 0, 3)),
    ("layer_norm_forward", lambda: (torch.randn(3, 4), None, None, 4,
                                    fused.OB.f32_bits(4.0), fused.OB.f32_bits(1e-5), 0, 0)),
    ("layer_norm_backward", lambda: (torch.randn(3, 4), torch.randn(3, 4), torch.randn(4),
                                     fused.layer_norm_forward(torch.randn(3, 4), 4,
                                                              stats=True)[1],
                                     4, fused.OB.f32_bits(4.0), 0, 7)),
])
def test_opcheck(op, args):
    """Schema (no mutation, no aliasing) and fake implementation agree with the kernels."""
    torch.library.opcheck(getattr(torch.ops.pam, op).default, args(),
                          test_utils=("test_schema", "test_faketensor"))


def test_functional_rows_one_launch_per_pass(monkeypatch):
    calls = []
    orig = fused.rows_launch
    monkeypatch.setattr(fused, "rows_launch",
                        lambda name, *a: (calls.append(name), orig(name, *a))[1])
    orig_launch = pam.dispatch.launch
    monkeypatch.setattr(pam.dispatch, "launch",
                        lambda name, *a: (calls.append(name), orig_launch(name, *a))[1])
    x = torch.randn(4, 2, 6, requires_grad=True)
    w = torch.randn(2, 6, requires_grad=True)
    b = torch.randn(2, 6, requires_grad=True)
    pam.nn.functional.layer_norm(x, (2, 6), w, b).sum().backward()
    assert calls == ["layer_norm_forward", "layer_norm_backward"]
    assert w.grad.shape == w.shape and b.grad.shape == b.shape
    calls.clear()
    pam.nn.functional.log_softmax(x, 1).sum().backward()
    assert calls == ["log_softmax_forward", "log_softmax_backward"]
    calls.clear()
    pam.nn.functional.softmax(x, 0).sum().backward()
    assert calls == ["softmax_forward", "softmax_backward"]


@pytest.mark.parametrize("n,affine", [(12, True), (8, False)])
def test_layer_norm_stats_are_the_reference_statistics(n, affine):
    """The forward's row statistics (pam.rows_bits.layer_norm_row_stats) hold the mean and
    std of the reference chain, V = the sum of PAM(xc, xc) and ve = PAD(V, N) + eps; the
    backward without them (computed by a forward launch) gives the same bits."""
    x, w, b = _ln_inputs(n)
    w, b = (w, b) if affine else (None, None)
    y, stats = fused.layer_norm_forward(x, n, w, b, 1e-5, 1.0552, stats=True)
    same_bits(y, fused.layer_norm_forward(x, n, w, b, 1e-5, 1.0552))
    assert stats.dtype == torch.float32 and stats.shape == (x.shape[0], rows_bits.LN_STATS)
    mu = P.div(seq_sum(x), float(n))
    same_bits(stats[:, :2], torch.cat([seq_sum(x), mu], 1))
    if n & (n - 1):
        for r in range(MEAN_REFINEMENTS):
            s = seq_sum(x - mu)
            mu = mu + P.div(s, float(n))
            same_bits(stats[:, 2 + 2 * r:4 + 2 * r], torch.cat([s, mu], 1))
    else:
        same_bits(stats[:, 2:6], torch.cat([torch.zeros_like(mu), mu] * 2, 1))
    xc = x - mu
    v = seq_sum(P.mul(xc, xc, offset=1.0552))
    ve = P.div(v, float(n)) + 1e-5
    same_bits(stats[:, 6:], torch.cat([v, ve, P.pow(ve, 0.5)], 1))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    for backward in ("exact", "approx"):
        got = fused.layer_norm_backward(grad, x, n, w, b, 1e-5, 1.0552, backward, stats=stats)
        again = fused.layer_norm_backward(grad, x, n, w, b, 1e-5, 1.0552, backward)
        assert [t is None for t in got] == [t is None for t in again] == \
            [False, not affine, not affine]
        for a, c in zip(got, again):
            if a is not None:
                same_bits(a, c)
    with pytest.raises(ValueError, match="stats must have shape"):
        fused.layer_norm_backward(grad, x, n, w, b, stats=stats[1:])


def test_layer_norm_multi_dim_shape_equals_flat(sequential_reduce):
    """normalized_shape (2, 6) normalizes the 12 trailing elements as one row."""
    x, w, b = _ln_inputs(12)
    y = pam.nn.functional.layer_norm(x.reshape(6, 2, 6), (2, 6), w.reshape(2, 6),
                                     b.reshape(2, 6))
    same_bits(y.reshape(6, 12), fused.layer_norm_forward(x, 12, w, b))
    with pytest.raises(ValueError, match="normalized_shape"):
        fused.layer_norm_forward(x, (5,))
    with pytest.raises(ValueError, match="weight must have shape"):
        fused.layer_norm_forward(x, 12, torch.ones(11))


def test_rows_close_to_torch_order_composites():
    """The fused definitions (sequential row sums) against the earlier torch-order chains:
    only the rounding of the row sums differs (measured max relative difference 4.8e-7;
    validation/README.md section 11)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 48, generator=g) * 2 + 1
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    pairs = [(pam.nn.functional.layer_norm(x, 48, w, b),
              pam.functional._layer_norm_chain(x, 48, w, b)),
             (pam.nn.functional.log_softmax(x * 1.5, -1),
              pam.functional._log_softmax_chain(x * 1.5, -1)),
             (pam.nn.functional.softmax(x * 1.5, -1),
              pam.functional._softmax_chain(x * 1.5, -1, None, "exact", False))]
    for new, old in pairs:
        assert ((new - old).abs().max() / old.abs().max()).item() < 1e-6


def test_layer_norm_split_between_threads_keeps_bits(monkeypatch):
    """A layer norm above FUSED_PARALLEL_MIN / LN_*_WORK elements is split between
    threads (each row whole, in one part): the same bits as one thread."""
    import numba
    from pam.kernels import cpu, cpu_rows, threads
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    rows, n = 300, 64          # 19200 elements: below FUSED_PARALLEL_MIN, above its 1/4
    assert rows * n < cpu.FUSED_PARALLEL_MIN <= cpu_rows.LN_FORWARD_WORK * rows * n
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, n, generator=g)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    go = torch.randn(rows, n, generator=g)
    parts = []
    real = threads.chunk_count
    monkeypatch.setattr(threads, "chunk_count",
                        lambda items, t: parts.append(t) or real(items, t))

    def run():
        y, stats = fused.layer_norm_forward(x, (n,), w, b, stats=True)
        gx, gw, gb = fused.layer_norm_backward(go, x, (n,), w, b, stats=stats)
        return [t.view(torch.int32) for t in (y, gx, gw, gb)]
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(2)
        parts.clear()
        two = run()
    finally:
        numba.set_num_threads(old)
    assert len(parts) == 2                         # forward and backward both split
    for a, c in zip(one, two):
        assert torch.equal(a, c)
