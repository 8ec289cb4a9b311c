"""pam.compile: torch.compile of a plain torch model under the op-level mode (CPU).

Matrix: an MLP (Linear, GELU, Linear, LayerNorm) and a pre-norm nn.TransformerEncoderLayer
(MultiheadAttention, GELU feed-forward; dropout 0), forward output and every gradient
compared bit for bit (int32 views) with eager ``pam.arithmetic()``:

* ``backend="aot_eager"``, fullgraph True / False, both models: bit-identical, one graph,
  no graph break;
* ``backend="inductor"``: the MLP (fullgraph True / False) and the encoder layer
  (fullgraph True), bit-identical (float32 sums kept ATen's: pam.ordered_sum);
* every final graph holds no float multiply-family ATen op (pam.audit.graph_float_ops),
  while the graph AOT autograd traces before the rewrite does;
* torch.erf inside the compiled model: UnsupportedOpError naming erf and the source line;
  with strict=False it runs in float, reported once, and the graph check names it;
* torch._dynamo.explain: one graph, no graph break;
* inside pam.audit.no_float_multiply() the model runs eagerly (audited), and compiles
  after;
* three AdamW training steps (torch.optim.AdamW eager, outside the compiled model) match
  eager training bit for bit and compile once (error_on_recompile after the first).
"""
import pytest
import torch

import pam

torch._dynamo.config.cache_size_limit = 8


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def _mlp():
    torch.manual_seed(0)
    return (torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 4), torch.nn.LayerNorm(4)),
            torch.randn(3, 8))


def _encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                             norm_first=True, activation="gelu")
    return layer, torch.randn(2, 5, 16)


MODELS = {"mlp": _mlp, "encoder": _encoder}


def _step(model, fn, x, **mode):
    """Forward and backward under pam.arithmetic(); [output, grads by parameter name]."""
    for p in model.parameters():
        p.grad = None
    with pam.arithmetic(**mode):
        out = fn(x)
        (out * out).mean().backward()
    return {"out": out.detach(), **{k: p.grad.clone() for k, p in model.named_parameters()}}


def _differing(ref, got):
    assert ref.keys() == got.keys()
    return sorted(k for k in ref if not torch.equal(_bits(ref[k]), _bits(got[k])))


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_aot_eager_same_bits_one_graph(name, fullgraph):
    model, x = MODELS[name]()
    ref = _step(model, model, x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = pam.compile(model, backend="aot_eager", fullgraph=fullgraph)
    got = _step(model, compiled, x)
    assert _differing(ref, got) == []
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1           # it was compiled, once
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(compiled.graphs) == 2                          # forward and backward


def test_explain_finds_no_graph_break():
    """torch._dynamo.explain in the scope pam.compile calls run in: one graph, no break
    (the pam ops of layer 1 and their autograd Functions trace through)."""
    from pam.mode.compiling import _scope
    model, x = _mlp()
    torch._dynamo.reset()
    with pam.arithmetic(), _scope():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"}
    assert any("pam" in o or "autograd" in o or "higher_order" in o for o in ops), ops


@pytest.mark.parametrize("fullgraph", [True, False])
def test_inductor_mlp_same_bits(fullgraph):
    model, x = _mlp()
    ref = _step(model, model, x)
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="inductor", fullgraph=fullgraph)
    assert _differing(ref, _step(model, compiled, x)) == []
    assert len(compiled.graphs) == 2


def test_inductor_encoder_same_bits():
    """Inductor's own float32 sum loops would round differently (up to 16 ulp on this
    output); with the sums kept ATen's (pam.ordered_sum) every result is eager's."""
    model, x = _encoder()
    ref = _step(model, model, x)
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="inductor", fullgraph=True)
    assert _differing(ref, _step(model, compiled, x)) == []
    ops = {str(n.target) for g in compiled.graphs for n in g.graph.nodes}
    assert "pam.ordered_sum.default" in ops and "aten.sum.dim_IntList" not in ops


def test_final_graphs_multiply_no_float():
    model, x = _encoder()
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="aot_eager", fullgraph=True)
    _step(model, compiled, x)
    assert compiled.graphs and all(pam.audit.graph_float_ops(g) == []
                                   for g in compiled.graphs)
    assert any(str(n.target).startswith("pam.") for g in compiled.graphs
               for n in g.graph.nodes)
    # the check can fail: the same model's graphs without the mode multiply in float
    seen = []

    def keep(gm, example_inputs):
        seen.append(gm)
        return gm

    from torch._dynamo.backends.common import aot_autograd
    torch._dynamo.reset()
    plain = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    plain(x).sum().backward()
    names = {op for g in seen for op, _ in pam.audit.graph_float_ops(g)}
    assert {"mm", "_softmax", "native_layer_norm"} & names, names


