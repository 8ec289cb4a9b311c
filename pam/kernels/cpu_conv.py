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
kernels' bit for bit.

``conv_forward`` is a matrix product per group: with t the flattened (c, kh, kw) tap and
q the flattened (n, oh, ow) output position, out[q, g Og + j] = sum over t of
PAM(w[g Og + j, t], patch[t, q]). Output positions are taken in tiles; the patches of one
tile are gathered into a per-thread buffer of K x tile int32 entries (K = Cg KH KW; about
PATCH_BUDGET entries, never the whole im2col matrix), and the products are vectorized
across the tile's positions with the CPU matmul's inner block. Parallel over (group, tile).
When no operand holds an inf or NaN and the exponent ranges rule out overflow and
underflow, one PAM product of normal operands is one wrapping int32 addition of the
input's bit pattern and a per-weight constant (the matmul's int32 fast path); zero or
subnormal weights are skipped and zero, subnormal or padding inputs give +0 (masked). This
is exact because an accumulator that starts at +0.0 never becomes -0.0 and adding +-0 to it
changes nothing. Otherwise every term calls bits.mul_bits. Both paths give the same bits.

The backward kernels are organised the same way (see the comments above
``_grad_input_tiles`` and ``_grad_weight_tiles``): gathered tiles of output-gradient entries
or patches, vectorized reductions, the int32 fast paths of the matmul backward (exact and
approximate) when the operands allow them, bits.mul_bits / bits.mul_slope_bits per term
otherwise. Extra memory: per task a tile buffer of about PATCH_BUDGET int32 entries (at
least 8 positions' worth) and its accumulators, plus weight-sized constant tables; nothing
scales with batch x output x kernel size.

L-Mul: ``conv_forward_lmul``, ``conv_grad_input_lmul`` and ``conv_grad_weight_lmul`` (the
approximate backward only) take the same arguments with the L-Mul constant c in the
``off`` slot and every PAM term replaced by bits.lmul_bits (same order, same fast paths
with the L-Mul carry correction of pam.kernels.cpu). The exact L-Mul backward needs no
kernel of its own: the slope is a power of two (bits.pow2_part_bits of the other operand),
so it is the approximate PAM backward at off = 0 with that operand replaced by its
pow2_part.
"""
import numpy as np
from numba import njit, prange

from .. import bits
from .cpu import (_add1, _add4, _add4m, _check_lmul_constant, _fast_ok, _ladd1, _ladd4,
                  _ladd4m, _lmm_fast_block, _lmm_fast_block_m, _lmul_row_consts,
                  _mantissa_const, _mm_fast_block, _mm_fast_block_m, _mm_row_consts,
                  _signed_const, _sl1, _sl4, _sl4m, _slope_fast_ok, _sr1, _sr4m, _stats)

_JIT = dict(parallel=True, cache=True, nogil=True)

# Positions per tile: output positions of ``conv_forward``, input positions of
# ``conv_grad_input``, output positions per step of ``conv_grad_weight``.
POS_TILE = 256
# Tiles shrink (to 8 positions at least) so that a tile buffer holds about this many int32
# entries: K x tile (forward, weight gradient; K = in_channels / groups x KH x KW) or
# R x tile (input gradient; R = out_channels / groups x the taps reaching a stride phase).
PATCH_BUDGET = 1 << 16
# Output channels (forward) or input channels (input gradient) that share one pass over
# a tile of gathered entries.
O_BLOCK = 8
# Output channels per task of ``conv_grad_weight`` (they share the gathered patches).
GW_O_BLOCK = 8

ONE = bits.ONE
ABS_MASK = bits.ABS_MASK
MIN_NORMAL = bits.MIN_NORMAL

__all__ = ["conv_forward", "conv_grad_input", "conv_grad_weight", "conv_forward_lmul",
           "conv_grad_input_lmul", "conv_grad_weight_lmul"]
MANT_MASK = bits.MANT_MASK


@njit(cache=True, nogil=True)
def _patch(x, n, ci0, ih0, iw0, KH, KW, dh, dw, vals, mask):
    """The patch under output position (ih0, iw0) = (oh sh - ph, ow sw - pw) of image n.

    vals[t] = x[n, ci0 + c, ih0 + kh dh, iw0 + kw dw] at t = (c KH + kh) KW + kw for the
    vals.size // (KH KW) channels of the group (+0 in the padding); mask[t] = 0 where
    vals[t] is zero or subnormal, -1 elsewhere. Returns True when some value is.
    """
    H = x.shape[2]
    W = x.shape[3]
    any_zero = False
    t = 0
    for c in range(vals.size // (KH * KW)):
        for kh in range(KH):
            ih = ih0 + kh * dh
            for kw in range(KW):
                iw = iw0 + kw * dw
                inside = 0 <= ih < H and 0 <= iw < W
                v = x[n, ci0 + c, ih, iw] if inside else np.int32(0)
                vals[t] = v
                normal = (v & ABS_MASK) >= MIN_NORMAL
                mask[t] = -1 if normal else 0
                any_zero = any_zero or not normal
                t += 1
    return any_zero


@njit(cache=True, nogil=True)
def _gather(x, g, q0, Cg, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, P, M, qn, qs):
    """Patches of output positions q0 .. q0 + width - 1 (width = P.shape[1]) of group g.

    Position q = (n OH + oh) OW + ow; column i of P (values) and M (zero masks) is
    ``_patch`` of position q0 + i; qn[i] = n, qs[i] = oh OW + ow. Returns True when some
    value is zero or subnormal.
    """
    S = OH * OW
    K = P.shape[0]
    vals = np.empty(K, np.int32)
    mask = np.empty(K, np.int32)
    any_zero = False
    for i in range(P.shape[1]):
        q = q0 + i
        n = q // S
        rem = q - n * S
        qn[i] = n
        qs[i] = rem
        oh = rem // OW
        z = _patch(x, n, g * Cg, oh * sh - ph, (rem - oh * OW) * sw - pw, KH, KW, dh, dw,
                   vals, mask)
        any_zero = any_zero or z
        for t in range(K):
            P[t, i] = vals[t]
            M[t, i] = mask[t]
    return any_zero


# The forward is a matrix product per group: out[n, g Og + j, oh, ow] =
# sum_t PAM(w[g Og + j, t], P[t, q]), t increasing (t: the flattened (c, kh, kw) tap, q: the
# flattened (n, oh, ow) position). Positions are processed in tiles whose patches P are
# gathered into a per-thread buffer of K x tile entries (at most about PATCH_BUDGET; never
# the whole im2col matrix), and the products are vectorized across the positions of a tile
# exactly as the CPU matmul vectorizes across columns (its inner block is reused).
@njit(**_JIT)
def _forward_tiles(x, wflat, cs, es, nz, nz4, fast, tile, sh, sw, ph, pw, dh, dw, groups, KH,
                   KW, off, lmul, out):
    N, C, H, W = x.shape
    O, K = wflat.shape
    Cg = C // groups
    Og = O // groups
    OH = out.shape[2]
    OW = out.shape[3]
    Q = N * OH * OW
    out3 = out.reshape(N, O, OH * OW)
    tiles = (Q + tile - 1) // tile
    for task in prange(groups * tiles):
        g = task // tiles
        q0 = (task - g * tiles) * tile
        width = min(tile, Q - q0)
        P = np.empty((K, width), np.int32)
        M = np.empty((K, width), np.int32)
        qn = np.empty(width, np.int64)
        qs = np.empty(width, np.int64)
        use_mask = _gather(x, g, q0, Cg, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, P, M, qn,
                           qs)
        acc = np.empty((O_BLOCK, width), np.float32)
        for o0 in range(g * Og, (g + 1) * Og, O_BLOCK):
            rows = min(O_BLOCK, (g + 1) * Og - o0)
            a = acc[:rows]
            a[:] = 0.0
            if fast and lmul and use_mask:
                _lmm_fast_block_m(a, P, M, cs[o0:o0 + rows], es[o0:o0 + rows],
                                  nz[o0:o0 + rows], nz4[o0:o0 + rows], K, 0, width)
            elif fast and lmul:
                _lmm_fast_block(a, P, M, cs[o0:o0 + rows], es[o0:o0 + rows],
                                nz[o0:o0 + rows], nz4[o0:o0 + rows], K, 0, width)
            elif fast and use_mask:
                _mm_fast_block_m(a, P, M, cs[o0:o0 + rows], nz[o0:o0 + rows],
                                 nz4[o0:o0 + rows], K, 0, width)
            elif fast:
                _mm_fast_block(a, P, M, cs[o0:o0 + rows], nz[o0:o0 + rows],
                               nz4[o0:o0 + rows], K, 0, width)
            else:
                for t in range(K):
                    prow = P[t]
                    for r in range(rows):
                        wv = wflat[o0 + r, t]
                        arow = a[r]
                        if lmul:
                            for i in range(width):
                                arow[i] += bits.bits_to_f32(bits.lmul_bits(wv, prow[i], off))
                        else:
                            for i in range(width):
                                arow[i] += bits.bits_to_f32(bits.mul_bits(wv, prow[i], off))
            for r in range(rows):
                for i in range(width):
                    out3[qn[i], o0 + r, qs[i]] = a[r, i]


@njit(cache=True, nogil=True)
def conv_forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, out):
    """PAM convolution (cross-correlation, like torch), no bias; see the module docstring.

    x: (N, C, H, W), w: (O, C // groups, KH, KW) int32; out: (N, O, OH, OW) float32.
    An empty reduction (no input channels) gives zeros.
    """
    _conv_forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, False, out)


@njit(cache=True, nogil=True)
def conv_forward_lmul(x, w, sh, sw, ph, pw, dh, dw, groups, c, out):
    """``conv_forward`` with L-Mul products (bits.lmul_bits; c = bits.lmul_constant(m)),
    the same order of accumulation, the same fast path (with the L-Mul carry correction)."""
    _check_lmul_constant(c)
    _conv_forward(x, w, sh, sw, ph, pw, dh, dw, groups, c, True, out)


@njit(cache=True, nogil=True)
def _conv_forward(x, w, sh, sw, ph, pw, dh, dw, groups, off, lmul, out):
    if out.size == 0:
        return
    if w.size == 0:
        out[:] = 0.0
        return
    sx, zx, lo_x, hi_x = _stats(x)
    sw_, zw, lo_w, hi_w = _stats(w)
    fast = not (sx or sw_) and _fast_ok(lo_x, hi_x, lo_w, hi_w, off, lmul)
    O = w.shape[0]
    wflat = w.reshape(O, -1)
    K = wflat.shape[1]
    cs, nz, nz4 = _mm_row_consts(wflat, off)
    es = np.empty((O, K), np.int32)      # L-Mul: Mw + c - 2^23 (see cpu._lprod)
    for o in range(O):
        _lmul_row_consts(wflat[o], off, es[o])
    tile = max(8, min(POS_TILE, PATCH_BUDGET // K))
    _forward_tiles(x, wflat, cs, es, nz, nz4, fast, tile, sh, sw, ph, pw, dh, dw, groups,
                   w.shape[2], w.shape[3], off, lmul, out)


@njit(cache=True, nogil=True)
def _grad_term(g, a, b, exact, off, lmul):
    """PAM(g, slope_a(a, b)) (exact) or PAM(g, b; offset) (approx), as float32; with
    ``lmul`` (approx only) L-Mul(g, b; c)."""
    if lmul:
        return bits.bits_to_f32(bits.lmul_bits(g, b, off))
    if exact:
        return bits.bits_to_f32(bits.mul_bits(g, bits.mul_slope_bits(a, b, off), 0))
    return bits.bits_to_f32(bits.mul_bits(g, b, off))


# Input gradient: per group a matrix product over r = (o, kh, kw), the flattened (output
# channel of the group, tap) index: out[n, g Cg + c, ih, iw] = sum over r (increasing) of
# term(G[r, p], x[n, g Cg + c, ih, iw], w[g Og + o, c, kh, kw]), where p = (n, ih, iw) and
# G[r, p] = grad[n, o, oh, ow] for the output position (oh, ow) that reads p through tap
# (kh, kw), when one exists (valid). Input positions are split into stride phases
# (ih mod sh, iw mod sw): within a phase the same taps can be valid, and only those enter r
# (skipping a tap that is never valid is the same as adding +0.0). Positions of a phase are
# taken in tiles, G is gathered per tile (R x tile entries, R = Og x the phase's taps), and
# the products are vectorized across the tile's positions: the approximate gradient with
# the CPU matmul's inner block, the exact one with the int32 fast path of the matmul's
# right-operand gradient. Entries without an output position are masked (+0 in the fast
# paths; +0.0 added in the general path).
@njit(**_JIT)
def _grad_input_tiles(x, w, grad, table, sh, sw, ph, pw, dh, dw, groups, exact, fast, off,
                      lmul, out):
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    Og = O // groups
    OH = grad.shape[2]
    OW = grad.shape[3]
    g3 = grad.reshape(grad.shape[0], O, OH * OW)
    T = table.shape[0]
    for task in prange(groups * T):
        gi = task // T
        a, b, q0, width = table[task - gi * T]
        nh = (H - a + sh - 1) // sh
        nw = (W - b + sw - 1) // sw
        khs = np.empty(KH, np.int64)
        nkh = 0
        for kh in range(KH):
            if (a + ph - kh * dh) % sh == 0:
                khs[nkh] = kh
                nkh += 1
        kws = np.empty(KW, np.int64)
        nkw = 0
        for kw in range(KW):
            if (b + pw - kw * dw) % sw == 0:
                kws[nkw] = kw
                nkw += 1
        R = Og * nkh * nkw
        # the weights of this group and phase, by input channel and r; fast-path
        # constants with the sign folded in: exact |bits(w)|, approx |bits(w)| - ONE + off
        wp = np.empty((Cg, R), np.int32)
        wc = np.empty((Cg, R), np.int32)
        wnz = np.empty((Cg, R), np.bool_)
        wnz4 = np.empty((Cg, R // 4), np.bool_)
        we = np.empty((Cg, R), np.int32)     # L-Mul: Mw + c - 2^23
        for c in range(Cg):
            r = 0
            for o in range(Og):
                for jh in range(nkh):
                    for jw in range(nkw):
                        v = np.int64(w[gi * Og + o, c, khs[jh], kws[jw]])
                        u = v & ABS_MASK
                        wp[c, r] = v
                        wnz[c, r] = u >= MIN_NORMAL
                        wc[c, r] = _signed_const(u if exact else u - ONE + off, v < 0)
                        we[c, r] = np.int32((u & MANT_MASK) + off - bits.TWO23)
                        r += 1
            for r in range(0, R - R % 4, 4):
                wnz4[c, r >> 2] = wnz[c, r] and wnz[c, r + 1] and wnz[c, r + 2] and wnz[c, r + 3]
        # per position: its image, its input row/column, and for each of the phase's taps
        # the flat output position oh OW + ow reading it through that tap (-1: none)
        pn = np.empty(width, np.int64)
        pih = np.empty(width, np.int64)
        piw = np.empty(width, np.int64)
        ntap = nkh * nkw
        gidx = np.empty((ntap, width), np.int64)
        for i in range(width):
            q = q0 + i
            n = q // (nh * nw)
            rem = q - n * (nh * nw)
            jh = rem // nw
            ih = a + jh * sh
            iw = b + (rem - jh * nw) * sw
            pn[i] = n
            pih[i] = ih
            piw[i] = iw
            for th in range(nkh):
                oh = (ih + ph - khs[th] * dh) // sh
                for tw in range(nkw):
                    ow = (iw + pw - kws[tw] * dw) // sw
                    ok = 0 <= oh < OH and 0 <= ow < OW
                    gidx[th * nkw + tw, i] = oh * OW + ow if ok else -1
        G = np.empty((R, width), np.int32)
        MG = np.empty((R, width), np.int32)
        for o in range(Og):
            for t in range(ntap):
                r = o * ntap + t
                grow = G[r]
                mrow = MG[r]
                idx = gidx[t]
                for i in range(width):
                    k = idx[i]
                    v = g3[pn[i], gi * Og + o, k] if k >= 0 else np.int32(0)
                    grow[i] = v
                    ok = k >= 0
                    if fast:
                        ok = ok and (v & ABS_MASK) >= MIN_NORMAL
                    mrow[i] = -1 if ok else 0
        xm = np.empty((Cg, width), np.int32)
        for c in range(Cg):
            for i in range(width):
                xm[c, i] = x[pn[i], gi * Cg + c, pih[i], piw[i]]
            if fast and exact:
                _mantissa_const(xm[c].copy(), off, xm[c])
        acc = np.empty((O_BLOCK, width), np.float32)
        for c0 in range(0, Cg, O_BLOCK):
            rows = min(O_BLOCK, Cg - c0)
            A = acc[:rows]
            A[:] = 0.0
            if fast and lmul:
                _lmm_fast_block_m(A, G, MG, wc[c0:c0 + rows], we[c0:c0 + rows],
                                  wnz[c0:c0 + rows], wnz4[c0:c0 + rows], R, 0, width)
            elif fast and not exact:
                _mm_fast_block_m(A, G, MG, wc[c0:c0 + rows], wnz[c0:c0 + rows],
                                 wnz4[c0:c0 + rows], R, 0, width)
            elif fast:
                R4 = R - R % 4
                for q in range(rows):
                    arow = A[q]
                    bm = xm[c0 + q]
                    cs = wc[c0 + q]
                    z = wnz[c0 + q]
                    for r in range(0, R4, 4):
                        if wnz4[c0 + q, r >> 2]:
                            _sr4m(arow, bm, G[r], G[r + 1], G[r + 2], G[r + 3], MG[r],
                                  MG[r + 1], MG[r + 2], MG[r + 3], cs[r], cs[r + 1],
                                  cs[r + 2], cs[r + 3], width)
                        else:
                            for u in range(r, r + 4):
                                if z[u]:
                                    _sr1(arow, bm, G[u], MG[u], True, cs[u], width)
                    for u in range(R4, R):
                        if z[u]:
                            _sr1(arow, bm, G[u], MG[u], True, cs[u], width)
            else:
                for r in range(R):
                    grow = G[r]
                    vrow = MG[r]
                    for q in range(rows):
                        wv = wp[c0 + q, r]
                        arow = A[q]
                        xrow = xm[c0 + q]
                        for i in range(width):
                            term = _grad_term(grow[i], xrow[i], wv, exact, off, lmul)
                            arow[i] += term if vrow[i] else np.float32(0.0)
            for q in range(rows):
                for i in range(width):
                    out[pn[i], gi * Cg + c0 + q, pih[i], piw[i]] = A[q, i]


@njit(cache=True, nogil=True)
def _phase_tiles(N, H, W, KH, KW, Og, sh, sw, ph, pw, dh, dw):
    """Rows (a, b, q0, width): tiles of the input positions with ih % sh = a, iw % sw = b.

    A tile holds at most about PATCH_BUDGET / R positions (at least 8, at most POS_TILE),
    R = Og x the number of taps that can reach the phase.
    """
    rows = []
    for a in range(min(sh, H)):
        nkh = 0
        for kh in range(KH):
            nkh += (a + ph - kh * dh) % sh == 0
        for b in range(min(sw, W)):
            nkw = 0
            for kw in range(KW):
                nkw += (b + pw - kw * dw) % sw == 0
            count = N * ((H - a + sh - 1) // sh) * ((W - b + sw - 1) // sw)
            tile = max(8, min(POS_TILE, PATCH_BUDGET // max(1, Og * nkh * nkw)))
            for q0 in range(0, count, tile):
                rows.append((a, b, q0, min(tile, count - q0)))
    table = np.empty((len(rows), 4), np.int64)
    for i in range(len(rows)):
        table[i, 0], table[i, 1], table[i, 2], table[i, 3] = rows[i]
    return table


@njit(cache=True, nogil=True)
def conv_grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    """Gradient of ``conv_forward`` w.r.t. x (exact or approximate; see the module docstring).

    x: (N, C, H, W), w: (O, C // groups, KH, KW), grad: (N, O, OH, OW) int32;
    out: (N, C, H, W) float32. Inputs no output reads get +0.0.
    """
    _conv_grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, False, out)


@njit(cache=True, nogil=True)
def conv_grad_input_lmul(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, c, out):
    """Approximate gradient of ``conv_forward_lmul`` w.r.t. x: ``conv_grad_input``'s sums
    with L-Mul(grad, w; c) terms. ``exact`` must be False (the exact L-Mul slope is
    pow2_part(w): use ``conv_grad_input`` with pow2_part(w) and off = 0)."""
    if exact:
        raise ValueError("conv_grad_input_lmul: only the approximate backward (exact=False)")
    _check_lmul_constant(c)
    _conv_grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, False, c, True, out)


@njit(cache=True, nogil=True)
def _conv_grad_input(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, lmul, out):
    if out.size == 0:
        return
    sx, zx, lo_x, hi_x = _stats(x)
    sw_, zw, lo_w, hi_w = _stats(w)
    sg, zg, lo_g, hi_g = _stats(grad)
    if exact:
        fast = not (sx or sw_ or sg) and _slope_fast_ok(lo_g, hi_g, lo_w, hi_w, off)
    else:
        fast = not (sw_ or sg) and _fast_ok(lo_g, hi_g, lo_w, hi_w, off, lmul)
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    table = _phase_tiles(N, H, W, KH, KW, O // groups, sh, sw, ph, pw, dh, dw)
    _grad_input_tiles(x, w, grad, table, sh, sw, ph, pw, dh, dw, groups, exact, fast, off,
                      lmul, out)


# Weight gradient: out[o, t] = sum over positions q (increasing) of term(grad[q, o], w[o, t],
# patch[q, t]). A task owns GW_O_BLOCK output channels of one group and walks every
# position tile, gathering the tile's patches position-major (PT[i, t]); for each position
# the terms of all K taps are added at once, vectorized across t. Int32 fast path (as the
# matmul backward): approx PAM(g, x) = bits(x) + (|bits(g)| - ONE + off, sign), exact
# PAM(g, slope(w, x)) = ((Mw + off - ONE + bits(x)) & ~MANT) + bits(g); zero or
# subnormal g is skipped, zero x (or padding) masked to +0.
@njit(**_JIT)
def _grad_weight_tiles(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, fast, tile, off,
                       lmul, out):
    N = x.shape[0]
    O, Cg, KH, KW = w.shape
    K = Cg * KH * KW
    Og = O // groups
    OH = grad.shape[2]
    OW = grad.shape[3]
    S = OH * OW
    Q = N * S
    wflat = w.reshape(O, K)
    g3 = grad.reshape(N, O, S)
    out2 = out.reshape(O, K)
    oblocks = (Og + GW_O_BLOCK - 1) // GW_O_BLOCK
    for task in prange(groups * oblocks):
        gi = task // oblocks
        o0 = gi * Og + (task - gi * oblocks) * GW_O_BLOCK
        rows = min(GW_O_BLOCK, (gi + 1) * Og - o0)
        acc = np.zeros((rows, K), np.float32)
        am = np.empty((rows, K), np.int32)
        for r in range(rows):
            _mantissa_const(wflat[o0 + r], off, am[r])
        PT = np.empty((tile, K), np.int32)
        MT = np.empty((tile, K), np.int32)
        gv = np.empty((rows, tile), np.int32)
        for q0 in range(0, Q, tile):
            width = min(tile, Q - q0)
            use_mask = False
            for i in range(width):
                q = q0 + i
                n = q // S
                rem = q - n * S
                oh = rem // OW
                z = _patch(x, n, gi * Cg, oh * sh - ph, (rem - oh * OW) * sw - pw, KH, KW,
                           dh, dw, PT[i], MT[i])
                use_mask = use_mask or z
                for r in range(rows):
                    gv[r, i] = g3[n, o0 + r, rem]
            if not fast:
                for i in range(width):
                    prow = PT[i]
                    for r in range(rows):
                        g = gv[r, i]
                        arow = acc[r]
                        wrow = wflat[o0 + r]
                        for t in range(K):
                            arow[t] += _grad_term(g, wrow[t], prow[t], exact, off, lmul)
                continue
            i4 = width - width % 4
            for r in range(rows):
                arow = acc[r]
                y = am[r]
                gr = gv[r]
                for i in range(0, width + 3, 4):
                    if i < i4:
                        g0, g1, g2, g3_ = gr[i], gr[i + 1], gr[i + 2], gr[i + 3]
                        if ((g0 & ABS_MASK) >= MIN_NORMAL and (g1 & ABS_MASK) >= MIN_NORMAL
                                and (g2 & ABS_MASK) >= MIN_NORMAL
                                and (g3_ & ABS_MASK) >= MIN_NORMAL):
                            if lmul:
                                _lw4(arow, PT, MT, i, use_mask, g0, g1, g2, g3_, off, K)
                            elif exact and use_mask:
                                _sl4m(arow, y, PT[i], PT[i + 1], PT[i + 2], PT[i + 3], MT[i],
                                      MT[i + 1], MT[i + 2], MT[i + 3], g0, g1, g2, g3_, K)
                            elif exact:
                                _sl4(arow, y, PT[i], PT[i + 1], PT[i + 2], PT[i + 3], g0, g1,
                                     g2, g3_, K)
                            elif use_mask:
                                _add4m(arow, PT[i], PT[i + 1], PT[i + 2], PT[i + 3], MT[i],
                                       MT[i + 1], MT[i + 2], MT[i + 3], _gconst(g0, off),
                                       _gconst(g1, off), _gconst(g2, off), _gconst(g3_, off),
                                       K)
                            else:
                                _add4(arow, PT[i], PT[i + 1], PT[i + 2], PT[i + 3],
                                      _gconst(g0, off), _gconst(g1, off), _gconst(g2, off),
                                      _gconst(g3_, off), K)
                            continue
                    for u in range(i, min(i + 4, width)):
                        g = gr[u]
                        if (g & ABS_MASK) < MIN_NORMAL:
                            continue
                        if lmul:
                            _ladd1(arow, PT[u], MT[u], use_mask, _gconst(g, off),
                                   _gmant(g, off), K)
                        elif exact:
                            _sl1(arow, y, PT[u], MT[u], use_mask, g, K)
                        else:
                            _add1(arow, PT[u], MT[u], use_mask, _gconst(g, off), K)
        out2[o0:o0 + rows] = acc


@njit(cache=True, nogil=True)
def _gmant(g, c):
    """int32 constant Mg + c - 2^23 of the L-Mul fast path (see cpu._lprod)."""
    return np.int32((np.int64(g) & MANT_MASK) + c - bits.TWO23)


@njit(cache=True, nogil=True)
def _lw4(arow, PT, MT, i, use_mask, g0, g1, g2, g3, c, K):
    """arow[:K] += L-Mul(g_u, PT[i + u]) for u = 0..3 in order (weight gradient fast path)."""
    if use_mask:
        _ladd4m(arow, PT[i], PT[i + 1], PT[i + 2], PT[i + 3], MT[i], MT[i + 1], MT[i + 2],
                MT[i + 3], _gconst(g0, c), _gconst(g1, c), _gconst(g2, c), _gconst(g3, c),
                _gmant(g0, c), _gmant(g1, c), _gmant(g2, c), _gmant(g3, c), K)
    else:
        _ladd4(arow, PT[i], PT[i + 1], PT[i + 2], PT[i + 3], _gconst(g0, c), _gconst(g1, c),
               _gconst(g2, c), _gconst(g3, c), _gmant(g0, c), _gmant(g1, c), _gmant(g2, c),
               _gmant(g3, c), K)


@njit(cache=True, nogil=True)
def _gconst(g, off):
    """int32 constant c with PAM(g, x) = int32(bits(x) + c) for normal g, x (fast path)."""
    v = np.int64(g)
    return _signed_const((v & ABS_MASK) - ONE + off, v < 0)


@njit(cache=True, nogil=True)
def conv_grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, out):
    """Gradient of ``conv_forward`` w.r.t. w (exact or approximate; see the module docstring).

    x: (N, C, H, W), w: (O, C // groups, KH, KW), grad: (N, O, OH, OW) int32;
    out: (O, C // groups, KH, KW) float32. An empty reduction (N = 0 or no outputs) gives
    zeros.
    """
    _conv_grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, False, out)


@njit(cache=True, nogil=True)
def conv_grad_weight_lmul(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, c, out):
    """Approximate gradient of ``conv_forward_lmul`` w.r.t. w: ``conv_grad_weight``'s sums
    with L-Mul(grad, x; c) terms. ``exact`` must be False (the exact L-Mul slope is
    pow2_part(x): use ``conv_grad_weight`` with pow2_part(x) and off = 0)."""
    if exact:
        raise ValueError("conv_grad_weight_lmul: only the approximate backward (exact=False)")
    _check_lmul_constant(c)
    _conv_grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, False, c, True, out)


@njit(cache=True, nogil=True)
def _conv_grad_weight(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, off, lmul, out):
    if out.size == 0:
        return
    sx, zx, lo_x, hi_x = _stats(x)
    sw_, zw, lo_w, hi_w = _stats(w)
    sg, zg, lo_g, hi_g = _stats(grad)
    if exact:
        fast = not (sx or sw_ or sg) and _slope_fast_ok(lo_g, hi_g, lo_x, hi_x, off)
    else:
        fast = not (sx or sg) and _fast_ok(lo_g, hi_g, lo_x, hi_x, off, lmul)
    K = out.size // out.shape[0]
    tile = max(8, min(POS_TILE, PATCH_BUDGET // K))
    _grad_weight_tiles(x, w, grad, sh, sw, ph, pw, dh, dw, groups, exact, fast, tile, off,
                       lmul, out)
