"""L-Mul convolution kernels (forward, approximate backward) against a NumPy loop reference.

The reference walks every output element and adds its L-Mul terms (tests/reference.py
``lmul_ref``, exact fractions) in float32 in the documented order of
pam.kernels.cpu_conv: forward over (c, kh, kw), input gradient over (o, kh, kw) for the
taps whose output position exists, weight gradient over (n, oh, ow) with padding inputs
as +0. CPU kernels (fast and general paths) must match bit for bit; the CUDA kernels
(simulator) must match the CPU ones.
"""
import numpy as np
import pytest

import reference as R
from pam import bits
from pam.kernels import cpu_conv

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered",
                                        "ignore:invalid value encountered")

# (x shape, w shape, stride, pad_lo, dilation, groups, operand format)
CASES = [
    ((2, 4, 5, 4), (4, 2, 3, 2), (2, 1), (0, 2), (1, 2), 2, 1),
    ((1, 2, 4, 5), (3, 2, 2, 3), (1, 1), (1, 1), (1, 1), 1, 3),
    ((1, 3, 3, 6), (3, 1, 1, 3), (1, 3), (0, 1), (1, 1), 3, 0),
]
KINDS = ("normal", "zeros", "special")


def values(rng, shape, kind, fmt):
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-3, 4, shape))).astype(np.float32)
    if kind == "zeros":
        pick = rng.random(shape)
        x[pick < 0.25] = 0.0
        x[(pick >= 0.25) & (pick < 0.35)] = -0.0
        x[(pick >= 0.35) & (pick < 0.45)] = np.float32(1e-40)
    elif kind == "special":
        pick = rng.random(shape) < 0.15
        x[pick] = rng.choice(np.array([np.inf, -np.inf, np.nan, 0.0, 2.0 ** 100, 2.0 ** -100],
                                      np.float32), size=int(pick.sum()))
    return R.round_to_format_ref(x, fmt)


def out_size(size, lo, hi, d, k, s):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


def lm(a, b, m):
    return R.lmul_ref(np.float32(a), np.float32(b), m)[()]


