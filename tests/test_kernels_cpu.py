"""CPU matmul kernels (pam.kernels.cpu) against slow, obvious NumPy references.

The references below restate the golden semantics of pam.bits (PAM on bit patterns, the
exact power-of-two slope) elementwise in NumPy and accumulate in float32 with a Python loop
over the reduced index, in increasing order. Kernel results must match bit for bit
(compared as int32 patterns; any NaN matches any NaN) for every input: zeros of both
signs, subnormals, infinities, NaN, values whose products overflow or underflow. Random
operands are drawn from several regimes so that both the int32 fast paths and the general
select-based paths of the kernels run.
"""
import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pam
from pam import bits
from pam.kernels import cpu

ONE = 0x3F800000
MIN_NORMAL = 0x00800000
INF = 0x7F800000
MANT = 0x007FFFFF
OFFSETS = [None, 1.0552, 0.75, 1.9]


# --------------------------------------------------------------------------- references
def _bits64(x):
    return np.asarray(x, np.float32).view(np.int32).astype(np.int64)


def _f32(i):
    return np.asarray(i, np.int64).astype(np.uint32).view(np.float32)


def _off(offset):
    return 0 if offset is None else int(np.float32(offset).view(np.int32)) - ONE


def ref_pam(a, b, off=0):
    """PAM(a, b; off) elementwise: |c| = |a| + |b| - ONE + off on bit patterns, as float32."""
    ia, ib = np.broadcast_arrays(_bits64(a), _bits64(b))
    ua, ub = ia & 0x7FFFFFFF, ib & 0x7FFFFFFF
    sign = (ia ^ ib) & 0x80000000
    r = ua + ub - ONE + off
    mag = np.where(r < MIN_NORMAL, 0, np.where(r >= INF, INF, r))
    a_zero, b_zero = ua < MIN_NORMAL, ub < MIN_NORMAL
    a_inf, b_inf = ua == INF, ub == INF
    mag = np.where(a_zero | b_zero, 0, mag)          # zero or subnormal operand: signed zero
    mag = np.where(a_inf | b_inf, INF, mag)          # inf times nonzero: signed inf
    out = _f32(mag | sign)
    nan = (ua > INF) | (ub > INF) | ((a_inf | b_inf) & (a_zero | b_zero))
    return np.where(nan, np.float32(np.nan), out).astype(np.float32)


def ref_slope(x, y, off=0):
    """Exact derivative of PAM(x, y; off) w.r.t. x: sign(y) 2^(exponent of Mx + |y| + off).

    Mx = 0 for zero/subnormal x (one-sided limit); zero y gives a signed zero, infinite y a
    signed infinity, NaN in either gives NaN; flush/saturate like PAM.
    """
    ix, iy = np.broadcast_arrays(_bits64(x), _bits64(y))
    ux, uy = ix & 0x7FFFFFFF, iy & 0x7FFFFFFF
    sign = iy & 0x80000000
    mx = np.where(ux >= MIN_NORMAL, ux & MANT, 0)
    s = mx + uy + off
    mag = np.where(s < MIN_NORMAL, 0, np.where(s >= INF, INF, s & 0x7F800000))
    mag = np.where(uy < MIN_NORMAL, 0, np.where(uy == INF, INF, mag))
    out = _f32(mag | sign)
    nan = (ux > INF) | (uy > INF)
    return np.where(nan, np.float32(np.nan), out).astype(np.float32)


def ref_matmul(a, b, off=0):
    """C[i, j] = sum_t PAM(a[i, t], b[t, j]), float32, t increasing."""
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for t in range(a.shape[1]):
        acc = (acc + ref_pam(a[:, t:t + 1], b[t:t + 1, :], off)).astype(np.float32)
    return acc


def ref_grad_left(a, b, g, off=0):
    """dA[i, t] = sum_j PAM(g[i, j], slope(a[i, t], b[t, j])), j increasing."""
    acc = np.zeros(a.shape, np.float32)
    for j in range(b.shape[1]):
        acc = (acc + ref_pam(g[:, j:j + 1], ref_slope(a, b[None, :, j], off))).astype(np.float32)
    return acc


def ref_grad_right(a, b, g, off=0):
    """dB[t, j] = sum_i PAM(g[i, j], slope(b[t, j], a[i, t])), i increasing."""
    acc = np.zeros(b.shape, np.float32)
    for i in range(a.shape[0]):
        acc = (acc + ref_pam(g[i:i + 1, :], ref_slope(b, a[i][:, None], off))).astype(np.float32)
    return acc


