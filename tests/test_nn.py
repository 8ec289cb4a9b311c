"""pam.nn modules and pam.convert."""
import warnings

import pytest
import torch
from torch import nn

import pam
import pam.nn.functional as PF
from pam.audit import no_float_multiply


def test_linear_layernorm_state_dict_roundtrip_and_repr():
    torch.manual_seed(0)
    tl, pl = nn.Linear(6, 4), pam.nn.Linear(6, 4, backward="approx", offset=1.0552)
    pl.load_state_dict(tl.state_dict())
    tl.load_state_dict(pl.state_dict())
    assert "offset=1.0552" in repr(pl) and "backward='approx'" in repr(pl)
    x = torch.randn(3, 6)
    assert torch.equal(pl(x), PF.linear(x, tl.weight, tl.bias, offset=1.0552,
                                        backward="approx"))
    ln = pam.nn.LayerNorm(6)
    ln.load_state_dict(nn.LayerNorm(6).state_dict())
    assert "backward='exact'" in repr(ln)
    with pytest.raises(ValueError, match="backward"):
        pam.nn.Linear(2, 2, backward="fast")


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_matches_torch_and_loads_state_dict(batch_first):
    torch.manual_seed(1)
    t = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    p = pam.nn.MultiheadAttention(16, 4, batch_first=batch_first)
    assert set(p.state_dict()) == set(t.state_dict())
    p.load_state_dict(t.state_dict())
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    am = torch.ones(5, 5, dtype=torch.bool).triu(1)        # torch: True = masked
    ro, rw = t(x, x, x, key_padding_mask=kpm, attn_mask=am)
    po, pw = p(x, x, x, key_padding_mask=kpm, attn_mask=am)
    assert po.shape == ro.shape and pw.shape == rw.shape
    assert torch.allclose(po, ro, atol=0.25), (po - ro).abs().max()
    assert torch.allclose(pw, rw, atol=0.15)
    # masked keys get exactly zero weight
    assert torch.all(pw[1, :, 3:] == 0)
    po2, none = p(x, x, x, need_weights=False, is_causal=True)
    assert none is None and torch.equal(
        po2, p(x, x, x, attn_mask=am, need_weights=False)[0])
    # unbatched input
    xu = x[0] if batch_first else x[:, 0]
    assert p(xu, xu, xu)[0].shape == (5, 16)


def test_convert_swaps_in_place_and_keeps_weights():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(),
                      nn.Dropout(0.1), nn.ReLU(), nn.Identity(), nn.Flatten(),
                      nn.Softmax(dim=-1))
    w = m[1].weight
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    out = pam.convert(m, backward="approx", offset=1.0552)
    assert out is m
    assert isinstance(m[1], pam.nn.Linear) and m[1].weight is w
    assert isinstance(m[2], pam.nn.LayerNorm) and isinstance(m[3], pam.nn.GELU)
    assert isinstance(m[4], pam.nn.Dropout) and isinstance(m[5], pam.nn.ReLU)
    assert type(m[0]) is nn.Embedding and type(m[6]) is nn.Identity
    assert isinstance(m[8], pam.nn.Softmax) and m[8].dim == -1
    assert m[1].backward == "approx" and m[1].offset == 1.0552
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])
    # converting twice is a no-op; a single supported layer is returned replaced
    assert pam.convert(m) is m
    assert isinstance(pam.convert(nn.Linear(2, 3)), pam.nn.Linear)


def test_convert_reports_unsupported_layers():
    class OwnForward(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = OwnForward(2)
            self.conv = nn.Conv3d(2, 2, 3)
            self.lin = nn.Linear(2, 2)
            self.act = nn.Tanh()
    m = nn.Sequential(Mine(), nn.BatchNorm1d(2))
    with pytest.raises(pam.nn.UnsupportedModuleError) as e:
        pam.convert(m)
    msg = str(e.value)
    assert "0.norm (OwnForward: subclass of nn.LayerNorm that overrides forward" in msg
    assert "0.conv (Conv3d" in msg and "1 (BatchNorm1d" in msg and "0.act" not in msg
    assert type(m[0].lin) is nn.Linear                         # nothing changed
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        pam.convert(m, strict=False)
    assert isinstance(m[0].lin, pam.nn.Linear) and isinstance(m[0].act, pam.nn.Tanh)
    assert pam.nn.float_leaves(m) == [("0.norm", "OwnForward"), ("0.conv", "Conv3d"),
                                      ("1", "BatchNorm1d")]
    with pytest.raises(pam.nn.UnsupportedModuleError, match="max_norm"):
        pam.convert(nn.Sequential(nn.Embedding(3, 2, max_norm=1.0)))
    with pytest.raises(TypeError, match="module"):
        pam.convert("model")


def test_convert_subclasses_and_activations():
    class TimmLikeNorm(nn.LayerNorm):       # a subclass that keeps torch's forward
        pass
    m = nn.Sequential(TimmLikeNorm(4), nn.Tanh(), nn.SiLU(), nn.Sigmoid())
    x = torch.randn(3, 4)
    pam.convert(m, backward="approx")
    assert pam.nn.float_leaves(m) == []
    with no_float_multiply():
        y = m(x)
    want = PF.sigmoid(PF.silu(PF.tanh(PF.layer_norm(x, (4,), m[0].weight, m[0].bias))))
    assert torch.equal(y.view(torch.int32), want.view(torch.int32))


def test_convert_hf_gpt2_leaves_nothing_float():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20,
                                   n_positions=8, bos_token_id=0, eos_token_id=0))
    w = g.transformer.h[0].attn.c_attn.weight
    pam.convert(g, strict=False)
    assert isinstance(g.transformer.h[0].attn.c_attn, pam.nn.TransposedLinear)
    assert g.transformer.h[0].attn.c_attn.weight is w          # same Parameter
    assert pam.nn.float_leaves(g) == []


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_convert_transformer_encoder_eval_has_no_float_fast_path(activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, activation=activation)
    enc = pam.convert(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    assert pam.nn.float_leaves(enc) == []
    x = torch.randn(2, 5, 16)
    enc.eval()
    with torch.no_grad(), no_float_multiply():
        y = enc(x)
    enc.train()
    with no_float_multiply():
        enc(x).sum().backward()
    assert torch.isfinite(y).all()


def test_dropout_module_train_eval():
    d = pam.nn.Dropout(0.5)
    x = torch.ones(1000)
    assert (d(x) == 0).any()
    d.eval()
    assert d(x) is x
