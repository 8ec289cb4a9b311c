"""No float multiply or divide in the compiled CPU kernels (checked on the LLVM IR).

Every Numba dispatcher defined in pam.kernels.cpu, pam.kernels.cpu_conv,
pam.kernels.cpu_rows, pam.kernels.cpu_xent and pam.kernels.cpu_attn (named
``cpu_conv.<name>``...) is found
automatically (so a new kernel is covered as soon as it exists), compiled for its int32
bit-pattern signatures by running the public kernels on small inputs that take every path
(int32 fast paths with and without zero masks, general paths with inf/NaN), and the IR of
every compiled signature is scanned for ``fmul``/``fdiv`` instructions and calls to
``llvm.fma``/``llvm.fmuladd``. The IR of a parallel kernel includes its prange bodies. A
canary (a parallel float multiply) proves the detector flags what it is meant to flag.

Numba returns no valid IR for code loaded from its cache (cache=True), so the scan runs in a
subprocess that never loads from the cache: everything compiles afresh. That subprocess is
the suite's longest job (every kernel, every path), so tests/conftest.py starts it as soon
as the session has collected this module and it runs beside the other tests; it still
*saves* what it compiles to the usual Numba cache, where the test process finds kernels it
has not compiled yet (each kernel compiles once per suite instead of twice).
"""
import json
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from numba import njit, prange
from numba.core.dispatcher import Dispatcher

from pam.kernels import cpu, cpu_attn, cpu_conv, cpu_rows, cpu_xent

KERNEL_MODULES = {"": cpu, "cpu_conv.": cpu_conv, "cpu_rows.": cpu_rows,
                  "cpu_xent.": cpu_xent, "cpu_attn.": cpu_attn}

FORBIDDEN = re.compile(r"=\s*(?:fmul|fdiv)\b|call\b[^\n]*@llvm\.(?:fma|fmuladd)\.")


def forbidden_ops(ir):
    """The IR lines that multiply or divide floats (instructions or fused intrinsics)."""
    return [line.strip() for line in ir.splitlines() if FORBIDDEN.search(line)]


def cpu_dispatchers():
    return {prefix + name: obj for prefix, module in KERNEL_MODULES.items()
            for name, obj in vars(module).items()
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__}


def _operands(rng, shape, kind):
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "zeros":
        x[rng.random(shape) < 0.4] = 0.0
    elif kind == "special":
        x.flat[0], x.flat[-1] = np.inf, np.nan
    return x.view(np.int32)


def compile_conv_kernels(rng, lmul):
    """Convolutions (PAM, or L-Mul when ``lmul``): forward (fast path with normal operands,
    general with inf/NaN), both backward modes, stride 1 and 2 (contiguous and strided
    rows)."""
    for kind in ("normal", "zeros", "special"):
        cx = _operands(rng, (2, 4, 6, 7), kind)
        cw = _operands(rng, (4, 2, 3, 2), kind)
        for sw in (1, 2):
            ow = (7 + 2 - 2) // sw + 1
            cg = _operands(rng, (2, 4, 6, ow), kind)
            if lmul:
                cpu_conv.conv_forward_lmul(cx, cw, 1, sw, 1, 1, 1, 1, 2, 1 << 19,
                                           np.empty((2, 4, 6, ow), np.float32))
                cpu_conv.conv_grad_input_lmul(cx, cw, cg, 1, sw, 1, 1, 1, 1, 2, False,
                                              1 << 19, np.empty((2, 4, 6, 7), np.float32))
                cpu_conv.conv_grad_weight_lmul(cx, cw, cg, 1, sw, 1, 1, 1, 1, 2, False,
                                               1 << 19, np.empty((4, 2, 3, 2), np.float32))
                continue
            cpu_conv.conv_forward(cx, cw, 1, sw, 1, 1, 1, 1, 2, 0,
                                  np.empty((2, 4, 6, ow), np.float32))
            for exact in (True, False):
                cpu_conv.conv_grad_input(cx, cw, cg, 1, sw, 1, 1, 1, 1, 2, exact, 0,
                                         np.empty((2, 4, 6, 7), np.float32))
                cpu_conv.conv_grad_weight(cx, cw, cg, 1, sw, 1, 1, 1, 1, 2, exact, 0,
                                          np.empty((4, 2, 3, 2), np.float32))


