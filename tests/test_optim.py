"""pam.optim against torch.optim: same layout, close trajectories, multiplication-free."""
import pytest
import torch

import pam
from pam.audit import no_float_multiply


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(16, 4, generator=g)
    xs = torch.randn(4, generator=g)
    b = A @ xs
    return A, b


def _train(opt_cls, kwargs, steps=60, audit=False):
    A, b = _problem()
    w = torch.zeros(4, requires_grad=True)
    opt = opt_cls([w], **kwargs)
    for _ in range(steps):
        loss = ((A @ w - b) ** 2).mean()     # the problem itself is float; only the step
        opt.zero_grad()
        loss.backward()
        if audit:
            with no_float_multiply():
                opt.step()
        else:
            opt.step()
    return w.detach(), float(((A @ w.detach() - b) ** 2).mean()), opt


@pytest.mark.parametrize("kw", [dict(lr=0.05, betas=(0.9, 0.98), weight_decay=1e-4),
                                dict(lr=0.05, amsgrad=True), dict(lr=0.05, maximize=False)])
def test_adamw_tracks_torch(kw):
    w_p, loss_p, opt_p = _train(pam.optim.AdamW, kw, audit=True)
    w_t, loss_t, opt_t = _train(torch.optim.AdamW, kw)
    A, b = _problem()
    loss0 = float((b ** 2).mean())
    assert loss_p < 0.1 * loss0 and loss_t < 0.1 * loss0
    # beta2 = 0.999: pa_log2/pa_exp2 bias correction differs most (see pam.optim doc)
    assert torch.allclose(w_p, w_t, atol=0.5), (w_p, w_t)
    # torch's layout: same keys, loadable both ways
    sp, st_ = opt_p.state_dict(), opt_t.state_dict()
    assert set(sp["state"][0]) == set(st_["state"][0])
    assert sp["param_groups"][0].keys() == st_["param_groups"][0].keys()
    assert sp["state"][0]["step"].dtype == st_["state"][0]["step"].dtype
    opt_t.load_state_dict(sp)
    opt_p.load_state_dict(st_)
    assert torch.equal(opt_p.state_dict()["state"][0]["exp_avg"], st_["state"][0]["exp_avg"])


@pytest.mark.parametrize("kw", [dict(lr=0.02), dict(lr=0.02, momentum=0.9),
                                dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                dict(lr=0.02, momentum=0.5, dampening=0.5)])
def test_sgd_tracks_torch(kw):
    w_p, loss_p, opt_p = _train(pam.optim.SGD, kw, audit=True)
    w_t, loss_t, opt_t = _train(torch.optim.SGD, kw)
    assert loss_p < 1.5 * loss_t + 0.05
    assert torch.allclose(w_p, w_t, atol=0.3)
    if kw.get("momentum"):
        assert set(opt_p.state_dict()["state"][0]) == {"momentum_buffer"}
        opt_p.load_state_dict(opt_t.state_dict())


def test_first_adamw_step_value():
    # step 1: bias corrections 1 - beta^1 are exact here (pa_exp2(pa_log2(b)) == b), so
    # the update is lr * PAD(g, pa_sqrt(g^2)) ~ lr * sign(g) within PA error.
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = pam.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    w.grad = torch.tensor([0.5, -0.25, 3.0])
    opt.step()
    step = torch.tensor([1.0, -2.0, 3.0]) - w.detach()
    assert torch.all(step.sign() == torch.tensor([1.0, -1.0, 1.0]))
    assert torch.all((step.abs() - 0.1).abs() <= 0.02), step


def test_bad_arguments():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="beta"):
        pam.optim.AdamW([w], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Nesterov"):
        pam.optim.SGD([w], nesterov=True)
    with pytest.raises(ValueError, match="offset"):
        pam.optim.SGD([w], offset=-1.0)
