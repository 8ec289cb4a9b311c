"""pam.dispatch fast paths: scalar-operand kernels and equal-shape launches give the same
bits as the broadcast (materialized) path, and a Python-number operand is not expanded."""
import numpy as np
import pytest
import torch

import pam
from pam import dispatch as D
from pam.kernels import cpu

BINARY = ["mul", "div", "mul_slope", "div_slope_num", "div_slope_den"]
F32 = np.finfo(np.float32)
SPECIAL = np.array([0.0, -0.0, 1.0, -1.5, 3.0, 0.1, F32.tiny, 1e-45, -5.9e-39, F32.max,
                    -F32.max, np.inf, -np.inf, np.nan, 2.0 ** -126, 2.0 ** 127, 7e19], np.float32)


def _bits(x):
    return np.ascontiguousarray(x, np.float32).view(np.int32)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("off", [0, D.offset_constant(1.0552)])
def test_scalar_operand_kernels_equal_full_kernel(name, off):
    rng = np.random.default_rng(0)
    x = _bits(np.concatenate([SPECIAL, rng.standard_normal(200).astype(np.float32)]))
    full = getattr(cpu, name)
    for s in _bits(SPECIAL):
        sv = np.array([s], np.int32)
        want = np.empty_like(x)
        got = np.empty_like(x)
        full(x, np.full_like(x, s), off, want)
        getattr(cpu, name + "_bs")(x, sv, off, got)
        assert _same(got, want)
        full(np.full_like(x, s), x, off, want)
        getattr(cpu, name + "_as")(sv, x, off, got)
        assert _same(got, want)


def test_python_number_operand_uses_scalar_kernel(monkeypatch):
    seen = []
    orig = D._launcher

    def spy(device, name):
        kernel = orig(device, name)

        def call(*args):
            seen.append((name, [tuple(a.shape) for a in args if hasattr(a, "shape")]))
            return kernel(*args)
        return call

    monkeypatch.setattr(D, "_launcher", spy)
    x = torch.randn(64, 32)
    y = pam.mul(x, 2.5)
    assert seen == [("mul_bs", [(2048,), (1,), (2048,)])]
    want = pam.mul(x, torch.full_like(x, 2.5))
    assert torch.equal(y.view(torch.int32), want.view(torch.int32))
    seen.clear()
    q = pam.div(torch.tensor(3.0), x)
    assert seen[0][0] == "div_as"
    assert torch.equal(q.view(torch.int32),
                       pam.div(torch.full_like(x, 3.0), x).view(torch.int32))


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_scalar_tensor_operand_gradients_match_broadcast(backward):
    torch.manual_seed(1)
    x = torch.randn(5, 7, requires_grad=True)
    s = torch.tensor([1.7], requires_grad=True)
    for op in (pam.mul, pam.div):
        op(x, s, backward=backward).sum().backward()
        gx, gs = x.grad.clone(), s.grad.clone()
        x.grad = s.grad = None
        se = s.expand(5, 7).contiguous().detach().requires_grad_()
        op(x, se, backward=backward).sum().backward()
        assert torch.equal(x.grad.view(torch.int32), gx.view(torch.int32))
        assert torch.equal(se.grad.sum_to_size(1).view(torch.int32), gs.view(torch.int32))
        x.grad = None
        s.grad = None


def test_cached_number_tensors_are_per_device_and_value():
    x = torch.ones(3)
    a = D.as_operand(2.0, "b", x)
    assert a is D.as_operand(2.0, "b", x)
    assert a.item() == 2.0 and a.dtype == torch.float32
    assert D.as_operand(3.0, "b", x).item() == 3.0
    zero, neg_zero = D.as_operand(0.0, "b", x), D.as_operand(-0.0, "b", x)
    assert not torch.signbit(zero) and torch.signbit(neg_zero)
    assert torch.signbit(pam.mul(torch.ones(2), -0.0)).all()


def test_ops_without_grad_skip_autograd_with_same_bits():
    """With no input requiring grad (or under no_grad) the ops call their kernels directly:
    same bits as through autograd.Function, no grad_fn; CPU results own their memory."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=g)
    b = torch.randn(5, 4, generator=g).abs()
    m = torch.randn(4, 3, generator=g)
    cases = [lambda x: pam.mul(x, b), lambda x: pam.div(x, b), lambda x: pam.exp2(x),
             lambda x: pam.log2(x.abs()), lambda x: pam.matmul(x, m),
             lambda x: pam.mul(x, 0.75, offset=1.0552)]
    for f in cases:
        plain = f(a)
        with torch.no_grad():
            nog = f(a.clone().requires_grad_())
        tracked = f(a.clone().requires_grad_())
        assert plain.grad_fn is None and nog.grad_fn is None and tracked.grad_fn is not None
        assert torch.equal(plain.view(torch.int32), tracked.detach().view(torch.int32))
        assert torch.equal(nog.view(torch.int32), plain.view(torch.int32))
    y = pam.mul(a, b)
    y.add_(1.0)                                    # a normal, writable CPU tensor
    assert y.is_contiguous() and y.dtype == torch.float32
    assert pam.mul(torch.empty(0, 3), torch.empty(0, 3)).shape == (0, 3)
    assert pam.mul(torch.tensor(2.0), torch.tensor(3.0)).shape == ()