def assert_same_bits(got, expected, what=""):
    got = np.asarray(got, np.float32)
    expected = np.asarray(expected, np.float32)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    same = (got.view(np.int32) == expected.view(np.int32)) | (np.isnan(got) & np.isnan(expected))
    bad = np.argwhere(~same)
    assert bad.size == 0, (f"{what}: {len(bad)} of {same.size} differ, first at {bad[:3].tolist()}: "
                           f"got {got[tuple(bad[0])]!r}, expected {expected[tuple(bad[0])]!r}")


# --------------------------------------------------------------------------- kernel calls
def k_matmul(a, b, off=0):
    """Through the kernel with a batch of 1 (a: (n, k), b: (k, m) float32)."""
    out = np.full((1, a.shape[0], b.shape[1]), np.nan, np.float32)
    cpu.matmul(a[None].view(np.int32), b[None].view(np.int32), off, out)
    return out[0]


def k_grad_left(a, b, g, off=0):
    out = np.full((1,) + a.shape, np.nan, np.float32)
    bt = np.ascontiguousarray(b.T)[None].view(np.int32)
    cpu.matmul_exact_grad_left(a[None].view(np.int32), bt, g[None].view(np.int32), off, out)
    return out[0]


def k_grad_right(a, b, g, off=0):
    out = np.full((1,) + b.shape, np.nan, np.float32)
    at = np.ascontiguousarray(a.T)[None].view(np.int32)
    cpu.matmul_exact_grad_right(at, b[None].view(np.int32), g[None].view(np.int32), off, out)
    return out[0]


# --------------------------------------------------------------------------- operands
EDGE = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1.1754942e-38, 1.17549435e-38, -1.17549435e-38,
                 np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e30, -1e-30, 1.0, -1.0,
                 0.5, 1.5, -0.75, 2.0 ** -126, 2.0 ** 127, 2.0 ** -63, 2.0 ** 64, 3e-20, -7e19],
                np.float32)
REGIMES = ("normal", "zeros", "edge", "wide", "bits")


def operand(rng, shape, regime):
    """Random float32 array; regime picks which kernel path the operand allows."""
    x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-8, 8)).astype(np.float32)
    if regime == "zeros":            # ReLU-like: zeros of both signs and subnormals
        x[rng.random(shape) < 0.35] = 0.0
        x[rng.random(shape) < 0.1] = -0.0
        x[rng.random(shape) < 0.05] = np.float32(3e-39)
    elif regime == "edge":           # special values sprinkled in
        pick = rng.random(shape) < 0.2
        x[pick] = rng.choice(EDGE, size=int(pick.sum()))
    elif regime == "wide":           # finite, exponents over the whole range: over/underflow
        e = rng.integers(-140, 128, size=shape).astype(np.float64)
        x = (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(1, 2, size=shape)
             * 2.0 ** e).astype(np.float32)
    elif regime == "bits":           # arbitrary bit patterns (NaNs with payloads, subnormals)
        x = rng.integers(-2 ** 31, 2 ** 31, size=shape, dtype=np.int64).astype(np.int32)
        x = x.view(np.float32)
    return np.ascontiguousarray(x, np.float32)


pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")

dims = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33])
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- the reference itself
def test_reference_pam_matches_scalar_definition():
    """The NumPy reference equals bits.mul_bits / bits.mul_slope_bits on all edge pairs."""
    a, b = np.meshgrid(EDGE, EDGE)
    a, b = a.ravel(), b.ravel()
    for off in (0, _off(1.0552), _off(0.75)):
        scalar = np.array([bits.mul_bits(int(x), int(y), off)
                           for x, y in zip(a.view(np.int32), b.view(np.int32))], np.int64)
        assert_same_bits(ref_pam(a, b, off), _f32(scalar), "ref_pam")
        slope = np.array([bits.mul_slope_bits(int(x), int(y), off)
                          for x, y in zip(a.view(np.int32), b.view(np.int32))], np.int64)
        assert_same_bits(ref_slope(a, b, off), _f32(slope), "ref_slope")


# --------------------------------------------------------------------------- property tests
@SETTINGS
@given(n=dims, k=dims, m=dims, ra=st.sampled_from(REGIMES), rb=st.sampled_from(REGIMES),
       offset=st.sampled_from(OFFSETS), seed=st.integers(0, 2 ** 32 - 1))
def test_matmul_matches_reference(n, k, m, ra, rb, offset, seed):
    rng = np.random.default_rng(seed)
    a, b = operand(rng, (n, k), ra), operand(rng, (k, m), rb)
    off = _off(offset)
    assert_same_bits(k_matmul(a, b, off), ref_matmul(a, b, off), "matmul")


@SETTINGS
@given(n=dims, k=dims, m=dims, ra=st.sampled_from(REGIMES), rb=st.sampled_from(REGIMES),
       rg=st.sampled_from(REGIMES), offset=st.sampled_from(OFFSETS),
       seed=st.integers(0, 2 ** 32 - 1))
