"""CPU kernels of the fused cross entropy (Numba), the definitions of :mod:`pam.xent_bits`.

``x``: flat int32 logits, rows of ``n`` classes; ``target``: int64 class index per row;
``w``: int32 class weights (any 1-element array without ``CE_WEIGHT``); ``ignore``: the
ignore_index; ``a_b`` / ``s_b``: the bits of the smoothing factors (unused without
``CE_SMOOTH``); ``reduction``: a ``pam.xent_bits.REDUCE_*`` code. The rows (their
log_softmax, through :mod:`.cpu_rows`' compiled range kernels, and their loss terms or
gradients) are split over threads with :func:`pam.kernels.threads.run` as the other row
kernels are; the sums over rows run after them in one thread, in increasing row order.
The backward rows are one kernel per ``CE_EXACT`` choice (``_backward_rows_<exact|approx>``,
each calling one log_softmax backward variant of :mod:`.cpu_rows`): a run compiles one.
A target outside [0, n) that is not ``ignore`` raises ValueError; ``off`` must be an
offset constant of pam.dispatch.offset_constant.
"""
import numpy as np
from numba import njit

from .. import optim_bits
from .. import xent_bits as XB
from . import threads
from .cpu import _SERIAL, FUSED_PARALLEL_MIN, row_work
from .cpu_rows import (_log_softmax_backward_rows_approx_body,
                       _log_softmax_backward_rows_exact_body, _log_softmax_forward_rows_body)

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]


@threads.splittable
def _forward_rows(x, w, target, n, ignore, off, flags, lp, nll, sm, wt, lo, hi):
    optim_bits.check_offset(off)
    for r in range(lo, hi):
        if XB.ce_row_log_probs_wanted(target, r, ignore, flags):
            _log_softmax_forward_rows_body(x, lp, n, off, r, r + 1)
        XB.ce_row_terms(w, target, lp, nll, sm, wt, r, n, ignore, off, flags)


@njit(**_SERIAL)
def _finish(target, nll, sm, wt, ignore, reduction, flags, a_b, s_b, out):
    XB.ce_finish(target, nll, sm, wt, target.size, ignore, reduction, flags, a_b, s_b, out)


@njit(**_SERIAL)
def _grad_scalars(target, nll, sm, wt, ignore, reduction, flags, a_b, s_b, g, dn, ds):
    XB.ce_grad_scalars(target, nll, sm, wt, target.size, ignore, reduction, flags, a_b,
                       s_b, g, dn, ds)


def _make_backward_rows(exact):
    """The backward rows with CE_EXACT fixed (``exact``, a captured bool: the branch on it
    is pruned, so only one log_softmax backward kernel is compiled in)."""
    def kernel(x, w, target, n, ignore, off, flags, reduction, lp, dn, ds, dl, out, lo, hi):
        for r in range(lo, hi):
            k = r if reduction == XB.REDUCE_NONE else 0
            XB.ce_row_grad(w, target, lp, dl, r, n, ignore, dn[k], ds[k], flags, off)
            if exact:
                _log_softmax_backward_rows_exact_body(x, dl, out, n, off, r, r + 1)
            else:
                _log_softmax_backward_rows_approx_body(x, dl, out, n, off, r, r + 1)
    return threads.splittable(kernel, name=f"_backward_rows_{'exact' if exact else 'approx'}")


_backward_rows_exact = _make_backward_rows(True)
_backward_rows_approx = _make_backward_rows(False)


def _rows_forward(x, w, target, n, ignore, off, flags):
    rows = target.size
    lp = np.empty(x.size, np.int32)
    nll, sm, wt = (np.empty(rows, np.int32) for _ in range(3))
    threads.run(_forward_rows, rows, row_work(x.size, rows), FUSED_PARALLEL_MIN,
                x, w, target, n, ignore, off, flags, lp, nll, sm, wt)
    return lp, nll, sm, wt


def cross_entropy_forward(x, w, target, n, ignore, a_b, s_b, off, flags, reduction, out):
    """The loss into ``out`` (one element per row for reduction "none", else one)."""
    _, nll, sm, wt = _rows_forward(x, w, target, n, ignore, off, flags)
    _finish(target, nll, sm, wt, ignore, reduction, flags, a_b, s_b, out)


def cross_entropy_backward(x, w, target, n, ignore, a_b, s_b, off, flags, reduction, g,
                           out):
    """The input gradient (shaped like ``x``) for the loss gradient ``g`` (one element per
    row for "none", else one); the forward rows are recomputed."""
    rows = target.size
    lp, nll, sm, wt = _rows_forward(x, w, target, n, ignore, off, flags)
    dn, ds = np.empty(rows, np.int32), np.empty(rows, np.int32)
    _grad_scalars(target, nll, sm, wt, ignore, reduction, flags, a_b, s_b, g, dn, ds)
    kernel = _backward_rows_exact if flags & XB.CE_EXACT else _backward_rows_approx
    threads.run(kernel, rows, row_work(x.size, rows), FUSED_PARALLEL_MIN,
                x, w, target, n, ignore, off, flags, reduction, lp, dn, ds,
                np.empty(x.size, np.int32), out)
