"""CUDA convolution kernels (numba-cuda), bit-identical to :mod:`pam.kernels.cpu_conv`.

Same names, arguments, shapes and accumulation order as the CPU kernels (read that module's
docstring for the definitions): every kernel calls the scalar definitions of
:mod:`pam.bits`, and each thread owns one output element and reduces it sequentially in
float32 from +0.0 in the documented order, so the results are deterministic and equal to
the CPU results bit for bit (the CPU fast path gives the same bits as the general one).
Padding terms are included as PAM(+0, w) here; they are +-0 (no change to a sum) unless w
is inf or NaN, exactly as on CPU.

* ``conv_forward``: one thread per (n, o, oh, ow), reducing over c, kh, kw.
* ``conv_grad_input``: one thread per (n, ci, ih, iw), reducing over o, kh, kw (the taps
  whose output position exists).
* ``conv_grad_weight``: one thread per (o, c, kh, kw), reducing over n, oh, ow.
* ``conv_forward_lmul``, ``conv_grad_input_lmul``, ``conv_grad_weight_lmul``: the same
  with L-Mul terms (bits.lmul_bits, the constant c in the ``off`` slot; approximate
  backward only).

Threads walk the flat output index with a grid-stride loop (``THREADS`` per block, at most
``MAX_BLOCKS`` blocks); no shared memory, no atomics. Arguments are either torch CUDA
tensors (contiguous, zero-copy, launched on torch's current stream) or NumPy arrays (copied
to the device and back; what the tests use under ``NUMBA_ENABLE_CUDASIM=1``). Kernels are
compiled on first use; importing this module needs neither a GPU nor numba-cuda.
"""
import numpy as np
from numba.extending import register_jitable

from .. import bits
from .cuda import (_check_array, _is_torch_tensor, available, cuda, lazy_kernels,
                   torch_stream)

__all__ = ["conv_forward", "conv_grad_input", "conv_grad_weight", "conv_forward_lmul",
           "conv_grad_input_lmul", "conv_grad_weight_lmul", "available", "THREADS"]

THREADS = 128
MAX_BLOCKS = 8192


