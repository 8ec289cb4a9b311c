"""torch.optim Adam / AdamW / SGD under pam.arithmetic(): one fused PAM kernel per group.

With the default ``optimizers="fused"`` a step has the bits of pam.optim.AdamW / SGD (paper
moments) from the same gradients, whatever the foreach/fused flags, issues one kernel
launch per parameter group, passes pam.audit.no_float_multiply(), and leaves a state_dict
that a plain torch.optim optimizer loads. ``optimizers="ops"`` keeps the op-by-op step
(bits of the chain of PAM ops torch's single-tensor AdamW issues). What the fused step
cannot do is refused with a message naming the option.
"""
import copy

import pytest
import torch
from torch import nn

import pam
import pam.dispatch as D
import pam.fused as PFU
from pam.audit import no_float_multiply


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def _run(model, opt, steps, **mode):
    """``steps`` steps of ``opt`` under the mode (and the audit) from _grads."""
    for s in range(steps):
        _set_grads(model, _grads(model, s))
        with no_float_multiply(), pam.arithmetic(**mode):
            opt.step()


def _same(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _assert_same_state(m1, o1, m2, o2):
    assert _same(m1.parameters(), m2.parameters())
    for p, q in zip(m1.parameters(), m2.parameters()):
        s1, s2 = o1.state[p], o2.state[q]
        assert set(s1) == set(s2)
        for k in s1:
            assert torch.equal(_bits(s1[k]), _bits(s2[k])), k


MODE_MOMENTS = "unbiased"            # pam.arithmetic()'s default for the fused Adam/AdamW step

ADAMW_CASES = [dict(), dict(amsgrad=True), dict(weight_decay=0.1), dict(maximize=True),
               dict(amsgrad=True, weight_decay=0.05, maximize=True)]


@pytest.mark.parametrize("flags", [dict(), dict(foreach=True), dict(foreach=False),
                                   dict(fused=True)])
@pytest.mark.parametrize("kw", ADAMW_CASES)
def test_torch_adamw_has_the_bits_of_pam_adamw(kw, flags):
    m, r = _model(), _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, **kw, **flags)
    ref = pam.optim.AdamW(r.parameters(), lr=1e-2, moments=MODE_MOMENTS, **kw)
    _run(m, opt, 3)
    for s in range(3):
        _set_grads(r, _grads(r, s))
        ref.step()
    _assert_same_state(m, opt, r, ref)
    assert opt.param_groups[0]["fused"] == flags.get("fused")       # restored


@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True, weight_decay=0.05, maximize=True)])
def test_paper_moments_option(kw):
    """pam.arithmetic(moments="paper"): torch.optim.AdamW takes pam.optim.AdamW's
    paper-moments step (its bits), not the default unbiased one; a bad value is refused."""
    m, r, u = _model(), _model(), _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, **kw)
    ref = pam.optim.AdamW(r.parameters(), lr=1e-2, moments="paper", **kw)
    unbiased = pam.optim.AdamW(u.parameters(), lr=1e-2, moments="unbiased", **kw)
    _run(m, opt, 3, moments="paper")
    for s in range(3):
        for model, o in ((r, ref), (u, unbiased)):
            _set_grads(model, _grads(model, s))
            o.step()
    _assert_same_state(m, opt, r, ref)
    assert not _same(m.parameters(), u.parameters())
    assert pam.arithmetic().spec["moments"] == MODE_MOMENTS
    with pytest.raises(ValueError, match="moments must be one of"):
        pam.arithmetic(moments="exact")


@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True, maximize=True)])
def test_torch_adam_without_decay_has_the_bits_of_pam_adamw(kw):
    m, r = _model(), _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, **kw)
    ref = pam.optim.AdamW(r.parameters(), lr=1e-2, weight_decay=0.0, moments=MODE_MOMENTS,
                          **kw)
    _run(m, opt, 3)
    for s in range(3):
        _set_grads(r, _grads(r, s))
        ref.step()
    _assert_same_state(m, opt, r, ref)


