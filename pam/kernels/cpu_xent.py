"""CPU kernels of the fused cross entropy (Numba), the definitions of :mod:`pam.xent_bits`.

``x``: flat int32 logits, rows of ``n`` classes; ``target``: int64 class index per row;
``w``: int32 class weights (any 1-element array without ``CE_WEIGHT``); ``ignore``: the
ignore_index; ``a_b`` / ``s_b``: the bits of the smoothing factors (unused without
``CE_SMOOTH``); ``reduction``: a ``pam.xent_bits.REDUCE_*`` code. One serial loop over rows
(a loss has few rows and classes next to the layers before it; serial code compiles in a
fraction of a parallel kernel's time). The log_softmax rows are :mod:`.cpu_rows`' compiled
row functions (their code compiles once for both modules). A target outside [0, n) that
is not ``ignore`` raises ValueError; ``off`` must be an offset constant of
pam.dispatch.offset_constant.
"""
import numpy as np
from numba import njit

from .. import optim_bits
from .. import xent_bits as XB
from .cpu_rows import _log_softmax_backward_rows, _log_softmax_forward_rows

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]


@njit(cache=True, nogil=True)
def _rows_forward(x, w, target, n, ignore, off, flags):
    rows = target.size
    lp = np.empty(x.size, np.int32)
    nll = np.empty(rows, np.int32)
    sm = np.empty(rows, np.int32)
    wt = np.empty(rows, np.int32)
    for r in range(rows):
        if target[r] != ignore:
            _log_softmax_forward_rows(x, lp, n, off, r, r + 1)
        XB.ce_row_terms(w, target, lp, nll, sm, wt, r, n, ignore, off, flags)
    return lp, nll, sm, wt


@njit(cache=True, nogil=True)
def cross_entropy_forward(x, w, target, n, ignore, a_b, s_b, off, flags, reduction, out):
    """The loss into ``out`` (one element per row for reduction "none", else one)."""
    optim_bits.check_offset(off)
    _, nll, sm, wt = _rows_forward(x, w, target, n, ignore, off, flags)
    XB.ce_finish(target, nll, sm, wt, target.size, ignore, reduction, flags, a_b, s_b, out)


@njit(cache=True, nogil=True)
def cross_entropy_backward(x, w, target, n, ignore, a_b, s_b, off, flags, reduction, g,
                           out):
    """The input gradient (shaped like ``x``) for the loss gradient ``g`` (one element per
    row for "none", else one); the forward rows are recomputed."""
    optim_bits.check_offset(off)
    rows = target.size
    lp, nll, sm, wt = _rows_forward(x, w, target, n, ignore, off, flags)
    dn = np.empty(rows, np.int32)
    ds = np.empty(rows, np.int32)
    XB.ce_grad_scalars(target, nll, sm, wt, rows, ignore, reduction, flags, a_b, s_b, g, dn,
                       ds)
    exact = (flags & XB.CE_EXACT) != 0
    dl = np.empty(x.size, np.int32)
    for r in range(rows):
        k = r if reduction == XB.REDUCE_NONE else 0
        XB.ce_row_grad(w, target, lp, dl, r, n, ignore, dn[k], ds[k], flags, off)
        _log_softmax_backward_rows(x, dl, out, n, off, exact, r, r + 1)