def test_exact_grads_match_reference(n, k, m, ra, rb, rg, offset, seed):
    rng = np.random.default_rng(seed)
    a, b, g = operand(rng, (n, k), ra), operand(rng, (k, m), rb), operand(rng, (n, m), rg)
    off = _off(offset)
    assert_same_bits(k_grad_left(a, b, g, off), ref_grad_left(a, b, g, off), "grad_left")
    assert_same_bits(k_grad_right(a, b, g, off), ref_grad_right(a, b, g, off), "grad_right")


# --------------------------------------------------------------------------- tiles and paths
@pytest.mark.parametrize("regime", ["normal", "zeros", "edge"])
def test_sizes_across_column_tiles(regime):
    """Reduced and vectorized sizes that are not multiples of the tiles and the 4-step unroll."""
    rng = np.random.default_rng(7)
    n, k, m = 6, cpu.COL_TILE + 7, cpu.COL_TILE + 5
    a, b, g = operand(rng, (n, k), regime), operand(rng, (k, m), "zeros"), operand(rng, (n, m), regime)
    assert_same_bits(k_matmul(a, b), ref_matmul(a, b), "matmul")
    assert_same_bits(k_grad_left(a, b, g), ref_grad_left(a, b, g), "grad_left")
    assert_same_bits(k_grad_right(a, b, g), ref_grad_right(a, b, g), "grad_right")


BLOCK_SHAPES = [(1, 1, 1), (3, 15, 17), (2, 16, 16), (5, 31, 33), (17, 8, 1), (33, 47, 2)]


@pytest.mark.parametrize("zeros", ["none", "a", "b", "g", "all"])
@pytest.mark.parametrize("n, k, m", BLOCK_SHAPES)
def test_grad_micro_kernel_blocks(n, k, m, zeros):
    """The register-blocked gradient fast paths (2-row x 16-column tiles, GRAD_ROW_BLOCK-row
    tasks, packed strips with zero padding) on shapes that are not multiples of the blocks
    (odd rows, partial strips, a partial last task), batch 2, unmasked and masked (zeros in
    one operand or all three), against the reference per batch."""
    rng = np.random.default_rng(n * 10007 + k * 101 + m)
    pick = lambda x: "zeros" if zeros in (x, "all") else "normal"  # noqa: E731
    n = n + cpu.GRAD_ROW_BLOCK if n > 16 else n                     # a partial last task
    a = operand(rng, (2, n, k), pick("a"))
    b = operand(rng, (2, k, m), pick("b"))
    g = operand(rng, (2, n, m), pick("g"))
    ai, bi, gi = a.view(np.int32), b.view(np.int32), g.view(np.int32)
    fast_a, fast_b, _, _, _ = cpu._grads_plan(ai, bi, gi, 0)
    assert fast_a and fast_b                          # the fast paths are what runs
    bt = np.ascontiguousarray(bi.transpose(0, 2, 1))
    at = np.ascontiguousarray(ai.transpose(0, 2, 1))
    dl = np.full(a.shape, np.nan, np.float32)
    cpu.matmul_exact_grad_left(ai, bt, gi, 0, dl)
    dr = np.full(b.shape, np.nan, np.float32)
    cpu.matmul_exact_grad_right(at, bi, gi, 0, dr)
    for p in range(2):
        assert_same_bits(dl[p], ref_grad_left(a[p], b[p], g[p]), f"grad_left batch {p}")
        assert_same_bits(dr[p], ref_grad_right(a[p], b[p], g[p]), f"grad_right batch {p}")
    both_l, both_r = np.full(a.shape, np.nan, np.float32), np.full(b.shape, np.nan, np.float32)
    cpu.matmul_exact_grads(ai, bt, at, bi, gi, 0, both_l, both_r)    # one plan for both
    assert_same_bits(both_l, dl, "matmul_exact_grads left")
    assert_same_bits(both_r, dr, "matmul_exact_grads right")


@pytest.mark.parametrize("zeros", ["none", "a", "b", "all"])
@pytest.mark.parametrize("n, k, m", BLOCK_SHAPES + [(6, 3, 40)])
def test_matmul_micro_kernel_blocks(n, k, m, zeros):
    """The register-blocked PAM forward fast path (4-row x 16-column tiles, MM_ROW_BLOCK-row
    tasks, packed strips of b) on shapes that are not multiples of the blocks, batch 2,
    unmasked and masked (zeros in a, b or both), against the reference per batch."""
    rng = np.random.default_rng(n * 7919 + k * 31 + m)
    pick = lambda x: "zeros" if zeros in (x, "all") else "normal"  # noqa: E731
    n = n + cpu.MM_ROW_BLOCK if n > 16 else n                       # a partial last task
    a = operand(rng, (2, n, k), pick("a"))
    b = operand(rng, (2, k, m), pick("b"))
    ai, bi = a.view(np.int32), b.view(np.int32)
    fast, za, zb = cpu._matmul_plan(ai, bi, 0, False)
    assert fast and (zeros != "none" or not (za or zb))           # fast path, masked or not
    out = np.full((2, n, m), np.nan, np.float32)
    cpu.matmul(ai, bi, 0, out)
    for p in range(2):
        assert_same_bits(out[p], ref_matmul(a[p], b[p]), f"matmul batch {p}")


