"""CUDA kernels of the fused cross entropy (numba-cuda), bit-identical to
:mod:`pam.kernels.cpu_xent`: the same names and arguments, the definitions of
:mod:`pam.xent_bits`.

One thread per row for the rows (forward values, then the input gradient), one thread
for the sequential sums over rows (the reduction, the loss's gradients w.r.t. the rows'
terms), so every sum has the CPU order. Arguments are torch CUDA tensors (zero-copy,
torch's current stream) or NumPy arrays (copied to the device and back: what the tests
use under NUMBA_ENABLE_CUDASIM=1). Targets must have been checked (an index outside
[0, n) that is not ``ignore`` is not detected on the device). Importing this module needs
neither a GPU nor numba-cuda.
"""
import numpy as np

from .. import optim_bits, rows_bits
from .. import xent_bits as XB
from .cuda import _check_array, cuda, lazy_kernels
from .cuda_rows import THREADS, _grid, _run, _scratch

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]


def _rows_forward_kernel(x, w, target, n, ignore, off, flags, lp, nll, sm, wt):
    for r in range(cuda.grid(1), target.size, cuda.gridsize(1)):
        if XB.ce_row_log_probs_wanted(target, r, ignore, flags):
            rows_bits.log_softmax_row_forward(x, lp, r * n, n, off)
        XB.ce_row_terms(w, target, lp, nll, sm, wt, r, n, ignore, off, flags)


def _finish_kernel(target, nll, sm, wt, ignore, reduction, flags, a_b, s_b, out):
    if cuda.grid(1) == 0:
        XB.ce_finish(target, nll, sm, wt, target.size, ignore, reduction, flags, a_b, s_b,
                     out)


def _grad_scalars_kernel(target, nll, sm, wt, ignore, reduction, flags, a_b, s_b, g, dn,
                         ds):
    if cuda.grid(1) == 0:
        XB.ce_grad_scalars(target, nll, sm, wt, target.size, ignore, reduction, flags, a_b,
                           s_b, g, dn, ds)


def _rows_backward_kernel(x, w, target, n, ignore, off, flags, reduction, lp, dn, ds, dl,
                          out):
    exact = (flags & XB.CE_EXACT) != 0
    for r in range(cuda.grid(1), target.size, cuda.gridsize(1)):
        k = r if reduction == XB.REDUCE_NONE else 0
        XB.ce_row_grad(w, target, lp, dl, r, n, ignore, dn[k], ds[k], flags, off)
        rows_bits.log_softmax_row_backward(x, dl, out, r * n, n, off, exact)


_compiled = lazy_kernels({
    "rows_forward": _rows_forward_kernel,
    "finish": _finish_kernel,
    "grad_scalars": _grad_scalars_kernel,
    "rows_backward": _rows_backward_kernel,
})


def _check(x, w, target, n, off):
    optim_bits.check_offset(int(off))
    _check_array(x, "x", 1, np.int32)
    _check_array(w, "w", 1, np.int32)
    _check_array(target, "target", 1, np.int64)
    rows = target.shape[0]
    if x.shape[0] != rows * int(n):
        raise ValueError(f"x has {x.shape[0]} elements, not target's {rows} rows of {n}")
    return rows


def cross_entropy_forward(x, w, target, n, ignore, a_b, s_b, off, flags, reduction, out):
    """The loss into ``out`` (see cpu_xent): one thread per row, then one thread."""
    rows = _check(x, w, target, n, off)
    lp, nll, sm, wt = (_scratch(x, x.shape[0]), _scratch(x, rows), _scratch(x, rows),
                       _scratch(x, rows))
    ints = (int(ignore), int(reduction), int(flags), int(a_b), int(s_b))

    def body(d, o, s):
        if rows:
            _compiled("rows_forward")[_grid(rows), THREADS, s](
                d[0], d[1], d[2], int(n), int(ignore), int(off), int(flags), o[0], o[1], o[2],
                o[3])
        _compiled("finish")[1, 1, s](d[2], o[1], o[2], o[3], *ints, o[4])
    _run((x, w, target), (lp, nll, sm, wt, out), body)
    return out


def cross_entropy_backward(x, w, target, n, ignore, a_b, s_b, off, flags, reduction, g,
                           out):
    """The input gradient into ``out`` (see cpu_xent): the forward rows, one thread for the
    rows' gradient terms, then one thread per row."""
    rows = _check(x, w, target, n, off)
    if rows == 0:
        return out
    lp, dl = _scratch(x, x.shape[0]), _scratch(x, x.shape[0])
    nll, sm, wt, dn, ds = (_scratch(x, rows) for _ in range(5))
    ints = (int(ignore), int(reduction), int(flags), int(a_b), int(s_b))

    def body(d, o, s):
        _compiled("rows_forward")[_grid(rows), THREADS, s](
            d[0], d[1], d[2], int(n), int(ignore), int(off), int(flags), o[0], o[1], o[2], o[3])
        _compiled("grad_scalars")[1, 1, s](d[2], o[1], o[2], o[3], *ints, d[3], o[4], o[5])
        _compiled("rows_backward")[_grid(rows), THREADS, s](
            d[0], d[1], d[2], int(n), int(ignore), int(off), int(flags), int(reduction), o[0],
            o[4], o[5], o[6], o[7])
    _run((x, w, target, g), (lp, nll, sm, wt, dn, ds, dl, out), body)
    return out
