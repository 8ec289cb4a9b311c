"""CPU row kernels of the fused log_softmax and layer norm (Numba, rows split over threads).

Each kernel runs the scalar row definitions of :mod:`pam.rows_bits` (the same lines the
CUDA kernels of :mod:`pam.kernels.cuda_rows` compile) over rows of length ``n`` of flat
int32 bit patterns, one row per iteration. The compiled part (``_<kernel>_rows``) is a
serial ``nogil`` kernel over the rows ``lo:hi``; the public kernel of the same name splits
the rows between threads with :func:`pam.kernels.threads.run` when the input has at least
``cpu.FUSED_PARALLEL_MIN`` elements (a quarter / a twelfth of that for the layer norm's
costlier rows), else runs them in the calling thread (same bits either
way: rows are independent and each is reduced sequentially). The flags (exact, weight,
bias) choose one compiled kernel per variant in Python (``_<kernel>_rows_<variant>``), so a
run compiles only the row code of the variants it uses (cold start, validation/README.md
section 9c). The layer-norm forward writes each row's statistics (LN_STATS per row) to a
``stats`` array that the backward reads instead of recomputing them. The layer-norm weight
and bias gradients are the column sums of per-row terms over rows in increasing row index
(float32 from +0), after the rows.
``off`` must be an offset constant of pam.dispatch.offset_constant (ValueError otherwise).
"""
import numpy as np
from numba import njit

from .. import optim_bits, rows_bits
from . import threads
from .cpu import _SERIAL, FUSED_PARALLEL_MIN, row_work

LN_STATS = rows_bits.LN_STATS        # layer-norm row statistics per row

__all__ = ["log_softmax_forward", "log_softmax_backward", "layer_norm_forward",
           "layer_norm_backward"]


def _rows(x, n):
    return x.size // n if n else 0


# Work of one element of the layer-norm kernels relative to the elementwise kernels that
# FUSED_PARALLEL_MIN is set for (the forward ~4x, the backward ~12x per element on one
# thread), so that a (640, 64) layer norm, 0.2 / 0.5 ms of work, is split between threads
# too (0.25 -> 0.20 ms and 0.59 -> 0.38-0.48 ms on 2 threads; a (128, 64) one stays whole).
LN_FORWARD_WORK = 4
LN_BACKWARD_WORK = 12


def _log_softmax_forward_rows_body(x, out, n, off, lo, hi):
    optim_bits.check_offset(off)
    for r in range(lo, hi):
        rows_bits.log_softmax_row_forward(x, out, r * n, n, off)


_log_softmax_forward_rows = threads.splittable(_log_softmax_forward_rows_body,
                                               name="_log_softmax_forward_rows")


# One kernel per flag variant: each captures its flags as Python bools, so Numba prunes the
# branches on them and compiles only the row code of that variant (the row definitions'
# pam.rows_bits.*_<variant> functions); a run compiles the variants it uses.
def _make_log_softmax_backward_rows_body(exact):
    def body(x, g, out, n, off, lo, hi):
        optim_bits.check_offset(off)
        for r in range(lo, hi):
            if exact:
                rows_bits.log_softmax_row_backward_exact(x, g, out, r * n, n, off)
            else:
                rows_bits.log_softmax_row_backward_approx(x, g, out, r * n, n, off)
    return body


_log_softmax_backward_rows_exact_body = _make_log_softmax_backward_rows_body(True)
_log_softmax_backward_rows_approx_body = _make_log_softmax_backward_rows_body(False)
_log_softmax_backward_rows_exact = threads.splittable(
    _log_softmax_backward_rows_exact_body, name="_log_softmax_backward_rows_exact")
_log_softmax_backward_rows_approx = threads.splittable(
    _log_softmax_backward_rows_approx_body, name="_log_softmax_backward_rows_approx")


def _make_layer_norm_forward_rows(has_w, has_b):
    def kernel(x, w, b, out, stats, n, nb, eps_b, off, lo, hi):
        optim_bits.check_offset(off)
        for r in range(lo, hi):
            if has_w:
                if has_b:
                    rows_bits.layer_norm_row_forward_wb(x, w, b, out, r * n, n, nb, eps_b,
                                                        off, stats, LN_STATS * r)
                else:
                    rows_bits.layer_norm_row_forward_w(x, w, b, out, r * n, n, nb, eps_b,
                                                       off, stats, LN_STATS * r)
            elif has_b:
                rows_bits.layer_norm_row_forward_b(x, w, b, out, r * n, n, nb, eps_b, off,
                                                   stats, LN_STATS * r)
            else:
                rows_bits.layer_norm_row_forward_plain(x, w, b, out, r * n, n, nb, eps_b,
                                                       off, stats, LN_STATS * r)
    suffix = ("w" if has_w else "") + ("b" if has_b else "")
    return threads.splittable(kernel, name=f"_layer_norm_forward_rows_{suffix or 'plain'}")


_layer_norm_forward_rows_plain = _make_layer_norm_forward_rows(False, False)
_layer_norm_forward_rows_w = _make_layer_norm_forward_rows(True, False)
_layer_norm_forward_rows_b = _make_layer_norm_forward_rows(False, True)
_layer_norm_forward_rows_wb = _make_layer_norm_forward_rows(True, True)
_LAYER_NORM_FORWARD = {(False, False): _layer_norm_forward_rows_plain,
                       (True, False): _layer_norm_forward_rows_w,
                       (False, True): _layer_norm_forward_rows_b,
                       (True, True): _layer_norm_forward_rows_wb}


