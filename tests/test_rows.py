"""Fused composite kernels (pam.fused / pam.nn.functional) against the composite chains of
PAM ops they replace, kept here as the reference: same bits, forward and backward."""
import numpy as np
import pytest
import torch

import pam
from pam import fused
from pam import ops as P
from pam.functional import GELU_KNOTS, GELU_SLOPE_CHANGES
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


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_gelu_fused_equals_composite(backward):
    x = _inputs()
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(x.shape, generator=g) * 3
    grad[:3] = torch.tensor([0.0, np.inf, np.nan])
    xf = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    yf = pam.nn.functional.gelu(xf, backward=backward)
    yc = gelu_composite(xc, backward=backward)
    assert _same(yf, yc)
    yf.backward(grad)
    yc.backward(grad)
    assert _same(xf.grad, xc.grad)


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