def ref_forward(x, w, stride, lo, dil, groups, m, OH, OW):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    Og = O // groups
    out = np.zeros((N, O, OH, OW), np.float32)
    for n in range(N):
        for o in range(O):
            for oh in range(OH):
                for ow in range(OW):
                    acc = np.float32(0.0)
                    for c in range(Cg):
                        for kh in range(KH):
                            for kw in range(KW):
                                ih = oh * stride[0] - lo[0] + kh * dil[0]
                                iw = ow * stride[1] - lo[1] + kw * dil[1]
                                inside = 0 <= ih < H and 0 <= iw < W
                                xv = x[n, (o // Og) * Cg + c, ih, iw] if inside else 0.0
                                acc = np.float32(acc + lm(xv, w[o, c, kh, kw], m))
                    out[n, o, oh, ow] = acc
    return out


def ref_grad_input(x, w, g, stride, lo, dil, groups, m):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    Og = O // groups
    OH, OW = g.shape[2:]
    out = np.zeros(x.shape, np.float32)
    for n in range(N):
        for ci in range(C):
            for ih in range(H):
                for iw in range(W):
                    acc = np.float32(0.0)
                    for o in range((ci // Cg) * Og, (ci // Cg + 1) * Og):
                        for kh in range(KH):
                            th = ih + lo[0] - kh * dil[0]
                            if th < 0 or th % stride[0] or th // stride[0] >= OH:
                                continue
                            for kw in range(KW):
                                tw = iw + lo[1] - kw * dil[1]
                                if tw < 0 or tw % stride[1] or tw // stride[1] >= OW:
                                    continue
                                term = lm(g[n, o, th // stride[0], tw // stride[1]],
                                          w[o, ci % Cg, kh, kw], m)
                                acc = np.float32(acc + term)
                    out[n, ci, ih, iw] = acc
    return out


def ref_grad_weight(x, w, g, stride, lo, dil, groups, m):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    Og = O // groups
    OH, OW = g.shape[2:]
    out = np.zeros(w.shape, np.float32)
    for o in range(O):
        for c in range(Cg):
            for kh in range(KH):
                for kw in range(KW):
                    acc = np.float32(0.0)
                    for n in range(N):
                        for oh in range(OH):
                            for ow in range(OW):
                                ih = oh * stride[0] - lo[0] + kh * dil[0]
                                iw = ow * stride[1] - lo[1] + kw * dil[1]
                                inside = 0 <= ih < H and 0 <= iw < W
                                xv = x[n, (o // Og) * Cg + c, ih, iw] if inside else 0.0
                                acc = np.float32(acc + lm(g[n, o, oh, ow], xv, m))
                    out[o, c, kh, kw] = acc
    return out


def i32(x):
    return np.ascontiguousarray(x, np.float32).view(np.int32)


def run_all(K, x, w, g, stride, lo, dil, groups, c):
    """(forward, grad input, grad weight) through the L-Mul kernels of module K."""
    fwd = np.full(g.shape, np.float32(7.0))
    K.conv_forward_lmul(i32(x), i32(w), *stride, *lo, *dil, groups, c, fwd)
    gi = np.full(x.shape, np.float32(7.0))
    K.conv_grad_input_lmul(i32(x), i32(w), i32(g), *stride, *lo, *dil, groups, False, c, gi)
    gw = np.full(w.shape, np.float32(7.0))
    K.conv_grad_weight_lmul(i32(x), i32(w), i32(g), *stride, *lo, *dil, groups, False, c, gw)
    return fwd, gi, gw


def case_data(case, kind):
    xs, ws, stride, lo, dil, groups, fmt = case
    rng = np.random.default_rng(sum(xs) + len(kind))
    x, w = values(rng, xs, kind, fmt), values(rng, ws, kind, fmt)
    hi = lo
    OH = out_size(xs[2], lo[0], hi[0], dil[0], ws[2], stride[0])
    OW = out_size(xs[3], lo[1], hi[1], dil[1], ws[3], stride[1])
    g = values(rng, (xs[0], ws[0], OH, OW), kind, fmt)
    m = bits.FORMAT_MANT_BITS[fmt]
    return x, w, g, stride, lo, dil, groups, m, int(bits.lmul_constant(m))


def assert_same_bits(got, expected, what):
    same = R.same_bits(got, expected)
    bad = np.flatnonzero(~same)
    assert bad.size == 0, (f"{what}: {bad.size} of {same.size} differ, first at {bad[:5]}: "
                           f"got {np.ravel(got)[bad[:5]]}, expected {np.ravel(expected)[bad[:5]]}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_lmul_conv_matches_loop_reference(case, kind):
    x, w, g, stride, lo, dil, groups, m, c = case_data(case, kind)
    fwd, gi, gw = run_all(cpu_conv, x, w, g, stride, lo, dil, groups, c)
    assert_same_bits(fwd, ref_forward(x, w, stride, lo, dil, groups, m, *g.shape[2:]), "fwd")
    assert_same_bits(gi, ref_grad_input(x, w, g, stride, lo, dil, groups, m), "grad input")
    assert_same_bits(gw, ref_grad_weight(x, w, g, stride, lo, dil, groups, m), "grad weight")


def test_lmul_conv_rejects_exact_and_bad_constant():
    x, w, g, stride, lo, dil, groups, m, c = case_data(CASES[1], "normal")
    with pytest.raises(ValueError, match="approximate backward"):
        cpu_conv.conv_grad_input_lmul(i32(x), i32(w), i32(g), *stride, *lo, *dil, groups,
                                      True, c, np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match="L-Mul constant"):
        cpu_conv.conv_forward_lmul(i32(x), i32(w), *stride, *lo, *dil, groups, 1 << 23,
                                   np.empty(g.shape, np.float32))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_lmul_conv_matches_cpu(case):
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    from pam.kernels import cuda_conv
    if not cuda_conv.available():
        pytest.skip("no CUDA GPU and the CUDA simulator is off (NUMBA_ENABLE_CUDASIM=1)")
    for kind in ("zeros", "special"):
        x, w, g, stride, lo, dil, groups, m, c = case_data(case, kind)
        want = run_all(cpu_conv, x, w, g, stride, lo, dil, groups, c)
        got = run_all(cuda_conv, x, w, g, stride, lo, dil, groups, c)
        for name, a, b in zip(("fwd", "grad input", "grad weight"), got, want):
            assert_same_bits(a, b, name)