def _make_layer_norm_backward_rows(exact, has_w):
    def kernel(x, w, g, stats, out, terms, n, nb, off, lo, hi):
        optim_bits.check_offset(off)
        tmp = np.empty(max(n, 1), np.int32)      # one row's scratch (y or its gradient)
        for r in range(lo, hi):
            if exact:
                if has_w:
                    rows_bits.layer_norm_row_backward_exact_w(x, w, g, out, terms, tmp, r * n, n,
                                                              nb, off, stats, LN_STATS * r, 0)
                else:
                    rows_bits.layer_norm_row_backward_exact(x, w, g, out, terms, tmp, r * n, n,
                                                            nb, off, stats, LN_STATS * r, 0)
            elif has_w:
                rows_bits.layer_norm_row_backward_approx_w(x, w, g, out, terms, tmp, r * n, n, nb,
                                                           off, stats, LN_STATS * r, 0)
            else:
                rows_bits.layer_norm_row_backward_approx(x, w, g, out, terms, tmp, r * n, n, nb,
                                                         off, stats, LN_STATS * r, 0)
    suffix = ("exact" if exact else "approx") + ("_w" if has_w else "")
    return threads.splittable(kernel, name=f"_layer_norm_backward_rows_{suffix}")


_layer_norm_backward_rows_approx = _make_layer_norm_backward_rows(False, False)
_layer_norm_backward_rows_approx_w = _make_layer_norm_backward_rows(False, True)
_layer_norm_backward_rows_exact = _make_layer_norm_backward_rows(True, False)
_layer_norm_backward_rows_exact_w = _make_layer_norm_backward_rows(True, True)
_LAYER_NORM_BACKWARD = {(False, False): _layer_norm_backward_rows_approx,
                        (False, True): _layer_norm_backward_rows_approx_w,
                        (True, False): _layer_norm_backward_rows_exact,
                        (True, True): _layer_norm_backward_rows_exact_w}


@njit(**_SERIAL)
def _column_sums(t, out, n, rows):
    """out[j] = t[0 * n + j] + t[1 * n + j] + ... (float32 from +0, increasing row), row
    by row into a vector of column accumulators (each column in row order)."""
    acc = np.empty(n, np.float32)
    for j in range(n):
        acc[j] = np.float32(0.0)
    for r in range(rows):
        for j in range(n):
            acc[j] += rows_bits._f(t[r * n + j])
    for j in range(n):
        out[j] = rows_bits._b(acc[j])


def log_softmax_forward(x, out, n, off):
    """Rows of length ``n`` of flat int32 ``x`` -> PA log-softmax
    (pam.rows_bits.log_softmax_row_forward)."""
    rows = _rows(x, n)
    threads.run(_log_softmax_forward_rows, rows, row_work(x.size, rows), FUSED_PARALLEL_MIN,
                x, out, n, off)


def log_softmax_backward(x, g, out, n, off, exact):
    """Input gradient of log_softmax_forward for output gradient ``g``
    (pam.rows_bits.log_softmax_row_backward)."""
    kernel = _log_softmax_backward_rows_exact if exact else _log_softmax_backward_rows_approx
    rows = _rows(x, n)
    threads.run(kernel, rows, row_work(x.size, rows), FUSED_PARALLEL_MIN, x, g, out, n, off)


def _check_stats(x, stats, n):
    """The number of rows of length ``n`` in ``x``; ValueError unless ``stats`` holds
    LN_STATS entries per row."""
    rows = _rows(x, n)
    if stats.size != LN_STATS * rows:
        raise ValueError(f"stats must have {LN_STATS} entries per row "
                         f"({LN_STATS * rows}), got {stats.size}")
    return rows


def layer_norm_forward(x, w, b, out, stats, n, nb, eps_b, off, flags):
    """Rows of length ``n`` -> PA layer norm (pam.rows_bits.layer_norm_row_forward);
    ``w``, ``b``: int32 bits of length ``n`` (read only with LN_WEIGHT / LN_BIAS in
    ``flags``), ``nb`` the bits of float32(n), ``eps_b`` those of float32(eps). Each row's
    statistics (layer_norm_row_stats) go to ``stats`` (int32, LN_STATS per row), for
    layer_norm_backward."""
    rows = _check_stats(x, stats, n)
    kernel = _LAYER_NORM_FORWARD[(flags & rows_bits.LN_WEIGHT) != 0,
                                 (flags & rows_bits.LN_BIAS) != 0]
    threads.run(kernel, rows, LN_FORWARD_WORK * x.size, FUSED_PARALLEL_MIN, x, w, b, out,
                stats, n, nb, eps_b, off)


def layer_norm_backward(x, w, g, stats, out, gw, gb, n, nb, off, flags):
    """Input gradient of layer_norm_forward for output gradient ``g`` into ``out``, given
    the ``stats`` layer_norm_forward wrote for ``x``; with LN_WEIGHT in ``flags`` the
    weight gradient into ``gw`` (length n), with LN_BIAS the bias gradient (column sums of
    g) into ``gb`` (length n)."""
    rows = _check_stats(x, stats, n)
    has_w = (flags & rows_bits.LN_WEIGHT) != 0
    terms = np.empty(x.size if has_w else 1, np.int32)
    kernel = _LAYER_NORM_BACKWARD[(flags & rows_bits.LN_EXACT) != 0, has_w]
    threads.run(kernel, rows, LN_BACKWARD_WORK * x.size, FUSED_PARALLEL_MIN, x, w, g, stats,
                out, terms, n, nb, off)
    if has_w:
        _column_sums(terms, gw, n, rows)
    if flags & rows_bits.LN_BIAS:
        _column_sums(g, gb, n, rows)
