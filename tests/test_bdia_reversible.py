"""bdia_pam.ReversibleStack: bit-exact inversion, gradients, eval mode, errors."""
from fractions import Fraction

import pytest
import torch

import pam
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import bdia_pam
from bdia_pam import GridRangeError, NonDeterministicBlockError, ReversibleStack, quant

pam = pytest.importorskip("pam")

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def bits(t):
    return t.detach().contiguous().view(torch.int32)


def small_init(module, gen, scale):
    for p in module.parameters():
        with torch.no_grad():
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * scale)


class FloatMLP(nn.Module):
    def __init__(self, width, gen, scale=0.5):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        small_init(self, gen, scale)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class PamMLP(nn.Module):
    def __init__(self, width, gen, scale=0.5):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(2 * width, width))
        self.b1 = nn.Parameter(torch.empty(2 * width))
        self.w2 = nn.Parameter(torch.empty(width, 2 * width))
        small_init(self, gen, scale)

    def forward(self, x):
        return pam.linear(torch.tanh(pam.linear(x, self.w1, self.b1)), self.w2)


class PamAttention(nn.Module):
    """Attention-like block: PAM projections and PAM QK^T / AV, float softmax."""

    def __init__(self, width, gen, scale=0.5):
        super().__init__()
        self.wq = nn.Parameter(torch.empty(width, width))
        self.wk = nn.Parameter(torch.empty(width, width))
        self.wv = nn.Parameter(torch.empty(width, width))
        small_init(self, gen, scale)

    def forward(self, x):  # x: (batch, seq, width); bounded output for any x
        x = torch.tanh(x)
        q, k, v = (pam.linear(x, w) for w in (self.wq, self.wk, self.wv))
        a = torch.softmax(pam.matmul(q, k.transpose(-1, -2)), dim=-1)
        return pam.matmul(a, v)


KINDS = {"float": FloatMLP, "pam": PamMLP, "attn": PamAttention}


