"""The two ways of running the attention core as a unit -- the fused kernels
(pam.fused / pam.kernels.cpu_attn, cuda_attn) and the composite's kernels as one autograd
node (pam.functional._attention_node) -- against the composite
pam.functional._attention_composite, bit for bit: outputs and the three input gradients
(exact and approx), every mask kind, L != S, head dims that are not powers of 4, fully
masked rows, signed zeros, inf / NaN and large values (which turn the fused kernels' zero
skipping off); the routing rules; CUDA (simulator) == CPU on small shapes."""
import numpy as np
import pytest
import torch

from pam import dispatch as D
from pam import functional as PF
from pam.kernels import cpu_attn

NAN, INF = float("nan"), float("inf")
# "node": the node's forward in one lane-kernel launch where its rows are short (no mask,
# CPU); "node_chain": the node with that kernel off (the composite's kernels one by one).
PATHS = ["fused", "node", "node_chain"]


@pytest.fixture
def fused_on(monkeypatch):
    monkeypatch.setattr(PF, "FUSED_ATTENTION", True)


def _composite(q, k, v, attn_mask=None, is_causal=False, scale=None, offset=None,
               backward="exact", family="pam"):
    sc = PF.attention_scale(q.shape[-1]) if scale is None else float(scale)
    return PF._attention_composite(q, k, v, attn_mask, 0.0, is_causal, sc, offset,
                                   backward, False, family)[0]


def _run(path, q, k, v, go, grads=(True, True, True), **kw):
    """(out, dq, dk, dv) bits of SDPA through ``path``: "fused", "node" (the routing of
    scaled_dot_product_attention with FUSED_ATTENTION on / off) or "composite"; ``grads``:
    which of q, k, v require grad (a zero tensor stands for a gradient not asked)."""
    saved, PF.FUSED_ATTENTION = PF.FUSED_ATTENTION, path == "fused"
    saved_lanes = PF.LANES_MAX_ROWS
    if path == "node_chain":
        PF.LANES_MAX_ROWS = 0
    try:
        qq, kk, vv = (t.detach().clone().requires_grad_(r) for t, r in zip((q, k, v), grads))
        if path == "composite":
            out = _composite(qq, kk, vv, **kw)
        else:
            out = PF.scaled_dot_product_attention(qq, kk, vv, **kw)
            fn = out.grad_fn
            while type(fn).__name__.startswith(("View", "Reshape")):
                fn = fn.next_functions[0][0]
            node = type(fn).__name__
            assert node.startswith("_AttentionCore" if path == "fused" else
                                   "_AttentionNode"), node
        out.backward(go)
    finally:
        PF.FUSED_ATTENTION = saved
        PF.LANES_MAX_ROWS = saved_lanes
    return [(torch.zeros(()) if t is None else t).detach().view(torch.int32)
            for t in (out, qq.grad, kk.grad, vv.grad)]


def _same(q, k, v, go, path="fused", grads=(True, True, True), **kw):
    got = _run(path, q, k, v, go, grads, **kw)
    want = _run("composite", q, k, v, go, grads, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), (path, name, (a != b).sum().item())


def _inputs(seed, batch, L, S, E, Ev, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, L, E, generator=g) * spread
    k = torch.randn(*batch, S, E, generator=g) * spread
    v = torch.randn(*batch, S, Ev, generator=g)
    go = torch.randn(*batch, L, Ev, generator=g)
    return q, k, v, go, g


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "bool_causal",
                                  "float_causal", "bool_per_head"])
