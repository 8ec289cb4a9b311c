"""torch.compile of PAM models: custom ops (pam.library), same bits as eager, no graph breaks.

Matrix (CPU):
* a transformer block of pam.nn (LayerNorm, MultiheadAttention, Linear, GELU), backend
  aot_eager, fullgraph True / False: outputs and every gradient bit-identical to eager,
  one graph and no graph break (torch._dynamo.explain);
* an MLP of pam.nn (Linear, GELU), backend inductor, fullgraph True / False: bit-identical;
* a plain torch model under the op-level mode (pam.arithmetic) with plain torch.compile:
  Dynamo refuses frames run under a non-infra TorchDispatchMode, so fullgraph=True raises
  and fullgraph=False runs every frame eagerly (same bits as eager); pam.compile compiles
  it (tests/test_mode_compile.py);
* a 5-step training loop of fixed shapes compiles once (no recompile).
"""
import math

import pytest
import torch

import pam
import pam.nn as pnn
from pam import library as L

torch._dynamo.config.cache_size_limit = 8


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def _assert_same(ref, got):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.shape == b.shape, i
        assert torch.equal(_bits(a), _bits(b)), f"tensor {i} differs"


# --------------------------------------------------------------------------- scalars
SCALARS = [1.0, 2.0, 3.0, 0.1, -7.5, 1e-30, 3e38, 1e-45, 0.0, -0.0, math.inf, -math.inf,
           math.nan, 64.0, 48.0, 0.9]


@pytest.mark.parametrize("b", [3.0, 0.5, -1.7, 1e-20, 0.0, math.inf])
def test_scalar_helpers_match_tensor_ops(b):
    """pam_scalar / pad_scalar (pure Python on bit patterns) give pam.mul / pam.div bits."""
    a = torch.tensor(SCALARS, dtype=torch.float32)
    mul = pam.mul(a, b)
    div = pam.div(a, b)
    for i, x in enumerate(SCALARS):
        got_m = torch.tensor(L.pam_scalar(x, b), dtype=torch.float32)
        got_d = torch.tensor(L.pad_scalar(x, b), dtype=torch.float32)
        assert torch.equal(_bits(got_m), _bits(mul[i])), (x, b)
        assert torch.equal(_bits(got_d), _bits(div[i])), (x, b)


def test_sqrt_scalar_and_attention_scale_match_tensor_ops():
    xs = [1.0, 2.0, 3.0, 4.0, 16.0, 48.0, 64.0, 0.3, 0.0, math.inf]
    ref = pam.sqrt(torch.tensor(xs, dtype=torch.float32))
    for i, x in enumerate(xs):
        assert torch.equal(_bits(torch.tensor(L.pa_sqrt_scalar(x))), _bits(ref[i])), x
    for d in (1, 3, 8, 16, 48, 64):
        s = pam.div(torch.ones(()), pam.sqrt(torch.tensor(float(d))))
        assert torch.equal(_bits(torch.tensor(pam.functional.attention_scale(d))), _bits(s))


