"""Fused cross entropy (pam.fused.cross_entropy_forward / backward, pam.xent_bits) against
its reference: the composite of earlier versions run op by op (fused log_softmax, PAM
products by class weights and smoothing factors, PAD for the mean) with every torch sum
replaced by a float32 sum from +0 in increasing index, the fused kernels' definition.
Bits compared on int32 patterns (NaN against NaN), forward and input gradient."""
import numpy as np
import pytest
import torch

import pam
import pam.nn.functional as PF
from pam import fused
from pam import ops as P
from pam import xent_bits as XB
from pam.functional import _cross_entropy_chain, _pad_scalar

from test_rows_ln import SeqSum, same_bits


def _seq_rows(v):
    """v_0 + v_1 + ... (float32 from +0, increasing index) of a 1-D tensor, 0-dim, with
    the gradient broadcast back (torch.sum's)."""
    return SeqSum.apply(v.reshape(1, -1)).reshape(())


def reference(x, target, weight, ignore_index, reduction, ls, offset, backward):
    """The composite cross entropy with sequential sums (x: (rows, classes))."""
    C = x.shape[-1]
    logp = PF.log_softmax(x, dim=-1, offset=offset, backward=backward)
    wlogp = logp if weight is None else P.mul(logp, weight, offset=offset, backward=backward)
    ignore = target == ignore_index
    t = torch.where(ignore, torch.zeros_like(target), target)
    zero = torch.zeros((), dtype=torch.float32)
    nll = torch.where(ignore, zero, -wlogp.gather(-1, t.unsqueeze(-1)).squeeze(-1))
    denom = None
    if reduction == "mean":
        denom = (_seq_rows(torch.where(ignore, zero, weight[t])) if weight is not None
                 else (~ignore).sum().to(torch.float32))

    def reduce(v):
        if reduction == "none":
            return v
        total = _seq_rows(v)
        return total if reduction == "sum" else P.div(total, denom, backward=backward)

    loss = reduce(nll)
    if ls == 0.0:
        return loss
    smooth = reduce(torch.where(ignore, zero, -SeqSum.apply(wlogp).squeeze(-1)))
    return (P.mul(loss, 1.0 - ls, backward=backward)
            + P.mul(smooth, _pad_scalar(ls, C), backward=backward))