def test_bits_match_composite(backward, mask, path):
    batch, L, S, E, Ev = (2, 3), 5, 7, 6, 3
    q, k, v, go, g = _inputs(1, batch, L, S, E, Ev, spread=2.0)
    kw = dict(backward=backward, is_causal=mask.endswith("causal"))
    if mask.startswith("bool"):
        shape = (*batch, L, S) if mask == "bool_per_head" else (L, S)
        m = torch.rand(*shape, generator=g) > 0.35
        m[..., 1, :] = False                           # a fully masked row: zeros
        kw["attn_mask"] = m
    elif mask.startswith("float"):
        m = torch.randn(batch[0], 1, L, S, generator=g)
        m[..., 2, 4] = -INF
        kw["attn_mask"] = m
    _same(q, k, v, go, path, **kw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("L,S,E,Ev", [(1, 1, 1, 1), (4, 9, 5, 2), (9, 4, 3, 7),
                                      (33, 33, 16, 16)])
@pytest.mark.parametrize("offset,scale", [(None, None), (1.0552, 0.3), (0.9, 1.7)])
def test_shapes_offset_scale(L, S, E, Ev, offset, scale, path):
    q, k, v, go, _ = _inputs(L * 7 + S, (2,), L, S, E, Ev)
    for causal in (False, True):
        _same(q, k, v, go, path, is_causal=causal, offset=offset, scale=scale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["zeros", "inf_q", "nan_v", "inf_go", "large", "neg_zero"])
def test_edge_values(case, path):
    """Edge values, including those that turn zero skipping off (module attn_bits)."""
    q, k, v, go, g = _inputs(3, (2,), 6, 6, 5, 4)
    m = torch.rand(6, 6, generator=g) > 0.3
    if case == "zeros":
        q[0, 1] = 0.0
        k[1, 2] = -0.0
        k[0, 3, 1] = 1e-40                             # subnormal: a zero to PAM
        v[0, :3] = 0.0
        v[1, 2, 2] = -1e-41
        go[1, 4] = -0.0
        go[0, 2, 1] = 2e-39
    elif case == "inf_q":
        q[0, 2, 1] = INF
        k[1, 0, 3] = -INF
    elif case == "nan_v":
        v[1, 3, 2] = NAN
        v[0, 5, 0] = INF
    elif case == "inf_go":
        go[0, 1, 1] = INF
        go[1, 4, 0] = NAN
    elif case == "large":
        q = q * 1e20
        v[0] = v[0] * 3e37
    else:
        q, k, v, go = (torch.where(t == t, -torch.zeros_like(t), t) for t in (q, k, v, go))
    for backward in ("exact", "approx"):
        _same(q, k, v, go, path, is_causal=True, backward=backward)
        _same(q, k, v, go, path, attn_mask=m, backward=backward)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_and_3d_inputs(path):
    q, k, v, go, _ = _inputs(4, (3,), 5, 6, 4, 4)
    _same(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, go, path, is_causal=True)
    _same(q[0], k[0], v[0], go[0], path)                # 2-D: one head


@pytest.mark.parametrize("grads", [(False, False, True), (True, False, False),
                                   (False, True, True)])
def test_node_partial_gradients(grads):
    """The node computes only the gradients asked for, with the composite's bits."""
    q, k, v, go, _ = _inputs(7, (2,), 4, 5, 3, 2)
    _same(q, k, v, go, "node", grads, is_causal=True)


@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_node_lmul_family(backward):
    q, k, v, go, _ = _inputs(8, (2, 2), 4, 4, 5, 3)
    _same(q, k, v, go, "node", is_causal=True, family="lmul", backward=backward)


def test_node_forward_without_grad():
    q, k, v, _, _ = _inputs(9, (2,), 4, 6, 4, 3)
    with torch.no_grad():
        got = PF.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = _composite(q, k, v, is_causal=True)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_node_not_for_a_tensor_passed_twice():
    """Self-attention on one tensor passed as query and key goes to the composite (whose
    autograd sums the two gradients in its own order)."""
    q, _, v, _, _ = _inputs(10, (2,), 4, 4, 3, 3)
    q.requires_grad_(True)
    out = PF.scaled_dot_product_attention(q, q, v)
    assert not type(out.grad_fn).__name__.startswith("_AttentionNode")


def test_node_gradient_layouts_match_the_composite():
    """The node hands autograd gradients in the composite's memory layouts: torch's
    reductions downstream (e.g. a projection bias's gradient, a sum over rows) sum in an
    order that depends on the layout."""
    q, k, v, go, _ = _inputs(12, (2, 3), 4, 5, 6, 3)
    strides = {}
    for path in ("node", "composite"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        seen = strides[path] = []
        inner = [t + 0.0 for t in leaves]
        for t in inner:
            t.register_hook(lambda g: seen.append((tuple(g.shape), g.stride())))
        out = (PF.scaled_dot_product_attention(*inner, is_causal=True) if path == "node"
               else _composite(*inner, is_causal=True))
        out.backward(go)
    assert len(strides["node"]) == 3
    assert sorted(strides["node"]) == sorted(strides["composite"])


@pytest.mark.parametrize("batch,L,S,causal", [((37,), 3, 5, False), ((37,), 5, 5, True),
                                              ((16,), 16, 16, True), ((3, 7), 1, 9, False)])
@pytest.mark.parametrize("backward", ["exact", "approx"])
def test_node_lanes_many_heads(batch, L, S, causal, backward):
    """The lane kernel over whole groups of heads, a partial last group and the longest
    rows it takes, against the composite."""
    q, k, v, go, _ = _inputs(13, batch, L, S, 6, 5, spread=1.5)
    _same(q, k, v, go, "node", is_causal=causal, backward=backward)


def test_node_forward_launch(monkeypatch):
    """Short rows without a mask on CPU: the node's forward is one launch of the lane
    kernel; a mask, the L-Mul family or rows longer than LANES_MAX_ROWS take the
    composite's kernels."""
    q, k, v, _, g = _inputs(14, (2, 2), 4, 5, 3, 3)
    mask = torch.rand(4, 5, generator=g) > 0.3

    def forward(q, k, v, **kw):
        qq = q.clone().requires_grad_(True)
        with D.recording_launches() as names:
            PF.scaled_dot_product_attention(qq, k, v, **kw)
        return names

    assert forward(q, k, v, is_causal=True) == ["attention_forward_lanes"]
    assert "attention_forward_lanes" not in forward(q, k, v, attn_mask=mask)
    assert "attention_forward_lanes" not in forward(q, k, v, family="lmul")
    monkeypatch.setattr(PF, "LANES_MAX_ROWS", 4)
    assert "attention_forward_lanes" not in forward(q, k, v)


def test_node_launches(monkeypatch):
    """One autograd node, launching the composite's kernels, as many times each (the
    forward's lane kernel off)."""
    monkeypatch.setattr(PF, "LANES_MAX_ROWS", 0)
    q, k, v, go, _ = _inputs(11, (2, 2), 4, 4, 3, 3)
    launches = {}
    for path in ("node", "composite"):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        with D.recording_launches() as forward:
            out = (PF.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                   if path == "node" else _composite(qq, kk, vv, is_causal=True))
        with D.recording_launches() as backward:
            out.backward(go)
        launches[path] = (sorted(forward), sorted(backward))
        if path == "node":
            assert type(out.grad_fn).__name__ == "_AttentionNodeBackward"
            assert [f.variable for f, _ in out.grad_fn.next_functions[:3]] == [qq, kk, vv]
    assert launches["node"] == launches["composite"]
    assert launches["node"][0].count("matmul") == 2


def test_one_launch_per_pass(fused_on):
    q, k, v, go, _ = _inputs(5, (2, 2), 4, 4, 3, 3)
    q.requires_grad_(True)
    with D.recording_launches() as forward:
        out = PF.scaled_dot_product_attention(q, k, v, is_causal=True)
    with D.recording_launches() as backward:
        out.backward(go)
    assert forward == ["attention_forward"]
    assert backward == ["attention_backward"]


@pytest.mark.parametrize("call", ["dropout", "lmul", "need_weights", "broadcast_key",
                                  "float_mask_grad", "mask_grows", "off_switch"])
def test_routing_to_composite(call, fused_on, monkeypatch):
    """Calls the fused core does not cover run the composite (no attention launch)."""
    q, k, v, go, _ = _inputs(6, (2, 2), 4, 4, 3, 3)
    kw, need_weights = {}, False
    if call == "dropout":
        kw["dropout_p"] = 0.5
    elif call == "lmul":
        kw["family"] = "lmul"
    elif call == "need_weights":
        need_weights = True
    elif call == "broadcast_key":
        k, v = k[:1], v[:1]
    elif call == "float_mask_grad":
        kw["attn_mask"] = torch.zeros(4, 4, requires_grad=True)
    elif call == "mask_grows":
        kw["attn_mask"] = torch.ones(3, 2, 2, 4, 4, dtype=torch.bool)
    else:
        monkeypatch.setattr(PF, "FUSED_ATTENTION", False)
    with D.recording_launches() as names:
        PF._attention(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), False, None,
                      None, "exact", need_weights, kw.get("family", "pam"))
    assert names and "attention_forward" not in names


def test_fused_core_off_by_default():
    """The fused core is off by default (slower than the composite's kernels on CPU,
    validation/bench_attention.py); the calls it covers then run as one node."""
    assert PF.FUSED_ATTENTION is False


def test_kernel_argument_errors():
    a = np.zeros(12, np.int32)
    with pytest.raises(ValueError, match="whole heads"):
        cpu_attn.attention_forward(a, a, a, a[:1], 2, 2, 3, 3, 0, False, 0, 0x3F800000, 0,
                                   a[:7], a[:8], a[:8], a[:8])
    with pytest.raises(ValueError, match="mstride"):
        cpu_attn.attention_forward(a, a, a, a[:1], 2, 2, 3, 3, 0, False, 1, 0x3F800000, 0,
                                   a, a[:8], a[:8], a[:8])
    with pytest.raises(ValueError, match="mode"):
        cpu_attn.attention_forward(a, a, a, a[:1], 2, 2, 3, 3, 0, False, 5, 0x3F800000, 0,
                                   a, a[:8], a[:8], a[:8])


# --------------------------------------------------------------------------- CUDA
def _kernel_case(seed, mode, special):
    rng = np.random.default_rng(seed)
    P, L, S, E, Ev = 2, 3, 4, 3, 2
    q, k, v, go = ((rng.standard_normal(n) * 2).astype(np.float32)
                   for n in (P * L * E, P * S * E, P * S * Ev, P * L * Ev))
    if special:
        q[1], v[3], go[2], k[0] = INF, NAN, -0.0, 0.0
    mask = {0: np.zeros(1, np.int32), 1: np.array([1, 0, 1, 0] * 3, np.int32),
            2: rng.standard_normal(L * S).astype(np.float32).view(np.int32)}[mode]
    if mode == 1:
        mask[4:8] = 0                                  # a fully masked row
    return (P, L, S, E, Ev), [x.view(np.int32) for x in (q, k, v, go)], mask


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("special", [False, True])
def test_cuda_matches_cpu(mode, special):
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    from numba import cuda
    if not cuda.is_available():
        pytest.skip("no CUDA GPU and the CUDA simulator is off")
    from pam.kernels import cuda_attn
    (P, L, S, E, Ev), (q, k, v, go), mask = _kernel_case(mode, mode, special)
    res = {}
    for name, mod in (("cpu", cpu_attn), ("cuda", cuda_attn)):
        fw = [np.zeros(n, np.int32) for n in (P * L * Ev, P * L * S, P * L * S, P * L * 2)]
        mod.attention_forward(q, k, v, mask, L, S, E, Ev, 0, True, mode, 0x3F000000, 0, *fw)
        res[name] = fw
        for exact in (True, False):
            grads = [np.zeros_like(x) for x in (q, k, v)]
            mod.attention_backward(q, k, v, go, mask, *fw[1:], L, S, E, Ev, 0, True, mode,
                                   0x3F000000, 0, exact, *grads)
            res[name] = res[name] + grads
    for a, b in zip(res["cpu"], res["cuda"]):
        np.testing.assert_array_equal(a, b)


def test_compiled_same_bits(fused_on):
    """torch.compile (aot_eager, fullgraph): the custom ops pam::attention_forward /
    attention_backward trace as graph nodes, with eager's bits."""
    q, k, v, go, g = _inputs(7, (2, 2), 5, 6, 4, 3)
    m = torch.rand(5, 6, generator=g) > 0.3

    def step(q, k, v):
        return PF.scaled_dot_product_attention(q, k, v, attn_mask=m)

    res = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(go)
        res.append([t.detach().view(torch.int32) for t in (out, qq.grad, kk.grad, vv.grad)])
    for a, b in zip(*res):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(
        lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, attn_mask=m))(q, k, v)
    ops = [str(n.target) for gr in explained.graphs for n in gr.graph.nodes
           if n.op == "call_function"]
    assert explained.graph_break_count == 0, explained.break_reasons
    assert any("pam.attention_forward" in o for o in ops), ops
