"""torch.compile of the fused optimizer steps: the custom ops pam::adamw_step and
pam::sgd_step trace as single graph nodes (declared mutation, fake implementation), with
the bits of eager on parameters and state (backend aot_eager, fullgraph=True)."""
import pytest
import torch

import pam
from pam import fused

torch._dynamo.config.cache_size_limit = 8


def _same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.detach().view(torch.int32), y.detach().view(torch.int32)), i


def _adamw_lists(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((5, 3), (7,), (2, 2, 2))
    ps = [torch.randn(s, generator=g) for s in shapes]
    gs = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    ms = [torch.randn(s, generator=g) * 0.01 for s in shapes]
    vs = [torch.rand(s, generator=g) * 1e-3 for s in shapes]
    mxs = [v * 2 for v in vs]
    steps = [torch.tensor(3.0), torch.tensor(3.0), torch.tensor(5.0)]   # two launches
    return ps, gs, ms, vs, mxs, steps


def _adamw_twice(ps, gs, ms, vs, mxs, steps, moments):
    for _ in range(2):
        fused.adamw_step(ps, gs, ms, vs, mxs, steps, lr=1e-2, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=0.01, amsgrad=True, offset=1.0552,
                         moments=moments)


def _sgd_twice(ps, gs, bufs):
    fused.sgd_step(ps, gs, bufs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                   first_step=[True, False, True])
    fused.sgd_step(ps, gs, bufs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                   first_step=[False] * 3)


@pytest.mark.parametrize("moments", ["paper", "unbiased"])
def test_adamw_step_compiled_same_bits(moments):
    ref, got = _adamw_lists(), _adamw_lists()
    _adamw_twice(*ref, moments)
    torch._dynamo.reset()
    torch.compile(_adamw_twice, backend="aot_eager", fullgraph=True)(*got, moments)
    for r, c in zip(ref, got):
        _same(r, c)
    assert not torch.equal(ref[0][0], _adamw_lists()[0][0])      # the step did update


def test_sgd_step_compiled_same_bits():
    ref, got = _adamw_lists()[:3], _adamw_lists()[:3]
    _sgd_twice(*ref)
    torch._dynamo.reset()
    torch.compile(_sgd_twice, backend="aot_eager", fullgraph=True)(*got)
    for r, c in zip(ref, got):
        _same(r, c)


def test_fused_steps_trace_without_graph_breaks():
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_adamw_twice)(*_adamw_lists(), "paper")
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"]
    assert sum("pam.adamw_step" in o for o in ops) == 2, ops
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_sgd_twice)(*_adamw_lists()[:3])
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"]
    assert sum("pam.sgd_step" in o for o in ops) == 2, ops


@pytest.mark.parametrize("opt_cls, kw", [
    (pam.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (pam.optim.SGD, dict(lr=0.1, momentum=0.9))])
def test_optimizer_step_compiled_same_bits(opt_cls, kw):
    """opt.step under torch.compile(fullgraph=True): params and state as in eager."""
    def train(compiled):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 3)
        opt = opt_cls(model.parameters(), **kw)
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled \
            else opt.step
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            step()
        state = [t for s in opt.state.values() for t in s.values()]
        return list(model.parameters()), state

    torch._dynamo.reset()
    ref_p, ref_s = train(False)
    got_p, got_s = train(True)
    _same(ref_p, got_p)
    _same(ref_s, got_s)
