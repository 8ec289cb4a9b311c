"""CPU row kernels of the fused log_softmax and layer norm (Numba, parallel over rows).

Each kernel runs the scalar row definitions of :mod:`pam.rows_bits` (the same lines the
CUDA kernels of :mod:`pam.kernels.cuda_rows` compile) over rows of length ``n`` of flat
int32 bit patterns, one row per iteration: ``prange`` over rows when the input has at
least ``cpu.FUSED_PARALLEL_MIN`` elements, a serial loop otherwise (same bits either way:
rows are independent and each is reduced sequentially). Flags are runtime integers, so
each kernel has one specialization. The layer-norm weight and bias gradients are the
column sums of per-row terms over rows in increasing row index (float32 from +0), in a
second loop, parallel over columns. ``off`` must be an offset constant of
pam.dispatch.offset_constant (ValueError otherwise).
"""
import numpy as np
from numba import njit, prange

from .. import optim_bits, rows_bits
from .cpu import FUSED_PARALLEL_MIN

_JIT = dict(parallel=True, cache=True, nogil=True)

__all__ = ["log_softmax_forward", "log_softmax_backward", "layer_norm_forward",
           "layer_norm_backward"]


# Each kernel runs its row definition in a serial loop (small inputs) and in a prange loop.
# Called through these dispatchers, the (inlined, vectorized) row code compiles once rather
# than once per loop: 28 s instead of 38 s for the first compilation of the four kernels
# in a fresh process (idle machine), the same machine code per row.
@njit(cache=True, nogil=True)
def _log_softmax_row_forward(x, out, base, n, off):
    rows_bits.log_softmax_row_forward(x, out, base, n, off)


@njit(cache=True, nogil=True)
def _log_softmax_row_backward(x, g, out, base, n, off, exact):
    rows_bits.log_softmax_row_backward(x, g, out, base, n, off, exact)


@njit(cache=True, nogil=True)
def _layer_norm_row_forward(x, w, b, out, base, n, nb, eps_b, off, flags, stats, si):
    rows_bits.layer_norm_row_forward(x, w, b, out, base, n, nb, eps_b, off, flags, stats, si)


@njit(cache=True, nogil=True)
def _layer_norm_row_backward(x, w, g, out, terms, base, n, nb, eps_b, off, flags, stats, si):
    rows_bits.layer_norm_row_backward(x, w, g, out, terms, base, n, nb, eps_b, off, flags,
                                      stats, si)


@njit(**_JIT)
def log_softmax_forward(x, out, n, off):
    """Rows of length ``n`` of flat int32 ``x`` -> PA log-softmax
    (pam.rows_bits.log_softmax_row_forward)."""
    optim_bits.check_offset(off)
    rows = x.size // n if n else 0
    if x.size < FUSED_PARALLEL_MIN:
        for r in range(rows):
            _log_softmax_row_forward(x, out, r * n, n, off)
    else:
        for r in prange(rows):
            _log_softmax_row_forward(x, out, r * n, n, off)


@njit(**_JIT)
def log_softmax_backward(x, g, out, n, off, exact):
    """Input gradient of log_softmax_forward for output gradient ``g``
    (pam.rows_bits.log_softmax_row_backward)."""
    optim_bits.check_offset(off)
    rows = x.size // n if n else 0
    if x.size < FUSED_PARALLEL_MIN:
        for r in range(rows):
            _log_softmax_row_backward(x, g, out, r * n, n, off, exact)
    else:
        for r in prange(rows):
            _log_softmax_row_backward(x, g, out, r * n, n, off, exact)


@njit(**_JIT)
def layer_norm_forward(x, w, b, out, n, nb, eps_b, off, flags):
    """Rows of length ``n`` -> PA layer norm (pam.rows_bits.layer_norm_row_forward);
    ``w``, ``b``: int32 bits of length ``n`` (read only with LN_WEIGHT / LN_BIAS in
    ``flags``), ``nb`` the bits of float32(n), ``eps_b`` those of float32(eps)."""
    optim_bits.check_offset(off)
    rows = x.size // n if n else 0
    stats = np.empty(rows * 9, np.int32)
    if x.size < FUSED_PARALLEL_MIN:
        for r in range(rows):
            _layer_norm_row_forward(x, w, b, out, r * n, n, nb, eps_b, off, flags, stats,
                                    r * 9)
    else:
        for r in prange(rows):
            _layer_norm_row_forward(x, w, b, out, r * n, n, nb, eps_b, off, flags, stats,
                                    r * 9)


@njit(cache=True, nogil=True)
def _column_sums(t, out, n, rows):
    """out[j] = t[0 * n + j] + t[1 * n + j] + ... (float32 from +0, increasing row), row
    by row into a vector of column accumulators (each column in row order)."""
    tf = t.view(np.float32)
    acc = np.zeros(n, np.float32)
    for r in range(rows):
        for j in range(n):
            acc[j] += tf[r * n + j]
    for j in range(n):
        out[j] = rows_bits._b(acc[j])


@njit(**_JIT)
def layer_norm_backward(x, w, g, out, gw, gb, n, nb, eps_b, off, flags):
    """Input gradient of layer_norm_forward for output gradient ``g`` into ``out``; with
    LN_WEIGHT in ``flags`` the weight gradient into ``gw`` (length n), with LN_BIAS the
    bias gradient (column sums of g) into ``gb`` (length n)."""
    optim_bits.check_offset(off)
    rows = x.size // n if n else 0
    stats = np.empty(rows * 9, np.int32)
    has_w = (flags & rows_bits.LN_WEIGHT) != 0
    terms = np.empty(x.size if has_w else 1, np.int32)
    if x.size < FUSED_PARALLEL_MIN:
        for r in range(rows):
            _layer_norm_row_backward(x, w, g, out, terms, r * n, n, nb, eps_b, off,
                                     flags, stats, r * 9)
    else:
        for r in prange(rows):
            _layer_norm_row_backward(x, w, g, out, terms, r * n, n, nb, eps_b, off,
                                     flags, stats, r * 9)
    if has_w:
        _column_sums(terms, gw, n, rows)
    if flags & rows_bits.LN_BIAS:
        _column_sums(g, gb, n, rows)
