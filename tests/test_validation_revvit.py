"""validation/revvit.py: the RevViT-style coupling baseline recomputes activations yet gives the
gradients of ordinary autograd through the same computation (up to float rounding of the
inversion), keeps only the two final streams, and has the parameters of a BDIA/ViT block."""
import importlib.util
import os
import sys

import pytest
import torch

from bdia_pam.model import BDIAConfig, BDIATransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def revvit():
    sys.path.insert(0, os.path.join(ROOT, "validation"))
    spec = importlib.util.spec_from_file_location("revvit", os.path.join(ROOT, "validation", "revvit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg(**kw):
    base = dict(kind="vit", arithmetic="float", reversible=False, depth=3, width=16, heads=2,
                image_size=8, patch_size=4, channels=1)
    base.update(kw)
    return BDIAConfig(**base)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model.loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_reversible_backward_matches_stored_autograd(revvit):
    torch.manual_seed(0)
    model = revvit.RevViTTransformer(_cfg()).train()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    loss_rev, g_rev = _grads(model, x, y)
    model.stack.reversible = False  # the same computation through ordinary autograd
    loss_ref, g_ref = _grads(model, x, y)
    assert torch.equal(loss_rev, loss_ref)  # the forward is the same computation, bit for bit
    assert set(g_rev) == set(g_ref)
    for n in g_ref:  # the inversion y - F(x) rounds: equal up to float rounding, not bitwise
        # Rounding errors scale with the gradient's magnitude, not each element's (sums
        # that cancel leave small elements with the error of large terms), and their size
        # depends on the CPU's float kernels: bound them relative to the tensor's scale.
        scale = g_ref[n].abs().max().item()
        torch.testing.assert_close(g_rev[n], g_ref[n], rtol=1e-4, atol=1e-5 * scale + 1e-12,
                                   msg=n)
    assert any(g.abs().sum() > 0 for n, g in g_rev.items() if n.startswith("stack.blocks.0."))


def test_parameters_are_those_of_the_same_vit(revvit):
    cfg = _cfg()
    a = revvit.RevViTTransformer(cfg)
    b = BDIATransformer(cfg)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    assert type(a.stack).__name__ == "CouplingStack"


def test_keeps_only_the_final_streams_for_backward(revvit):
    """The autograd graph of a reversible forward saves no per-block activations."""
    torch.manual_seed(0)
    stack = revvit.CouplingStack(BDIATransformer(_cfg(depth=4)).stack.blocks).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stack(x)
    assert [t.shape for t in saved] == [x.shape, x.shape]  # the two final streams, nothing else
    stack.reversible = False
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stack(x)
    assert len(saved) > 4 * 4  # stored: every block's intermediate tensors


def test_rejects_what_it_cannot_do(revvit):
    with pytest.raises(ValueError, match="reversible=False"):
        revvit.RevViTTransformer(_cfg(reversible=True))
    with pytest.raises(ValueError, match="dropout"):
        revvit.RevViTTransformer(_cfg(dropout=0.1))
    with pytest.raises(TypeError, match="Block"):
        revvit.CouplingStack([torch.nn.Linear(4, 4)])