# --------------------------------------------------------------------------- custom ops
def _grads(fn, *inputs):
    xs = [x.clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return [out.detach()] + [x.grad for x in xs]


CASES = {
    "mul": (lambda a, b: pam.mul(a, b), ((3, 5), (5,))),
    "mul_approx": (lambda a, b: pam.mul(a, b, offset=1.0552, backward="approx"), ((3, 5), (3, 5))),
    "div": (lambda a, b: pam.div(a, b), ((4, 3), (4, 3))),
    "div_approx": (lambda a, b: pam.div(a, b, backward="approx"), ((4, 3), (1,))),
    "exp2_log2": (lambda a: pam.log2(pam.exp2(a)), ((6,),)),
    "matmul": (lambda a, b: pam.matmul(a, b), ((2, 3, 4), (2, 4, 5))),
    "matmul_shared": (lambda a, b: pam.matmul(a, b, backward="approx"), ((2, 3, 4), (4, 5))),
    "conv2d": (lambda x, w: pam.conv2d(x, w, padding=1, stride=(1, 2)), ((2, 2, 5, 6), (3, 2, 3, 3))),
    "gelu": (lambda x: pnn.functional.gelu(x), ((7,),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_op_path_gives_the_direct_bits(case, monkeypatch):
    """Forcing every call through torch.ops.pam.* gives the bits of the direct eager path."""
    fn, shapes = CASES[case]
    torch.manual_seed(0)
    inputs = [torch.randn(s) for s in shapes]
    ref = _grads(fn, *inputs)
    calls = []
    monkeypatch.setattr(L, "_direct", lambda *t: calls.append(1) and False)
    got = _grads(fn, *inputs)
    assert calls, "the custom-op path was not taken"
    _assert_same(ref, got)


@pytest.mark.parametrize("op,args", [
    ("binary_map", lambda: ("mul", torch.randn(3, 4), torch.randn(4), 0)),
    ("unary_map", lambda: ("exp2", torch.randn(5),)),
    ("matmul", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5), 0)),
    ("matmul_exact_grad_left", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5),
                                        torch.randn(2, 3, 5), 0)),
    ("matmul_exact_grad_right", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5),
                                         torch.randn(2, 3, 5), 0)),
    ("conv_forward", lambda: (torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), [1, 1],
                              [1, 1], [1, 1], [1, 1], 1, 0)),
    ("gelu_backward", lambda: (torch.randn(6), torch.randn(6), True)),
    ("matmul", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5), 1 << 19, "lmul")),
    ("conv_forward", lambda: (torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), [1, 1],
                              [1, 1], [1, 1], [1, 1], 1, 1 << 20, "lmul")),
    ("conv_grad_weight", lambda: (torch.randn(1, 3, 5, 5), torch.randn(1, 2, 5, 5),
                                  torch.randn(3, 2, 3, 3), [1, 1], [1, 1], [1, 1], 1, False,
                                  1 << 19, "lmul")),
    ("quantize", lambda: (torch.randn(7), 3, True)),
    ("softmax_forward", lambda: (torch.randn(3, 5, 4), 1, 0, False)),
    ("softmax_backward", lambda: (torch.randn(3, 4), torch.randn(3, 4),
                                  pam.fused.softmax_forward(torch.randn(3, 4), 1,
                                                            stats=True)[1],
                                  1, 1 << 19, True, False)),
])
def test_opcheck(op, args):
    """Schema (no mutation, no aliasing) and fake implementation agree with the kernels."""
    torch.library.opcheck(getattr(torch.ops.pam, op).default, args(),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_fused_entry_points_compile_to_custom_ops(dim):
    """pam.fused's GELU and softmax rows trace as torch.ops.pam.* under fullgraph, with the
    eager bits (including a softmax along a middle dimension, whose result is laid out
    with ``dim`` innermost)."""
    from pam import fused

    def fn(x, g):
        p = fused.softmax_forward(x, dim=dim, offset=1.0552)
        return (p, fused.softmax_backward(g, x, dim=dim, backward="approx"),
                fused.gelu_forward(x), fused.gelu_backward(g, x))

    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    x[0, 0, 0] = -math.inf
    ref = fn(x, g)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(x, g)
    assert explained.graph_break_count == 0, explained.break_reasons
    targets = {str(n.target) for gr in explained.graphs for n in gr.graph.nodes}
    assert {"pam.softmax_forward.default", "pam.softmax_backward.default",
            "pam.gelu_forward.default", "pam.gelu_backward.default"} <= targets, targets
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, g)
    _assert_same(ref, got)
    assert all(a.stride() == b.stride() for a, b in zip(ref, got))


# --------------------------------------------------------------------------- models
class Block(torch.nn.Module):
    """Pre-LN transformer block of pam.nn modules."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.ln1 = pnn.LayerNorm(d)
        self.attn = pnn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = pnn.LayerNorm(d)
        self.fc1 = pnn.Linear(d, 2 * d)
        self.act = pnn.GELU()
        self.fc2 = pnn.Linear(2 * d, d)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def _step(model, fn, x):
    for p in model.parameters():
        p.grad = None
    xx = x.clone().requires_grad_()
    out = fn(xx)
    out.sum().backward()
    return [out.detach(), xx.grad] + [p.grad for p in model.parameters()]


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block(), torch.randn(2, 4, 8)


@pytest.mark.parametrize("fullgraph", [True, False])
def test_block_aot_eager_same_bits(block, fullgraph):
    model, x = block
    ref = _step(model, model, x)
    torch._dynamo.reset()
    got = _step(model, torch.compile(model, backend="aot_eager", fullgraph=fullgraph), x)
    _assert_same(ref, got)


def test_block_traces_without_graph_breaks(block):
    model, x = block
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"}
    assert any("pam" in o or "autograd" in o or "higher_order" in o for o in ops), ops


@pytest.mark.parametrize("fullgraph", [True, False])
def test_mlp_inductor_same_bits(fullgraph):
    torch.manual_seed(0)
    model = torch.nn.Sequential(pnn.Linear(8, 16), pnn.GELU(), pnn.Linear(16, 4))
    x = torch.randn(3, 8)
    ref = _step(model, model, x)
    torch._dynamo.reset()
    got = _step(model, torch.compile(model, backend="inductor", fullgraph=fullgraph), x)
    _assert_same(ref, got)


@pytest.mark.parametrize("kw", [{"offset": 1.0552}, {"family": "pam_offset"},
                                {"family": "lmul", "operands": "e4m3"},
                                {"family": "pam", "operands": "bfloat16"}])
def test_offsets_and_families_trace_in_one_graph(kw):
    """Offsets, families and operand formats are constants of the trace: fullgraph
    compiles, and forward and gradients keep the eager bits."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(pnn.Linear(8, 16, offset=kw.get("offset")), pnn.GELU(),
                                pnn.Linear(16, 4))
    for m in model.modules():
        if isinstance(m, pnn.Linear) and "family" in kw:
            m.offset = pam.families.resolve(kw["family"]).offset
            m.family = "pam" if kw["family"] == "pam_offset" else kw["family"]
            m.operands = kw.get("operands", "float32")
    x = torch.randn(3, 8)
    ref = _step(model, model, x)
    torch._dynamo.reset()
    got = _step(model, torch.compile(model, backend="aot_eager", fullgraph=True), x)
    _assert_same(ref, got)


