"""No kernel reads scratch it did not write: a small model's loss and gradients under
``pam.arithmetic()`` keep their bits when every uninitialized allocation the kernels and
ops make (``np.empty`` in the CPU kernel modules, ``torch.empty`` / ``torch.empty_like``)
comes back filled with NaN patterns instead of whatever the memory held."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pam
from pam.kernels import cpu, cpu_attn, cpu_conv, cpu_rows, cpu_xent

_NAN_BITS = 0x7FC00001


def _fill(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.int32:
        t.fill_(_NAN_BITS)
    return t


class _PoisonedNumpy:
    """numpy with ``empty`` returning NaN-filled arrays (int32: a NaN pattern)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float, **kw):
        a = np.empty(shape, dtype, **kw)
        if a.dtype == np.int32:
            a.fill(_NAN_BITS)
        elif a.dtype.kind == "f":
            a.fill(np.nan)
        return a


def _step(backward):
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                             activation="gelu")
    head = torch.nn.Linear(16, 5)
    x = torch.randn(3, 6, 16)
    target = torch.tensor([0, 4, -100, 2, 1, 3] * 3)
    weight = torch.rand(5) + 0.5
    with pam.arithmetic(backward=backward):
        logits = head(block(x)).reshape(-1, 5)
        loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
        loss.backward()
    return [loss.detach()] + [p.grad for p in (*block.parameters(), *head.parameters())]


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_poisoned_scratch_keeps_the_bits(backward, monkeypatch):
    clean = _step(backward)
    for mod in (cpu, cpu_rows, cpu_xent, cpu_attn, cpu_conv):
        monkeypatch.setattr(mod, "np", _PoisonedNumpy())
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(empty_like(*a, **k)))
    poisoned = _step(backward)
    assert len(clean) == len(poisoned)
    for a, b in zip(clean, poisoned):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