@pytest.mark.parametrize("maximize", [False, True])
def test_torch_adam_l2_decay_is_added_to_the_gradient(maximize):
    """Adam's coupled decay: the gradient (negated first for maximize) plus PAM(p, wd),
    then the PAM AdamW step without decoupled decay."""
    wd = 0.1
    m, r = _model(), _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=wd, maximize=maximize)
    ref = pam.optim.AdamW(r.parameters(), lr=1e-2, weight_decay=0.0, moments=MODE_MOMENTS)
    _run(m, opt, 3)
    for s in range(3):
        for p, g in zip(r.parameters(), _grads(r, s)):
            p.grad = (-g if maximize else g) + pam.mul(p.detach(), wd)
        ref.step()
    _assert_same_state(m, opt, r, ref)
    assert all(p.grad is not None for p in m.parameters())


SGD_CASES = [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
             dict(momentum=0.9, dampening=0.25), dict(weight_decay=0.01, maximize=True),
             dict(momentum=0.5, weight_decay=0.01, nesterov=True, maximize=True)]


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kw", SGD_CASES)
def test_torch_sgd_has_the_bits_of_pam_sgd(kw, foreach):
    m, r = _model(), _model()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, foreach=foreach, **kw)
    ref = pam.optim.SGD(r.parameters(), lr=1e-2, **kw)
    _run(m, opt, 3)
    for s in range(3):
        _set_grads(r, _grads(r, s))
        ref.step()
    _assert_same_state(m, opt, r, ref)


@pytest.fixture
def launched():
    """The names of the kernels launched while the test runs."""
    with D.recording_launches() as names:
        yield names


@pytest.mark.parametrize("make, kernel", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True), "adamw_unbiased_table"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2), "adamw_unbiased_table"),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True), "sgd_table"),
])
def test_one_kernel_launch_per_group(launched, make, kernel):
    m = _model()
    layers = list(m)
    opt = make([{"params": layers[0].parameters()},
                {"params": layers[1].parameters(), "lr": 1e-3}])
    for s in range(2):
        _set_grads(m, _grads(m, s))
        with no_float_multiply(), pam.arithmetic():
            launched.clear()
            opt.step()
        assert launched == [kernel, kernel]          # one launch per group, nothing else


def test_adam_l2_decay_adds_one_elementwise_launch(monkeypatch, launched):
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1)
    entry = []
    step = PFU.adamw_step
    monkeypatch.setattr(PFU, "adamw_step", lambda *a, **k: (entry.append(1), step(*a, **k)))
    _set_grads(m, _grads(m, 0))
    launched.clear()
    with no_float_multiply(), pam.arithmetic():
        opt.step()
    assert entry == [1] and len(launched) == 2 and launched[-1] == "adamw_unbiased_table"


def test_opt_out_runs_op_by_op_with_the_old_bits():
    """optimizers="ops": torch's single-tensor AdamW as the chain of PAM ops it issues
    (mul_, lerp_, mul_/addcmul_, sqrt, div, add_, addcdiv_), foreach the same bits, and
    the fused kernel never runs."""
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    results = {}
    for foreach in (False, True):
        m = _model()
        opt = torch.optim.AdamW(m.parameters(), lr=lr, foreach=foreach)
        _run(m, opt, 2, optimizers="ops")
        results[foreach] = [p.detach().clone() for p in m.parameters()]
    r = _model()
    ps = [p.detach().clone() for p in r.parameters()]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for s in range(2):
        step = s + 1
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        for i, g in enumerate(_grads(r, s)):
            p = pam.mul(ps[i], 1 - lr * wd)
            ms[i] = ms[i] + pam.mul(g - ms[i], 1 - b1)
            vs[i] = pam.mul(vs[i], b2) + pam.mul(pam.mul(g, g), 1 - b2)
            denom = pam.div(pam.sqrt(vs[i]), bc2 ** 0.5) + eps
            ps[i] = p + pam.mul(pam.div(ms[i], denom), -(lr / bc1))
    assert _same(results[False], ps)
    assert _same(results[True], ps)
    fused_m = _model()
    fused = torch.optim.AdamW(fused_m.parameters(), lr=lr)
    _run(fused_m, fused, 2)
    assert not _same(fused_m.parameters(), ps)       # the two definitions differ


