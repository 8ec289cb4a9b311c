"""Edge cases of pam ops that used to return a wrong number silently (issue 11, section 4/6)."""
import math

import pytest
import torch

import pam
import pam.nn.functional as PF
from pam import dispatch


def bits(t):
    return t.detach().contiguous().view(torch.int32)


def test_mean_over_empty_dim_tuple_is_the_mean_of_everything():
    x = torch.arange(8, dtype=torch.float32).view(2, 4)  # 8 elements: PAD by 8 is exact
    assert float(PF.mean(x, dim=())) == 3.5
    assert float(PF.mean(x, dim=[])) == 3.5
    assert torch.equal(bits(PF.mean(x, dim=())), bits(PF.mean(x)))
    k = PF.mean(x, dim=(), keepdim=True)
    assert k.shape == (1, 1) and float(k) == 3.5
    assert float(PF.mean(x, dim=(0, 1))) == 3.5


@pytest.mark.parametrize("fn", [PF.softmax, PF.log_softmax])
def test_softmax_over_a_zero_size_dim(fn):
    x = torch.zeros(3, 0, requires_grad=True)
    y = fn(x, dim=-1)
    assert y.shape == torch.softmax(x, -1).shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0)


def test_dropout_inplace_writes_into_the_input():
    x = torch.ones(1000)
    g = torch.Generator().manual_seed(0)
    y = PF.dropout(x, 0.5, inplace=True, generator=g)
    assert y is x and bool((x == 0).any()) and bool((x == 2).any())
    x2 = torch.ones(1000)
    out = PF.dropout(x2, 0.5, inplace=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bits(out), bits(x)) and bool((x2 == 1).all())
    leaf = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="in-place"):
        PF.dropout(leaf, 0.5, inplace=True)


def test_sqrt_gradient_at_zero_is_torchs():
    a = torch.tensor([0.0, -0.0, 4.0, 0.0, 1.0], requires_grad=True)
    up = torch.tensor([1.0, 1.0, 1.0, 0.0, -2.0])
    s = pam.sqrt(a)
    assert bits(s)[:2].tolist() == [0, 0] and float(s[2].detach()) == 2.0
    s.backward(up)
    t = a.detach().clone().requires_grad_(True)
    torch.sqrt(t).backward(up)
    assert a.grad[0] == math.inf and a.grad[1] == -math.inf and t.grad[0] == math.inf
    assert math.isnan(float(a.grad[3])) and math.isnan(float(t.grad[3]))
    # away from zero: the composite's PAM gradient, unchanged
    b = torch.tensor([4.0, 1.0], requires_grad=True)
    pam.pow(b, 0.5).backward(up[[2, 4]])
    assert torch.equal(bits(a.grad[[2, 4]]), bits(b.grad))
    with torch.no_grad():
        assert torch.equal(bits(pam.sqrt(a)), bits(s))


@pytest.mark.parametrize("op", [
    lambda x: pam.mul(x, x), lambda x: pam.div(x, x + 3), lambda x: pam.exp2(x), lambda x: pam.log2(x + 3),
    lambda x: pam.matmul(x.view(2, 2), x.view(2, 2)), lambda x: pam.sqrt(x + 3)])
def test_double_backward_raises(op):
    x = torch.tensor([0.5, 1.5, -0.25, 2.0], requires_grad=True)
    # a torch term makes the first-order gradient require grad: without the check, the
    # second-order term of the pam op would be dropped silently
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (g,) = torch.autograd.grad(op(x).sum() + (x * x * x).sum(), x, create_graph=True)
        g.sum().backward()
    # a gradient that itself requires grad flowing into the op
    y = x.detach().clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (g,) = torch.autograd.grad(op(y * y).sum(), y, create_graph=True)
        g.sum().backward()
    # first-order gradients are unaffected
    (g,) = torch.autograd.grad(op(x).sum(), x)
    assert g.shape == x.shape


@pytest.mark.parametrize("offset, err", [(True, TypeError), (False, TypeError), ("1.05", TypeError),
                                         (1e39, ValueError), (float("inf"), ValueError), (1e-39, ValueError),
                                         (0.0, ValueError), (-1.0, ValueError)])
def test_offset_constant_rejects_non_numbers_and_non_normal_float32(offset, err):
    with pytest.raises(err, match="offset"):
        dispatch.offset_constant(offset)
    with pytest.raises(err, match="offset"):
        pam.mul(torch.ones(2), torch.ones(2), offset=offset)


def test_offset_constant_accepts_numbers():
    assert dispatch.offset_constant(None) == 0
    assert dispatch.offset_constant(1) == dispatch.offset_constant(1.0) == 0
    assert dispatch.offset_constant(3.0e38) > 0
