"""PAM convolutions: kernels against a slow NumPy reference bit for bit, CUDA == CPU, ops.

The reference (``ref_forward``, ``ref_grad_input``, ``ref_grad_weight``) is built from the
elementwise PAM of tests/reference.py and float32 sums in exactly the order documented in
pam/kernels/cpu_conv.py: per output element from +0.0, forward over (c, kh, kw), input
gradient over (o, kh, kw), weight gradient over (n, oh, ow), zero padding as +0.0 inputs.
The exact slope reference ``ref_slope`` reads sign and exponent of PAM(1.Ma, b), computed
with reference.pam, with np.frexp/np.ldexp (exact). Results are compared as bit patterns
(any NaN matches any NaN).
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pam
import reference as R

# inf - inf and 0 * inf in the NumPy references are meant (NaN is what they give)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                                        "ignore:overflow:RuntimeWarning")
from pam import conv as PC
from pam import dispatch
from pam.kernels import cpu_conv

F32 = np.finfo(np.float32)
SPECIAL = np.array([0.0, -0.0, 1.0, -2.0, 1.5, F32.tiny, -F32.tiny, 1e-45, -5.9e-39,
                    F32.max, -3e38, 1e30, -1e-30, 2.0 ** -100, 2.0 ** 100, np.inf, -np.inf,
                    np.nan], dtype=np.float32)
KINDS = ("normal", "zeros", "special", "extreme")
OFFSETS = (None, 1.0552)


# --------------------------------------------------------------------------- reference
def ref_slope(a, b, offset=None):
    """Exact derivative of PAM(a, b; offset) w.r.t. a, elementwise, float32.

    sign(b) 2^E where E is the exponent of PAM(1.Ma, b) (Ma: a's mantissa, 0 for zero or
    subnormal a); a flushed or saturated PAM(1.Ma, b) gives a signed zero or infinity;
    NaN a or b gives NaN.
    """
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ua = R.bits(a) & 0x7FFFFFFF
    unit = R.from_bits(np.where(ua >= R.MIN_NORMAL, R.ONE | (ua & 0x7FFFFF), R.ONE))
    c = R.pam(unit, b, offset)
    with np.errstate(all="ignore"):
        _, e = np.frexp(c)
        power = np.copysign(np.ldexp(1.0, e - 1), c)
    out = np.where(np.isfinite(c) & (c != 0), power, c).astype(np.float32)
    return np.where(np.isnan(a), np.float32(np.nan), out).astype(np.float32)


def out_size(size, lo, hi, d, k, s):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


def padded(x, lo, rows, cols):
    """x (N, C, H, W) inside +0.0 padding: lo = (top, left), at least rows x cols."""
    N, C, H, W = x.shape
    xp = np.zeros((N, C, max(rows, lo[0] + H), max(cols, lo[1] + W)), np.float32)
    xp[:, :, lo[0]:lo[0] + H, lo[1]:lo[1] + W] = x
    return xp


def taps(k, d, s, n_out):
    """Slices of the padded input read by tap k for the n_out outputs."""
    return slice(k * d, k * d + (n_out - 1) * s + 1, s)


def ref_forward(x, w, stride, lo, hi, dil, groups, offset):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    Og = O // groups
    OH = out_size(H, lo[0], hi[0], dil[0], KH, stride[0])
    OW = out_size(W, lo[1], hi[1], dil[1], KW, stride[1])
    xp = padded(x, lo, (OH - 1) * stride[0] + (KH - 1) * dil[0] + 1,
                (OW - 1) * stride[1] + (KW - 1) * dil[1] + 1)
    out = np.zeros((N, O, OH, OW), np.float32)
    for g in range(groups):
        os_ = slice(g * Og, (g + 1) * Og)
        for c in range(Cg):
            for kh in range(KH):
                for kw in range(KW):
                    xs = xp[:, g * Cg + c, taps(kh, dil[0], stride[0], OH),
                            taps(kw, dil[1], stride[1], OW)]
                    p = R.pam(xs[:, None], w[os_, c, kh, kw][None, :, None, None], offset)
                    out[:, os_] = (out[:, os_] + p).astype(np.float32)
    return out


def ref_grad_input(x, w, g, stride, lo, dil, groups, exact, offset):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    Og = O // groups
    OH, OW = g.shape[2:]
    xp = padded(x, lo, (OH - 1) * stride[0] + (KH - 1) * dil[0] + 1,
                (OW - 1) * stride[1] + (KW - 1) * dil[1] + 1)
    acc = np.zeros_like(xp)
    for ci in range(C):
        c = ci % Cg
        for o in range((ci // Cg) * Og, (ci // Cg + 1) * Og):
            for kh in range(KH):
                for kw in range(KW):
                    sl = (slice(None), taps(kh, dil[0], stride[0], OH),
                          taps(kw, dil[1], stride[1], OW))
                    wv = w[o, c, kh, kw]
                    other = ref_slope(xp[:, ci][sl], wv, offset) if exact else wv
                    term = R.pam(g[:, o], other, None if exact else offset)
                    acc[:, ci][sl] = (acc[:, ci][sl] + term).astype(np.float32)
    return acc[:, :, lo[0]:lo[0] + H, lo[1]:lo[1] + W]


def ref_grad_weight(x, w, g, stride, lo, dil, groups, exact, offset):
    O, Cg, KH, KW = w.shape
    Og = O // groups
    N, _, OH, OW = g.shape
    xp = padded(x, lo, (OH - 1) * stride[0] + (KH - 1) * dil[0] + 1,
                (OW - 1) * stride[1] + (KW - 1) * dil[1] + 1)
    chan = ((np.arange(O) // Og) * Cg)[:, None] + np.arange(Cg)[None, :]
    acc = np.zeros(w.shape, np.float32)
    for n in range(N):
        for oh in range(OH):
            for ow in range(OW):
                rows = oh * stride[0] + np.arange(KH) * dil[0]
                cols = ow * stride[1] + np.arange(KW) * dil[1]
                xv = xp[n][chan[:, :, None, None], rows[None, None, :, None],
                           cols[None, None, None, :]]
                gv = g[n, :, oh, ow][:, None, None, None]
                term = (R.pam(gv, ref_slope(w, xv, offset)) if exact
                        else R.pam(gv, xv, offset))
                acc = (acc + term).astype(np.float32)
    return acc


# --------------------------------------------------------------------------- helpers
def assert_same_bits(got, expected):
    got = np.asarray(got, np.float32)
    expected = np.asarray(expected, np.float32)
    assert got.shape == expected.shape
    same = R.same_bits(got, expected)
    bad = np.flatnonzero(~same)
    assert bad.size == 0, (f"{bad.size} of {same.size} differ, first at {bad[:5]}: "
                           f"got {got.ravel()[bad[:5]]}, expected {expected.ravel()[bad[:5]]}")


def values(rng, shape, kind):
    """float32 test data: 'normal'; 'zeros' (zeros, -0, subnormals: int32 fast path with
    masks); 'special' (also inf/NaN/huge: general path); 'extreme' (products that overflow
    or underflow, no inf/NaN inputs)."""
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-3, 4, shape))).astype(np.float32)
    if kind == "zeros":
        pick = rng.random(shape)
        x[pick < 0.25] = 0.0
        x[(pick >= 0.25) & (pick < 0.35)] = -0.0
        x[(pick >= 0.35) & (pick < 0.45)] = np.float32(1e-40)
    elif kind == "special":
        mask = rng.random(shape) < 0.15
        x[mask] = rng.choice(SPECIAL, size=int(mask.sum()))
    elif kind == "extreme":
        x = (x * np.exp2(rng.choice([-70, 0, 70], shape))).astype(np.float32)
    return x


def i32(x):
    return np.ascontiguousarray(x, np.float32).view(np.int32)


def run_forward(kernels, x, w, stride, lo, hi, dil, groups, offset):
    O, _, KH, KW = w.shape
    shape = (x.shape[0], O, out_size(x.shape[2], lo[0], hi[0], dil[0], KH, stride[0]),
             out_size(x.shape[3], lo[1], hi[1], dil[1], KW, stride[1]))
    out = np.full(shape, np.float32(7.0))
    kernels.conv_forward(i32(x), i32(w), *stride, *lo, *dil, groups,
                         dispatch.offset_constant(offset), out)
    return out


def run_grad(kernels, which, x, w, g, stride, lo, dil, groups, exact, offset):
    out = np.full(x.shape if which == "input" else w.shape, np.float32(7.0))
    getattr(kernels, f"conv_grad_{which}")(i32(x), i32(w), i32(g), *stride, *lo, *dil,
                                           groups, exact, dispatch.offset_constant(offset),
                                           out)
    return out


@st.composite
def geometries(draw, max_size=6):
    """(x shape, w shape, stride, pad_lo, pad_hi, dilation, groups) with a non-empty output."""
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    lo = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    hi = tuple(p + draw(st.integers(0, 1)) for p in lo)
    size = []
    for i in range(2):
        least = max(1, dil[i] * (k[i] - 1) + 1 - lo[i] - hi[i])
        size.append(draw(st.integers(least, max(least, max_size))))
    n = draw(st.integers(1, 2))
    return ((n, groups * cg, *size), (groups * og, cg, *k), stride, lo, hi, dil, groups)


# --------------------------------------------------------------------------- CPU kernels
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.sampled_from(KINDS), st.sampled_from(OFFSETS), st.integers(0, 2 ** 32 - 1))
def test_cpu_forward_matches_reference(geom, kind, offset, seed):
    xs, ws, stride, lo, hi, dil, groups = geom
    rng = np.random.default_rng(seed)
    x, w = values(rng, xs, kind), values(rng, ws, kind)
    assert_same_bits(run_forward(cpu_conv, x, w, stride, lo, hi, dil, groups, offset),
                     ref_forward(x, w, stride, lo, hi, dil, groups, offset))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(max_size=5), st.sampled_from(KINDS), st.sampled_from(OFFSETS),
       st.booleans(), st.integers(0, 2 ** 32 - 1))
def test_cpu_backward_matches_reference(geom, kind, offset, exact, seed):
    xs, ws, stride, lo, hi, dil, groups = geom
    rng = np.random.default_rng(seed)
    x, w = values(rng, xs, kind), values(rng, ws, kind)
    OH = out_size(xs[2], lo[0], hi[0], dil[0], ws[2], stride[0])
    OW = out_size(xs[3], lo[1], hi[1], dil[1], ws[3], stride[1])
    g = values(rng, (xs[0], ws[0], OH, OW), kind)
    assert_same_bits(run_grad(cpu_conv, "input", x, w, g, stride, lo, dil, groups, exact,
                              offset),
                     ref_grad_input(x, w, g, stride, lo, dil, groups, exact, offset))
    assert_same_bits(run_grad(cpu_conv, "weight", x, w, g, stride, lo, dil, groups, exact,
                              offset),
                     ref_grad_weight(x, w, g, stride, lo, dil, groups, exact, offset))


def test_ref_slope_matches_the_defining_formula():
    """The slope reference against sign(b) 2^(Eb + carry) on normal pairs (reference.py)."""
    rng = np.random.default_rng(3)
    a = values(rng, 2000, "normal")
    b = values(rng, 2000, "normal")
    assert_same_bits(ref_slope(a, b), R.pam_slope(a, b).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_cpu_kernels_edge_values(kind, offset):
    """Every kernel on a fixed larger case: 3x3, stride 1, padding 1, two groups of 5
    output channels (a partial block), 468 output positions (more than one position tile
    of the CPU forward, tiles crossing images)."""
    rng = np.random.default_rng(KINDS.index(kind))
    x = values(rng, (3, 4, 12, 13), kind)
    w = values(rng, (10, 2, 3, 3), kind)
    geom = ((1, 1), (1, 1), (1, 1), (1, 1), 2)
    stride, lo, hi, dil, groups = geom
    out = run_forward(cpu_conv, x, w, stride, lo, hi, dil, groups, offset)
    assert_same_bits(out, ref_forward(x, w, stride, lo, hi, dil, groups, offset))
    g = values(rng, out.shape, kind)
    for exact in (True, False):
        assert_same_bits(run_grad(cpu_conv, "input", x, w, g, stride, lo, dil, groups, exact,
                                  offset),
                         ref_grad_input(x, w, g, stride, lo, dil, groups, exact, offset))
        assert_same_bits(run_grad(cpu_conv, "weight", x, w, g, stride, lo, dil, groups, exact,
                                  offset),
                         ref_grad_weight(x, w, g, stride, lo, dil, groups, exact, offset))


def test_cpu_kernels_do_not_depend_on_the_thread_count():
    import numba
    rng = np.random.default_rng(21)
    x, w = values(rng, (2, 4, 10, 9), "zeros"), values(rng, (6, 2, 3, 3), "zeros")
    geom = ((2, 1), (1, 1), (1, 1), (1, 2), 2)
    out = run_forward(cpu_conv, x, w, *geom, None)
    g = values(rng, out.shape, "normal")
    stride, lo, _, dil, groups = geom

    def run_all():
        return [run_forward(cpu_conv, x, w, *geom, None)] + [
            run_grad(cpu_conv, which, x, w, g, stride, lo, dil, groups, exact, None)
            for which in ("input", "weight") for exact in (True, False)]

    default = run_all()
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = run_all()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(single, default):
        assert_same_bits(a, b)


def test_empty_batch_and_channels():
    w = torch.randn(3, 2, 2, 2, requires_grad=True)
    x = torch.randn(0, 2, 4, 4, requires_grad=True)
    y = pam.conv2d(x, w)
    assert y.shape == (0, 3, 3, 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    y = pam.conv2d(torch.randn(1, 2, 4, 4), torch.randn(0, 2, 2, 2))
    assert y.shape == (1, 0, 3, 3)


def test_special_cases_by_hand():
    """Padding zeros times an infinite weight give NaN (as 0 * inf in torch); a zero
    weight gives +0, a negative-zero input gives +0 sums; overflow saturates to inf."""
    x = np.ones((1, 1, 2, 2), np.float32)
    w = np.full((1, 1, 1, 1), np.inf, np.float32)
    out = run_forward(cpu_conv, x, w, (1, 1), (1, 0), (0, 0), (1, 1), 1, None)
    assert np.isnan(out[0, 0, 0]).all() and np.isposinf(out[0, 0, 1:]).all()
    out = run_forward(cpu_conv, -0.0 * x, np.ones((1, 1, 2, 2), np.float32), (1, 1), (0, 0),
                      (0, 0), (1, 1), 1, None)
    assert out.view(np.int32).tolist() == [[[[0]]]]
    big = np.full((1, 1, 1, 2), 3e38, np.float32)
    out = run_forward(cpu_conv, big, big, (1, 1), (0, 0), (0, 0), (1, 1), 1, None)
    assert np.isposinf(out).all()


# --------------------------------------------------------------------------- CUDA kernels
def _cuda_kernels():
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    from pam.kernels import cuda_conv
    if not cuda_conv.available():
        pytest.skip("no CUDA GPU and the CUDA simulator is off (NUMBA_ENABLE_CUDASIM=1)")
    return cuda_conv


CUDA_CASES = [  # (x shape, w shape, stride, pad_lo, pad_hi, dilation, groups, kind, offset)
    ((1, 2, 4, 5), (2, 2, 2, 3), (1, 1), (1, 1), (1, 1), (1, 1), 1, "special", None),
    ((2, 4, 5, 4), (4, 2, 3, 2), (2, 1), (0, 2), (1, 2), (1, 2), 2, "zeros", 1.0552),
    ((1, 3, 3, 6), (3, 1, 1, 3), (1, 3), (0, 1), (0, 1), (1, 1), 3, "extreme", None),
]


@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_kernels_match_cpu(case):
    K = _cuda_kernels()
    xs, ws, stride, lo, hi, dil, groups, kind, offset = case
    rng = np.random.default_rng(sum(xs))
    x, w = values(rng, xs, kind), values(rng, ws, kind)
    out = run_forward(cpu_conv, x, w, stride, lo, hi, dil, groups, offset)
    assert_same_bits(run_forward(K, x, w, stride, lo, hi, dil, groups, offset), out)
    g = values(rng, out.shape, kind)
    for which in ("input", "weight"):
        for exact in (True, False):
            assert_same_bits(
                run_grad(K, which, x, w, g, stride, lo, dil, groups, exact, offset),
                run_grad(cpu_conv, which, x, w, g, stride, lo, dil, groups, exact, offset))


def test_cuda_grid_stride_and_errors(monkeypatch):
    """More outputs than launched threads (grid-stride loop); clear errors on bad arrays."""
    K = _cuda_kernels()
    monkeypatch.setattr(K, "MAX_BLOCKS", 1)
    monkeypatch.setattr(K, "THREADS", 8)
    rng = np.random.default_rng(5)
    x, w = values(rng, (1, 2, 4, 6), "normal"), values(rng, (3, 2, 2, 2), "normal")
    geom = ((1, 2), (1, 0), (1, 0), (1, 1), 1)
    assert_same_bits(run_forward(K, x, w, *geom, None), run_forward(cpu_conv, x, w, *geom, None))
    with pytest.raises(TypeError, match="int32"):
        K.conv_forward(x, i32(w), 1, 1, 0, 0, 1, 1, 1, 0, np.empty((1, 3, 3, 5), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        K.conv_forward(i32(x)[0], i32(w), 1, 1, 0, 0, 1, 1, 1, 0,
                       np.empty((1, 3, 3, 5), np.float32))


PTX_SCRIPT = textwrap.dedent(r"""
    import json, re, sys, types
    root = sys.argv[1]
    # Load pam.bits and the CUDA kernels without pam/__init__ (which imports torch).
    for name, path in [("pam", "pam"), ("pam.kernels", "pam/kernels")]:
        mod = types.ModuleType(name)
        mod.__path__ = [f"{root}/{path}"]
        sys.modules[name] = mod
    from numba import cuda, types as nt
    if not cuda.is_available():
        import numba.cuda.dispatcher as D
        D.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    try:
        cuda.compile_ptx(lambda x: None, (nt.int32[::1],), cc=(9, 0))
    except Exception as e:
        print(f"NVVM unavailable: {type(e).__name__}: {e}")
        sys.exit(77)
    from pam.kernels import cuda_conv as K
    i4, f4, i = nt.int32[:, :, :, ::1], nt.float32[:, :, :, ::1], nt.int64
    sigs = {"conv_forward": (i4, i4) + (i,) * 8 + (f4,),
            "conv_grad_input": (i4, i4, i4) + (i,) * 7 + (nt.boolean, i, f4)}
    sigs["conv_grad_weight"] = sigs["conv_grad_input"]
    for name in list(sigs):
        sigs[name + "_lmul"] = sigs[name]
    report = {}
    for name, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(K.KERNEL_FUNCTIONS[name], sig, cc=(9, 0))
        ops = sorted(set(re.findall(r"\b(?:mul|div|fma|mad|rcp|add)\.[a-z0-9.]*f(?:32|64)\b",
                                    ptx)))
        report[name] = ops
    print("REPORT" + json.dumps(report))
