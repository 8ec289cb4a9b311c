"""CPU convolution kernels (Numba, parallel, cached) over int32 bit-pattern arrays.

One kernel set serves every convolution: tensors are 2-D convolutions in NCHW layout
(a 1-D convolution is the case H = 1, KH = 1). Arguments:

* ``x``: (N, C, H, W) int32 bit patterns of the input;
* ``w``: (O, C // groups, KH, KW) int32 bit patterns of the weight;
* ``grad``: (N, O, OH, OW) int32 bit patterns of the output gradient (backward kernels);
* ``sh, sw``: strides, ``ph, pw``: the padding before the first row / column (the padding
  after the last one follows from the output shape, so asymmetric padding works),
  ``dh, dw``: dilations, ``groups``, ``off``: the PAM offset constant
  (:func:`pam.dispatch.offset_constant`), ``exact``: exact or approximate backward;
* ``out``: the float32 result, whose shape fixes the output size (OH, OW).

Input position of output (oh, ow) and kernel tap (kh, kw): ih = oh sh - ph + kh dh,
iw = ow sw - pw + kw dw. A position outside the input is a padding zero, +0.0.

Accumulation order (the same in :mod:`pam.kernels.cuda_conv`; it defines the bits):

* ``conv_forward``: out[n, o, oh, ow] = float32 sum, starting at +0.0, over c (the input
  channels of o's group, increasing), then kh, then kw (increasing), of
  PAM(x[n, g Cg + c, ih, iw], w[o, c, kh, kw]). Padding terms are PAM(+0, w): +-0, which
  changes no sum, or NaN when w is inf or NaN (as 0 * inf in torch).
* ``conv_grad_input``: out[n, ci, ih, iw] = float32 sum from +0.0 over o (the output
  channels of ci's group), then kh, then kw, increasing, of the terms whose (oh, ow)
  exists: PAM(grad[n, o, oh, ow], slope(x[n, ci, ih, iw], w[o, c, kh, kw])) (``exact``;
  slope = bits.mul_slope_bits, offset inside the slope) or PAM(grad, w; offset) (approx).
* ``conv_grad_weight``: out[o, c, kh, kw] = float32 sum from +0.0 over n, then oh, then ow,
  increasing, of PAM(grad[n, o, oh, ow], slope(w[o, c, kh, kw], x[n, ci, ih, iw])) (exact)
  or PAM(grad, x; offset) (approx), padding positions included as x = +0.

Every output element is reduced sequentially by one thread (parallel over output elements,
no atomics, no partial sums): results do not depend on the thread count and equal the CUDA
kernels' bit for bit. Extra memory is one accumulator per output plane (O(output)).

``conv_forward`` takes an int32 fast path, as the CPU matmul does, when no operand holds an
inf or NaN and the exponent ranges rule out overflow and underflow: one PAM product of
normal operands is then one wrapping int32 addition of the input's bit pattern and a
per-weight constant, vectorized across output columns. Zero or subnormal weights are
skipped and zero or subnormal inputs give +0 (masked); padding terms are skipped. This is
exact because an accumulator that starts at +0.0 never becomes -0.0 and adding +-0 to it
changes nothing. Otherwise every term calls bits.mul_bits. Both paths give the same bits.
"""
import numpy as np
from numba import njit, prange

from .. import bits
from .cpu import _mul_fast_ok, _signed_const, _stats

_JIT = dict(parallel=True, cache=True, nogil=True)

ONE = bits.ONE
ABS_MASK = bits.ABS_MASK
MIN_NORMAL = bits.MIN_NORMAL

__all__ = ["conv_forward", "conv_grad_input", "conv_grad_weight"]


