"""CUDA kernels (numba-cuda) over int32 bit-pattern arrays, bit-identical to the CPU ones.

Same names, argument orders and semantics as :mod:`pam.kernels.cpu`; every kernel calls
the scalar definitions of :mod:`pam.bits`, so CPU and CUDA compute the same bits.

* Elementwise (``a, b, off, out`` or ``x, out``): one thread per element, grid-stride loop.
* ``matmul`` and the exact-backward kernels: each call first runs one range check
  (``_range_stats_kernel``: max |bits|, min normal |bits|, min |bits| of every operand,
  3 int32 per operand copied back to the host). When no operand holds an inf or NaN and
  the exponent ranges rule out overflow and underflow (the CPU fast path's conditions), a
  register-tiled fast kernel runs whose product is integer adds on the bit patterns
  (``FAST_*`` constants; ``_zeros`` variants mask products with a zero or subnormal
  factor to +0). Otherwise the general tiled kernel runs (``TILE`` x ``TILE`` threads,
  one output each, calling bits.mul_bits / bits.mul_slope_bits per product). In both,
  each output is accumulated by one thread in float32 in increasing order of the reduced
  index, exactly as the CPU kernels do: no split reductions, no atomics, so the result is
  deterministic and equal to the CPU result bit for bit. Sizes need not be multiples of
  any tile (loads and stores are bounds-checked). The batch dimension is walked with a
  grid-stride loop, so any batch size works.
* ``matmul_lmul``: ``matmul`` with L-Mul products (bits.lmul_bits, the L-Mul constant in
  the ``off`` slot): the same range check (L-Mul's underflow bound), the fast kernel in its
  L-Mul mode (``_LMUL``: PAM's add plus the carry correction, the row operand's
  Ma + c - 2^23 staged in shared memory) or the general kernel. Elementwise:
  ``mul_lmul`` (``_bs``, ``_as``), ``pow2_part``, ``quantize`` (bits.quantize_bits).
* ``SIGNATURES`` gives every kernel's numba argument types (kernels are compiled with
  them), so tools compile each ahead of time (validation/cuda_sass.py: SASS per product).

Arguments
---------
Either torch CUDA tensors (contiguous; passed zero-copy through
``__cuda_array_interface__`` and launched on torch's current stream of their device), or
NumPy arrays (copied to the device, launched, the result copied back into ``out``; this is
the path the tests use under the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``). Bit-pattern
arrays are int32; the matmul outputs are float32. ``off`` is a Python int (the offset
constant of :func:`pam.dispatch.offset_constant`).

Importing this module needs neither a GPU nor numba-cuda; the kernels are compiled on first
use. Calling a kernel without numba-cuda installed raises an ImportError naming the extra
to install (``pip install bdia-pam[cuda]``).
"""
import contextlib
import importlib.util
import sys

import numpy as np
from numba.extending import register_jitable

from .. import bits, optim_bits, rows_bits

__all__ = ["mul", "div", "mul_slope", "div_slope_num", "div_slope_den", "exp2", "log2",
           "exp2_slope", "log2_slope", "matmul", "matmul_exact_grad_left",
           "matmul_exact_grad_right", "matmul_exact_grads", "available", "TILE", "ELEMENTWISE_THREADS"]

# Side of the square thread block and of the shared-memory tiles of the matmul kernels.
TILE = 16
# Threads per block of the elementwise kernels, and the most blocks launched (grid stride).
ELEMENTWISE_THREADS = 256
ELEMENTWISE_MAX_BLOCKS = 8192
# Threads per block of the range check that picks the matmul kernels' path.
RANGE_STATS_THREADS = 256
# CUDA limits the y and z grid dimensions to 65535 blocks.
_MAX_GRID_YZ = 65535

try:
    _HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
except (ImportError, ValueError):  # pragma: no cover - a broken or blocked installation
    _HAVE_NUMBA_CUDA = False
if _HAVE_NUMBA_CUDA:
    from numba import cuda, float32, int32, types
else:  # pragma: no cover - exercised only where numba-cuda is absent
    cuda = float32 = int32 = types = None


def available():
    """True when numba-cuda is installed and a GPU (or the CUDA simulator) is usable."""
    return _HAVE_NUMBA_CUDA and cuda.is_available()


def _require_numba_cuda():
    if not _HAVE_NUMBA_CUDA:
        raise ImportError("PAM on CUDA tensors needs numba-cuda: install the 'cuda' extra, "
                          "pip install 'bdia-pam[cuda]' (or pip install numba-cuda)")


# =========================================================================== kernels
# Plain Python functions; _compiled() applies cuda.jit on first use. The test suite also
# compiles them to PTX (cuda.compile_ptx) to check that no float multiply is emitted.

# ----------------------------------------------------------------- elementwise, binary
def _mul_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_bits(a[i], b[i], off)


def _div_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_bits(a[i], b[i], off)


def _mul_slope_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_slope_bits(a[i], b[i], off)


def _div_slope_num_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_num_bits(a[i], b[i], off)


def _div_slope_den_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_den_bits(a[i], b[i], off)


# ----------------------------------------------------------------- elementwise, unary
def _exp2_kernel(y, out):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        out[i] = bits.exp2_bits(y[i])