def compile_matmul_kernels(rng):
    """matmul (PAM and L-Mul) and the exact gradients on normal, zero-holding and inf/NaN
    operands (fast paths with and without masks, general paths)."""
    for kind in ("normal", "zeros", "special"):
        x = _operands(rng, (2, 5, 6), kind)
        y = _operands(rng, (2, 6, 7), kind)
        g = _operands(rng, (2, 5, 7), kind)
        xt = np.ascontiguousarray(x.transpose(0, 2, 1))
        yt = np.ascontiguousarray(y.transpose(0, 2, 1))
        cpu.matmul(x, y, 0, np.empty((2, 5, 7), np.float32))
        cpu.matmul_lmul(x, y, 1 << 19, np.empty((2, 5, 7), np.float32))
        cpu.matmul_exact_grad_left(x, yt, g, 0, np.empty((2, 5, 6), np.float32))
        cpu.matmul_exact_grad_right(xt, y, g, 0, np.empty((2, 6, 7), np.float32))


def compile_elementwise_kernels(a, b, out):
    """Elementwise PAM/L-Mul kernels, their slopes and scalar-operand forms, quantize."""
    for name in ("mul", "div", "mul_slope", "div_slope_num", "div_slope_den"):
        getattr(cpu, name)(a, b, 0, out)
    for name in ("exp2", "log2", "exp2_slope", "log2_slope", "pow2_part"):
        getattr(cpu, name)(a, out)
    for fmt in range(5):
        cpu.quantize(b, fmt, 1, out)
    s = b[:1].copy()
    for name in ("mul", "div", "mul_slope", "div_slope_num", "div_slope_den"):
        getattr(cpu, name + "_bs")(a, s, 0, out)
        getattr(cpu, name + "_as")(s, b, 0, out)
    cpu.mul_lmul(a, b, 1 << 19, out)
    cpu.mul_lmul_bs(a, s, 1 << 19, out)
    cpu.mul_lmul_as(s, b, 1 << 19, out)


