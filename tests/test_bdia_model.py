"""BDIATransformer / BDIAConfig: shapes, causality, validation, PAM arithmetic wiring."""
import pytest
import torch

from bdia_pam.model import BDIAConfig, BDIATransformer, FRAC_BITS_RANGE

TINY = dict(depth=2, width=16, heads=2, mlp_ratio=2)


def vit(**kw):
    return BDIAConfig(**{**TINY, "arithmetic": "float", **kw})


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_and_all_params_get_grads(reversible, pool):
    torch.manual_seed(0)
    m = BDIATransformer(vit(reversible=reversible, pool=pool))
    x = torch.rand(3, 1, 8, 8)
    out = m(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 10)
    m.loss(out, torch.tensor([0, 1, 2])).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_lm_is_causal_and_tied():
    torch.manual_seed(0)
    m = BDIATransformer(BDIAConfig(kind="lm", context=8, arithmetic="float", **TINY)).eval()
    x = torch.randint(0, 256, (2, 8))
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 256
    a, b = m(x), m(y)
    assert a.shape == (2, 8, 256)
    assert torch.equal(a[:, :5], b[:, :5])  # the future does not leak into the past
    assert not torch.equal(a[:, 5:], b[:, 5:])
    assert not hasattr(m, "head")  # tied weights: no separate head


def test_gamma_generator_makes_training_forward_reproducible():
    torch.manual_seed(0)
    m = BDIATransformer(vit())
    x = torch.rand(4, 1, 8, 8)
    a = m(x, generator=torch.Generator().manual_seed(3))
    b = m(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("kw, word", [
    (dict(width=16, heads=3), "heads"),
    (dict(frac_bits=FRAC_BITS_RANGE[1] + 1), "frac_bits"),
    (dict(frac_bits=0), "frac_bits"),
    (dict(arithmetic="fixed"), "arithmetic"),
    (dict(patch_size=3), "patch_size"),
    (dict(depth=0), "depth"),
])
def test_config_errors_are_one_line_and_name_the_option(kw, word):
    with pytest.raises(ValueError) as e:
        BDIAConfig(**{**TINY, **kw}).validate()
    msg = str(e.value)
    assert word in msg and "\n" not in msg


def test_config_roundtrip_and_unknown_keys():
    c = vit(frac_bits=7)
    assert BDIAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        BDIAConfig.from_dict({**c.to_dict(), "bogus": 1})


def _pam_available():
    try:
        from bdia_pam.model import arithmetic_context
        arithmetic_context("pam")
        import pam.optim  # noqa: F401
        import pam.audit  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _pam_available(), reason="pam.nn.functional / pam.optim / pam.audit not available")
def test_pam_training_step_runs_no_float_multiply():
    import pam.audit
    from bdia_pam.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    m = BDIATransformer(BDIAConfig(**{**TINY, "arithmetic": "pam"}))
    opt = make_optimizer(m, TrainConfig())
    assert type(opt).__module__.startswith("pam")
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in m.parameters()]
    with pam.audit.no_float_multiply():
        loss = m.loss(m(x, generator=g), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


@pytest.mark.skipif(not _pam_available(), reason="pam pieces not available")
def test_pam_matmul_differs_from_float_but_is_close():
    torch.manual_seed(0)
    f = BDIATransformer(vit(reversible=False)).eval()
    p = BDIATransformer(vit(reversible=False, arithmetic="pam_matmul")).eval()
    p.load_state_dict(f.state_dict())
    x = torch.rand(4, 1, 8, 8)
    a, b = f(x), p(x)
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.5)
