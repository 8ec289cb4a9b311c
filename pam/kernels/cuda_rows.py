"""CUDA row kernels of the fused log_softmax and layer norm (numba-cuda), bit-identical
to :mod:`pam.kernels.cpu_rows`.

Same names and arguments as the CPU kernels; every kernel runs the scalar row definitions
of :mod:`pam.rows_bits` with one thread per row (grid-stride loop), so each row is reduced
sequentially in the same order as on CPU. ``layer_norm_forward`` writes each row's
statistics to ``stats``, which ``layer_norm_backward`` reads; the backward launches twice:
the rows (input gradient and the per-row weight terms), then one thread per column for the
weight and bias gradients (sums over rows in increasing row index). Arguments are torch CUDA
tensors (zero-copy, torch's current stream; scratch from torch's allocator) or NumPy
arrays (copied to the device and back: what the tests use under NUMBA_ENABLE_CUDASIM=1).
Kernels are compiled on first use; importing this module needs neither a GPU nor
numba-cuda.
"""
import numpy as np

from .. import rows_bits
from .. import optim_bits
from .cuda import (_check_array, _check_rows, _is_torch_tensor, _require_numba_cuda, cuda,
                   lazy_kernels, torch_stream)

__all__ = ["log_softmax_forward", "log_softmax_backward", "layer_norm_forward",
           "layer_norm_backward", "THREADS"]

THREADS = 128
MAX_BLOCKS = 8192
LN_STATS = rows_bits.LN_STATS