def make_blocks(kind, depth, width, seed, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    if kind == "mixed":
        kinds = ["pam", "attn", "float"]
        return [KINDS[kinds[i % 3]](width, gen, scale) for i in range(depth)]
    return [KINDS[kind](width, gen, scale) for _ in range(depth)]


def random_gamma(batch, depth, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 2, (batch, depth - 1), generator=g).bool()
    return torch.where(b, torch.tensor(0.5), torch.tensor(-0.5))




# --------------------------------------------------------------------------- inversion

@SETTINGS
@given(kind=st.sampled_from(["float", "pam", "mixed"]), depth=st.integers(2, 12),
       batch=st.integers(1, 3), seq=st.integers(1, 4), width=st.sampled_from([4, 8, 12]),
       frac_bits=st.integers(4, 12), log_scale=st.integers(-6, 18), seed=st.integers(0, 2 ** 16))
def test_inverse_is_bit_exact(kind, depth, batch, seq, width, frac_bits, log_scale, seed):
    # input magnitude up to 1/4 of the grid range 2^(24-l); the branches stay O(1)
    scale = 2.0 ** min(log_scale, 22 - frac_bits)
    blocks = make_blocks(kind, depth, width, seed)
    stack = ReversibleStack(blocks, frac_bits=frac_bits)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = (torch.rand(batch, seq, width, generator=g) * 2 - 1) * scale
    gamma = random_gamma(batch, depth, seed + 2)
    record = stack.forward_record(x0, gamma)
    assert record.side_bits.dtype == torch.uint8 and record.side_bits.is_contiguous()
    assert record.side_bits.shape == (depth - 1, (x0.numel() + 7) // 8)
    assert torch.equal(record.gamma, gamma)
    back = stack.inverse(record)
    assert torch.equal(bits(back), bits(quant.round_grid(x0, frac_bits)))


def bdia_reference(blocks, x0, gamma, l):
    """Slow independent forward: the brief's formula on Python Fractions, element by element."""
    def Q(v):
        return Fraction(round(v * 2 ** l), 2 ** l)

    def to_t(vals):
        return torch.tensor([float(v) for v in vals], dtype=torch.float32).view(x0.shape)

    per_sample = x0[0].numel()
    xs = [[Q(Fraction(float(v))) for v in x0.reshape(-1).tolist()]]
    h = blocks[0](to_t(xs[0])).reshape(-1).tolist()
    xs.append([a + Q(Fraction(b)) for a, b in zip(xs[0], h)])
    for k in range(1, len(blocks)):
        h = blocks[k](to_t(xs[k])).reshape(-1).tolist()
        nxt = []
        for i, (xp, xc, hi) in enumerate(zip(xs[k - 1], xs[k], h)):
            g = Fraction(float(gamma[i // per_sample, k - 1]))
            s = (xp * 2 ** l).numerator % 2
            nxt.append(Q(g * (xp + Fraction(s, 2 ** l))) + Q((1 - g) * xc + (1 + g) * Fraction(hi)))
        xs.append(nxt)
    return to_t(xs[-1]), to_t(xs[-2])


@pytest.mark.parametrize("kind", ["float", "pam"])
def test_forward_matches_fraction_reference(kind):
    depth, l = 5, 6
    blocks = make_blocks(kind, depth, 4, seed=3, scale=1.0)
    stack = ReversibleStack(blocks, frac_bits=l)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 3
    gamma = random_gamma(2, depth, 7)
    rec = stack.forward_record(x0, gamma)
    x_last, x_prev = bdia_reference(blocks, x0, gamma, l)
    assert torch.equal(bits(rec.x_last), bits(x_last))
    assert torch.equal(bits(rec.x_prev), bits(x_prev))
    # the training forward returns the same x_K
    assert torch.equal(bits(stack(x0, gamma)), bits(x_last))


def test_single_block_stack():
    blocks = make_blocks("float", 1, 4, seed=0)
    stack = ReversibleStack(blocks, frac_bits=9)
    x0 = torch.randn(3, 4)
    rec = stack.forward_record(x0, torch.zeros(3, 0))
    assert rec.side_bits.shape[0] == 0
    assert torch.equal(bits(stack.inverse(rec)), bits(quant.round_grid(x0, 9)))
    x = x0.clone().requires_grad_(True)
    stack(x).sum().backward()
    assert x.grad is not None and blocks[0].fc1.weight.grad is not None


# --------------------------------------------------------------------------- gradients

def grads_of(stack, x0, gamma, weight, rng_seed=None):
    stack.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    y = stack(x, gamma)
    (y * weight).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in stack.parameters()]


def assert_close_rel(a, b, rel=1e-5):
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale).item() <= rel


@settings(SETTINGS, max_examples=10)
@given(kind=st.sampled_from(["float", "pam", "attn"]), depth=st.integers(2, 6),
       frac_bits=st.integers(4, 12), seed=st.integers(0, 2 ** 16))
def test_gradients_match_stored_activation_autograd(kind, depth, frac_bits, seed):
    blocks = make_blocks(kind, depth, 8, seed)
    rev = ReversibleStack(blocks, frac_bits=frac_bits)
    ref = ReversibleStack(blocks, frac_bits=frac_bits, reversible=False)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 8, generator=g) * 2
    w = torch.randn(2, 3, 8, generator=g)
    gamma = random_gamma(2, depth, seed)
    y1, gx1, gp1 = grads_of(rev, x0, gamma, w)
    y2, gx2, gp2 = grads_of(ref, x0, gamma, w)
    assert torch.equal(bits(y1), bits(y2))
    assert_close_rel(gx1, gx2)
    for a, b in zip(gp1, gp2):
        assert_close_rel(a, b)


def test_gradient_values_straight_through():
    # identity-free check of the chain rule on a 2-block stack with linear branches
    l = 12
    lin = [nn.Linear(3, 3, bias=False) for _ in range(2)]
    with torch.no_grad():
        lin[0].weight.copy_(torch.eye(3) * 0.25)
        lin[1].weight.copy_(torch.eye(3) * 0.5)
    stack = ReversibleStack(lin, frac_bits=l)
    x = torch.ones(2, 3, requires_grad=True)
    gamma = torch.tensor([[0.5], [-0.5]])
    stack(x, gamma).sum().backward()
    # x1 = x0 + 0.25 x0; x2 = g x0 + (1-g) x1 + (1+g) 0.5 x1
    # dx2/dx0 = g + ((1-g) + 0.5 (1+g)) * 1.25
    expected = [0.5 + (0.5 + 0.75) * 1.25, -0.5 + (1.5 + 0.25) * 1.25]
    assert x.grad[:, 0].tolist() == expected


def test_shared_parameters_accumulate():
    gen = torch.Generator().manual_seed(1)
    shared = FloatMLP(4, gen)
    other = FloatMLP(4, gen)
    blocks = [shared, other, shared, other]
    x0, w = torch.randn(2, 4), torch.randn(2, 4)
    gamma = random_gamma(2, 4, 0)
    _, gx1, gp1 = grads_of(ReversibleStack(blocks), x0, gamma, w)
    _, gx2, gp2 = grads_of(ReversibleStack(blocks, reversible=False), x0, gamma, w)
    assert len(gp1) == 8  # 2 distinct modules x 4 tensors, each listed once
    assert_close_rel(gx1, gx2)
    for a, b in zip(gp1, gp2):
        assert_close_rel(a, b)


class DropoutMLP(nn.Module):
    def __init__(self, width, gen):
        super().__init__()
        self.mlp = FloatMLP(width, gen)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.mlp(x))


def test_dropout_replayed_from_rng_state():
    gen = torch.Generator().manual_seed(0)
    blocks = [DropoutMLP(8, gen) for _ in range(5)]
    x0, w = torch.randn(4, 8), torch.randn(4, 8)
    gamma = random_gamma(4, 5, 1)
    y1, gx1, gp1 = grads_of(ReversibleStack(blocks), x0, gamma, w, rng_seed=11)
    after_rev = torch.rand(1)
    y2, gx2, gp2 = grads_of(ReversibleStack(blocks, reversible=False), x0, gamma, w, rng_seed=11)
    after_ref = torch.rand(1)
    assert torch.equal(bits(y1), bits(y2))
    assert torch.equal(after_rev, after_ref)  # the backward left the global RNG alone
    assert_close_rel(gx1, gx2)
    for a, b in zip(gp1, gp2):
        assert_close_rel(a, b)
    # without RNG preservation the dropout masks differ on recomputation
    stack = ReversibleStack(blocks, preserve_rng_state=False)
    with pytest.raises(NonDeterministicBlockError, match="block 4 is not deterministic"):
        grads_of(stack, x0, gamma, w, rng_seed=11)


class PamReluMLP(PamMLP):
    def forward(self, x):
        return pam.linear(torch.relu(pam.linear(x, self.w1, self.b1)), self.w2)


@pytest.mark.parametrize("reversible", [True, False])
def test_training_step_passes_pam_audit(reversible):
    audit = pytest.importorskip("pam.audit")
    gen = torch.Generator().manual_seed(0)
    blocks = [PamReluMLP(8, gen) for _ in range(4)]
    stack = ReversibleStack(blocks, frac_bits=9, seed=0, reversible=reversible)
    x = torch.randn(2, 3, 8).requires_grad_(True)
    pam.linear(x, blocks[0].w1)  # compile outside the audited region
    with audit.no_float_multiply() as mode:
        y = stack(x)
        y.sum().backward()
        stack.eval()
        stack(x).sum().backward()
        rec = stack.train().forward_record(x.detach())
        stack.inverse(rec)
    assert mode.ops_seen.get("floor", 0) > 0  # the grid code really ran under the audit
    assert all(p.grad is not None for p in stack.parameters())


# --------------------------------------------------------------------------- eval, rng

@pytest.mark.parametrize("kind", ["float", "pam"])
def test_eval_is_quantized_residual_stack(kind):
    l = 7
    blocks = make_blocks(kind, 5, 8, seed=2)
    stack = ReversibleStack(blocks, frac_bits=l).eval()
    x0 = torch.randn(3, 2, 8) * 4
    x = quant.round_grid(x0, l)
    for b in blocks:
        x = x + quant.round_grid(b(x), l)
    with torch.no_grad():
        assert torch.equal(bits(stack(x0)), bits(x))
    xg = x0.clone().requires_grad_(True)
    y = stack(xg)  # with grad: straight-through, same values
    assert torch.equal(bits(y), bits(x))
    y.sum().backward()
    assert xg.grad is not None
    with pytest.raises(ValueError, match="gamma"):
        stack(x0, torch.zeros(3, 4))


def test_gamma_seeding():
    blocks = make_blocks("float", 4, 4, seed=0)
    x0 = torch.randn(16, 4)
    a = ReversibleStack(blocks, seed=5)
    b = ReversibleStack(blocks, seed=5)
    c = ReversibleStack(blocks, generator=torch.Generator().manual_seed(6))
    ya, yb, yc = a(x0), b(x0), c(x0)
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    gam = a.sample_gamma(1000)
    assert gam.shape == (1000, 3) and set(gam.unique().tolist()) == {-0.5, 0.5}
    assert 0.4 < (gam > 0).float().mean().item() < 0.6


# --------------------------------------------------------------------------- tampering

def test_flipped_side_bit_changes_recovered_x0():
    blocks = make_blocks("pam", 4, 8, seed=4)
    stack = ReversibleStack(blocks, frac_bits=9)
    x0 = torch.randn(2, 3, 8)
    rec = stack.forward_record(x0, random_gamma(2, 4, 0))
    good = stack.inverse(rec)
    rec.side_bits[0, 1] ^= 4  # s_0, element 10
    bad = stack.inverse(rec, check=False)
    diff = (bits(bad) != bits(good)).reshape(-1)
    assert diff.any() and diff.nonzero().reshape(-1).tolist() == [10]
    with pytest.raises(NonDeterministicBlockError, match="block 1"):
        stack.inverse(rec)


class NoisyBlock(nn.Module):
    """Adds noise from a private generator that is never replayed."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.lin(x) + torch.rand(x.shape, generator=self.gen)


class GlobalRandBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x) + torch.rand(x.shape)


@pytest.mark.parametrize("bad_index", [0, 1, 3, 4])
def test_nondeterministic_block_is_named(bad_index):
    blocks = make_blocks("float", 5, 6, seed=0)
    blocks[bad_index] = NoisyBlock(6)
    stack = ReversibleStack(blocks)
    x = torch.randn(2, 6, requires_grad=True)
    y = stack(x)
    with pytest.raises(NonDeterministicBlockError, match=f"block {bad_index} is not deterministic"):
        y.sum().backward()


def test_unseeded_global_rand_caught_without_rng_preservation():
    blocks = make_blocks("float", 4, 6, seed=0)
    blocks[2] = GlobalRandBlock(6)
    x = torch.randn(2, 6, requires_grad=True)
    with pytest.raises(NonDeterministicBlockError, match="block 2"):
        ReversibleStack(blocks, preserve_rng_state=False)(x).sum().backward()
    # with preservation (default) torch.rand is replayed and the backward succeeds
    ReversibleStack(blocks)(x).sum().backward()


# --------------------------------------------------------------------------- range, arguments

class Huge(nn.Module):
    def forward(self, x):
        return x + 2.0 ** 20


def test_out_of_range_activations_raise():
    blocks = make_blocks("float", 4, 4, seed=0)
    stack = ReversibleStack(blocks, frac_bits=9)
    with pytest.raises(GridRangeError, match=r"input x0.*32768"):
        stack(torch.full((2, 4), 40000.0))
    blocks[2] = Huge()
    stack = ReversibleStack(blocks, frac_bits=9)
    with pytest.raises(GridRangeError, match=r"block 2.*32768"):
        stack(torch.randn(2, 4))
    with pytest.raises(GridRangeError, match="block 2"):
        stack.eval()(torch.randn(2, 4))
    with pytest.raises(GridRangeError, match="block 2"):
        ReversibleStack(blocks, reversible=False)(torch.randn(2, 4))
    # accumulation past the limit (no single huge branch) is caught too
    ones = [_Const(3000.0) for _ in range(12)]
    with pytest.raises(GridRangeError, match=r"block \d+"):
        ReversibleStack(ones, frac_bits=9).eval()(torch.zeros(1, 2))


class _Const(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x):
        return torch.full_like(x, self.v)


class WrongShape(nn.Module):
    def forward(self, x):
        return x[..., :1]


def test_bad_arguments():
    blocks = make_blocks("float", 3, 4, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        ReversibleStack([])
    with pytest.raises(TypeError, match=r"blocks\[1\]"):
        ReversibleStack([blocks[0], lambda x: x])
    with pytest.raises(TypeError, match="sequence"):
        ReversibleStack(blocks[0])
    for bad in (0, 21, 9.5, True):
        with pytest.raises((TypeError, ValueError), match="frac_bits"):
            ReversibleStack(blocks, frac_bits=bad)
    with pytest.raises(ValueError, match="at most one"):
        ReversibleStack(blocks, seed=1, generator=torch.Generator())
    stack = ReversibleStack(blocks)
    x0 = torch.randn(2, 4)
    with pytest.raises(TypeError, match="floating-point"):
        stack(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        stack([[1.0] * 4])
    with pytest.raises(ValueError, match=r"shape \(batch, len\(blocks\) - 1\) = \(2, 2\)"):
        stack(x0, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"\+0.5 or -0.5"):
        stack(x0, torch.full((2, 2), 0.25))
    with pytest.raises(TypeError, match="float tensor"):
        stack(x0, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="gamma"):
        stack.forward_record(x0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="block 1 returned shape"):
        ReversibleStack([blocks[0], WrongShape()])(x0)
    rec = stack.forward_record(x0)
    with pytest.raises(ValueError, match="frac_bits"):
        ReversibleStack(blocks, frac_bits=8).inverse(rec)
    with pytest.raises(ValueError, match="3 blocks, this one has 2"):
        ReversibleStack(blocks[:2]).inverse(rec)


def test_second_backward_is_a_clear_error():
    stack = ReversibleStack(make_blocks("float", 3, 4, seed=0))
    y = stack(torch.randn(2, 4, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y.sum().backward()


def test_parameter_gradients_accumulate_like_autograd():
    blocks = make_blocks("float", 3, 4, seed=0)
    stack = ReversibleStack(blocks, seed=0)
    x0 = torch.randn(2, 4)
    gamma = random_gamma(2, 3, 0)
    stack(x0, gamma).sum().backward()
    first = [p.grad.clone() for p in stack.parameters()]
    stack(x0, gamma).sum().backward()  # .grad accumulates across backward calls
    for p, g in zip(stack.parameters(), first):
        assert torch.allclose(p.grad, 2 * g)
    # torch.autograd.grad works as with any module (no .grad side effects)
    stack.zero_grad(set_to_none=True)
    params = list(stack.parameters())
    grads = torch.autograd.grad(stack(x0, gamma).sum(), params)
    assert all(p.grad is None for p in params)
    for g, f in zip(grads, first):
        assert torch.allclose(g, f)


class Conditioned(nn.Module):
    """A branch that reads tensors from outside the block: ``shared`` (a parameter of another
    module, closed over) and ``cond()`` (a conditioning tensor, possibly a non-leaf)."""

    def __init__(self, width, gen, shared, cond):
        super().__init__()
        self.mlp = FloatMLP(width, gen)
        self.shared, self.cond = shared, cond

    def forward(self, x):
        return self.mlp(x * self.shared) + self.cond()


@pytest.mark.parametrize("nonleaf", [False, True])
def test_outside_tensors_get_the_stored_mode_gradient(nonleaf):
    gen = torch.Generator().manual_seed(0)
    shared = nn.Parameter(torch.rand(4, generator=gen) + 0.5)   # registered in no block
    emb = nn.Parameter(torch.randn(4, generator=gen) * 0.1)
    x0, w = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    gamma = random_gamma(3, 4, 1)

    def grads(reversible):
        holder = {}
        blocks = [Conditioned(4, torch.Generator().manual_seed(k), shared, lambda: holder["c"]) for k in range(4)]
        stack = ReversibleStack(blocks, reversible=reversible)
        for t in (shared, emb):
            t.grad = None
        holder["c"] = torch.tanh(emb) * 2 if nonleaf else emb  # computed outside the stack
        x = x0.clone().requires_grad_(True)
        (stack(x, gamma) * w).sum().backward()
        return x.grad, shared.grad.clone(), emb.grad.clone(), [p.grad.clone() for p in stack.parameters()]

    rev, ref = grads(True), grads(False)
    assert ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0
    for a, b in zip(rev[:3], ref[:3]):
        assert_close_rel(a, b)
    for a, b in zip(rev[3], ref[3]):
        assert_close_rel(a, b)


def test_outside_tensor_with_frozen_input_and_no_parameters():
    """Nothing registered requires grad, only the outside tensor: it still gets its gradient."""
    cond = torch.tensor([0.25, -0.5], requires_grad=True)

    class AddCond(nn.Module):
        def forward(self, x):
            return torch.tanh(x) + cond

    x0 = torch.randn(2, 2)
    gamma = random_gamma(2, 3, 0)
    out = {}
    for reversible in (True, False):
        cond.grad = None
        ReversibleStack([AddCond() for _ in range(3)], reversible=reversible)(x0, gamma).sum().backward()
        out[reversible] = cond.grad.clone()
    assert_close_rel(out[True], out[False])


class BatchNormMLP(nn.Module):
    def __init__(self, width, gen):
        super().__init__()
        self.mlp = FloatMLP(width, gen)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x):
        return self.bn(self.mlp(x))


def test_batchnorm_counts_each_batch_once():
    x0, w = torch.randn(6, 4), torch.randn(6, 4)
    gamma = random_gamma(6, 3, 2)
    state = {}
    for reversible in (True, False):
        blocks = [BatchNormMLP(4, torch.Generator().manual_seed(k)) for k in range(3)]
        stack = ReversibleStack(blocks, reversible=reversible)
        y, gx, gp = grads_of(stack, x0, gamma, w)
        state[reversible] = (y, gx, gp, {k: v.clone() for k, v in stack.state_dict().items()})
        if reversible:  # inverse() re-runs blocks too and must leave the statistics alone
            before = {k: v.clone() for k, v in stack.state_dict().items()}
            rec = stack.forward_record(x0, gamma)
            after_forward = {k: v.clone() for k, v in stack.state_dict().items()}
            stack.inverse(rec)
            assert all(torch.equal(after_forward[k], v) for k, v in stack.state_dict().items())
            assert any(not torch.equal(before[k], after_forward[k]) for k in before)
    (y1, gx1, gp1, s1), (y2, gx2, gp2, s2) = state[True], state[False]
    assert torch.equal(bits(y1), bits(y2))
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k  # running stats and num_batches_tracked == 1
    assert int(s1["blocks.0.bn.num_batches_tracked"]) == 1
    assert_close_rel(gx1, gx2)
    for a, b in zip(gp1, gp2):
        assert_close_rel(a, b)


def test_autocast_is_replayed_in_the_recompute():
    blocks = make_blocks("float", 4, 8, seed=3)
    x0, w = torch.randn(2, 8) * 2, torch.randn(2, 8)
    gamma = random_gamma(2, 4, 3)
    res = {}
    for reversible in (True, False):
        stack = ReversibleStack(blocks, reversible=reversible)
        stack.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = stack(x, gamma)
        (y.float() * w).sum().backward()  # the backward runs outside the autocast region
        res[reversible] = (y.detach(), x.grad, [p.grad.clone() for p in stack.parameters()])
    (y1, gx1, gp1), (y2, gx2, gp2) = res[True], res[False]
    assert torch.equal(bits(y1), bits(y2))
    assert_close_rel(gx1, gx2, rel=2e-2)
    for a, b in zip(gp1, gp2):
        assert_close_rel(a, b, rel=2e-2)
    # the record of an autocast forward inverts outside autocast too
    stack = ReversibleStack(blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = stack.forward_record(x0, gamma)
    assert torch.equal(bits(stack.inverse(rec)), bits(quant.from_grid(quant.to_grid(x0, 9, "x"), 9)))


def test_float64_input_gradient_dtype():
    blocks = make_blocks("float", 3, 4, seed=0)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = ReversibleStack(blocks)(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float64


def test_exports():
    for name in ("ReversibleStack", "ForwardRecord", "NonDeterministicBlockError",
                 "GridRangeError", "quant"):
        assert name in bdia_pam.__all__ and hasattr(bdia_pam, name)


# --------------------------------------------------------------------------- benchmark

@pytest.mark.slow
def test_memory_depth_benchmark_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "validation" / "memory_depth.py"
    spec = importlib.util.spec_from_file_location("memory_depth", path)
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    result = md.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    assert (tmp_path / "memory_depth_quick.json").exists()
    assert (tmp_path / "memory_depth_quick.png").stat().st_size > 0
    mem = {(r["mode"], r["depth"]): r["activation_bytes"] for r in result["rows"]}
    assert set(mem) == {(m, d) for m in ("stored", "reversible") for d in (2, 4, 8)}
    assert mem["stored", 8] > mem["stored", 4] > mem["stored", 2]  # stored grows with depth
    assert mem["reversible", 8] <= 1.5 * mem["reversible", 4]  # reversible stays flat
    assert mem["reversible", 8] < mem["stored", 8]