@pytest.mark.parametrize("regime", ["normal", "zeros", "edge"])
@pytest.mark.parametrize("n, k, m", [(1, 1, 1), (5, 17, 3), (19, 33, 40), (6, 3, 40),
                                     (4, 0, 5)])
def test_matmul_bias_epilogue(n, k, m, regime):
    """matmul(..., bias) == the reference matmul, then + bias (float32, the sum first: a
    linear layer's y + bias): in the fast path's epilogue (masked or not, partial tiles),
    after the general path (edge values), for L-Mul, and k = 0 (the bias alone); a bias
    with signed zeros, infinities and NaN; a bias of the wrong length is refused."""
    rng = np.random.default_rng(n * 131 + k * 17 + m)
    a = operand(rng, (2, n, k), regime)
    b = operand(rng, (2, k, m), "zeros" if regime == "zeros" else "normal")
    bias = operand(rng, (m,), "normal")
    bias[::3] = -0.0
    if m > 3:
        bias[1], bias[2], bias[-1] = np.inf, np.nan, -np.inf
    out = np.full((2, n, m), np.nan, np.float32)
    cpu.matmul(a.view(np.int32), b.view(np.int32), 0, out, bias)
    for p in range(2):
        want = (ref_matmul(a[p], b[p]) + bias).astype(np.float32)
        assert_same_bits(out[p], want, f"matmul + bias, batch {p}")
    c = int(bits.lmul_constant(3))
    plain, fused = (np.full((2, n, m), np.nan, np.float32) for _ in range(2))
    cpu.matmul_lmul(a.view(np.int32), b.view(np.int32), c, plain)
    cpu.matmul_lmul(a.view(np.int32), b.view(np.int32), c, fused, bias)
    assert_same_bits(fused, (plain + bias).astype(np.float32), "L-Mul + bias")
    with pytest.raises(ValueError, match="bias must have"):
        cpu.matmul(a.view(np.int32), b.view(np.int32), 0, out, np.zeros(m + 1, np.float32))


def _layouts(x, trans):
    """int32 view of the 3-D float32 ``x`` in C order (trans False) or as the transposed
    view of a C-contiguous transpose (trans True): same values, the other layout."""
    xi = x.view(np.int32)
    return np.ascontiguousarray(xi.transpose(0, 2, 1)).transpose(0, 2, 1) if trans else xi


def _causal(rng, shape, upper):
    """Random normal operand with a zero triangle (j > i, or j < i when ``upper`` is False)
    like causal attention's probabilities and their gradients, plus scattered zeros."""
    x = operand(rng, shape, "normal")
    i, j = np.indices(shape[1:])
    x[:, (j > i) if upper else (j < i)] = 0.0
    x[rng.random(shape) < 0.05] = -0.0
    return np.ascontiguousarray(x)


LAYOUT_SHAPES = [(1, 1, 1), (5, 17, 3), (19, 33, 40), (34, 16, 18)]


