"""pam.arithmetic(): third-party models train multiplication-free, unmodified.

Models are built the way their libraries' users build them (torch.nn.TransformerEncoder,
Hugging Face GPT-2 and BERT from tiny configs, a nanoGPT-style model calling
F.scaled_dot_product_attention); each trains a few steps inside
pam.audit.no_float_multiply() and pam.arithmetic() with torch.optim.AdamW and with
pam.optim.AdamW, and its loss falls.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pam
import pam.nn.functional as PF
from pam.audit import no_float_multiply


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


# ----------------------------------------------------------------------------- models
class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab=40, d=32, h=4, layers=2, ctx=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(NanoBlock(d, h) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


class TimmLayerNorm(nn.LayerNorm):
    """timm's pattern: a LayerNorm subclass with its own forward calling F.layer_norm."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class TimmBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.norm1, self.norm2 = TimmLayerNorm(d), TimmLayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.h, C // self.h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A timm-style ViT: Conv2d patch embedding, class token, pre-norm blocks."""

    def __init__(self, d=32, classes=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(TimmBlock(d, 4), TimmBlock(d, 4))
        self.norm, self.head = TimmLayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _vit():
    torch.manual_seed(0)
    m = ViT()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    return m, lambda m: F.cross_entropy(m(x), y)


def _encoder(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    head = nn.Linear(32, 5)
    model = nn.ModuleDict({"enc": enc, "head": head})
    x = torch.randn(8, 6, 32)
    y = torch.randint(0, 5, (8,))
    return model, lambda m: F.cross_entropy(m["head"](m["enc"](x).mean(dim=1)), y)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40,
                                   n_positions=16, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 40, (4, 12))
    return m, lambda m: m(ids, labels=ids).loss


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=40, max_position_embeddings=16, num_labels=3))
    ids = torch.randint(0, 40, (6, 10))
    labels = torch.randint(0, 3, (6,))
    return m, lambda m: m(ids, labels=labels).loss


def _nanogpt():
    torch.manual_seed(0)
    m = NanoGPT()
    idx = torch.randint(0, 40, (4, 16))
    return m, lambda m: m(idx[:, :-1], idx[:, 1:])


MODELS = {"encoder_post_norm": lambda: _encoder(False),
          "encoder_pre_norm": lambda: _encoder(True),
          "hf_gpt2": _gpt2, "hf_bert": _bert, "nanogpt_sdpa": _nanogpt, "vit_conv2d": _vit}


def _train(model, loss_fn, opt, steps, **mode):
    losses = []
    for _ in range(steps):
        with no_float_multiply(), pam.arithmetic(**mode):
            loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["torch", "pam"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_multiplication_free(name, optimizer):
    model, loss_fn = MODELS[name]()
    opt = (torch.optim.AdamW(model.parameters(), lr=3e-3) if optimizer == "torch"
           else pam.optim.AdamW(model.parameters(), lr=3e-3))
    losses = _train(model, loss_fn, opt, 5)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_eval_never_takes_the_float_fast_path(norm_first):
    model, _ = _encoder(norm_first)
    model.eval()
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        with no_float_multiply() as audit, pam.arithmetic():
            y = model["enc"](x)
    assert torch.isfinite(y).all()
    assert "_native_multi_head_attention" not in audit.ops_seen
    assert torch.backends.mha.get_fastpath_enabled()     # restored after the block


def test_exact_backward_matches_convert_bit_for_bit():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4),
                          nn.Softmax(dim=-1))
    converted = pam.convert(copy.deepcopy(model), backward="exact")
    x = torch.randn(5, 8)
    with pam.arithmetic(backward="exact"):
        y = model(x)
        pam.mul(y, y).sum().backward()
    y2 = converted(x)
    PF_grads = torch.autograd.grad(pam.mul(y2, y2).sum(), list(converted.parameters()))
    assert torch.equal(_bits(y), _bits(y2))
    for p, g in zip(model.parameters(), PF_grads):
        assert torch.equal(_bits(p.grad), _bits(g))


