"""pam.audit.no_float_multiply: catches float multiplies, passes a full PAM training step."""
import pytest
import torch
from torch import nn

import pam
import pam.nn.functional as PF
from pam.audit import FloatMultiplyError, no_float_multiply


def test_catches_planted_mul_matmul_and_friends():
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    for fn, name in [(lambda: torch.mul(a, b), "mul"), (lambda: a @ b, "mm"),
                     (lambda: a * 2.0, "mul"), (lambda: a / b, "div"),
                     (lambda: torch.exp(a), "exp"), (lambda: torch.softmax(a, -1), "softmax"),
                     (lambda: nn.functional.layer_norm(a, (3,)), "layer_norm"),
                     (lambda: torch.add(a, b, alpha=2.0), "add"),
                     (lambda: torch.bmm(a[None], b[None]), "bmm"),
                     (lambda: nn.functional.linear(a, b), "addmm|mm"),
                     (lambda: a.mean(), "mean"), (lambda: torch.lerp(a, b, 0.5), "lerp"),
                     (lambda: a.sqrt(), "sqrt"), (lambda: torch.addcmul(a, a, b), "addcmul")]:
        with pytest.raises(FloatMultiplyError, match=f"aten\\._?(native_)?({name})"):
            with no_float_multiply():
                fn()


def test_catches_float_mul_in_backward():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(FloatMultiplyError, match="aten.mul"):
        with no_float_multiply():
            (x * x).sum().backward()          # forward mul caught first
    y = torch.randn(4, requires_grad=True)
    loss = y.mean()                           # mean's backward divides
    with pytest.raises(FloatMultiplyError, match="aten.(div|mean|mul)"):
        with no_float_multiply():
            loss.backward()


def test_allows_integer_arithmetic_and_record_mode():
    i = torch.arange(12)
    with no_float_multiply() as mode:
        j = (i * 3) // 2 + i.view(3, 4).sum(0).repeat(3)
        f = torch.randn(3) if False else torch.zeros(3) + 1.0
    assert j.dtype == torch.int64 and torch.equal(f, torch.ones(3))
    assert mode.ops_seen.get("mul", 0) >= 1
    with no_float_multiply(record=True) as mode:
        torch.ones(2) * torch.ones(2)
    assert mode.violations == ["mul"]
    with no_float_multiply(allow={"mul"}):
        torch.ones(2) * torch.ones(2)


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=16, heads=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d),
                                 nn.Dropout(0.1))
        self.head = nn.Linear(d, vocab)

    def forward(self, t, pad):
        x = self.emb(t)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False,
                          is_causal=True)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_full_training_step_is_multiplication_free(backward):
    torch.manual_seed(0)
    model = pam.convert(TinyTransformer(), backward=backward)
    opt = pam.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-4)
    t = torch.randint(0, 11, (3, 6))
    y = torch.randint(0, 11, (3, 6))
    y[0, -1] = -100
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[2, 4:] = True
    before = [p.detach().clone() for p in model.parameters()]
    with no_float_multiply() as mode:
        loss = PF.cross_entropy(model(t, pad).reshape(-1, 11), y.reshape(-1),
                                label_smoothing=0.1, backward=backward)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(changed)
    assert mode.ops_seen.get("sum", 0) > 0 and "mm" not in mode.ops_seen
    # and the same step in plain torch is caught
    torch_model = TinyTransformer()
    with pytest.raises(FloatMultiplyError):
        with no_float_multiply():
            torch_model(t, pad).sum().backward()