class _Erf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.erf(self.fc(x))          # no PAM version


@pytest.mark.parametrize("fullgraph", [True, False])
def test_op_without_pam_version_is_refused(fullgraph):
    torch.manual_seed(0)
    model = _Erf()
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="aot_eager", fullgraph=fullgraph)
    with pytest.raises(pam.UnsupportedOpError, match=r"aten\.erf.*test_mode_compile\.py"):
        with pam.arithmetic():
            compiled(torch.randn(3, 8))


def test_non_strict_reports_and_the_graph_check_names_it():
    pam.exp(torch.randn(3, 8))               # eager PAM ops first: cached scalar constants
    torch.manual_seed(0)
    model = _Erf()
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match=r"aten\.erf.*strict=False"):
        with pam.arithmetic(strict=False) as ctx:
            compiled(torch.randn(3, 8)).sum().backward()
    assert ctx.reported == ["erf"]
    found = {op for g in compiled.graphs for op, _ in pam.audit.graph_float_ops(g)}
    assert found == {"erf"}       # its backward formula's exp and mul are PAM


def test_inference_same_bits():
    """Under no_grad AOT autograd compiles one inference graph: made PAM as well."""
    model, x = _encoder()
    with torch.no_grad(), pam.arithmetic():
        ref = model(x)
        torch._dynamo.reset()
        compiled = pam.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x)
    assert torch.equal(_bits(ref), _bits(got))
    assert len(compiled.graphs) == 1 and pam.audit.graph_float_ops(compiled.graphs[0]) == []


def test_plain_torch_compile_under_the_mode_is_not_compiled():
    """Without pam.compile Dynamo compiles nothing under the mode: fullgraph=True raises,
    otherwise every frame runs eagerly in PAM (never compiled float)."""
    model, x = _mlp()
    ref = _step(model, model, x)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="dispatch mode"):
        _step(model, torch.compile(model, backend="inductor", fullgraph=True), x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = _step(model, torch.compile(model, backend="inductor"), x)
    assert _differing(ref, got) == []
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_outside_the_mode_it_is_the_float_model():
    model, x = _mlp()
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="aot_eager")
    assert torch.equal(_bits(compiled(x)), _bits(model(x)))
    assert compiled.graphs == []
    with pam.arithmetic():
        pam_out = compiled(x)
    assert not torch.equal(_bits(pam_out), _bits(model(x)))


def test_under_the_audit_it_runs_eagerly_then_compiles():
    """Inside pam.audit.no_float_multiply() the model runs eagerly (the audit sees every
    op, nothing is flagged); a later call without the audit still compiles."""
    model, x = _mlp()
    ref = _step(model, model, x)
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="aot_eager", fullgraph=True)
    with pam.audit.no_float_multiply() as audit:
        got = _step(model, compiled, x)
    assert _differing(ref, got) == [] and compiled.graphs == []
    assert audit.ops_seen                                  # it saw the eager ops
    assert _differing(ref, _step(model, compiled, x)) == []
    assert len(compiled.graphs) == 2


def test_configuration_is_followed():
    """Each arithmetic configuration gets its own graphs (here backward="exact"), with the
    bits of eager under that configuration."""
    model, x = _mlp()
    torch._dynamo.reset()
    compiled = pam.compile(model, backend="aot_eager", fullgraph=True)
    for mode in ({}, {"backward": "exact"}, {"ops": "matmul"}):
        ref = _step(model, model, x, **mode)
        assert _differing(ref, _step(model, compiled, x, **mode)) == [], mode


def _train(model, fn, x, y, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        with pam.arithmetic(), \
                torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = torch.nn.functional.cross_entropy(fn(x).reshape(-1, 16), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.detach())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_training_loop_same_bits_compiles_once():
    """Three steps, torch.optim.AdamW outside the compiled model (eager, under the mode):
    losses and final weights bit-identical to eager; no recompilation."""
    model, x = _encoder()
    y = torch.randint(0, 16, (10,))
    ref_losses, ref_params = _train(model, model, x, y)
    model, x = _encoder()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses, params = _train(model, pam.compile(model, backend="aot_eager", fullgraph=True),
                            x, y)
    assert torch.equal(torch.stack(losses).view(torch.int32),
                       torch.stack(ref_losses).view(torch.int32))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ref_params, params))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(set(float(v) for v in losses)) > 1            # the weights did change