@pytest.mark.parametrize("ta, tb", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("zeros", ["none", "a", "b", "g", "all", "causal"])
@pytest.mark.parametrize("n, k, m", LAYOUT_SHAPES)
def test_grads_read_either_operand_layout(n, k, m, zeros, ta, tb):
    """matmul_exact_grads reads a and b in place whether each is C-contiguous or the
    transpose of a C-contiguous array (a linear layer's b is weight.t()), and writes the
    right gradient into the transpose of a C-contiguous output (or a plain one): the same
    bits as the per-batch references, batch 3, odd shapes (partial strips and row blocks),
    unmasked, zeros in each operand (the masked variants: the packed operand's lane mask,
    grad's folded mask) and causal zero triangles (the skipped spans)."""
    rng = np.random.default_rng(n * 131 + k * 17 + m + 7 * ta + 3 * tb)
    pick = lambda x: "zeros" if zeros in (x, "all") else "normal"  # noqa: E731
    if zeros == "causal":       # scores = q @ k^T backward: grad (n, m) lower triangle
        a, b = operand(rng, (3, n, k), "normal"), operand(rng, (3, k, m), "normal")
        g = _causal(rng, (3, n, m), upper=True)
    else:
        a, b, g = (operand(rng, (3, n, k), pick("a")), operand(rng, (3, k, m), pick("b")),
                   operand(rng, (3, n, m), pick("g")))
    ai, bi = _layouts(a, ta), _layouts(b, tb)
    gi = g.view(np.int32)
    fast_a, fast_b, _, _, _ = cpu._grads_plan(a.view(np.int32), b.view(np.int32), gi, 0)
    assert fast_a and fast_b
    dl = np.full(a.shape, np.nan, np.float32)
    dr_t = np.full((3, m, k), np.nan, np.float32).transpose(0, 2, 1)   # written in place
    dr = np.full(b.shape, np.nan, np.float32)
    cpu.matmul_exact_grads(ai, None, None, bi, gi, 0, dl, dr_t)
    cpu.matmul_exact_grads(None, bi.transpose(0, 2, 1), ai.transpose(0, 2, 1), None, gi, 0,
                           None, dr)                    # at and bt given instead
    for p in range(3):
        assert_same_bits(dl[p], ref_grad_left(a[p], b[p], g[p]), f"grad_left batch {p}")
        assert_same_bits(dr_t[p], ref_grad_right(a[p], b[p], g[p]), f"grad_right batch {p}")
    assert_same_bits(dr, dr_t, "grad_right into a C-contiguous output")


@pytest.mark.parametrize("a_trans, b_trans", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("zeros", ["none", "a", "b", "causal"])
@pytest.mark.parametrize("n, k, m", LAYOUT_SHAPES + [(6, 40, 3)])
def test_matmul_reads_either_layout(n, k, m, zeros, a_trans, b_trans):
    """The PAM forward reads an operand from the transpose of a C-contiguous array (linear:
    b = weight.t(); an approximate backward: a^T @ grad) as it reads a C-contiguous one:
    same bits as the reference, batch 2, odd shapes, zeros (masked) and causal
    probabilities (a with a zero upper triangle: the skipped spans of the 4-row tiles)."""
    rng = np.random.default_rng(n * 7 + k * 3 + m)
    a = (_causal(rng, (2, n, k), upper=True) if zeros == "causal" else
         operand(rng, (2, n, k), "zeros" if zeros == "a" else "normal"))
    b = operand(rng, (2, k, m), "zeros" if zeros == "b" else "normal")
    out = np.full((2, n, m), np.nan, np.float32)
    cpu.matmul(_layouts(a, a_trans), _layouts(b, b_trans), 0, out)
    for p in range(2):
        assert_same_bits(out[p], ref_matmul(a[p], b[p]), f"matmul batch {p}")


@pytest.mark.parametrize("regime", ["edge", "wide"])
def test_matmul_general_path_reads_a_transposed(regime):
    """Operands outside the fast path (inf/NaN, over/underflow) given as transposed views
    go to the general path with the same bits as the reference."""
    rng = np.random.default_rng(11)
    a = operand(rng, (2, 9, 13), regime)
    b = operand(rng, (2, 13, 6), regime)
    out = np.full((2, 9, 6), np.nan, np.float32)
    cpu.matmul(_layouts(a, True), _layouts(b, True), 0, out)
    for p in range(2):
        assert_same_bits(out[p], ref_matmul(a[p], b[p]), f"matmul batch {p}")


def test_grad_right_of_causal_probabilities():
    """dV of probs @ v with causal probabilities: the packed operand (probs) has a zero
    lower-left triangle per strip, so each strip's span of live rows is skipped around;
    batch 2, strips and rows that end mid-tile."""
    rng = np.random.default_rng(5)
    n = k = 37
    m = 20
    a = _causal(rng, (2, n, k), upper=True)
    b = operand(rng, (2, k, m), "normal")
    g = operand(rng, (2, n, m), "normal")
    dr = np.full(b.shape, np.nan, np.float32)
    dl = np.full(a.shape, np.nan, np.float32)
    cpu.matmul_exact_grads(a.view(np.int32), None, None, b.view(np.int32), g.view(np.int32), 0,
                           dl, dr)
    for p in range(2):
        assert_same_bits(dl[p], ref_grad_left(a[p], b[p], g[p]), f"grad_left batch {p}")
        assert_same_bits(dr[p], ref_grad_right(a[p], b[p], g[p]), f"grad_right batch {p}")


def _attention_operands(rng, batch, seq, head):
    """The operands of causal attention's two matmuls: probs (batch, seq, seq) with a zero
    upper triangle (softmax of masked scores), v, q (batch, seq, head), k^T as the transpose
    of a C-contiguous k (as ``key.transpose(-2, -1)``), d(out) and d(scores) (causal
    zeros) for the backward; probs and d(scores) also hold scattered -0.0."""
    probs = _causal(rng, (batch, seq, seq), upper=True)
    v = operand(rng, (batch, seq, head), "normal")
    q = operand(rng, (batch, seq, head), "normal")
    k = operand(rng, (batch, seq, head), "normal")
    d_out = operand(rng, (batch, seq, head), "normal")
    d_scores = _causal(rng, (batch, seq, seq), upper=True)
    return probs, v, q, k, d_out, d_scores


@pytest.mark.parametrize("seq, head", [(64, 32), (48, 24)])
def test_attention_shapes_match_reference(seq, head):
    """The attention-sized batched matmuls of a small GPT (many small matrices, causal
    zeros in probs and in the scores' gradient, k^T read as the transpose of a contiguous
    k), forward and both exact gradients, with each gradient written into a C-contiguous
    output (as pam's autograd asks) and into the transpose of one: bit for bit the
    per-batch references."""
    rng = np.random.default_rng(seq + head)
    batch = 3
    probs, v, q, k, d_out, d_scores = _attention_operands(rng, batch, seq, head)
    kt = k.view(np.int32).transpose(0, 2, 1)                # (batch, head, seq), a view
    cases = [("probs @ v", probs.view(np.int32), v.view(np.int32), d_out),
             ("q @ k^T", q.view(np.int32), kt, d_scores)]
    for what, a, b, g in cases:
        af, bf = a.view(np.float32), np.ascontiguousarray(b).view(np.float32)
        out = np.full((batch, a.shape[1], b.shape[2]), np.nan, np.float32)
        cpu.matmul(a, b, 0, out)
        da = np.full(a.shape, np.nan, np.float32)
        db = np.full(b.shape, np.nan, np.float32)
        cpu.matmul_exact_grads(a, None, None, b, g.view(np.int32), 0, da, db)
        db_t = np.full((batch, b.shape[2], b.shape[1]), np.nan, np.float32).transpose(0, 2, 1)
        cpu.matmul_exact_grads(a, None, None, b, g.view(np.int32), 0, None, db_t)
        for p in range(batch):
            assert_same_bits(out[p], ref_matmul(af[p], bf[p]), f"{what} forward {p}")
            assert_same_bits(da[p], ref_grad_left(af[p], bf[p], g[p]), f"{what} d left {p}")
            expect = ref_grad_right(af[p], bf[p], g[p])
            assert_same_bits(db[p], expect, f"{what} d right {p}")
            assert_same_bits(db_t[p], expect, f"{what} d right, transposed output {p}")


def test_live_spans_of_zero_masks():
    """cpu._live_span (the reduced span of a pair or quad of splatted rows) and
    cpu._strip_span (of a packed strip) against a direct search, on masks with live
    entries at group edges, in the scalar remainder, one live column, or none."""
    rng = np.random.default_rng(17)
    for trial in range(300):
        n = int(rng.integers(1, 70))
        W = n + (-n) % 8
        count = int(rng.choice([2, 4]))
        z = np.zeros((count + 1, W), np.int32)
        live = rng.random((count + 1, n)) < rng.choice([0.0, 0.02, 0.2, 0.9])
        z[:, :n][live] = rng.choice([-1, cpu.NOT_MANT], size=int(live.sum()))
        cols = np.flatnonzero((z[1:1 + count, :n] < 0).any(axis=0))
        expect = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (n, n)
        assert tuple(cpu._live_span(z, 1, count, n)) == expect, (trial, z)
        rows = n
        mp = np.zeros((2, rows, 16), np.int32)
        mp[1][rng.random((rows, 16)) < rng.choice([0.0, 0.01, 0.3])] = -1
        live_rows = np.flatnonzero((mp[1] != 0).any(axis=1))
        lo, hi = cpu._strip_span(mp, rows * 16, rows)
        if live_rows.size:
            assert (lo, hi) == (live_rows[0], live_rows[-1] + 1), trial
        else:
            assert lo == hi, trial


def test_grad_scratch_reused_across_sizes_and_threads():
    """The per-thread packing scratch (cpu._strip_work): a large call, then a smaller one
    that reuses the bigger buffer, then a masked one that needs more than it; and two
    threads running different shapes at once. Each result equals its reference."""
    import concurrent.futures

    rng = np.random.default_rng(21)
    cases = [((9, 40, 70), "normal"), ((3, 5, 6), "normal"), ((9, 45, 80), "zeros"),
             ((4, 33, 17), "zeros")]
    data = [(operand(rng, (n, k), "normal"), operand(rng, (k, m), r), operand(rng, (n, m), r))
            for (n, k, m), r in cases]

    def run(abg):
        a, b, g = abg
        return k_grad_left(a, b, g), k_grad_right(a, b, g)

    def check(abg, got):
        a, b, g = abg
        assert_same_bits(got[0], ref_grad_left(a, b, g), "grad_left")
        assert_same_bits(got[1], ref_grad_right(a, b, g), "grad_right")

    for abg in data:
        check(abg, run(abg))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for abg, got in zip(data, pool.map(run, data)):
                check(abg, got)


@pytest.mark.parametrize("threads", [1, 2])
def test_plan_scans_equal_the_scalar_stats(threads):
    """The chunked, 8-lane range scans of the matmul plans (cpu._scan) give cpu._stats's
    (inf/NaN, zero/subnormal, min normal |bits|, max |bits|) for each operand: arrays of
    several chunks plus a tail that is not a multiple of 8, with the extremes placed at a
    chunk's last lane, in the scalar tail, or absent (no normal number, no zero), and
    operands that are empty or transposed views."""
    rng = np.random.default_rng(13)
    size = 2 * cpu.SCAN_CHUNK + 13
    base = lambda: (rng.standard_normal(size) + 3).astype(np.float32).view(np.int32)  # noqa: E731
    cases = []
    x = base()
    x[cpu.SCAN_CHUNK - 1] = np.float32(1e-40).view(np.int32)          # subnormal, lane 7
    x[size - 1] = np.float32(-np.inf).view(np.int32)                   # in the tail
    cases.append(x)
    x = base()
    x[cpu.SCAN_CHUNK + 8] = np.float32(2.0 ** -126).view(np.int32)      # min normal
    x[size - 3] = np.float32(-3e38).view(np.int32)
    cases.append(x)
    cases.append(np.zeros(size, np.int32))                                # no normal number
    cases.append(np.full(size, np.float32(1e-39).view(np.int32), np.int32))
    cases.append(np.full(size, np.float32(np.nan).view(np.int32), np.int32))
    cases.append(rng.integers(-2 ** 31, 2 ** 31, size, dtype=np.int64).astype(np.int32))
    cases.append(np.zeros(0, np.int32))
    cases.append(base()[:6 * 50].reshape(1, 6, 50).transpose(0, 2, 1))  # not contiguous
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for i, x in enumerate(cases):
            y = cases[(i + 1) % len(cases)]
            z = cases[(i + 3) % len(cases)]
            out, parts = cpu._scan(x, y, z)
            for arr, (lo, hi) in zip((x, y, z), parts):
                expect = cpu._stats(np.ascontiguousarray(arr))
                assert tuple(cpu._scan_merge(out, lo, hi)) == tuple(expect), i
            out, parts = cpu._scan(x, y)
            assert parts[2][0] == parts[2][1] == len(out)
            for arr, (lo, hi) in zip((x, y), parts):
                assert tuple(cpu._scan_merge(out, lo, hi)) == \
                    tuple(cpu._stats(np.ascontiguousarray(arr))), i
    finally:
        numba.set_num_threads(before)


def test_fast_path_at_range_boundaries():
    """Operands whose extreme products are exactly the smallest normal and just below inf.

    The fast-path range check must accept them (so the int32 path is what runs) and the
    results must still equal the reference; one step further must send them to the general path.
    """
    lo = np.float32(2.0 ** -63)          # lo * lo = 2^-126, the smallest normal
    hi = np.float32(np.nextafter(np.float32(2.0 ** 64), np.float32(0)))
    rng = np.random.default_rng(3)
    a = operand(rng, (5, 9), "normal")
    b = operand(rng, (9, 6), "normal")
    a[0, :3] = [lo, -lo, hi]
    b[:3, 0] = [lo, lo, -hi]
    a[1, 4], b[4, 1] = hi, hi
    _, _, lo_a, hi_a = cpu._stats(a.view(np.int32))
    _, _, lo_b, hi_b = cpu._stats(b.view(np.int32))
    assert lo_a + lo_b - ONE == MIN_NORMAL
    assert cpu._mul_fast_ok(lo_a, hi_a, lo_b, hi_b, 0)
    assert_same_bits(k_matmul(a, b), ref_matmul(a, b), "boundary")
    a[2, 2] = np.nextafter(lo, np.float32(0))   # one ulp below: a product underflows
    _, _, lo_a, hi_a = cpu._stats(a.view(np.int32))
    assert not cpu._mul_fast_ok(lo_a, hi_a, lo_b, hi_b, 0)
    assert_same_bits(k_matmul(a, b), ref_matmul(a, b), "below boundary")


@pytest.mark.parametrize("regime", REGIMES)
def test_fast_and_general_paths_agree(regime):
    """The dispatching kernels equal the general (bits.mul_bits) kernels on the same data."""
    rng = np.random.default_rng(11)
    a = operand(rng, (2, 19, 37), regime).view(np.int32)
    b = operand(rng, (2, 37, 23), "zeros").view(np.int32)
    g = operand(rng, (2, 19, 23), regime).view(np.int32)
    bt = np.ascontiguousarray(b.transpose(0, 2, 1))
    at = np.ascontiguousarray(a.transpose(0, 2, 1))
    for off in (0, _off(1.0552)):
        x, y = np.empty((2, 19, 23), np.float32), np.empty((2, 19, 23), np.float32)
        cpu.matmul(a, b, off, x)
        cpu._matmul_general(a, b, off, False, y)
        assert_same_bits(x, y, "matmul")
        x, y = np.empty((2, 19, 37), np.float32), np.empty((2, 19, 37), np.float32)
        cpu.matmul_exact_grad_left(a, bt, g, off, x)
        cpu._grad_left_general(a, bt, g, off, y)
        assert_same_bits(x, y, "grad_left")
        x, y = np.empty((2, 37, 23), np.float32), np.empty((2, 37, 23), np.float32)
        cpu.matmul_exact_grad_right(at, b, g, off, x)
        cpu._grad_right_general(at, b, g, off, y)
        assert_same_bits(x, y, "grad_right")


def test_batched_kernels_match_reference_per_batch():
    rng = np.random.default_rng(5)
    a = operand(rng, (3, 6, 10), "zeros")
    b = operand(rng, (3, 10, 7), "normal")
    g = operand(rng, (3, 6, 7), "zeros")
    out = np.empty((3, 6, 7), np.float32)
    cpu.matmul(a.view(np.int32), b.view(np.int32), 0, out)
    dl = np.empty(a.shape, np.float32)
    cpu.matmul_exact_grad_left(a.view(np.int32), np.ascontiguousarray(b.transpose(0, 2, 1)).view(np.int32),
                               g.view(np.int32), 0, dl)
    dr = np.empty(b.shape, np.float32)
    cpu.matmul_exact_grad_right(np.ascontiguousarray(a.transpose(0, 2, 1)).view(np.int32),
                                b.view(np.int32), g.view(np.int32), 0, dr)
    for p in range(3):
        assert_same_bits(out[p], ref_matmul(a[p], b[p]), f"matmul batch {p}")
        assert_same_bits(dl[p], ref_grad_left(a[p], b[p], g[p]), f"grad_left batch {p}")
        assert_same_bits(dr[p], ref_grad_right(a[p], b[p], g[p]), f"grad_right batch {p}")


def test_empty_reduction_gives_zeros():
    a, b = np.zeros((4, 0), np.float32), np.zeros((0, 5), np.float32)
    assert_same_bits(k_matmul(a, b), np.zeros((4, 5), np.float32), "k = 0")
    a, b, g = np.ones((4, 3), np.float32), np.ones((3, 0), np.float32), np.ones((4, 0), np.float32)
    assert_same_bits(k_grad_left(a, b, g), np.zeros((4, 3), np.float32), "m = 0")
    a, b, g = np.ones((0, 3), np.float32), np.ones((3, 5), np.float32), np.ones((0, 5), np.float32)
    assert_same_bits(k_grad_right(a, b, g), np.zeros((3, 5), np.float32), "n = 0")


def test_result_does_not_depend_on_thread_count():
    rng = np.random.default_rng(9)
    a = operand(rng, (1, 67, 45), "zeros").view(np.int32)
    b = operand(rng, (1, 45, 70), "normal").view(np.int32)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            out = np.empty((1, 67, 70), np.float32)
            cpu.matmul(a, b, 0, out)
            results.append(out)
    finally:
        numba.set_num_threads(before)
    for r in results[1:]:
        assert_same_bits(r, results[0], "threads")


def test_through_torch_autograd_both_backward_modes():
    """pam.matmul's forward and both backward modes reach these kernels and match references."""
    rng = np.random.default_rng(4)
    a0, b0 = operand(rng, (9, 14), "zeros"), operand(rng, (14, 6), "normal")
    g0 = operand(rng, (9, 6), "normal")
    for mode in ("exact", "approx"):
        a = torch.from_numpy(a0.copy()).requires_grad_()
        b = torch.from_numpy(b0.copy()).requires_grad_()
        c = pam.matmul(a, b, backward=mode)
        assert_same_bits(c.detach().numpy(), ref_matmul(a0, b0), "forward")
        c.backward(torch.from_numpy(g0))
        if mode == "exact":
            ga, gb = ref_grad_left(a0, b0, g0), ref_grad_right(a0, b0, g0)
        else:
            ga, gb = ref_matmul(g0, b0.T.copy()), ref_matmul(a0.T.copy(), g0)
        assert_same_bits(a.grad.numpy(), ga, f"{mode} dA")
        assert_same_bits(b.grad.numpy(), gb, f"{mode} dB")