def test_ops_compute_pam_bits():
    torch.manual_seed(2)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    w = torch.randn(5, 3)
    with pam.arithmetic():
        got = {"mul": a * b, "rmul": 3.0 * a, "div": a / b, "rdiv": 2.0 / b,
               "matmul": a @ w, "exp": torch.exp(a), "square": a ** 2, "cube": a ** 3,
               "sqrt": b.abs().sqrt(), "mean": a.mean(dim=1),
               "softmax": a.softmax(-1), "inplace": a.clone().mul_(b)}
    want = {"mul": pam.mul(a, b), "rmul": pam.mul(a, 3.0), "div": pam.div(a, b),
            "rdiv": pam.div(torch.full((), 2.0), b), "matmul": pam.matmul(a, w),
            "exp": pam.exp(a), "square": pam.mul(a, a), "cube": pam.mul(pam.mul(a, a), a),
            "sqrt": pam.sqrt(b.abs()), "mean": PF.mean(a, 1),
            "softmax": PF.softmax(a, -1), "inplace": pam.mul(a, b)}
    for k in want:
        assert torch.equal(_bits(got[k]), _bits(want[k])), k


def test_foreach_and_single_tensor_adamw_agree():
    """The op-by-op step (optimizers="ops"): foreach and single-tensor give the same bits
    (the default fused step is tested in tests/test_mode_optim.py)."""
    torch.manual_seed(3)
    params = {}
    for foreach in (False, True):
        torch.manual_seed(3)
        m = nn.Linear(6, 3)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=foreach)
        for _ in range(3):
            with no_float_multiply(), pam.arithmetic(optimizers="ops"):
                m(torch.ones(2, 6)).square().sum().backward()
                opt.step()
                opt.zero_grad()
        params[foreach] = [p.detach().clone() for p in m.parameters()]
    for p, q in zip(params[False], params[True]):
        assert torch.equal(_bits(p), _bits(q))


class _Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.erf(self.fc(x))            # no PAM version: must be refused, located


def test_unsupported_op_raises_with_module_and_line():
    model = nn.Sequential(nn.Linear(4, 4), _Planted())
    with pytest.raises(pam.UnsupportedOpError) as e:
        with pam.arithmetic():
            model(torch.randn(2, 4))
    msg = str(e.value)
    assert "aten.erf" in msg and "1 (_Planted in Sequential)" in msg
    assert "test_mode.py" in msg and "in forward" in msg


def test_non_strict_reports_once_and_runs():
    model = nn.Sequential(_Planted())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pam.arithmetic(strict=False) as ctx:
            for _ in range(3):
                model(torch.randn(2, 4))
    assert ctx.reported == ["erf"]
    assert sum("aten.erf" in str(x.message) for x in w) == 1


def test_other_float_dtypes_are_refused():
    a = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(pam.UnsupportedOpError, match="float64"):
        with pam.arithmetic():
            a @ a


def test_ops_family_selection_keeps_the_rest_float():
    a = torch.randn(4, 4)
    with no_float_multiply(record=True) as audit, pam.arithmetic(ops="matmul"):
        c = a @ a
        a.softmax(-1)
    assert torch.equal(_bits(c), _bits(pam.matmul(a, a)))
    assert audit.violations == ["_softmax"]
    with pytest.raises(ValueError, match="unknown op families"):
        pam.arithmetic(ops={"matmul", "bogus"})


def test_audit_names_module_and_line_forward_and_backward():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    x = torch.randn(2, 4)
    with no_float_multiply(record=True) as audit:
        model(x).sum().backward()
    fwd = dict(zip(audit.violations, audit.locations))
    assert "0 (Linear in Sequential)" in fwd["addmm"] and "test_mode.py" in fwd["addmm"]
    back = [loc for v, loc in zip(audit.violations, audit.locations) if v == "tanh_backward"]
    assert back and "backward of TanhBackward0" in back[0] and "1 (Tanh in Sequential)" in back[0]


def test_pa_sigmoid_family_accuracy():
    x = torch.linspace(-8, 8, 100001)
    for f, ref, max_err in ((PF.sigmoid, torch.sigmoid, 0.075), (PF.tanh, torch.tanh, 0.149),
                            (PF.silu, F.silu, 0.1)):
        err = (f(x) - ref(x)).abs()
        assert err.max() <= max_err and err.mean() <= 0.0138, f.__name__
    assert PF.sigmoid(torch.zeros(1)).item() == 0.5 and PF.tanh(torch.zeros(1)).item() == 0.0