def _log2_kernel(x, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = bits.log2_bits(x[i])


def _exp2_slope_kernel(y, out):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        out[i] = bits.exp2_slope_bits(y[i])


def _log2_slope_kernel(x, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = bits.log2_slope_bits(x[i])


# ----------------------------------------------------------------- matmul
# Grid: x = tiles of output rows, y = tiles of output columns, z = batch (grid stride).
# threadIdx.x walks columns, so global loads of the right operand and stores are coalesced.
def _make_matmul_kernel(lmul):
    """The general matmul kernel with PAM (bits.mul_bits) or L-Mul (bits.lmul_bits) products."""

    def kernel(a, b, off, out):
        """out[p, i, j] = sum_t F(a[p, i, t], b[p, t, j]), float32, t increasing."""
        _matmul_body(a, b, off, out, lmul)

    kernel.__name__ = "_matmul_lmul_kernel" if lmul else "_matmul_kernel"
    kernel.__qualname__ = kernel.__name__
    return kernel


@register_jitable(forceinline=True)
def _matmul_body(a, b, off, out, lmul):
    """out[p, i, j] = sum_t PAM(a[p, i, t], b[p, t, j]) (L-Mul with ``lmul``), float32,
    t increasing."""
    sa = cuda.shared.array((TILE, TILE), dtype=int32)
    sb = cuda.shared.array((TILE, TILE), dtype=int32)
    batch = a.shape[0]
    n = a.shape[1]
    k = a.shape[2]
    m = b.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * TILE + ty
    j = cuda.blockIdx.y * TILE + tx
    for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
        acc = np.float32(0.0)
        for t0 in range(0, k, TILE):
            # a[p, i, t0 + tx] and b[p, t0 + ty, j]; out-of-range cells are never read.
            if i < n and t0 + tx < k:
                sa[ty, tx] = a[p, i, t0 + tx]
            if t0 + ty < k and j < m:
                sb[ty, tx] = b[p, t0 + ty, j]
            cuda.syncthreads()
            for tt in range(min(TILE, k - t0)):
                if lmul:
                    acc += bits.bits_to_f32(bits.lmul_bits(sa[ty, tt], sb[tt, tx], off))
                else:
                    acc += bits.bits_to_f32(bits.mul_bits(sa[ty, tt], sb[tt, tx], off))
            cuda.syncthreads()
        if i < n and j < m:
            out[p, i, j] = acc


def _matmul_exact_grad_left_kernel(a, bt, grad, off, out):
    """out[p, i, t] = sum_j PAM(grad[p, i, j], slope_a(a[p, i, t], bt[p, j, t])), j increasing.

    The reduction runs over j: grad (n, m) plays the left operand, bt (m, k) the right one.
    """
    sg = cuda.shared.array((TILE, TILE), dtype=int32)
    sb = cuda.shared.array((TILE, TILE), dtype=int32)
    batch = a.shape[0]
    n = a.shape[1]
    k = a.shape[2]
    m = bt.shape[1]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * TILE + ty
    t = cuda.blockIdx.y * TILE + tx
    for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
        ait = a[p, i, t] if (i < n and t < k) else 0
        acc = np.float32(0.0)
        for j0 in range(0, m, TILE):
            if i < n and j0 + tx < m:
                sg[ty, tx] = grad[p, i, j0 + tx]
            if j0 + ty < m and t < k:
                sb[ty, tx] = bt[p, j0 + ty, t]
            cuda.syncthreads()
            for jj in range(min(TILE, m - j0)):
                slope = bits.mul_slope_bits(ait, sb[jj, tx], off)
                acc += bits.bits_to_f32(bits.mul_bits(sg[ty, jj], slope, 0))
            cuda.syncthreads()
        if i < n and t < k:
            out[p, i, t] = acc


def _matmul_exact_grad_right_kernel(at, b, grad, off, out):
    """out[p, t, j] = sum_i PAM(grad[p, i, j], slope_a(b[p, t, j], at[p, t, i])), i increasing.

    The reduction runs over i: at (k, n) plays the left operand, grad (n, m) the right one.
    """
    sa = cuda.shared.array((TILE, TILE), dtype=int32)
    sg = cuda.shared.array((TILE, TILE), dtype=int32)
    batch = at.shape[0]
    k = at.shape[1]
    n = at.shape[2]
    m = b.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t = cuda.blockIdx.x * TILE + ty
    j = cuda.blockIdx.y * TILE + tx
    for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
        btj = b[p, t, j] if (t < k and j < m) else 0
        acc = np.float32(0.0)
        for i0 in range(0, n, TILE):
            if t < k and i0 + tx < n:
                sa[ty, tx] = at[p, t, i0 + tx]
            if i0 + ty < n and j < m:
                sg[ty, tx] = grad[p, i0 + ty, j]
            cuda.syncthreads()
            for ii in range(min(TILE, n - i0)):
                slope = bits.mul_slope_bits(btj, sa[ty, ii], off)
                acc += bits.bits_to_f32(bits.mul_bits(sg[ii, tx], slope, 0))
            cuda.syncthreads()
        if t < k and j < m:
            out[p, t, j] = acc


# ----------------------------------------------------------------- fast paths
# When one range check per call (_range_stats_kernel) shows that no operand holds an inf or
# NaN and the exponent ranges rule out overflow and underflow, every PAM product of normal
# operands is a wrapping int32 addition of bit patterns (see pam.kernels.cpu): the
# forward product is bits(a) + bits(b) + (off - ONE), the exact-backward product is
# ((Y + bits(y)) & NOT_MANT) + bits(g), with Y = Mx + off - ONE fixed per output. A
# product with a zero or subnormal factor is +-0, and adding +-0 to an accumulator that
# started at +0.0 never changes its bits (round-to-nearest makes x + (-x) = +0, so the
# accumulator is never -0); the "_zeros" variants mask such products to +0 with one AND.
#
# The three reductions share one shape: out[r, c] = sum_q F(R[r, q], C[q, c], Y[r, c]) over
# q increasing, in float32, one accumulator per output (the CPU's order, so the bits agree).
# Each block computes a FAST_BM x FAST_BN output tile with FAST_TY x FAST_TX threads; each
# thread owns FAST_TM x FAST_TN outputs in registers, rows ty + FAST_TY * r and columns
# tx + FAST_TX * c (strided, so that the shared-memory reads of a warp hit distinct banks
# or broadcast). Per step of FAST_BK reduction indices the block stages R (transposed, rows
# padded by FAST_PAD words so that the transposing stores hit distinct banks) and C in
# shared memory; each reduction index then costs FAST_TM + FAST_TN shared loads for
# FAST_TM * FAST_TN products of one integer add (forward) plus one float add. Index math
# is int32 over flat arrays (the launcher checks that every array has < 2^31 elements).
FAST_TX = 16
FAST_TY = 16
FAST_TM = 8
FAST_TN = 8
FAST_BK = 8                # the kernel spells out 8 steps per staged tile
FAST_PAD = 4
FAST_BM = FAST_TY * FAST_TM
FAST_BN = FAST_TX * FAST_TN
FAST_THREADS = FAST_TX * FAST_TY
FAST_BM_PADDED = FAST_BM + FAST_PAD   # row length of the transposed R tile in shared memory
_FAST_R_LOADS = FAST_BM * FAST_BK // FAST_THREADS    # R elements each thread stages per step
_FAST_C_LOADS = FAST_BK * FAST_BN // FAST_THREADS
_FAST_R_STRIDE = FAST_THREADS // FAST_BK             # tile rows staged per pass
_FAST_C_STRIDE = FAST_THREADS // FAST_BN             # reduction indices of C staged per pass
# Every thread stages whole cells: the block's threads divide both staged tiles evenly.
assert FAST_THREADS % FAST_BK == 0 and FAST_THREADS % FAST_BN == 0
assert FAST_BM * FAST_BK % FAST_THREADS == 0

_FWD, _LEFT, _RIGHT, _LMUL = 0, 1, 2, 3   # _LMUL: the forward with L-Mul products
# Masking of the fast kernels: none; zeros of grad only (the exact backward's additive
# operand: its zeros are staged as 0 and the slope masked, so a product stays one add
# cheaper); zeros of both factors (the whole product masked).
_MASK_NONE, _MASK_GRAD, _MASK_BOTH = 0, 1, 2
_MASK_SUFFIX = {_MASK_NONE: "_fast", _MASK_GRAD: "_fast_grad_zeros", _MASK_BOTH: "_fast_zeros"}
_NOT_MANT = -8388608          # ~MANT_MASK: clears the 23 mantissa bits


@register_jitable(forceinline=True)
def _nonzero_mask(x):
    """-1 (all ones) when bit pattern x is a normal number, inf or NaN; 0 for zero/subnormal."""
    return np.int32(-1) if (np.int64(x) & bits.ABS_MASK) >= bits.MIN_NORMAL else np.int32(0)


@register_jitable(forceinline=True)
def _fast_stage(R, C, q0, red, add, rq, rr, roff, rok, cq, cc, coff, cok, sR, sC, smR, smC,
                full, mask_r, mask_c, zero_r, zero_c, sE, lmul, lc):
    """Copy R[row0:+BM, q0:+BK] (transposed, + ``add``) and C[q0:+BK, col0:+BN] to shared.

    Each thread stages fixed cells: R rows rr + u * _FAST_R_STRIDE at reduction index
    q0 + rq (flat offsets roff[u], inside the array when rok[u]), and C reduction indices
    q0 + cq + u * _FAST_C_STRIDE at column cc (flat offsets coff[u], inside when ``cok``).
    With ``full`` the whole tile lies below ``red``. Cells outside the arrays hold anything:
    their rows and columns are never stored and their reduction indices never read.
    ``mask_r`` / ``mask_c``: also stage the operand's _nonzero_mask; ``zero_r`` /
    ``zero_c``: stage its zeros and subnormals as 0. ``lmul``: also stage the L-Mul
    carry constant Ma + lc - 2^23 of R in sE.
    """
    for u in range(_FAST_R_LOADS):
        v = np.int32(0)
        if rok[u] and (full or q0 + rq < red):
            v = R[np.uint32(roff[u])]
        if zero_r:
            v = v & _nonzero_mask(v)
        sR[rq, rr + u * _FAST_R_STRIDE] = np.int32(np.int64(v) + add)
        if lmul:
            sE[rq, rr + u * _FAST_R_STRIDE] = np.int32(
                (np.int64(v) & bits.MANT_MASK) + lc - bits.TWO23)
        if mask_r:
            smR[rq, rr + u * _FAST_R_STRIDE] = _nonzero_mask(v)
    for u in range(_FAST_C_LOADS):
        v = np.int32(0)
        if cok and (full or q0 + cq + u * _FAST_C_STRIDE < red):
            v = C[np.uint32(coff[u])]
        if zero_c:
            v = v & _nonzero_mask(v)
        sC[cq + u * _FAST_C_STRIDE, cc] = v
        if mask_c:
            smC[cq + u * _FAST_C_STRIDE, cc] = _nonzero_mask(v)


@register_jitable(forceinline=True)
def _fast_step(qq, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked, mask_r,
               mask_c, sE, rE, rM):
    """acc[r, c] += F(R[., qq], C[qq, .], Y[r, c]) for the thread's FAST_TM x FAST_TN outputs."""
    for r in range(FAST_TM):
        rR[r] = sR[qq, ty + r * FAST_TY]
    for c in range(FAST_TN):
        rC[c] = sC[qq, tx + c * FAST_TX]
    if mode == _LMUL:
        for r in range(FAST_TM):
            rE[r] = sE[qq, ty + r * FAST_TY]
        for c in range(FAST_TN):
            rM[c] = rC[c] & bits.MANT_MASK
    if mask_r:
        for r in range(FAST_TM):
            mR[r] = smR[qq, ty + r * FAST_TY]
    if mask_c:
        for c in range(FAST_TN):
            mC[c] = smC[qq, tx + c * FAST_TX]
    for r in range(FAST_TM):
        for c in range(FAST_TN):
            if mode == _FWD:
                v = np.int64(rR[r]) + rC[c]
            elif mode == _LMUL:
                # PAM's add, then the carry correction of bits.lmul_bits: the mantissa
                # t = max(Ma + Mb + c - 2^23, 0) becomes rne(t / 2). (This form compiles
                # to fewer SASS instructions than the CPU's (t >> 1) + (t % 4 == 1).)
                t = max(np.int32(np.int64(rM[c]) + rE[r]), np.int32(0))
                h = np.int32((t + ((t >> 1) & 1)) >> 1)
                v = np.int64(np.int32(np.int64(rR[r]) + rC[c])) - np.int32(t - h)
            elif mode == _LEFT:
                slope = (np.int64(Y[r, c]) + rC[c]) & _NOT_MANT
                if masked == _MASK_GRAD:       # grad (R) staged as 0 where it is zero
                    slope = slope & mR[r]
                v = slope + rR[r]
            else:
                slope = (np.int64(Y[r, c]) + rR[r]) & _NOT_MANT
                if masked == _MASK_GRAD:       # grad (C) staged as 0 where it is zero
                    slope = slope & mC[c]
                v = slope + rC[c]
            if masked == _MASK_BOTH:
                v = v & mR[r] & mC[c]
            acc[r, c] += bits.bits_to_f32(np.int32(v))


def _make_fast_kernel(mode, masked):
    """The fast-path kernel of one reduction (_FWD, _LEFT, _RIGHT, _LMUL) with masking
    ``masked`` (_LMUL: the forward with L-Mul products, ``off`` = c).

    Arguments: R (batch, rows, red), C (batch, red, cols), S (batch, rows, cols; the
    operand whose mantissa enters the slope, unused by the forward kernel), all flat int32;
    batch, rows, cols, red, off (int32); out (batch, rows, cols) flat float32.
    Grid: x = column tiles, y = row tiles, z = batches (grid stride).
    """
    grad_r = masked == _MASK_GRAD and mode == _LEFT     # grad is R in the left gradient,
    grad_c = masked == _MASK_GRAD and mode == _RIGHT    # C in the right one
    mask_r = masked == _MASK_BOTH or grad_r
    mask_c = masked == _MASK_BOTH or grad_c
    lmul = mode == _LMUL

    def kernel(R, C, S, batch, rows, cols, red, off, out):
        sR = cuda.shared.array((FAST_BK, FAST_BM_PADDED), dtype=int32)
        sC = cuda.shared.array((FAST_BK, FAST_BN), dtype=int32)
        smR = cuda.shared.array((FAST_BK, FAST_BM_PADDED), dtype=int32)
        smC = cuda.shared.array((FAST_BK, FAST_BN), dtype=int32)
        sE = cuda.shared.array((FAST_BK, FAST_BM_PADDED), dtype=int32)
        acc = cuda.local.array((FAST_TM, FAST_TN), dtype=float32)
        rE = cuda.local.array(FAST_TM, dtype=int32)
        rM = cuda.local.array(FAST_TN, dtype=int32)
        Y = cuda.local.array((FAST_TM, FAST_TN), dtype=int32)
        rR = cuda.local.array(FAST_TM, dtype=int32)
        rC = cuda.local.array(FAST_TN, dtype=int32)
        mR = cuda.local.array(FAST_TM, dtype=int32)
        mC = cuda.local.array(FAST_TN, dtype=int32)
        roff = cuda.local.array(_FAST_R_LOADS, dtype=int32)
        rok = cuda.local.array(_FAST_R_LOADS, dtype=types.boolean)
        coff = cuda.local.array(_FAST_C_LOADS, dtype=int32)
        tid = np.int32(cuda.threadIdx.x)
        ty = tid // FAST_TX
        tx = tid - ty * FAST_TX
        rr = tid // FAST_BK
        rq = tid - rr * FAST_BK
        cq = tid // FAST_BN
        cc = tid - cq * FAST_BN
        col0 = np.int32(cuda.blockIdx.x) * FAST_BN
        row0 = np.int32(cuda.blockIdx.y) * FAST_BM
        cok = col0 + cc < cols
        # The forward kernel folds the constant into R once per staged tile.
        add = np.int32(np.int64(off) - bits.ONE) if (mode == _FWD or mode == _LMUL) \
            else np.int32(0)
        red_full = red - red % FAST_BK
        for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
            rbase = np.int32(p * rows * red)
            cbase = np.int32(p * red * cols)
            obase = np.int32(p * rows * cols)
            for u in range(_FAST_R_LOADS):
                i = row0 + rr + u * _FAST_R_STRIDE
                rok[u] = i < rows
                roff[u] = np.int32(rbase + i * red + rq)
            for u in range(_FAST_C_LOADS):
                coff[u] = np.int32(cbase + (cq + u * _FAST_C_STRIDE) * cols + col0 + cc)
            for r in range(FAST_TM):
                for c in range(FAST_TN):
                    acc[r, c] = np.float32(0.0)
            if mode == _LEFT or mode == _RIGHT:
                # Y = Mx + off - ONE: the mantissa of the output's own operand (0 for a
                # zero or subnormal one: the one-sided limit of bits.mul_slope_bits).
                for r in range(FAST_TM):
                    i = row0 + ty + r * FAST_TY
                    for c in range(FAST_TN):
                        j = col0 + tx + c * FAST_TX
                        x = np.int64(0)
                        if i < rows and j < cols:
                            x = np.int64(S[np.uint32(obase + i * cols + j)]) & bits.ABS_MASK
                        mx = x & bits.MANT_MASK if x >= bits.MIN_NORMAL else np.int64(0)
                        Y[r, c] = np.int32(mx + off - bits.ONE)
            step_c = np.int32(FAST_BK * cols)
            for _ in range(red_full // FAST_BK):
                _fast_stage(R, C, 0, red, add, rq, rr, roff, rok, cq, cc, coff, cok,
                            sR, sC, smR, smC, True, mask_r, mask_c, grad_r, grad_c, sE, lmul, off)
                for u in range(_FAST_R_LOADS):
                    roff[u] = np.int32(roff[u] + FAST_BK)
                for u in range(_FAST_C_LOADS):
                    coff[u] = np.int32(coff[u] + step_c)
                cuda.syncthreads()
                # FAST_BK (8) steps written out: NVVM does not unroll a loop this large, and
                # unrolled, every shared-memory address is a constant offset.
                _fast_step(0, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(1, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(2, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(3, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(4, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(5, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(6, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                _fast_step(7, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode, masked,
                           mask_r, mask_c, sE, rE, rM)
                cuda.syncthreads()
            if red_full < red:
                _fast_stage(R, C, red_full, red, add, rq, rr, roff, rok, cq, cc, coff, cok,
                            sR, sC, smR, smC, False, mask_r, mask_c, grad_r, grad_c, sE, lmul, off)
                cuda.syncthreads()
                for qq in range(red - red_full):
                    _fast_step(qq, ty, tx, sR, sC, smR, smC, rR, rC, mR, mC, Y, acc, mode,
                               masked, mask_r, mask_c, sE, rE, rM)
                cuda.syncthreads()
            for r in range(FAST_TM):
                i = row0 + ty + r * FAST_TY
                if i < rows:
                    for c in range(FAST_TN):
                        j = col0 + tx + c * FAST_TX
                        if j < cols:
                            out[np.uint32(obase + i * cols + j)] = acc[r, c]

    kernel.__name__ = (["_matmul", "_matmul_exact_grad_left", "_matmul_exact_grad_right",
                        "_matmul_lmul"][mode]
                       + _MASK_SUFFIX[masked] + "_kernel")
    kernel.__qualname__ = kernel.__name__
    return kernel


# ----------------------------------------------------------------- range check
def _range_stats_kernel(x, stats):
    """stats[0] = max |bits| (>= INF: an inf or NaN), stats[1] = min normal |bits| (INF when
    none), stats[2] = min |bits| (< MIN_NORMAL: a zero or subnormal), over flat int32 ``x``.

    ``stats`` must hold (0, INF, INF) before the launch; blocks combine with atomics.
    """
    blk = cuda.shared.array(3, dtype=int32)
    tid = cuda.threadIdx.x
    if tid == 0:
        blk[0] = 0
        blk[1] = bits.INF
        blk[2] = bits.INF
    cuda.syncthreads()
    hi = np.int32(0)
    lo = np.int32(bits.INF)
    zmin = np.int32(bits.INF)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        u = np.int32(x[i] & bits.ABS_MASK)
        hi = max(hi, u)
        zmin = min(zmin, u)
        if u >= bits.MIN_NORMAL:
            lo = min(lo, u)
    cuda.atomic.max(blk, 0, hi)
    cuda.atomic.min(blk, 1, lo)
    cuda.atomic.min(blk, 2, zmin)
    cuda.syncthreads()
    if tid == 0:
        cuda.atomic.max(stats, 0, blk[0])
        cuda.atomic.min(stats, 1, blk[1])
        cuda.atomic.min(stats, 2, blk[2])


# Kernel name -> plain Python kernel function (what cuda.jit and cuda.compile_ptx take).
KERNEL_FUNCTIONS = {
    "mul": _mul_kernel,
    "div": _div_kernel,
    "mul_slope": _mul_slope_kernel,
    "div_slope_num": _div_slope_num_kernel,
    "div_slope_den": _div_slope_den_kernel,
    "exp2": _exp2_kernel,
    "log2": _log2_kernel,
    "exp2_slope": _exp2_slope_kernel,
    "log2_slope": _log2_slope_kernel,
    "matmul": _make_matmul_kernel(False),
    "matmul_lmul": _make_matmul_kernel(True),
    "matmul_exact_grad_left": _matmul_exact_grad_left_kernel,
    "matmul_exact_grad_right": _matmul_exact_grad_right_kernel,
    "range_stats": _range_stats_kernel,
}
for _mode, _name in enumerate(("matmul", "matmul_exact_grad_left", "matmul_exact_grad_right",
                               "matmul_lmul")):
    for _masked in (_MASK_NONE, _MASK_GRAD, _MASK_BOTH):
        if not (_mode in (_FWD, _LMUL) and _masked == _MASK_GRAD):
            KERNEL_FUNCTIONS[_name + _MASK_SUFFIX[_masked]] = _make_fast_kernel(_mode, _masked)


def _signatures():
    """Kernel name -> tuple of numba argument types (what the launchers pass)."""
    from numba import types as nt
    i1, i3, f3, off = nt.int32[::1], nt.int32[:, :, ::1], nt.float32[:, :, ::1], nt.int64
    sigs = {name: (i1, i1, off, i1) for name in
            ("mul", "div", "mul_slope", "div_slope_num", "div_slope_den")}
    sigs.update({name: (i1, i1) for name in ("exp2", "log2", "exp2_slope", "log2_slope")})
    sigs["matmul"] = (i3, i3, off, f3)
    sigs["matmul_lmul"] = (i3, i3, off, f3)
    sigs["matmul_exact_grad_left"] = (i3, i3, i3, off, f3)
    sigs["matmul_exact_grad_right"] = (i3, i3, i3, off, f3)
    sigs["range_stats"] = (i1, i1)
    i32, f1 = nt.int32, nt.float32[::1]
    for name in KERNEL_FUNCTIONS:
        if "_fast" in name:
            sigs[name] = (i1, i1, i1, i32, i32, i32, i32, i32, f1)
    return sigs


# Kernel name -> numba argument types: every kernel can be compiled ahead of time
# (cuda.compile_ptx(KERNEL_FUNCTIONS[name], SIGNATURES[name], cc=...)) by tools and tests.
SIGNATURES = _signatures()
# Kernel name -> threads per block it is launched with (ELEMENTWISE_THREADS if absent).
THREADS_PER_BLOCK = {"matmul": TILE * TILE, "matmul_lmul": TILE * TILE,
                     "matmul_exact_grad_left": TILE * TILE,
                     "matmul_exact_grad_right": TILE * TILE, "range_stats": RANGE_STATS_THREADS}
THREADS_PER_BLOCK.update({name: FAST_THREADS for name in KERNEL_FUNCTIONS if "_fast" in name})

def lazy_kernels(functions, signatures=None):
    """``compiled(name)``: the cuda.jit dispatcher of ``functions[name]`` (eagerly typed
    with ``signatures[name]`` when given), compiled on first use and kept."""
    cache = {}

    def compiled(name):
        _require_numba_cuda()
        kernel = cache.get(name)
        if kernel is None:
            if signatures is not None:
                from numba import types as nt
                kernel = cuda.jit(nt.void(*signatures[name]))(functions[name])
            else:
                kernel = cuda.jit(functions[name])
            cache[name] = kernel
        return kernel
    return compiled


@contextlib.contextmanager
def torch_stream(tensors):
    """For torch CUDA tensors on one device (ValueError naming both devices otherwise):
    makes that device current and yields numba's handle on torch's current stream there."""
    import torch
    device = tensors[-1].device
    for x in tensors:
        if x.device != device:
            raise ValueError(f"all tensors must be on one device, got {x.device} and "
                             f"{device}")
    with cuda.gpus[device.index if device.index is not None else 0]:
        yield cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)


_compiled = lazy_kernels(KERNEL_FUNCTIONS, SIGNATURES)


# =========================================================================== launching
def _is_torch_tensor(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_array(x, name, ndim, dtype):
    """Raise a clear error unless ``x`` is a C-contiguous ``dtype`` array of ``ndim`` dims."""
    if _is_torch_tensor(x):
        torch_dtype = {np.int32: "torch.int32", np.float32: "torch.float32"}[dtype]
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor (or a NumPy array), got a tensor "
                             f"on {x.device}")
        if str(x.dtype) != torch_dtype:
            raise TypeError(f"{name} must have dtype {torch_dtype}, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    elif isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {x.dtype}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    else:
        raise TypeError(f"{name} must be a torch CUDA tensor or a NumPy array, "
                        f"got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _on_device(arrays, out, body):
    """Call ``body(device_arrays, device_out, stream)`` and return ``out``.

    torch CUDA tensors are passed zero-copy on torch's current stream of their device;
    NumPy arrays are copied to the device and the result is copied back into ``out``.
    """
    _require_numba_cuda()
    tensors = [_is_torch_tensor(x) for x in (*arrays, out)]
    if all(tensors):
        with torch_stream((*arrays, out)) as stream:
            # Views with canonical strides (torch calls a tensor contiguous whatever the
            # strides of its size-1 dimensions; numba would then type it as non-contiguous).
            dev = [cuda.as_cuda_array(x.detach().reshape(-1).view(x.shape))
                   for x in (*arrays, out)]
            body(dev[:-1], dev[-1], stream)
        return out
    if any(tensors):
        raise TypeError("pass either only torch CUDA tensors or only NumPy arrays")
    stream = cuda.default_stream()
    dev = [cuda.to_device(x, stream=stream) for x in arrays]
    dout = cuda.to_device(out, stream=stream)
    body(dev, dout, stream)
    dout.copy_to_host(out, stream=stream)
    stream.synchronize()
    return out


def _launch(name, griddim, blockdim, arrays, scalars, out):
    """Launch kernel ``name`` with ``(*arrays, *scalars, out)`` (see _on_device)."""
    kernel = _compiled(name)

    def body(dev, dout, stream):
        kernel[griddim, blockdim, stream](*dev, *scalars, dout)
    return _on_device(arrays, out, body)


def _elementwise_grid(size):
    blocks = (size + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS
    return min(blocks, ELEMENTWISE_MAX_BLOCKS)


def _binary(name, a, b, off, out):
    for x, label in ((a, "a"), (b, "b"), (out, "out")):
        _check_array(x, label, 1, np.int32)
    if not (a.shape == b.shape == out.shape):
        raise ValueError(f"a, b and out must have one shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)} and {tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch(name, _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, (a, b),
                   (int(off),), out)


def _unary(name, x, out):
    _check_array(x, "x", 1, np.int32)
    _check_array(out, "out", 1, np.int32)
    if x.shape != out.shape:
        raise ValueError(f"x and out must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch(name, _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, (x,), (),
                   out)


# Reduction name -> (mode, index of R, of C, of S among the public arguments, index of the
# operand whose range bounds the slope's exponent (None for the forward product)).
_FAST_SPEC = {
    "matmul": (_FWD, 0, 1, 0, None),
    "matmul_lmul": (_LMUL, 0, 1, 0, None),
    "matmul_exact_grad_left": (_LEFT, 2, 1, 0, 1),       # R = grad, C = bt, S = a
    "matmul_exact_grad_right": (_RIGHT, 0, 2, 1, 0),     # R = at, C = grad, S = b
}
_INT32_LIMIT = 2 ** 31


def _range_stats(flat, stream):
    """(has inf/NaN, has zero/subnormal, min normal |bits|, max |bits|) of each flat array.

    One _range_stats_kernel launch per array and one copy of 3 int32 per array back to
    the host (this synchronizes with the stream).
    """
    init = np.empty((len(flat), 3), np.int32)
    init[:] = (0, bits.INF, bits.INF)
    dstats = cuda.to_device(init, stream=stream)
    kernel = _compiled("range_stats")
    for i, x in enumerate(flat):
        if x.size:
            blocks = min((x.size + RANGE_STATS_THREADS - 1) // RANGE_STATS_THREADS,
                         ELEMENTWISE_MAX_BLOCKS)
            kernel[blocks, RANGE_STATS_THREADS, stream](x, dstats[i])
    stats = dstats.copy_to_host(stream=stream)
    stream.synchronize()
    return [(int(hi) >= bits.INF, int(zmin) < bits.MIN_NORMAL, int(lo), int(hi))
            for hi, lo, zmin in stats]


def _fast_path(name, flat, off, stream):
    """The fast kernel's name for these operands, or None when the general path must run.

    Fast when no operand holds an inf or NaN and the exponent ranges rule out overflow and
    underflow of every product of normal operands (the CPU kernels' conditions). The
    "_zeros" variant when a factor of the products (R or C) holds a zero or subnormal,
    except in the exact backward when only grad does: "_fast_grad_zeros".
    """
    from . import cpu
    mode, ri, ci, _, yi = _FAST_SPEC[name]
    stats = _range_stats(flat, stream)
    if any(s[0] for s in stats):
        return None
    if mode == _FWD or mode == _LMUL:
        ok = cpu._fast_ok(stats[ri][2], stats[ri][3], stats[ci][2], stats[ci][3], off,
                          mode == _LMUL)
    else:
        g = stats[2]
        ok = cpu._slope_fast_ok(g[2], g[3], stats[yi][2], stats[yi][3], off)
    if not ok:
        return None
    if mode == _FWD or mode == _LMUL:
        zeros_grad, zeros_other = False, stats[ri][1] or stats[ci][1]
    else:   # the slope operand is C in the left gradient, R in the right one
        zeros_grad, zeros_other = stats[2][1], stats[ci if mode == _LEFT else ri][1]
    if zeros_other:
        return name + _MASK_SUFFIX[_MASK_BOTH]
    return name + _MASK_SUFFIX[_MASK_GRAD if zeros_grad else _MASK_NONE]


def _tiled(name, arrays, names, off, out):
    """Launch reduction ``name`` (fast path when the range check allows, else general).

    ``arrays`` are the public kernel's int32 operands, ``out`` is (P, rows, cols) float32.
    """
    for x, label in ((*zip(arrays, names), (out, "out"))):
        _check_array(x, label, 3, np.float32 if label == "out" else np.int32)
    batch, rows, cols = out.shape
    if batch == 0 or rows == 0 or cols == 0:
        return out
    mode, ri, ci, si, _ = _FAST_SPEC[name]
    red = arrays[ri].shape[2]
    row_tiles = (rows + FAST_BM - 1) // FAST_BM
    fast_fits = (row_tiles <= _MAX_GRID_YZ and -_INT32_LIMIT <= int(off) < _INT32_LIMIT
                 and all(x.size < _INT32_LIMIT for x in (*arrays, out)))
    col_tiles = (cols + TILE - 1) // TILE
    off = int(off)

    def body(dev, dout, stream):
        flat = [x.reshape(x.size) for x in dev]
        fast = _fast_path(name, flat, off, stream) if fast_fits else None
        if fast is not None:
            griddim = ((cols + FAST_BN - 1) // FAST_BN, row_tiles, min(batch, _MAX_GRID_YZ))
            _compiled(fast)[griddim, FAST_THREADS, stream](
                flat[ri], flat[ci], flat[si], np.int32(batch), np.int32(rows),
                np.int32(cols), np.int32(red), np.int32(off), dout.reshape(dout.size))
            return
        if col_tiles > _MAX_GRID_YZ:
            raise ValueError(f"{name}: at most {_MAX_GRID_YZ * TILE} output columns are "
                             f"supported on the general path, got {cols}")
        griddim = ((rows + TILE - 1) // TILE, col_tiles, min(batch, _MAX_GRID_YZ))
        _compiled(name)[griddim, (TILE, TILE), stream](*dev, off, dout)
    return _on_device(arrays, out, body)


def _shape_error(what, **shapes):
    listing = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
    return ValueError(f"{what}; got {listing}")


# =========================================================================== public kernels
def mul(a, b, off, out):
    """out = PAM(a, b; off) elementwise (flat int32 bit patterns)."""
    return _binary("mul", a, b, off, out)


def div(a, b, off, out):
    """out = PAD(a, b; off) elementwise (flat int32 bit patterns)."""
    return _binary("div", a, b, off, out)


def mul_slope(a, b, off, out):
    """out = exact derivative of PAM(a, b; off) w.r.t. a (a power of two)."""
    return _binary("mul_slope", a, b, off, out)


def div_slope_num(a, b, off, out):
    """out = exact derivative of PAD(a, b; off) w.r.t. the numerator a."""
    return _binary("div_slope_num", a, b, off, out)


def div_slope_den(a, b, off, out):
    """out = exact derivative of PAD(a, b; off) w.r.t. the denominator b."""
    return _binary("div_slope_den", a, b, off, out)


def exp2(y, out):
    """out = pa_exp2(y) elementwise."""
    return _unary("exp2", y, out)


def log2(x, out):
    """out = pa_log2(x) elementwise."""
    return _unary("log2", x, out)


def exp2_slope(y, out):
    """out = exact derivative of pa_exp2 at y: 2^floor(y)."""
    return _unary("exp2_slope", y, out)


def log2_slope(x, out):
    """out = exact derivative of pa_log2 at x: 2^-E(x)."""
    return _unary("log2_slope", x, out)


def matmul(a, b, off, out):
    """out[p, i, j] = sum_t PAM(a[p, i, t], b[p, t, j]), float32, t increasing.

    a: (batch, n, k) int32, b: (batch, k, m) int32, out: (batch, n, m) float32.
    k == 0 gives zeros.
    """
    if (a.ndim == b.ndim == out.ndim == 3
            and not (a.shape[0] == b.shape[0] == out.shape[0] and a.shape[2] == b.shape[1]
                     and out.shape[1] == a.shape[1] and out.shape[2] == b.shape[2])):
        raise _shape_error("matmul expects a (P, n, k), b (P, k, m), out (P, n, m)",
                           a=a.shape, b=b.shape, out=out.shape)
    return _tiled("matmul", (a, b), ("a", "b"), off, out)


def matmul_exact_grad_left(a, bt, grad, off, out):
    """Exact gradient w.r.t. the left operand of ``matmul`` (see the CPU kernel).

    out[p, i, t] = sum_j PAM(grad[p, i, j], slope_a(a[p, i, t], bt[p, j, t])), j increasing.
    a: (batch, n, k), bt: (batch, m, k), grad: (batch, n, m) int32; out: (batch, n, k)
    float32.
    """
    if (a.ndim == bt.ndim == grad.ndim == out.ndim == 3
            and not (a.shape[0] == bt.shape[0] == grad.shape[0] == out.shape[0]
                     and bt.shape[2] == a.shape[2] and grad.shape[1] == a.shape[1]
                     and grad.shape[2] == bt.shape[1] and tuple(out.shape) == tuple(a.shape))):
        raise _shape_error("matmul_exact_grad_left expects a (P, n, k), bt (P, m, k), "
                           "grad (P, n, m), out (P, n, k)",
                           a=a.shape, bt=bt.shape, grad=grad.shape, out=out.shape)
    # Thread layout: rows i, columns t; the extra operand a is read per thread.
    return _tiled("matmul_exact_grad_left", (a, bt, grad), ("a", "bt", "grad"), off, out)


def matmul_exact_grad_right(at, b, grad, off, out):
    """Exact gradient w.r.t. the right operand of ``matmul`` (see the CPU kernel).

    out[p, t, j] = sum_i PAM(grad[p, i, j], slope_a(b[p, t, j], at[p, t, i])), i increasing.
    at: (batch, k, n), b: (batch, k, m), grad: (batch, n, m) int32; out: (batch, k, m)
    float32.
    """
    if (at.ndim == b.ndim == grad.ndim == out.ndim == 3
            and not (at.shape[0] == b.shape[0] == grad.shape[0] == out.shape[0]
                     and b.shape[1] == at.shape[1] and grad.shape[1] == at.shape[2]
                     and grad.shape[2] == b.shape[2] and tuple(out.shape) == tuple(b.shape))):
        raise _shape_error("matmul_exact_grad_right expects at (P, k, n), b (P, k, m), "
                           "grad (P, n, m), out (P, k, m)",
                           at=at.shape, b=b.shape, grad=grad.shape, out=out.shape)
    return _tiled("matmul_exact_grad_right", (at, b, grad), ("at", "b", "grad"), off, out)


def matmul_exact_grads(a, bt, at, b, grad, off, out_a, out_b):
    """Both exact gradients (see the CPU kernel of that name): ``matmul_exact_grad_left``
    into ``out_a`` and ``matmul_exact_grad_right`` into ``out_b``, each skipped when None
    (the CUDA kernels take their fast path per tile, so there is no shared scan to save)."""
    if out_a is not None:
        matmul_exact_grad_left(a, bt, grad, off, out_a)
    if out_b is not None:
        matmul_exact_grad_right(at, b, grad, off, out_b)


# ===========================================================================
# Added kernels (scalar operands, fused optimizer and row kernels). Same conventions as
# above; the matmul kernels are not touched here.
# ===========================================================================

# ----------------------------------------------------------------- scalar operand
# ``<op>_bs(a, s, off, out)``: out[i] = op(a[i], s[0]); ``<op>_as(s, b, off, out)``:
# out[i] = op(s[0], b[i]). The scalar stays a 1-element device array (no host sync).
def _mul_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_bits(a[i], sb, off)


def _mul_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.mul_bits(sa, b[i], off)


def _div_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_bits(a[i], sb, off)


def _div_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.div_bits(sa, b[i], off)


def _mul_slope_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_slope_bits(a[i], sb, off)


def _mul_slope_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.mul_slope_bits(sa, b[i], off)


def _div_slope_num_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_num_bits(a[i], sb, off)


def _div_slope_num_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_num_bits(sa, b[i], off)


def _div_slope_den_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_den_bits(a[i], sb, off)


def _div_slope_den_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_den_bits(sa, b[i], off)


def _scalar_operand(name, x, s, off, out, scalar_first):
    _check_array(x, "b" if scalar_first else "a", 1, np.int32)
    _check_array(s, "s", 1, np.int32)
    _check_array(out, "out", 1, np.int32)
    if s.shape[0] != 1:
        raise ValueError(f"s must hold exactly one element, got shape {tuple(s.shape)}")
    if x.shape != out.shape:
        raise ValueError(f"the array operand and out must have one shape, got "
                         f"{tuple(x.shape)} and {tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    arrays = (s, x) if scalar_first else (x, s)
    return _launch(name, _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, arrays,
                   (int(off),), out)


def mul_bs(a, s, off, out):
    """out[i] = mul(a[i], s[0]) (see :func:`mul`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_bs", a, s, off, out, False)


def mul_as(s, b, off, out):
    """out[i] = mul(s[0], b[i]) (see :func:`mul`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_as", b, s, off, out, True)


def div_bs(a, s, off, out):
    """out[i] = div(a[i], s[0]) (see :func:`div`); ``s`` is a 1-element array."""
    return _scalar_operand("div_bs", a, s, off, out, False)


def div_as(s, b, off, out):
    """out[i] = div(s[0], b[i]) (see :func:`div`); ``s`` is a 1-element array."""
    return _scalar_operand("div_as", b, s, off, out, True)


def mul_slope_bs(a, s, off, out):
    """out[i] = mul_slope(a[i], s[0]) (see :func:`mul_slope`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_slope_bs", a, s, off, out, False)


def mul_slope_as(s, b, off, out):
    """out[i] = mul_slope(s[0], b[i]) (see :func:`mul_slope`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_slope_as", b, s, off, out, True)


def div_slope_num_bs(a, s, off, out):
    """out[i] = div_slope_num(a[i], s[0]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_num_bs", a, s, off, out, False)


def div_slope_num_as(s, b, off, out):
    """out[i] = div_slope_num(s[0], b[i]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_num_as", b, s, off, out, True)


def div_slope_den_bs(a, s, off, out):
    """out[i] = div_slope_den(a[i], s[0]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_den_bs", a, s, off, out, False)


def div_slope_den_as(s, b, off, out):
    """out[i] = div_slope_den(s[0], b[i]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_den_as", b, s, off, out, True)


KERNEL_FUNCTIONS.update({
    "mul_bs": _mul_bs_kernel,
    "mul_as": _mul_as_kernel,
    "div_bs": _div_bs_kernel,
    "div_as": _div_as_kernel,
    "mul_slope_bs": _mul_slope_bs_kernel,
    "mul_slope_as": _mul_slope_as_kernel,
    "div_slope_num_bs": _div_slope_num_bs_kernel,
    "div_slope_num_as": _div_slope_num_as_kernel,
    "div_slope_den_bs": _div_slope_den_bs_kernel,
    "div_slope_den_as": _div_slope_den_as_kernel,
})
__all__ += [
    "mul_bs", "mul_as", "div_bs", "div_as", "mul_slope_bs", "mul_slope_as",
    "div_slope_num_bs", "div_slope_num_as", "div_slope_den_bs", "div_slope_den_as"]


# ----------------------------------------------------------------- fused optimizers
# In place over flat int32 arrays, one thread per element (grid stride); the per-element
# arithmetic is pam.optim_bits, as in the CPU kernels of the same names.
def _adamw_kernel(p, g, m, v, mx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off,
                  flags):
    ams = (flags & optim_bits.ADAMW_AMSGRAD) != 0
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        imx = mx[i] if ams else 0
        np_, nm, nv, nmx = optim_bits.adamw_update(p[i], g[i], m[i], v[i], imx, decay, b1,
                                                   omb1, b2, omb2, step_size, sbc2, eps,
                                                   off, flags)
        p[i] = np_
        m[i] = nm
        v[i] = nv
        if ams:
            mx[i] = nmx


def _sgd_kernel(p, g, buf, lr, wd, mom, omd, off, flags):
    keep = (flags & optim_bits.SGD_MOMENTUM) != 0
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        ib = buf[i] if keep else 0
        np_, nb = optim_bits.sgd_update(p[i], g[i], ib, lr, wd, mom, omd, off, flags)
        p[i] = np_
        if keep:
            buf[i] = nb


def _launch_inplace(name, griddim, blockdim, arrays, scalars, updated):
    """Launch ``name(*arrays, *scalars)``; NumPy arrays at indices ``updated`` get the
    device results copied back (torch CUDA tensors are updated in place, zero-copy)."""
    kernel = _compiled(name)
    tensors = [_is_torch_tensor(x) for x in arrays]
    if all(tensors):
        with torch_stream(arrays) as stream:
            dev = [cuda.as_cuda_array(x.detach()) for x in arrays]
            kernel[griddim, blockdim, stream](*dev, *scalars)
        return
    if any(tensors):
        raise TypeError("pass either only torch CUDA tensors or only NumPy arrays")
    dev = [cuda.to_device(x) for x in arrays]
    kernel[griddim, blockdim](*dev, *scalars)
    for i in updated:
        dev[i].copy_to_host(arrays[i])


def _check_flat(named, n):
    for label, x in named:
        _check_array(x, label, 1, np.int32)
        if x.shape[0] != n:
            raise ValueError(f"{label} must have {n} elements, got {x.shape[0]}")


def adamw(p, g, m, v, mx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off, flags):
    """In place: p, m, v (and mx with amsgrad) <- one AdamW step (see the CPU kernel)."""
    optim_bits.check_offset(int(off))
    ams = (int(flags) & optim_bits.ADAMW_AMSGRAD) != 0
    _check_array(p, "p", 1, np.int32)
    n = p.shape[0]
    _check_flat((("g", g), ("m", m), ("v", v)) + ((("mx", mx),) if ams else ()), n)
    if n == 0:
        return
    scalars = tuple(int(x) for x in (decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off,
                                     flags))
    _launch_inplace("adamw", _elementwise_grid(n), ELEMENTWISE_THREADS, (p, g, m, v, mx),
                    scalars, (0, 2, 3, 4) if ams else (0, 2, 3))


def sgd(p, g, buf, lr, wd, mom, omd, off, flags):
    """In place: p (and buf with momentum) <- one SGD step (see the CPU kernel)."""
    optim_bits.check_offset(int(off))
    keep = (int(flags) & optim_bits.SGD_MOMENTUM) != 0
    _check_array(p, "p", 1, np.int32)
    n = p.shape[0]
    _check_flat((("g", g),) + ((("buf", buf),) if keep else ()), n)
    if n == 0:
        return
    scalars = tuple(int(x) for x in (lr, wd, mom, omd, off, flags))
    _launch_inplace("sgd", _elementwise_grid(n), ELEMENTWISE_THREADS, (p, g, buf), scalars,
                    (0, 2) if keep else (0,))


def _adamw_unbiased_kernel(p, g, m, v, mx, decay, c1, c2, k_step, eps_s, off, sq_off, flags):
    ams = (flags & optim_bits.ADAMW_AMSGRAD) != 0
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        imx = mx[i] if ams else 0
        np_, nm, nv, nmx = optim_bits.adamw_update_unbiased(p[i], g[i], m[i], v[i], imx,
                                                            decay, c1, c2, k_step, eps_s,
                                                            off, sq_off, flags)
        p[i] = np_
        m[i] = nm
        v[i] = nv
        if ams:
            mx[i] = nmx


def adamw_unbiased(p, g, m, v, mx, decay, c1, c2, k_step, eps_s, off, sq_off, flags):
    """In place: one step of the unbiased AdamW variant (see the CPU kernel)."""
    optim_bits.check_offset(int(off))
    optim_bits.check_offset(int(sq_off))
    ams = (int(flags) & optim_bits.ADAMW_AMSGRAD) != 0
    _check_array(p, "p", 1, np.int32)
    n = p.shape[0]
    _check_flat((("g", g), ("m", m), ("v", v)) + ((("mx", mx),) if ams else ()), n)
    if n == 0:
        return
    scalars = tuple(int(x) for x in (decay, c1, c2, k_step, eps_s, off, sq_off, flags))
    _launch_inplace("adamw_unbiased", _elementwise_grid(n), ELEMENTWISE_THREADS,
                    (p, g, m, v, mx), scalars, (0, 2, 3, 4) if ams else (0, 2, 3))


KERNEL_FUNCTIONS.update({"adamw": _adamw_kernel, "sgd": _sgd_kernel,
                         "adamw_unbiased": _adamw_unbiased_kernel})
__all__ += ["adamw", "sgd", "adamw_unbiased"]


# ----------------------------------------------------------------- fused composites
def _gelu_forward_kernel(x, knots, slopes, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = rows_bits.gelu_forward_bits(x[i], knots, slopes)


def _gelu_backward_kernel(x, grad, knots, slopes, exact, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = rows_bits.gelu_backward_bits(x[i], grad[i], knots, slopes, exact)


def gelu_forward(x, knots, slopes, out):
    """out = piecewise-affine GELU of x (see the CPU kernel); knots/slopes: int32 bits."""
    for a, label in ((x, "x"), (knots, "knots"), (slopes, "slopes"), (out, "out")):
        _check_array(a, label, 1, np.int32)
    if x.shape != out.shape or knots.shape != slopes.shape:
        raise ValueError(f"x and out, knots and slopes must have equal shapes, got "
                         f"{tuple(x.shape)}, {tuple(out.shape)}, {tuple(knots.shape)}, "
                         f"{tuple(slopes.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch("gelu_forward", _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS,
                   (x, knots, slopes), (), out)


def gelu_backward(x, grad, knots, slopes, exact, out):
    """out = input gradient of the piecewise-affine GELU (see the CPU kernel)."""
    for a, label in ((x, "x"), (grad, "grad"), (knots, "knots"), (slopes, "slopes"),
                     (out, "out")):
        _check_array(a, label, 1, np.int32)
    if not (x.shape == grad.shape == out.shape) or knots.shape != slopes.shape:
        raise ValueError(f"x, grad and out, knots and slopes must have equal shapes, got "
                         f"{tuple(x.shape)}, {tuple(grad.shape)}, {tuple(out.shape)}, "
                         f"{tuple(knots.shape)}, {tuple(slopes.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch("gelu_backward", _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS,
                   (x, grad, knots, slopes), (bool(exact),), out)


def _softmax_forward_kernel(x, n, off, safe, stats, out):
    rows = x.size // n
    for r in range(cuda.grid(1), rows, cuda.gridsize(1)):
        rows_bits.softmax_row_forward(x, out, r * n, n, off, safe, stats,
                                      r * rows_bits.SOFTMAX_STATS)


def _softmax_backward_kernel(x, g, stats, n, off, safe, exact, out):
    rows = x.size // n
    for r in range(cuda.grid(1), rows, cuda.gridsize(1)):
        rows_bits.softmax_row_backward(x, g, out, r * n, n, off, safe, exact, stats,
                                       r * rows_bits.SOFTMAX_STATS)


def _check_rows(n, **arrays):
    size = None
    for label, a in arrays.items():
        _check_array(a, label, 1, np.int32)
        if size is not None and a.shape[0] != size:
            raise ValueError(f"{label} must have {size} elements, got {a.shape[0]}")
        size = a.shape[0]
    if n <= 0 or size % n:
        raise ValueError(f"row length n={n} must be positive and divide {size}")
    return size // n


def _check_softmax_stats(stats, rows):
    _check_array(stats, "stats", 1, np.int32)
    per_row = rows_bits.SOFTMAX_STATS
    if stats.shape[0] != rows * per_row:
        raise ValueError(f"stats must have {per_row} entries per row ({rows * per_row}), "
                         f"got {stats.shape[0]}")


def softmax_forward(x, out, stats, n, off, safe):
    """Rows of length ``n`` -> PA softmax and each row's statistics into ``stats``, one
    thread per row (see the CPU kernel)."""
    rows = _check_rows(int(n), x=x, out=out)
    _check_softmax_stats(stats, rows)
    if rows == 0:
        return out
    from .cuda_rows import _run           # launches with two outputs (cuda_rows imports us)
    kernel = _compiled("softmax_forward")
    _run((x,), (stats, out), lambda d, o, s: kernel[
        _elementwise_grid(rows), ELEMENTWISE_THREADS, s](d[0], int(n), int(off), bool(safe),
                                                         o[0], o[1]))
    return out


def softmax_backward(x, g, stats, out, n, off, safe, exact):
    """Input gradient of softmax_forward given its ``stats``, one thread per row (see the
    CPU kernel)."""
    rows = _check_rows(int(n), x=x, g=g, out=out)
    _check_softmax_stats(stats, rows)
    if rows == 0:
        return out
    return _launch("softmax_backward", _elementwise_grid(rows), ELEMENTWISE_THREADS,
                   (x, g, stats), (int(n), int(off), bool(safe), bool(exact)), out)


KERNEL_FUNCTIONS.update({"gelu_forward": _gelu_forward_kernel,
                         "gelu_backward": _gelu_backward_kernel,
                         "softmax_forward": _softmax_forward_kernel,
                         "softmax_backward": _softmax_backward_kernel})
__all__ += ["gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward"]


def _added_signatures():
    """Argument types of the kernels added in this section (see SIGNATURES)."""
    from numba import types as nt
    i1, i64 = nt.int32[::1], nt.int64
    sigs = {name + sfx: (i1, i1, i64, i1) for sfx in ("_bs", "_as") for name in
            ("mul", "div", "mul_slope", "div_slope_num", "div_slope_den")}
    sigs.update({"adamw": (i1,) * 5 + (i64,) * 10, "sgd": (i1,) * 3 + (i64,) * 6,
                 "adamw_unbiased": (i1,) * 5 + (i64,) * 8,
                 "gelu_forward": (i1,) * 4, "gelu_backward": (i1,) * 4 + (nt.boolean, i1),
                 "softmax_forward": (i1, i64, i64, nt.boolean, i1, i1),
                 "softmax_backward": (i1, i1, i1, i64, i64, nt.boolean, nt.boolean, i1)})
    return sigs


SIGNATURES.update(_added_signatures())


# ----------------------------------------------------------------- families and formats
# L-Mul products (bits.lmul_bits, ``c`` in the ``off`` slot), the power-of-two part (the
# exact L-Mul slope) and the rounding to operand formats (bits.quantize_bits).
def _mul_lmul_kernel(a, b, c, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.lmul_bits(a[i], b[i], c)


def _mul_lmul_bs_kernel(a, s, c, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.lmul_bits(a[i], sb, c)


def _mul_lmul_as_kernel(s, b, c, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.lmul_bits(sa, b[i], c)


def _pow2_part_kernel(x, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = bits.pow2_part_bits(x[i])


def _quantize_kernel(x, fmt, flush, out):
    mbits, emin_field, max_pat, over_pat = bits.format_params(fmt)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = bits.quantize_core_bits(x[i], mbits, emin_field, max_pat, over_pat, flush)


def _check_lmul_constant(c):
    if not 0 <= int(c) < bits.TWO23:
        raise ValueError(f"L-Mul constant c must be in [0, 2^23) (see bits.lmul_constant), "
                         f"got {c}")


def mul_lmul(a, b, c, out):
    """out = L-Mul(a, b; c) elementwise (bits.lmul_bits; c = bits.lmul_constant(m))."""
    _check_lmul_constant(c)
    return _binary("mul_lmul", a, b, c, out)


def mul_lmul_bs(a, s, c, out):
    """out[i] = mul_lmul(a[i], s[0]); ``s`` is a 1-element array."""
    _check_lmul_constant(c)
    return _scalar_operand("mul_lmul_bs", a, s, c, out, False)


def mul_lmul_as(s, b, c, out):
    """out[i] = mul_lmul(s[0], b[i]); ``s`` is a 1-element array."""
    _check_lmul_constant(c)
    return _scalar_operand("mul_lmul_as", b, s, c, out, True)


def pow2_part(x, out):
    """out = sign(x) 2^E(x) elementwise (bits.pow2_part_bits), the exact L-Mul slope."""
    return _unary("pow2_part", x, out)


def quantize(x, fmt, flush, out):
    """out = x rounded to operand format ``fmt`` (bits.quantize_bits), flat int32 arrays."""
    if isinstance(fmt, bool) or not 0 <= int(fmt) < bits.N_FORMATS:
        raise ValueError(f"quantize: fmt must be a format code 0..4 (float32, bfloat16, "
                         f"float16, e4m3, e5m2), got {fmt!r}")
    _check_array(x, "x", 1, np.int32)
    _check_array(out, "out", 1, np.int32)
    if x.shape != out.shape:
        raise ValueError(f"x and out must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch("quantize", _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, (x,),
                   (int(fmt), int(bool(flush))), out)


def matmul_lmul(a, b, c, out):
    """out[p, i, j] = sum_t L-Mul(a[p, i, t], b[p, t, j]; c), float32, t increasing (see
    the CPU kernel): the range check, then the register-tiled fast kernel in its L-Mul mode
    (PAM's add plus the carry correction) or the general kernel (bits.lmul_bits)."""
    _check_lmul_constant(c)
    if (a.ndim == b.ndim == out.ndim == 3
            and not (a.shape[0] == b.shape[0] == out.shape[0] and a.shape[2] == b.shape[1]
                     and out.shape[1] == a.shape[1] and out.shape[2] == b.shape[2])):
        raise _shape_error("matmul_lmul expects a (P, n, k), b (P, k, m), out (P, n, m)",
                           a=a.shape, b=b.shape, out=out.shape)
    return _tiled("matmul_lmul", (a, b), ("a", "b"), c, out)


KERNEL_FUNCTIONS.update({"mul_lmul": _mul_lmul_kernel, "mul_lmul_bs": _mul_lmul_bs_kernel,
                         "mul_lmul_as": _mul_lmul_as_kernel, "pow2_part": _pow2_part_kernel,
                         "quantize": _quantize_kernel})
__all__ += ["mul_lmul", "mul_lmul_bs", "mul_lmul_as", "pow2_part", "quantize", "matmul_lmul"]


def _family_signatures():
    from numba import types as nt
    i1, i64 = nt.int32[::1], nt.int64
    return {"mul_lmul": (i1, i1, i64, i1), "mul_lmul_bs": (i1, i1, i64, i1),
            "mul_lmul_as": (i1, i1, i64, i1), "pow2_part": (i1, i1),
            "quantize": (i1, i64, i64, i1)}


SIGNATURES.update(_family_signatures())