""")


@pytest.mark.slow
def test_cuda_kernels_compile_to_ptx_without_float_multiply():
    """The conv kernels compile for sm_90 (real numba-cuda typing, not the simulator) and
    emit float additions but no float mul/div/fma. Needs NVVM (numba-cuda[cu12]); point
    PAM_PTX_PYTHON at an interpreter that has it (torch is not needed there)."""
    K = _cuda_kernels()
    python = os.environ.get("PAM_PTX_PYTHON", sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([python, "-c", PTX_SCRIPT, str(root)], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip().splitlines()[-1][:300])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    report = json.loads(line[len("REPORT"):])
    assert sorted(report) == sorted(K.KERNEL_FUNCTIONS)
    for name, ops in report.items():
        assert any(op.startswith("add.") for op in ops), (name, ops)
        assert all(op.startswith("add.") for op in ops), f"{name} multiplies floats: {ops}"


# --------------------------------------------------------------------------- ops
def _tensors(rng, xs, ws, kind="normal"):
    x = torch.from_numpy(values(rng, xs, kind)).requires_grad_()
    w = torch.from_numpy(values(rng, ws, kind)).requires_grad_()
    return x, w


def _grads(y, inputs, g):
    return [t.numpy() for t in torch.autograd.grad(y, inputs, torch.from_numpy(g))]


@pytest.mark.parametrize("backward", ["exact", "approx"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_conv2d_op_forward_and_backward_equal_reference(backward, offset):
    rng = np.random.default_rng(11)
    x, w = _tensors(rng, (2, 4, 7, 6), (6, 2, 3, 2))
    b = torch.from_numpy(values(rng, (6,), "normal")).requires_grad_()
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    y = pam.conv2d(x, w, b, offset=offset, backward=backward, **kw)
    geom = ((2, 1), (1, 2), (1, 2), (1, 2), 2)
    xn, wn = x.detach().numpy(), w.detach().numpy()
    expected = ref_forward(xn, wn, *geom, offset)
    assert_same_bits(y.detach().numpy(),
                     (expected + b.detach().numpy()[None, :, None, None]).astype(np.float32))
    assert y.shape == torch.nn.functional.conv2d(x, w, b, **kw).shape
    g = values(rng, tuple(y.shape), "normal")
    gx, gw, gb = _grads(y, (x, w, b), g)
    exact = backward == "exact"
    stride, lo, _, dil, groups = geom
    assert_same_bits(gx, ref_grad_input(xn, wn, g, stride, lo, dil, groups, exact, offset))
    assert_same_bits(gw, ref_grad_weight(xn, wn, g, stride, lo, dil, groups, exact, offset))
    assert_same_bits(gb, torch.from_numpy(g).sum((0, 2, 3)).numpy())


def test_conv1d_is_conv2d_with_height_one():
    rng = np.random.default_rng(12)
    x, w = _tensors(rng, (3, 4, 11), (6, 2, 3))
    b = torch.from_numpy(values(rng, (6,), "normal")).requires_grad_()
    for backward in ("exact", "approx"):
        kw = dict(stride=2, padding=2, dilation=2, groups=2, backward=backward)
        y1 = pam.conv1d(x, w, b, **kw)
        x2 = x.detach().unsqueeze(2).requires_grad_()
        w2 = w.detach().unsqueeze(2).requires_grad_()
        y2 = pam.conv2d(x2, w2, b, stride=(1, 2), padding=(0, 2), dilation=(1, 2), groups=2,
                        backward=backward)
        assert_same_bits(y1.detach().numpy(), y2.detach().numpy()[:, :, 0])
        g = values(rng, tuple(y1.shape), "normal")
        g1 = _grads(y1, (x, w, b), g)
        g2 = _grads(y2, (x2, w2, b), g[:, :, None])
        for a, c in zip(g1, (g2[0][:, :, 0], g2[1][:, :, 0], g2[2])):
            assert_same_bits(a, c)
    assert y1.shape == torch.nn.functional.conv1d(x, w, b, stride=2, padding=2, dilation=2,
                                                  groups=2).shape


def test_unbatched_same_valid_padding_and_bias():
    rng = np.random.default_rng(13)
    x, w = _tensors(rng, (2, 3, 6, 7), (4, 3, 2, 3))
    for padding in ("same", "valid"):
        y = pam.conv2d(x, w, padding=padding, dilation=(2, 1))
        assert y.shape == torch.nn.functional.conv2d(x, w, padding=padding,
                                                     dilation=(2, 1)).shape
    # 'same' with an even kernel pads one extra zero after the input, like torch
    y = pam.conv2d(x, w, padding="same")
    explicit = pam.conv2d(torch.nn.functional.pad(x, (1, 1, 0, 1)), w)
    assert_same_bits(y.detach().numpy(), explicit.detach().numpy())
    assert_same_bits(pam.conv2d(x[1], w, padding=1).detach().numpy(),
                     pam.conv2d(x[1:], w, padding=1)[0].detach().numpy())
    assert pam.conv1d(x[0, :, 0], w[:, :, 0], padding="same").shape == (4, 7)


def test_raw_functions_match_the_autograd_op():
    rng = np.random.default_rng(14)
    x, w = _tensors(rng, (2, 4, 5, 6), (2, 2, 2, 3))
    b = torch.from_numpy(values(rng, (2,), "normal")).requires_grad_()
    off = dispatch.offset_constant(1.0552)
    y = pam.conv2d(x, w, b, stride=(1, 2), padding=(1, 0), groups=2, offset=1.0552)
    raw = PC.conv_forward(x.detach(), w.detach(), b.detach(), (1, 2), (1, 0), (1, 1), 2, off)
    assert_same_bits(raw.numpy(), y.detach().numpy())
    g = values(rng, tuple(y.shape), "normal")
    expected = _grads(y, (x, w, b), g)
    got = PC.conv_backward(torch.from_numpy(g), x.detach(), w.detach(), (1, 2), (1, 0),
                           (1, 1), 2, off, True)
    for a, c in zip(got, expected):
        assert_same_bits(a.numpy(), c)
    gx, gw, gb = PC.conv_backward(torch.from_numpy(g), x.detach(), w.detach(), (1, 2),
                                  (1, 0), (1, 1), 2, off, False, (False, True, False))
    assert gx is None and gb is None
    assert_same_bits(gw.numpy(), ref_grad_weight(x.detach().numpy(), w.detach().numpy(), g,
                                                 (1, 2), (1, 0), (1, 1), 2, False, 1.0552))
    # 1-D raw call
    x1, w1 = x.detach()[:, :, 0], w.detach()[:, :, 0]
    y1 = PC.conv_forward(x1, w1, None, (2,), (1,), (1,), 2, 0)
    assert_same_bits(y1.numpy(), pam.conv1d(x1, w1, stride=2, padding=1, groups=2).numpy())
    g1 = torch.from_numpy(values(rng, tuple(y1.shape), "normal"))
    gx1, gw1, gb1 = PC.conv_backward(g1, x1, w1, (2,), (1,), (1,), 2, 0, True)
    assert gx1.shape == x1.shape and gw1.shape == w1.shape and gb1.shape == (2,)


def test_clear_errors():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3)
    with pytest.raises(TypeError, match="float32"):
        pam.conv2d(x.double(), w)
    with pytest.raises(ValueError, match="divisible by groups"):
        pam.conv2d(x, torch.randn(3, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="channels"):
        pam.conv2d(x, w)
    with pytest.raises(ValueError, match="4-D weight"):
        pam.conv2d(x, w[0])
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        pam.conv2d(x[0, 0], w)
    with pytest.raises(ValueError, match="strided"):
        pam.conv2d(x, w, groups=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding"):
        pam.conv2d(x, w, groups=2, padding="full")
    with pytest.raises(ValueError, match="stride"):
        pam.conv2d(x, w, groups=2, stride=0)
    with pytest.raises(ValueError, match="empty"):
        pam.conv2d(x[:, :, :2], w, groups=2)
    with pytest.raises(ValueError, match="bias"):
        pam.conv2d(x, w, torch.randn(3), groups=2)
    with pytest.raises(ValueError, match="backward"):
        pam.conv2d(x, w, groups=2, backward="fast")
    with pytest.raises(ValueError, match="padding_mode"):
        pam.nn.Conv2d(2, 2, 3, padding_mode="reflect")


# --------------------------------------------------------------------------- layers
def test_layers_convert_and_audit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, groups=1),
                                torch.nn.ReLU(), torch.nn.Flatten(1), torch.nn.Linear(64, 2))
    conv1 = torch.nn.Conv1d(2, 3, 2, stride=2)
    weight, bias = model[0].weight, model[0].bias
    pam.convert(model)
    conv1p = pam.convert(conv1)
    assert isinstance(model[0], pam.nn.Conv2d) and isinstance(model[0], torch.nn.Conv2d)
    assert model[0].weight is weight and model[0].bias is bias
    assert isinstance(conv1p, pam.nn.Conv1d) and conv1p.weight is conv1.weight
    assert "backward='exact'" in repr(model[0])
    x, x1 = torch.randn(2, 3, 4, 4), torch.randn(2, 6)
    with pam.audit.no_float_multiply():
        y = model[0](x)
        y.sum().backward()
        conv1p(x1).sum().backward()
    assert weight.grad is not None and bias.grad is not None
    expected = pam.conv2d(x, weight, bias, padding=1)
    assert torch.equal(y.detach().view(torch.int32), expected.detach().view(torch.int32))
    with pytest.raises(pam.nn.UnsupportedModuleError, match="padding_mode"):
        pam.convert(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