@njit(cache=True, nogil=True)
def _valid_range(base, s, size, count):
    """(lo, hi): the outputs j in [0, count) whose input j s + base lies in [0, size)."""
    lo = max(0, -(base // s))
    hi = min(count, (size - 1 - base) // s + 1)
    return lo, max(lo, hi)


@njit(cache=True, nogil=True)
def _fast_row(dst, src, cw):
    """dst[j] += PAM(src[j], w), w given by its int32 constant ``cw`` (fast path)."""
    for j in range(dst.size):
        xv = src[j]
        p = np.int32(xv + cw)
        dst[j] += bits.bits_to_f32(p if (xv & ABS_MASK) >= MIN_NORMAL else np.int32(0))


@njit(cache=True, nogil=True)
def _general_row(dst, src, wv, off):
    """dst[j] += PAM(src[j], wv) with bits.mul_bits (every input class)."""
    for j in range(dst.size):
        dst[j] += bits.bits_to_f32(bits.mul_bits(src[j], wv, off))


@njit(cache=True, nogil=True)
def _add_const(dst, value):
    for j in range(dst.size):
        dst[j] += value


@njit(**_JIT)
def _forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, fast, out):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    OH = out.shape[2]
    OW = out.shape[3]
    Og = O // groups
    for task in prange(N * O):
        n = task // O
        o = task - n * O
        ci0 = (o // Og) * Cg
        acc = np.zeros((OH, OW), np.float32)
        for c in range(Cg):
            for kh in range(KH):
                for kw in range(KW):
                    wv = w[o, c, kh, kw]
                    base = kw * dw - pw
                    lo, hi = _valid_range(base, sw, W, OW)
                    i0 = lo * sw + base
                    i1 = i0 + (hi - lo - 1) * sw + 1
                    if fast:
                        uw = np.int64(wv) & ABS_MASK
                        if uw < MIN_NORMAL or hi == lo:
                            continue
                        cw = _signed_const(uw - ONE + off, wv < 0)
                        for oh in range(OH):
                            ih = oh * sh - ph + kh * dh
                            if 0 <= ih < H:
                                xrow = x[n, ci0 + c, ih]
                                if sw == 1:
                                    _fast_row(acc[oh, lo:hi], xrow[i0:i1], cw)
                                else:
                                    _fast_row(acc[oh, lo:hi], xrow[i0:i1:sw], cw)
                    else:
                        p0 = bits.bits_to_f32(bits.mul_bits(0, wv, off))
                        for oh in range(OH):
                            ih = oh * sh - ph + kh * dh
                            row = acc[oh]
                            if 0 <= ih < H:
                                _add_const(row[:lo], p0)
                                if hi > lo:
                                    xrow = x[n, ci0 + c, ih]
                                    if sw == 1:
                                        _general_row(row[lo:hi], xrow[i0:i1], wv, off)
                                    else:
                                        _general_row(row[lo:hi], xrow[i0:i1:sw], wv, off)
                                _add_const(row[hi:], p0)
                            else:
                                _add_const(row, p0)
        out[n, o] = acc


@njit(cache=True, nogil=True)
def conv_forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, out):
    """PAM convolution (cross-correlation, like torch), no bias; see the module docstring.

    x: (N, C, H, W), w: (O, C // groups, KH, KW) int32; out: (N, O, OH, OW) float32.
    An empty reduction (no input channels) gives zeros.
    """
    if out.size == 0:
        return
    if w.size == 0:
        out[:] = 0.0
        return
    sx, zx, lo_x, hi_x = _stats(x)
    sw_, zw, lo_w, hi_w = _stats(w)
    fast = not (sx or sw_) and _mul_fast_ok(lo_x, hi_x, lo_w, hi_w, off)
    _forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, fast, out)


@njit(cache=True, nogil=True)
def _grad_term(g, a, b, exact, off):
    """PAM(g, slope_a(a, b)) (exact) or PAM(g, b; offset) (approx), as float32."""
    if exact:
        return bits.bits_to_f32(bits.mul_bits(g, bits.mul_slope_bits(a, b, off), 0))
    return bits.bits_to_f32(bits.mul_bits(g, b, off))


@njit(**_JIT)
def _grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    OH = grad.shape[2]
    OW = grad.shape[3]
    Og = O // groups
    for task in prange(N * C):
        n = task // C
        ci = task - n * C
        gi = ci // Cg
        c = ci - gi * Cg
        acc = np.zeros((H, W), np.float32)
        for o in range(gi * Og, (gi + 1) * Og):
            for kh in range(KH):
                for kw in range(KW):
                    wv = w[o, c, kh, kw]
                    base = kw * dw - pw
                    lo, hi = _valid_range(base, sw, W, OW)
                    for oh in range(OH):
                        ih = oh * sh - ph + kh * dh
                        if ih < 0 or ih >= H:
                            continue
                        grow = grad[n, o, oh]
                        xrow = x[n, ci, ih]
                        arow = acc[ih]
                        for ow in range(lo, hi):
                            iw = ow * sw + base
                            arow[iw] += _grad_term(grow[ow], xrow[iw], wv, exact, off)
        out[n, ci] = acc


@njit(cache=True, nogil=True)
def conv_grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    """Gradient of ``conv_forward`` w.r.t. x (exact or approximate; see the module docstring).

    x: (N, C, H, W), w: (O, C // groups, KH, KW), grad: (N, O, OH, OW) int32;
    out: (N, C, H, W) float32. Inputs no output reads get +0.0.
    """
    if out.size == 0:
        return
    _grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out)


@njit(**_JIT)
def _grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    OH = grad.shape[2]
    OW = grad.shape[3]
    Og = O // groups
    for task in prange(O * Cg):
        o = task // Cg
        c = task - o * Cg
        ci = (o // Og) * Cg + c
        acc = np.zeros((KH, KW), np.float32)
        for n in range(N):
            for oh in range(OH):
                grow = grad[n, o, oh]
                for kh in range(KH):
                    ih = oh * sh - ph + kh * dh
                    inside = 0 <= ih < H
                    for kw in range(KW):
                        wv = w[o, c, kh, kw]
                        base = kw * dw - pw
                        s = acc[kh, kw]
                        for ow in range(OW):
                            iw = ow * sw + base
                            xv = x[n, ci, ih, iw] if inside and 0 <= iw < W else np.int32(0)
                            if exact:
                                s += _grad_term(grow[ow], wv, xv, True, off)
                            else:
                                s += _grad_term(grow[ow], wv, xv, False, off)
                        acc[kh, kw] = s
        out[o, c] = acc


@njit(cache=True, nogil=True)
def conv_grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    """Gradient of ``conv_forward`` w.r.t. w (exact or approximate; see the module docstring).

    x: (N, C, H, W), w: (O, C // groups, KH, KW), grad: (N, O, OH, OW) int32;
    out: (O, C // groups, KH, KW) float32. An empty reduction (N = 0 or no outputs) gives
    zeros.
    """
    if out.size == 0:
        return
    _grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out)