def test_aten_convolution_reaches_pam_kernels():
    from pam.conv import conv_backward, conv_forward
    torch.manual_seed(4)
    x, w, b = torch.randn(2, 3, 7, 6), torch.randn(4, 3, 3, 2), torch.randn(4)
    g = torch.randn(2, 4, 3, 5)
    with pam.arithmetic():
        y = torch.ops.aten.convolution(x, w, b, [2, 1], [1, 0], [1, 1], False, [0, 0], 1)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [4], [2, 1], [1, 0], [1, 1], False, [0, 0], 1, [True, True, True])
    want = conv_forward(x, w, b, (2, 1), (1, 0), (1, 1), 1, 0)
    assert torch.equal(_bits(y), _bits(want))
    for got, ref in zip((gx, gw, gb), conv_backward(g, x, w, (2, 1), (1, 0), (1, 1), 1, 0,
                                                    False, (True, True, True))):
        assert torch.equal(_bits(got), _bits(ref))


def test_multihead_attention_matches_pam_module_bit_for_bit():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    ref = pam.convert(copy.deepcopy(mha), backward="exact")
    x = torch.randn(2, 5, 16)
    mask = torch.rand(5, 5) > 0.7
    with pam.arithmetic(backward="exact"):
        y, w = mha(x, x, x, attn_mask=mask)
        pam.mul(y, y).sum().backward()
    y2, w2 = ref(x, x, x, attn_mask=mask)
    grads = torch.autograd.grad(pam.mul(y2, y2).sum(), list(ref.parameters()))
    assert torch.equal(_bits(y), _bits(y2)) and torch.equal(_bits(w), _bits(w2))
    for p, g in zip(mha.parameters(), grads):
        assert torch.equal(_bits(p.grad), _bits(g))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_dispatch_layer_backward_formulas_are_pam_and_close_to_torch():
    """The ATen-level handlers (reached by backward formulas and direct aten calls)."""
    aten = torch.ops.aten
    torch.manual_seed(6)
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    t = torch.randint(0, 8, (4,))
    ref = {"ln": aten.native_layer_norm(x, [8], w, b, 1e-5),
           "ln_bw": aten.native_layer_norm_backward(g, x, [8], *aten.native_layer_norm(
               x, [8], w, b, 1e-5)[1:], w, b, [True, True, True]),
           "sm_bw": aten._softmax_backward_data(g, x.softmax(-1), -1, torch.float32),
           "lsm_bw": aten._log_softmax_backward_data(g, x.log_softmax(-1), -1,
                                                     torch.float32),
           "nll": aten.nll_loss_forward(x.log_softmax(-1), t, None, 1, -100),
           "nll_bw": aten.nll_loss_backward(torch.tensor(1.0), x.log_softmax(-1), t, None, 1,
                                            -100, torch.tensor(4.0)),
           "tanh_bw": aten.tanh_backward(g, x.tanh()),
           "gelu_bw": aten.gelu_backward(g, x)}
    with no_float_multiply(), pam.arithmetic():
        sm, lsm = PF.softmax(x, -1), PF.log_softmax(x, -1)
        got = {"ln": aten.native_layer_norm(x, [8], w, b, 1e-5),
               "sm_bw": aten._softmax_backward_data(g, sm, -1, torch.float32),
               "lsm_bw": aten._log_softmax_backward_data(g, lsm, -1, torch.float32),
               "nll": aten.nll_loss_forward(lsm, t, None, 1, -100),
               "nll_bw": aten.nll_loss_backward(torch.tensor(1.0), lsm, t, None, 1, -100,
                                                torch.tensor(4.0)),
               "tanh_bw": aten.tanh_backward(g, PF.tanh(x)),
               "gelu_bw": aten.gelu_backward(g, x)}
        y, mu, rstd = got["ln"]
        got["ln_bw"] = aten.native_layer_norm_backward(g, x, [8], mu, rstd, w, b,
                                                       [True, True, True])
    assert torch.equal(_bits(got["ln"][0]), _bits(PF.layer_norm(x, (8,), w, b)))
    assert torch.equal(_bits(got["nll"][0]), _bits(PF.nll_loss(lsm, t)))
    assert torch.equal(_bits(got["nll_bw"]), _bits(ref["nll_bw"]))   # -1/4: exact in PAM
    for key, tol in (("ln_bw", 0.3), ("sm_bw", 0.3), ("lsm_bw", 0.5), ("tanh_bw", 0.25),
                     ("gelu_bw", 0.15)):
        a, r = got[key], ref[key]
        for ga, gr in zip(a if isinstance(a, tuple) else (a,), r if isinstance(r, tuple)
                          else (r,)):
            assert _rel(ga, gr) < tol, key