def test_opt_out_never_calls_the_fused_kernel(monkeypatch):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    entry = []
    monkeypatch.setattr(PFU, "adamw_step", lambda *a, **k: entry.append(1))
    _run(m, opt, 1, optimizers="ops")
    assert entry == []


def test_state_dict_loads_into_a_plain_optimizer():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True)
    _run(m, opt, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["fused"] is None and sd["param_groups"][0]["foreach"] is None
    plain = torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True)
    plain.load_state_dict(sd)
    for p in m.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(_bits(plain.state[p][k]), _bits(v)), k
            assert plain.state[p][k].device == v.device
    _set_grads(m, _grads(m, 5))
    plain.step()                                       # float, outside the mode
    assert float(plain.state[next(m.parameters())]["step"]) == 3.0


def test_tensor_lr_is_read_exactly():
    m, r = _model(), _model()
    opt = torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-2))
    ref = pam.optim.AdamW(r.parameters(), lr=1e-2, moments=MODE_MOMENTS)
    _run(m, opt, 2)
    for s in range(2):
        _set_grads(r, _grads(r, s))
        ref.step()
    _assert_same_state(m, opt, r, ref)


def test_other_configurations_keep_their_path(monkeypatch):
    """Offset and lmul: op by op (the fused kernel has neither); ops="matmul": torch's own
    float step, bit for bit; a subclass of AdamW: op by op."""
    entry = []
    step = PFU.adamw_step
    monkeypatch.setattr(PFU, "adamw_step", lambda *a, **k: (entry.append(1), step(*a, **k)))
    for mode in (dict(offset=1.0552), dict(family="lmul")):
        m = _model()
        _run(m, torch.optim.AdamW(m.parameters(), lr=1e-2), 1, **mode)
    m = _model()
    _run(m, type("Sub", (torch.optim.AdamW,), {})(m.parameters(), lr=1e-2), 1)
    assert entry == []
    m, r = _model(), _model()
    opt, ref = (torch.optim.AdamW(x.parameters(), lr=1e-2) for x in (m, r))
    for s in range(2):
        _set_grads(m, _grads(m, s))
        with pam.arithmetic(ops="matmul"):
            opt.step()
        _set_grads(r, _grads(r, s))
        ref.step()
    _assert_same_state(m, opt, r, ref)


def _sparse_model():
    torch.manual_seed(0)
    return nn.Embedding(5, 3, sparse=True)


@pytest.mark.parametrize("make, match", [
    (lambda ps: torch.optim.AdamW(ps, capturable=True), "capturable=True"),
    (lambda ps: torch.optim.Adam(ps, differentiable=True), "differentiable=True"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, differentiable=True), "differentiable=True"),
])
def test_refused_options_name_the_option(make, match):
    m = _model()
    opt = make(m.parameters())
    _set_grads(m, _grads(m, 0))
    with pytest.raises(pam.UnsupportedOpError, match=match) as e:
        with pam.arithmetic():
            opt.step()
    assert "optimizers='ops'" in str(e.value)
    assert opt.param_groups[0]["fused"] in (None, False)