# =========================================================================== kernels
# Each body serves the PAM kernel and, with ``lmul``, the L-Mul one (bits.lmul_bits, the
# L-Mul constant c in the ``off`` slot; approximate backward only).
@register_jitable(forceinline=True)
def _conv_forward_body(x, w, sh, sw, ph, pw, dh, dw, groups, off, out, lmul):
    """out[n, o, oh, ow] = sum over c, kh, kw (increasing) of PAM(x, w[o, c, kh, kw])."""
    H = x.shape[2]
    W = x.shape[3]
    O = w.shape[0]
    Cg = w.shape[1]
    KH = w.shape[2]
    KW = w.shape[3]
    OH = out.shape[2]
    OW = out.shape[3]
    Og = O // groups
    total = out.shape[0] * O * OH * OW
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        ow = idx % OW
        t = idx // OW
        oh = t % OH
        t = t // OH
        o = t % O
        n = t // O
        ci0 = (o // Og) * Cg
        acc = np.float32(0.0)
        for c in range(Cg):
            for kh in range(KH):
                ih = oh * sh - ph + kh * dh
                for kw in range(KW):
                    iw = ow * sw - pw + kw * dw
                    xv = np.int32(0)
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        xv = x[n, ci0 + c, ih, iw]
                    if lmul:
                        p = bits.lmul_bits(xv, w[o, c, kh, kw], off)
                    else:
                        p = bits.mul_bits(xv, w[o, c, kh, kw], off)
                    acc += bits.bits_to_f32(p)
        out[n, o, oh, ow] = acc


@register_jitable(forceinline=True)
def _conv_grad_input_body(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out, lmul):
    """out[n, ci, ih, iw] = sum over o, kh, kw (increasing) of PAM(grad, slope(x, w) or w)."""
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    O = w.shape[0]
    Cg = w.shape[1]
    KH = w.shape[2]
    KW = w.shape[3]
    OH = grad.shape[2]
    OW = grad.shape[3]
    Og = O // groups
    total = x.shape[0] * C * H * W
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        iw = idx % W
        t = idx // W
        ih = t % H
        t = t // H
        ci = t % C
        n = t // C
        gi = ci // Cg
        c = ci - gi * Cg
        xv = x[n, ci, ih, iw]
        acc = np.float32(0.0)
        for o in range(gi * Og, (gi + 1) * Og):
            for kh in range(KH):
                th = ih + ph - kh * dh
                if th < 0 or th % sh != 0 or th // sh >= OH:
                    continue
                oh = th // sh
                for kw in range(KW):
                    tw = iw + pw - kw * dw
                    if tw < 0 or tw % sw != 0 or tw // sw >= OW:
                        continue
                    g = grad[n, o, oh, tw // sw]
                    wv = w[o, c, kh, kw]
                    if lmul:
                        p = bits.lmul_bits(g, wv, off)
                    elif exact:
                        p = bits.mul_bits(g, bits.mul_slope_bits(xv, wv, off), 0)
                    else:
                        p = bits.mul_bits(g, wv, off)
                    acc += bits.bits_to_f32(p)
        out[n, ci, ih, iw] = acc


@register_jitable(forceinline=True)
def _conv_grad_weight_body(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out, lmul):
    """out[o, c, kh, kw] = sum over n, oh, ow (increasing) of PAM(grad, slope(w, x) or x)."""
    N = x.shape[0]
    H = x.shape[2]
    W = x.shape[3]
    O = w.shape[0]
    Cg = w.shape[1]
    KH = w.shape[2]
    KW = w.shape[3]
    OH = grad.shape[2]
    OW = grad.shape[3]
    Og = O // groups
    total = O * Cg * KH * KW
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        kw = idx % KW
        t = idx // KW
        kh = t % KH
        t = t // KH
        c = t % Cg
        o = t // Cg
        ci = (o // Og) * Cg + c
        wv = w[o, c, kh, kw]
        acc = np.float32(0.0)
        for n in range(N):
            for oh in range(OH):
                ih = oh * sh - ph + kh * dh
                for ow in range(OW):
                    iw = ow * sw - pw + kw * dw
                    xv = np.int32(0)
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        xv = x[n, ci, ih, iw]
                    g = grad[n, o, oh, ow]
                    if lmul:
                        p = bits.lmul_bits(g, xv, off)
                    elif exact:
                        p = bits.mul_bits(g, bits.mul_slope_bits(wv, xv, off), 0)
                    else:
                        p = bits.mul_bits(g, xv, off)
                    acc += bits.bits_to_f32(p)
        out[o, c, kh, kw] = acc


def _conv_forward_kernel(x, w, sh, sw, ph, pw, dh, dw, groups, off, out):
    _conv_forward_body(x, w, sh, sw, ph, pw, dh, dw, groups, off, out, False)


def _conv_forward_lmul_kernel(x, w, sh, sw, ph, pw, dh, dw, groups, c, out):
    _conv_forward_body(x, w, sh, sw, ph, pw, dh, dw, groups, c, out, True)


def _conv_grad_input_kernel(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    _conv_grad_input_body(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out, False)


def _conv_grad_input_lmul_kernel(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, c, out):
    _conv_grad_input_body(x, w, grad, sh, sw, ph, pw, dh, dw, groups, False, c, out, True)


def _conv_grad_weight_kernel(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    _conv_grad_weight_body(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out, False)


def _conv_grad_weight_lmul_kernel(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, c, out):
    _conv_grad_weight_body(x, w, grad, sh, sw, ph, pw, dh, dw, groups, False, c, out, True)


# Kernel name -> plain Python kernel function (what cuda.jit and cuda.compile_ptx take).
KERNEL_FUNCTIONS = {
    "conv_forward": _conv_forward_kernel,
    "conv_grad_input": _conv_grad_input_kernel,
    "conv_grad_weight": _conv_grad_weight_kernel,
    "conv_forward_lmul": _conv_forward_lmul_kernel,
    "conv_grad_input_lmul": _conv_grad_input_lmul_kernel,
    "conv_grad_weight_lmul": _conv_grad_weight_lmul_kernel,
}

_compiled = lazy_kernels(KERNEL_FUNCTIONS)


# =========================================================================== launching
def _launch(name, arrays, scalars, out):
    """Launch kernel ``name`` over out.size threads with ``(*arrays, *scalars, out)``.

    torch CUDA tensors are passed zero-copy on torch's current stream; NumPy arrays are
    copied to the device and the result is copied back into ``out``.
    """
    for i, a in enumerate(arrays):
        _check_array(a, ("x", "w", "grad")[i], 4, np.int32)
    _check_array(out, "out", 4, np.float32)
    size = int(np.prod(out.shape))
    if size == 0:
        return out
    griddim = min((size + THREADS - 1) // THREADS, MAX_BLOCKS)
    kernel = _compiled(name)
    tensors = [_is_torch_tensor(a) for a in (*arrays, out)]
    if all(tensors):
        with torch_stream((*arrays, out)) as stream:
            dev = [cuda.as_cuda_array(a.detach()) for a in (*arrays, out)]
            kernel[griddim, THREADS, stream](*dev[:-1], *scalars, dev[-1])
        return out
    if any(tensors):
        raise TypeError("pass either only torch CUDA tensors or only NumPy arrays")
    dev = [cuda.to_device(a) for a in arrays]
    dout = cuda.to_device(out)
    kernel[griddim, THREADS](*dev, *scalars, dout)
    dout.copy_to_host(out)
    return out


def _geometry(sh, sw, ph, pw, dh, dw, groups):
    return tuple(int(v) for v in (sh, sw, ph, pw, dh, dw, groups))


# =========================================================================== public kernels
def conv_forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, out):
    """PAM convolution without bias (see :mod:`pam.kernels.cpu_conv`).

    x: (N, C, H, W), w: (O, C // groups, KH, KW) int32; out: (N, O, OH, OW) float32.
    """
    return _launch("conv_forward", (x, w),
                   (*_geometry(sh, sw, ph, pw, dh, dw, groups), int(off)), out)


def conv_grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    """Gradient w.r.t. x, exact or approximate; out: (N, C, H, W) float32."""
    return _launch("conv_grad_input", (x, w, grad),
                   (*_geometry(sh, sw, ph, pw, dh, dw, groups), bool(exact), int(off)), out)


def conv_grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    """Gradient w.r.t. w, exact or approximate; out: (O, C // groups, KH, KW) float32."""
    return _launch("conv_grad_weight", (x, w, grad),
                   (*_geometry(sh, sw, ph, pw, dh, dw, groups), bool(exact), int(off)), out)


def _lmul_checks(name, c, exact=False):
    if exact:
        raise ValueError(f"{name}: only the approximate backward (exact=False); the exact "
                         f"L-Mul slope is pow2_part of the other operand")
    if not 0 <= int(c) < bits.TWO23:
        raise ValueError(f"L-Mul constant c must be in [0, 2^23) (see bits.lmul_constant), "
                         f"got {c}")


def conv_forward_lmul(x, w, sh, sw, ph, pw, dh, dw, groups, c, out):
    """``conv_forward`` with L-Mul products (bits.lmul_bits, c = bits.lmul_constant(m))."""
    _lmul_checks("conv_forward_lmul", c)
    return _launch("conv_forward_lmul", (x, w),
                   (*_geometry(sh, sw, ph, pw, dh, dw, groups), int(c)), out)


def conv_grad_input_lmul(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, c, out):
    """Approximate gradient w.r.t. x with L-Mul(grad, w; c) terms (``exact`` must be False)."""
    _lmul_checks("conv_grad_input_lmul", c, exact)
    return _launch("conv_grad_input_lmul", (x, w, grad),
                   (*_geometry(sh, sw, ph, pw, dh, dw, groups), False, int(c)), out)


def conv_grad_weight_lmul(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, c, out):
    """Approximate gradient w.r.t. w with L-Mul(grad, x; c) terms (``exact`` must be False)."""
    _lmul_checks("conv_grad_weight_lmul", c, exact)
    return _launch("conv_grad_weight_lmul", (x, w, grad),
                   (*_geometry(sh, sw, ph, pw, dh, dw, groups), False, int(c)), out)