def _case(rows, classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=g) * 3
    x[1, 2] = float("-inf")                     # a masked logit (not the target)
    x[2] = torch.randn(classes, generator=g) * 40
    x[3] = 0.0                                  # all equal
    target = torch.randint(0, classes, (rows,), generator=g)
    target[1] = 0
    target[4] = -100                            # ignored
    target[rows - 1] = -100
    weight = torch.rand(classes, generator=g) + 0.25
    return x, target, weight


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_equals_reference(backward, reduction, ls, weighted):
    x, target, weight = _case(9, 7, 3)
    weight = weight if weighted else None
    offset = 1.0552 if ls else None
    xr = x.clone().requires_grad_()
    want = reference(xr, target, weight, -100, reduction, ls, offset, backward)
    grad = (torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
            if reduction == "none" else torch.tensor(1.5))
    want.backward(grad)
    got = fused.cross_entropy_forward(x, target, weight, -100, reduction, ls, offset)
    same_bits(got, want.detach())
    same_bits(fused.cross_entropy_backward(grad, x, target, weight, -100, reduction, ls,
                                           offset, backward), xr.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_and_nan_rows(reduction):
    """Every row ignored: a NaN mean (0 / 0, as torch), zero sums; a NaN logit poisons its
    row's loss and gradient only, ignored rows included (as the composite)."""
    x, target, _ = _case(6, 5, 7)
    x[0, 3] = float("nan")
    for t in (torch.full_like(target, -100), target):
        xr = x.clone().requires_grad_()
        want = reference(xr, t, None, -100, reduction, 0.1, None, "exact")
        grad = torch.ones(want.shape)
        want.backward(grad)
        same_bits(fused.cross_entropy_forward(x, t, None, -100, reduction, 0.1), want.detach())
        same_bits(fused.cross_entropy_backward(grad, x, t, None, -100, reduction, 0.1),
                  xr.grad)


def test_functional_is_fused_and_close_to_the_torch_order_chain():
    """pam.nn.functional.cross_entropy on (N, C, d) logits runs the fused kernels (the
    same bits as pam.fused on the rows) and stays within float32 rounding of the
    torch-order composite of earlier versions."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 6, (4, 5), generator=g)
    target[0, 0] = -100
    weight = torch.rand(6, generator=g) + 0.5
    loss = PF.cross_entropy(logits, target, weight, label_smoothing=0.05)
    assert loss.grad_fn.name() == "_CrossEntropyRowsBackward"
    loss.backward()
    rows = logits.detach().movedim(1, -1).reshape(-1, 6)
    same_bits(loss.detach(), fused.cross_entropy_forward(rows, target.reshape(-1), weight,
                                                         label_smoothing=0.05))
    grad_rows = fused.cross_entropy_backward(torch.tensor(1.0), rows, target.reshape(-1),
                                             weight, label_smoothing=0.05)
    same_bits(logits.grad, grad_rows.reshape(4, 5, 6).movedim(-1, 1))
    xr = logits.detach().clone().requires_grad_()
    chain = _cross_entropy_chain(xr.movedim(1, -1), target, weight, -100, "mean", 0.05, None,
                                 "exact")
    chain.backward()
    assert abs(float(chain) - float(loss)) <= 1e-6 * abs(float(chain))
    assert float((xr.grad - logits.grad).abs().max()) <= 1e-5 * float(xr.grad.abs().max())


def test_weights_requiring_grad_take_the_chain():
    """Class weights that require grad get their gradient (the composite of earlier
    versions computes it)."""
    _, target, weight = _case(5, 4, 2)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    weight.requires_grad_()
    loss = PF.cross_entropy(x, target, weight)
    assert loss.grad_fn.name() != "_CrossEntropyRowsBackward"
    loss.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert bool((weight.grad != 0).any())


def test_refusals():
    x, target, weight = _case(5, 4, 2)
    bad = target.clone()
    bad[0] = 4
    with pytest.raises(IndexError, match="target values must be in"):
        fused.cross_entropy_forward(x, bad)
    with pytest.raises(TypeError, match="class indices"):
        fused.cross_entropy_forward(x, target.float())
    with pytest.raises(ValueError, match="weight must have shape"):
        fused.cross_entropy_forward(x, target, weight[:3])
    with pytest.raises(ValueError, match="reduction"):
        fused.cross_entropy_forward(x, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused.cross_entropy_forward(x, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="grad must have the loss's shape"):
        fused.cross_entropy_backward(torch.ones(5), x, target)
    with pytest.raises(ValueError, match="out of range"):      # the kernel's own guard
        from pam.kernels import cpu_xent
        cpu_xent.cross_entropy_forward(x.view(torch.int32).numpy().ravel(),
                                       np.zeros(1, np.int32), bad.numpy(), 4, -100, 0, 0, 0,
                                       0, XB.REDUCE_SUM, np.zeros(1, np.int32))


def test_opcheck():
    x, target, weight = _case(5, 4, 2)
    flags, a_b, s_b, red = fused.cross_entropy_args(weight, 4, "mean", 0.1)
    torch.library.opcheck(torch.ops.pam.cross_entropy_forward.default,
                          (x, target, weight, True, -100, a_b, s_b, 0, flags, red))
    torch.library.opcheck(torch.ops.pam.cross_entropy_backward.default,
                          (torch.tensor(1.0), x, target, weight, True, -100, a_b, s_b, 0,
                           flags, red))


def test_compiled_loss_has_the_eager_bits():
    x, target, weight = _case(6, 5, 4)

    def f(x):
        return PF.cross_entropy(x, target, weight, label_smoothing=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le, lc = f(xe), compiled(xc)
    le.backward()
    lc.backward()
    same_bits(lc.detach(), le.detach())
    same_bits(xc.grad, xe.grad)


def test_cuda_equals_cpu():
    """The CUDA kernels (simulator) give the CPU kernels' bits, every reduction, smoothing
    and weights on."""
    from pam.kernels import cpu_xent, cuda_xent
    x, target, weight = _case(5, 4, 9)
    xb = x.numpy().view(np.int32).ravel()
    wb = weight.numpy().view(np.int32)
    tg = target.numpy()
    flags, a_b, s_b, _ = fused.cross_entropy_args(weight, 4, "sum", 0.1)
    flags |= XB.CE_EXACT
    for red in (XB.REDUCE_NONE, XB.REDUCE_MEAN):
        size = 5 if red == XB.REDUCE_NONE else 1
        outs = [np.zeros(size, np.int32), np.zeros(size, np.int32)]
        grads = [np.zeros(xb.size, np.int32), np.zeros(xb.size, np.int32)]
        g = np.arange(1, size + 1, dtype=np.float32).view(np.int32)
        for mod, out, gx in zip((cpu_xent, cuda_xent), outs, grads):
            mod.cross_entropy_forward(xb, wb, tg, 4, -100, a_b, s_b, 0, flags, red, out)
            mod.cross_entropy_backward(xb, wb, tg, 4, -100, a_b, s_b, 0, flags, red, g, gx)
        assert np.array_equal(outs[0], outs[1])
        assert np.array_equal(grads[0], grads[1])


def test_backward_never_reads_unwritten_scratch(monkeypatch):
    """Exact slopes with class weights read the rows' log-probabilities, ignored rows
    included: the kernels must compute them there too. Scratch arrays filled with NaN
    patterns (CPU: np.empty; CUDA simulator: the device scratch) must not change a bit
    (an ignored row's gradient was NaN or 0 depending on what the memory held)."""
    from pam.kernels import cpu_xent, cuda_xent
    x, target, weight = _case(9, 7, 3)
    flags, a_b, s_b, _ = fused.cross_entropy_args(weight, 7, "sum", 0.0)
    flags |= XB.CE_EXACT
    xb = x.numpy().view(np.int32).ravel()
    wb = weight.numpy().view(np.int32)
    tg = target.numpy()
    g = np.array([1.5], np.float32).view(np.int32)
    clean = np.zeros(xb.size, np.int32)
    cpu_xent.cross_entropy_backward(xb, wb, tg, 7, -100, a_b, s_b, 0, flags, XB.REDUCE_SUM,
                                    g, clean)
    assert not np.isnan(clean.view(np.float32)[4 * 7:5 * 7]).any()   # row 4 is ignored

    class PoisonedNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype=float):
            return np.full(shape, 0x7FC00001 if np.dtype(dtype) == np.int32 else np.nan,
                           dtype)

    monkeypatch.setattr(cpu_xent, "np", PoisonedNumpy())
    got = np.zeros(xb.size, np.int32)
    cpu_xent.cross_entropy_backward(xb, wb, tg, 7, -100, a_b, s_b, 0, flags, XB.REDUCE_SUM,
                                    g, got)
    np.testing.assert_array_equal(got, clean)
    if pam.kernels.cuda.available():
        real = cuda_xent._scratch
        monkeypatch.setattr(cuda_xent, "_scratch",
                            lambda like, n: _poison(real(like, n)))
        got = np.zeros(xb.size, np.int32)
        cuda_xent.cross_entropy_backward(xb, wb, tg, 7, -100, a_b, s_b, 0, flags,
                                         XB.REDUCE_SUM, g, got)
        np.testing.assert_array_equal(got, clean)


def _poison(a):
    a[...] = 0x7FC00001
    return a