def _log_softmax_forward_kernel(x, n, off, out):
    for r in range(cuda.grid(1), x.size // n, cuda.gridsize(1)):
        rows_bits.log_softmax_row_forward(x, out, r * n, n, off)


def _log_softmax_backward_kernel(x, g, n, off, exact, out):
    for r in range(cuda.grid(1), x.size // n, cuda.gridsize(1)):
        rows_bits.log_softmax_row_backward(x, g, out, r * n, n, off, exact != 0)


def _layer_norm_forward_kernel(x, w, b, n, nb, eps_b, off, flags, stats, out):
    for r in range(cuda.grid(1), x.size // n, cuda.gridsize(1)):
        rows_bits.layer_norm_row_forward(x, w, b, out, r * n, n, nb, eps_b, off, flags,
                                         stats, r * LN_STATS)


def _layer_norm_backward_kernel(x, w, g, stats, n, nb, off, flags, terms, tmp, out):
    for r in range(cuda.grid(1), x.size // n, cuda.gridsize(1)):
        rows_bits.layer_norm_row_backward(x, w, g, out, terms, tmp, r * n, n, nb, off, flags,
                                          stats, r * LN_STATS, r * n)


def _column_sums_kernel(t, n, rows, out):
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        acc = np.float32(0.0)
        for r in range(rows):
            acc += rows_bits._f(t[r * n + j])
        out[j] = rows_bits._b(acc)


KERNEL_FUNCTIONS = {
    "log_softmax_forward": _log_softmax_forward_kernel,
    "log_softmax_backward": _log_softmax_backward_kernel,
    "layer_norm_forward": _layer_norm_forward_kernel,
    "layer_norm_backward": _layer_norm_backward_kernel,
    "column_sums": _column_sums_kernel,
}

_compiled = lazy_kernels(KERNEL_FUNCTIONS)


def _grid(size):
    return max(1, min((size + THREADS - 1) // THREADS, MAX_BLOCKS))


def _run(inputs, outputs, body):
    """``body(device_inputs, device_outputs, stream)``: torch CUDA tensors zero-copy on
    torch's current stream, or NumPy arrays copied to the device and ``outputs`` copied
    back."""
    _require_numba_cuda()
    arrays = (*inputs, *outputs)
    tensors = [_is_torch_tensor(a) for a in arrays]
    if all(tensors):
        with torch_stream(arrays) as stream:
            dev = [cuda.as_cuda_array(a.detach().reshape(-1)) for a in arrays]
            body(dev[:len(inputs)], dev[len(inputs):], stream)
        return
    if any(tensors):
        raise TypeError("pass either only torch CUDA tensors or only NumPy arrays")
    stream = cuda.default_stream()
    dev_in = [cuda.to_device(a, stream=stream) for a in inputs]
    dev_out = [cuda.to_device(a, stream=stream) for a in outputs]
    body(dev_in, dev_out, stream)
    for d, a in zip(dev_out, outputs):
        d.copy_to_host(a, stream=stream)
    stream.synchronize()


def _scratch(like, size):
    """An int32 scratch array of ``size`` elements where ``like`` lives."""
    if _is_torch_tensor(like):
        import torch
        return torch.empty(max(size, 1), dtype=torch.int32, device=like.device)
    return np.empty(max(size, 1), np.int32)


def _rows(n, off, **arrays):
    """The number of rows of length ``n`` in the flat int32 ``arrays`` (checked as
    pam.kernels.cuda's row kernels check theirs), after checking the offset constant."""
    optim_bits.check_offset(int(off))
    return _check_rows(n, **arrays)


def log_softmax_forward(x, out, n, off):
    """Rows of length ``n`` -> PA log-softmax, one thread per row (see cpu_rows)."""
    rows = _rows(int(n), off, x=x, out=out)
    if rows:
        k = _compiled("log_softmax_forward")
        _run((x,), (out,), lambda d, o, s: k[_grid(rows), THREADS, s](
            d[0], int(n), int(off), o[0]))
    return out


def log_softmax_backward(x, g, out, n, off, exact):
    """Input gradient of log_softmax_forward, one thread per row (see cpu_rows)."""
    rows = _rows(int(n), off, x=x, g=g, out=out)
    if rows:
        k = _compiled("log_softmax_backward")
        _run((x, g), (out,), lambda d, o, s: k[_grid(rows), THREADS, s](
            d[0], d[1], int(n), int(off), int(bool(exact)), o[0]))
    return out


def _check_stats(stats, rows, per_row):
    """ValueError unless ``stats`` (int32, 1-D) holds ``per_row`` entries per row."""
    _check_array(stats, "stats", 1, np.int32)
    if stats.shape[0] != rows * per_row:
        raise ValueError(f"stats must have {per_row} entries per row ({rows * per_row}), "
                         f"got {stats.shape[0]}")


def layer_norm_forward(x, w, b, out, stats, n, nb, eps_b, off, flags):
    """Rows of length ``n`` -> PA layer norm and each row's statistics into ``stats``, one
    thread per row (see cpu_rows)."""
    rows = _rows(int(n), off, x=x, out=out)
    _check_array(w, "w", 1, np.int32)
    _check_array(b, "b", 1, np.int32)
    _check_stats(stats, rows, LN_STATS)
    if rows:
        k = _compiled("layer_norm_forward")
        _run((x, w, b), (stats, out), lambda d, o, s: k[_grid(rows), THREADS, s](
            d[0], d[1], d[2], int(n), int(nb), int(eps_b), int(off), int(flags), o[0], o[1]))
    return out


def layer_norm_backward(x, w, g, stats, out, gw, gb, n, nb, off, flags):
    """Input, weight and bias gradients of layer_norm_forward given its ``stats`` (see
    cpu_rows): one thread per row, then one per column for the weight / bias sums."""
    rows = _rows(int(n), off, x=x, g=g, out=out)
    for a, label in ((w, "w"), (gw, "gw"), (gb, "gb")):
        _check_array(a, label, 1, np.int32)
    _check_stats(stats, rows, LN_STATS)
    if not rows:
        return out
    has_w = bool(flags & rows_bits.LN_WEIGHT)
    has_b = bool(flags & rows_bits.LN_BIAS)
    terms = _scratch(x, rows * n if has_w else 1)
    tmp = _scratch(x, rows * n if has_w else 1)      # the rows' output-gradient terms
    k = _compiled("layer_norm_backward")
    sums = _compiled("column_sums")

    def body(d, o, s):
        k[_grid(rows), THREADS, s](d[0], d[1], d[2], d[3], int(n), int(nb), int(off),
                                   int(flags), o[0], o[1], o[2])
        if has_w:
            sums[_grid(n), THREADS, s](o[0], int(n), rows, o[3])
        if has_b:
            sums[_grid(n), THREADS, s](d[2], int(n), rows, o[4])
    _run((x, w, g, stats), (terms, tmp, out, gw, gb), body)
    return out