def test_integer_operands_with_float_results_are_pam():
    i = torch.arange(1, 7)
    with no_float_multiply(), pam.arithmetic():
        q = i / 3
        h = i * 0.5
        n = torch.ops.aten.bernoulli.p(torch.zeros(1000), 0.25)
    assert torch.equal(_bits(q), _bits(pam.div(i.float(), 3.0)))
    assert torch.equal(_bits(h), _bits(pam.mul(i.float(), 0.5)))
    assert set(n.unique().tolist()) <= {0.0, 1.0} and 150 < n.sum() < 350


def test_reversible_stack_recomputes_in_the_forward_arithmetic():
    """A plain block in a ReversibleStack: the backward recompute re-enters the forward's
    pam.arithmetic, so calling backward outside the block gives the same bits as inside."""
    from bdia_pam import ReversibleStack

    def grads(backward_inside):
        torch.manual_seed(7)
        blocks = [nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(3)]
        stack = ReversibleStack(blocks, frac_bits=9)
        x = torch.randn(4, 8, requires_grad=True)
        gamma = torch.tensor([[0.5, -0.5]] * 4)
        with pam.arithmetic(backward="exact"):
            y = stack(x, gamma=gamma)
            loss = pam.mul(y, y).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [x.grad] + [p.grad for p in stack.parameters()]

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(_bits(a), _bits(b))


def test_inplace_activation_stays_in_place():
    x = torch.randn(6)
    y = x.clone()
    with pam.arithmetic():
        out = F.silu(y, inplace=True)
    assert out is y
    assert torch.equal(_bits(y), _bits(PF.silu(x)))


# ----------------------------------------------------------------------------- internals
def _layers_at_launch(monkeypatch, run):
    """[(pam dispatch layer innermost?, torch function modes on?, audit on the stack?)]
    at every kernel launch made while ``run()`` executes."""
    from torch.utils._python_dispatch import (_get_current_dispatch_mode,
                                              _get_current_dispatch_mode_stack)
    from pam import dispatch as D
    from pam._internal import LAYER_ATTR

    seen = []

    def state():
        top = _get_current_dispatch_mode()
        seen.append((getattr(top, LAYER_ATTR, False), torch._C._is_torch_function_mode_enabled(),
                     any(isinstance(m, no_float_multiply)
                         for m in _get_current_dispatch_mode_stack())))

    orig_launch, orig_launcher = D.launch, D._launcher

    def launch(name, device, *args):
        state()
        return orig_launch(name, device, *args)

    def launcher(device, name):
        kernel = orig_launcher(device, name)

        def call(*args):
            state()
            return kernel(*args)
        return call

    monkeypatch.setattr(D, "launch", launch)
    monkeypatch.setattr(D, "_launcher", launcher)
    run()
    return seen


def _layers_model_step():
    """A step to run under the mode: layer 1 takes linear and layer_norm, layer 2 the
    multiplication; the backward runs the backward functions of both."""
    torch.manual_seed(0)
    lin, ln = nn.Linear(8, 8), nn.LayerNorm(8)
    x = torch.randn(4, 8)
    return lambda: (ln(lin(x)) * x).sum().backward()


def test_pam_internals_run_without_the_layers(monkeypatch):
    """pam's own code (the ops layer 1 and layer 2 hand over, their backward functions)
    runs with neither pam.arithmetic() layer active: no 10-20 us per internal torch call
    spent routing allocations and views through them (pam._internal)."""
    step = _layers_model_step()

    def run():
        with pam.arithmetic(backward="exact"):
            step()
    seen = _layers_at_launch(monkeypatch, run)
    assert len(seen) >= 4
    assert all(not layer and not function_modes for layer, function_modes, _ in seen)


@pytest.mark.parametrize("audit_inside", [False, True])
def test_pam_internals_stay_visible_to_the_audit(monkeypatch, audit_inside):
    """An audit around the mode (the documented use) or inside it still sees every ATen
    op pam runs: only the pam layer is popped, only when it is innermost, and kernels
    launch with the audit on the stack."""
    step = _layers_model_step()

    def run():
        mode = pam.arithmetic(backward="exact")
        with (mode if audit_inside else no_float_multiply()), \
                (no_float_multiply() if audit_inside else mode):
            step()
    seen = _layers_at_launch(monkeypatch, run)
    assert len(seen) >= 4
    assert all(audit for _, _, audit in seen)