def compile_fused_kernels(a, b, out):
    """Fused optimizer steps (flat and address-table) and row kernels (pam.optim_bits,
    pam.rows_bits); flags 7 / 63 turn every branch on (AdamW also without amsgrad, a kernel
    of its own)."""
    m, v, mx = a.copy(), np.abs(b.view(np.float32)).view(np.int32), a.copy()
    for flags in (7, 3):                                # amsgrad on and off: one kernel each
        cpu.adamw(a.copy(), b, m, v, mx, *([0x3F000000] * 8), 0, flags)
    cpu.adamw_unbiased(a.copy(), b, m, v, mx, *([0x3F000000] * 5), 0, 0, 7)
    cpu.sgd(a.copy(), b, m, *([0x3F000000] * 4), 0, 63)
    keep = [a.copy(), b, m, v, mx]                      # the table kernels: by address
    table = np.array([[x.ctypes.data] for x in keep], np.int64)
    sizes = np.array([a.size], np.int64)
    for flags in (7, 3):
        cpu.adamw_table(table, sizes, *([0x3F000000] * 8), 0, flags)
    cpu.adamw_unbiased_table(table, sizes, *([0x3F000000] * 5), 0, 0, 7)
    cpu.sgd_table(table[:3], sizes, *([0x3F000000] * 4), 0, 63)
    knots = np.array([-1.0, 0.5], np.float32).view(np.int32)
    slopes = np.array([0.25, 0.5], np.float32).view(np.int32)
    cpu.gelu_forward(a, knots, slopes, out)
    cpu.gelu_backward(a, b, knots, slopes, True, out)
    sm_stats = np.empty(2 * (a.size // 8), np.int32)      # the softmax rows' (m, s)
    cpu.softmax_forward(a, out, sm_stats, 8, 0, True)
    for exact in (True, False):                         # one kernel per variant
        cpu.softmax_backward(a, b, sm_stats, out, 8, 0, True, exact)
    w8 = b[:8].copy()                                   # row kernels (pam.kernels.cpu_rows)
    for exact in (True, False):
        cpu_rows.log_softmax_forward(a, out, 8, 0)
        cpu_rows.log_softmax_backward(a, b, out, 8, 0, exact)
    for n in (8, 6):                                    # N a power of two and not
        nb = int(np.float32(n).view(np.int32))
        x = a[:6 * n].copy()
        stats = np.empty(9 * 6, np.int32)               # the rows' statistics
        for flags in range(8):                          # weight / bias / exact: every variant
            cpu_rows.layer_norm_forward(x, w8[:n], w8[:n], np.empty_like(x), stats, n, nb,
                                        0x3727C5AC, 0, flags)
            cpu_rows.layer_norm_backward(x, w8[:n], b[:6 * n].copy(), stats,
                                         np.empty_like(x), np.empty(n, np.int32),
                                         np.empty(n, np.int32), n, nb, 0, flags)
    target = np.array([0, 7, -100, 3, 5, 1, 2, 6], np.int64)    # cross entropy, 8 rows of 8
    for reduction in (0, 1, 2):
        for flags in (0, 7):                            # weight / smoothing / exact
            loss = np.empty(8 if reduction == 0 else 1, np.int32)
            cpu_xent.cross_entropy_forward(a, w8, target, 8, -100, 0x3F666666, 0x3C23D70A, 0,
                                           flags, reduction, loss)
            cpu_xent.cross_entropy_backward(a, w8, target, 8, -100, 0x3F666666, 0x3C23D70A,
                                            0, flags, reduction, loss, out)


def compile_attention_kernels(rng):
    """The fused attention core (pam.kernels.cpu_attn): forward and both backward variants
    for every mask mode, on a bounded head (zero skipping) and one with inf / NaN; the
    node's lane forward."""
    P, L, S, E, Ev = 2, 3, 4, 3, 2
    mask = np.array([1, 0, 1, 1] * L, np.int32)
    for kind in ("zeros", "special"):
        q, k, v = (_operands(rng, (P * n * d,), kind) for n, d in ((L, E), (S, E), (S, Ev)))
        go = _operands(rng, (P * L * Ev,), kind)
        for mode, m in ((0, mask[:1]), (1, mask), (2, _operands(rng, (L * S,), kind))):
            out = np.empty(P * L * Ev, np.int32)
            scores, probs = np.empty(P * L * S, np.int32), np.empty(P * L * S, np.int32)
            stats = np.empty(P * L * 2, np.int32)
            cpu_attn.attention_forward(q, k, v, m, L, S, E, Ev, 0, True, mode, 0x3F000000, 0,
                                       out, scores, probs, stats)
            for exact in (True, False):
                cpu_attn.attention_backward(q, k, v, go, m, scores, probs, stats, L, S, E, Ev,
                                            0, True, mode, 0x3F000000, 0, exact,
                                            np.empty_like(q), np.empty_like(k),
                                            np.empty_like(v))
        cpu_attn.attention_forward_lanes(q, k, v, L, S, E, Ev, True, 0x3F000000, 0, 0,
                                         np.empty_like(q), out, scores, probs, stats)


def compile_all_kernels():
    """Run every public kernel on int32 operands so that each dispatcher gets compiled.

    The order is the test process's: the kernels of a PAM training step (which the test
    process compiles first, itself) last, the PAM convolutions (test_compile.py, early in
    the session) first, so that they are in the cache when the tests need them."""
    rng = np.random.default_rng(0)
    a = _operands(rng, (64,), "zeros")
    b = _operands(rng, (64,), "special")
    out = np.empty(64, np.int32)
    compile_conv_kernels(rng, lmul=False)
    compile_matmul_kernels(rng)
    compile_conv_kernels(rng, lmul=True)
    compile_fused_kernels(a, b, out)
    compile_attention_kernels(rng)
    compile_elementwise_kernels(a, b, out)


def scan():
    """Compile every kernel, then {dispatcher name: {signature: [offending IR lines]}}.

    Loading from Numba's cache is switched off in this process (cached code has no IR);
    saving stays on."""
    from numba.core import caching
    caching.Cache.load_overload = lambda self, sig, target_context: None
    compile_all_kernels()
    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # "Inspection disabled for cached code" fails
        for name, dispatcher in cpu_dispatchers().items():
            result[name] = {str(sig): forbidden_ops(ir)
                            for sig, ir in dispatcher.inspect_llvm().items()}
    return result


def start_scan():
    """Start :func:`scan` in a subprocess and return the ``subprocess.Popen``."""
    here = pathlib.Path(__file__).resolve().parent
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_no_float_mul_ir as t; "
            "print('SCAN ' + json.dumps(t.scan()))")
    return subprocess.Popen([sys.executable, "-c", code, str(here)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=here.parent)


@pytest.fixture(scope="module")
def compiled(request):
    proc = getattr(request.config, "pam_ir_scan", None) or start_scan()
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("SCAN ")][-1]
    return json.loads(line[5:])


def test_detector_flags_a_float_multiply():
    @njit(parallel=True)
    def canary(x, y, out):
        for i in prange(x.size):
            out[i] = x[i] * y[i]

    @njit
    def canary_div(x, y):
        return x / y

    x = np.ones(16, np.float32)
    canary(x, x, np.empty_like(x))
    canary_div(np.float32(1.0), np.float32(3.0))
    for fn in (canary, canary_div):
        irs = list(fn.inspect_llvm().values())
        assert irs and all(forbidden_ops(ir) for ir in irs), fn
    assert forbidden_ops("  %7 = call float @llvm.fma.f32(float %1, float %2, float %3)")
    assert forbidden_ops("  %s = call <8 x float> @llvm.fmuladd.v8f32(<8 x float> %a)")
    assert not forbidden_ops("  %3 = mul nsw i64 %1, %2\n  %4 = fadd float %5, %6")


def test_every_kernel_is_found_and_compiled(compiled):
    public = {"mul", "div", "mul_slope", "div_slope_num", "div_slope_den", "exp2", "log2",
              "exp2_slope", "log2_slope", "matmul", "matmul_exact_grad_left",
              "matmul_exact_grad_right", "cpu_conv.conv_forward", "cpu_conv.conv_grad_input",
              "cpu_conv.conv_grad_weight", "quantize", "pow2_part", "mul_lmul", "mul_lmul_bs",
              "mul_lmul_as", "matmul_lmul", "cpu_conv.conv_forward_lmul",
              "cpu_conv.conv_grad_input_lmul", "cpu_conv.conv_grad_weight_lmul",
              "cpu_rows.log_softmax_forward", "cpu_rows.log_softmax_backward",
              "cpu_rows.layer_norm_forward", "cpu_rows.layer_norm_backward",
              "cpu_xent.cross_entropy_forward", "cpu_xent.cross_entropy_backward",
              "cpu_attn.attention_forward", "cpu_attn.attention_backward",
              "cpu_attn.attention_forward_lanes"}
    # public kernels are dispatchers or, where the path is chosen in Python (matmul and its
    # gradients), plain functions over dispatchers that are all in ``compiled``
    entries = {prefix + name for prefix, module in KERNEL_MODULES.items()
               for name, obj in vars(module).items() if callable(obj)}
    assert public <= entries
    assert {"_mm_range", "_pack_range", "_matmul_fast_lmul",
            "_matmul_general", "_grad_range",
            "_grad_left_general", "_grad_right_general"} <= set(compiled)
    missing = sorted(name for name, sigs in compiled.items() if not sigs)
    assert not missing, (f"kernels never compiled by compile_all_kernels(), extend it so their "
                         f"IR gets checked: {missing}")


def test_no_float_mul_or_div_in_cpu_kernels(compiled):
    offenders = {f"{name}{sig}": bad[:3] for name, sigs in compiled.items()
                 for sig, bad in sigs.items() if bad}
    assert not offenders, offenders