def test_refused_tensors_name_the_problem():
    m = _model().double()
    opt = torch.optim.AdamW(m.parameters())
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(pam.UnsupportedOpError, match="torch.float64 parameters"):
        with pam.arithmetic():
            opt.step()
    e = _sparse_model()
    opt = torch.optim.SGD(e.parameters(), lr=0.1)
    e(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(pam.UnsupportedOpError, match="sparse gradients"):
        with pam.arithmetic():
            opt.step()


def test_sgd_with_partial_momentum_buffers_is_refused():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    params = list(m.parameters())
    params[0].grad = torch.ones_like(params[0])
    with pam.arithmetic():
        opt.step()
    _set_grads(m, _grads(m, 0))
    with pytest.raises(pam.UnsupportedOpError, match="momentum buffers for only some"):
        with pam.arithmetic():
            opt.step()


def test_grad_scaling_is_refused_and_flags_restored():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    _set_grads(m, _grads(m, 0))
    with pytest.raises(pam.UnsupportedOpError, match="grad_scale/found_inf"):
        with pam.arithmetic():
            opt.step()
    assert opt.param_groups[0]["fused"] is None      # restored by the context's exit


def test_fused_true_outside_the_pam_family_is_refused():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    _set_grads(m, _grads(m, 0))
    with pytest.raises(pam.UnsupportedOpError, match="without fused=True"):
        with pam.arithmetic(offset=1.0552):
            opt.step()


def test_optimizers_option_is_checked_and_in_spec():
    with pytest.raises(ValueError, match="optimizers must be one of"):
        pam.arithmetic(optimizers="fast")
    ctx = pam.arithmetic(optimizers="ops")
    assert pam.arithmetic(**ctx.spec).cfg.optimizers == "ops"


def test_non_strict_reports_once_and_runs_op_by_op(monkeypatch):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    params = list(m.parameters())
    params[0].grad = torch.ones_like(params[0])
    with pam.arithmetic():
        opt.step()
    entry = []
    monkeypatch.setattr(PFU, "sgd_step", lambda *a, **k: entry.append(1))
    before = [p.detach().clone() for p in params]
    _set_grads(m, _grads(m, 0))
    ctx = pam.arithmetic(strict=False)
    with pytest.warns(UserWarning, match="runs op by op"):
        with no_float_multiply(), ctx:
            opt.step()
    assert ctx.reported == ["SGD"] and entry == []
    assert all(not torch.equal(p, q) for p, q in zip(params, before))
    with ctx:
        opt.step()                    # every parameter has its buffer now: fused
    assert entry == [1]


def test_add_with_alpha_is_pam_in_the_op_by_op_step():
    """add/sub with alpha != 1 (torch's SGD: param.add_(grad, alpha=-lr), Adam's L2 term)
    is a product: computed as a + PAM(b, alpha), audited, single-tensor and foreach."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    with no_float_multiply(), pam.arithmetic():
        got = [a.add(b, alpha=0.3), a.sub(b, alpha=0.3), a.clone().add_(b, alpha=-0.1)]
        lists = [a.clone(), b.clone()]
        torch._foreach_add_(lists, [b, a], alpha=0.7)
    want = [a + pam.mul(b, 0.3), a - pam.mul(b, 0.3), a + pam.mul(b, -0.1),
            a + pam.mul(b, 0.7), b + pam.mul(a, 0.7)]
    assert _same(got + lists, want)
    m, r = _model(), _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _run(m, opt, 1, optimizers="ops")
    ref = [p.detach() - pam.mul(gr, 0.1) for p, gr in zip(r.parameters(), _grads(r, 0))]
    assert _same(m.parameters(), ref)


def test_bench_optim_mode_smoke(tmp_path):
    """validation/bench_optim_mode.py runs, writes its JSON, and its fused side has the
    bits of pam.optim.AdamW with one launch per step."""
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "validation" / "bench_optim_mode.py"
    spec = importlib.util.spec_from_file_location("validation_bench_optim_mode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import numba
    threads, nb_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        mod.main(["--models", "gpt_small", "--steps", "1", "--warmup", "1",
                  "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(nb_threads)
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["fused_same_bits_as_pam_optim"] is True
    assert row["fused_launches"] == 1 and row["ops_single_launches"] > row["tensors"]