def test_pam_compile_inductor_keeps_eager_bits_outside_the_mode(block):
    """pam.compile outside any context: Inductor with ATen's float32 sums, so a pam.nn
    transformer block (layer-norm means, softmax sums, bias gradients) keeps eager's bits."""
    model, x = block
    ref = _step(model, model, x)
    torch._dynamo.reset()
    got = _step(model, pam.compile(model, backend="inductor", fullgraph=True), x)
    _assert_same(ref, got)


def test_cross_entropy_with_index_targets_traces_in_one_graph():
    """The target range check is an async assert under compile (no data-dependent graph
    break); the loss and gradient keep the eager bits."""
    from pam import functional as PF
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 1, 3])

    def loss_fn(x, t):
        return PF.cross_entropy(x, t, ignore_index=-100, label_smoothing=0.1)
    ref = loss_fn(logits, target)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch._dynamo.reset()
    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(logits, target)
    (g_got,) = torch.autograd.grad(got, logits)
    _assert_same([ref.detach(), g_ref], [got.detach(), g_got])


def test_training_loop_compiles_once(block):
    """Five steps of fixed shapes with an optimizer outside the compiled model: one
    compilation, no recompile (error_on_recompile turns a recompile into an error)."""
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 4, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = pam.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for step in range(5):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss = compiled(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(set(losses)) > 1          # the parameters did change


# --------------------------------------------------------------------------- op-level mode
def _mode_model():
    torch.manual_seed(0)
    return (torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 4)), torch.randn(3, 8))


def _mode_step(model, fn, x):
    for p in model.parameters():
        p.grad = None
    with pam.arithmetic():
        out = fn(x)
        out.sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


def test_mode_fullgraph_is_refused():
    """Under pam.arithmetic() (a TorchDispatchMode) Dynamo compiles no frame: with
    fullgraph=True torch.compile raises and names the dispatch mode."""
    model, x = _mode_model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="dispatch mode"):
        _mode_step(model, compiled, x)


def test_mode_without_fullgraph_runs_eagerly():
    """Without fullgraph every frame is skipped and runs eagerly under the mode: the
    eager bits, and nothing compiled."""
    model, x = _mode_model()
    ref = _mode_step(model, model, x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = _mode_step(model, torch.compile(model, backend="aot_eager"), x)
    _assert_same(ref, got)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_square_gradient_through_an_alias():
    """pam.mul(x, x) (the operand aliased for Dynamo) gives x the sum of both operand
    gradients, as two separate leaves holding the same values do."""
    torch.manual_seed(2)
    v = torch.randn(9)
    g = torch.randn(9)
    x = v.clone().requires_grad_()
    pam.mul(x, x).backward(g)
    a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
    pam.mul(a, b).backward(g)
    assert torch.equal(_bits(x.grad), _bits(a.grad + b.grad))


def test_attention_scale_is_a_constant_per_head_dim():
    """The scale computed at trace time follows the head dimension (8, then 16: a new
    graph for the new shapes), same bits as eager; no graph break."""
    sdpa = pnn.functional.scaled_dot_product_attention
    torch._dynamo.reset()
    compiled = torch.compile(sdpa, backend="aot_eager", fullgraph=True)
    for E in (8, 16):
        torch.manual_seed(E)
        q, k, v = (torch.randn(1, 2, 3, E) for _ in range(3))
        assert torch.equal(_bits(compiled(q, k, v, is_causal=True)),
                           _bits(sdpa(q, k, v, is_causal=True)))
