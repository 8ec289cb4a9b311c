"""Fused PAM kernels on plain tensors, without autograd: one launch per call.

Entry points for code that already holds the tensors (the optimizers of :mod:`pam.optim`,
an op-level dispatch mode routing ``torch.optim``'s ``_foreach_`` / single-tensor updates):

* :func:`adamw_step`: the AdamW update of :class:`pam.optim.AdamW` for lists of tensors.
* :func:`sgd_step`: the SGD update of :class:`pam.optim.SGD` for lists of tensors.
* :func:`gelu_forward`, :func:`gelu_backward`: the piecewise-affine GELU of
  :func:`pam.nn.functional.gelu` and its input gradient, one elementwise launch each.
* :func:`softmax_forward`, :func:`softmax_backward`: the PA softmax of
  :func:`pam.nn.functional.softmax` along one dimension and its input gradient, one row
  kernel launch each.
* :func:`log_softmax_forward`, :func:`log_softmax_backward`: the PA log-softmax of
  :func:`pam.nn.functional.log_softmax` (and so of ``cross_entropy``), one row launch each.
* :func:`layer_norm_forward`, :func:`layer_norm_backward`: the PA layer norm of
  :func:`pam.nn.functional.layer_norm` with its weight and bias gradients (one launch on
  CPU; on CUDA the weight / bias column sums are a second launch).
* :func:`cross_entropy_forward`, :func:`cross_entropy_backward`: the PA cross entropy of
  :func:`pam.nn.functional.cross_entropy` for class-index targets (class weights,
  ignore_index, label smoothing, every reduction), its loss and its input gradient, one
  launch each on CPU (:mod:`pam.xent_bits`).

* :func:`attention_forward_kernel`, :func:`attention_backward_kernel`: the attention core
  of :func:`pam.nn.functional.scaled_dot_product_attention` (scale, QK^T, masks, PA
  softmax, PV; no dropout, family "pam") for (P, L, E) heads, one launch per pass with the
  composite's bits (:mod:`pam.attn_bits`); used by ``_attention`` when
  ``pam.functional.FUSED_ATTENTION`` is set (off by default: slower than the composite on
  CPU so far, validation/bench_attention.py). Otherwise the calls these kernels cover
  run the composite's own kernels as one autograd node (``pam.functional._attention_node``:
  five launches forward, the composite's bits).

The row ops take their rows' sums sequentially (float32 from +0, increasing index), the
one change from the composites of earlier versions (see :mod:`pam.rows_bits`);
``pam.nn.functional`` calls these kernels through autograd Functions. The softmax and
layer-norm forwards also return their rows' statistics (``stats=True``), which the
backwards take (``stats=``) instead of recomputing them; the autograd Functions save them.

A list is updated by a single kernel: on CPU the kernel walks a table of the tensors'
addresses and sizes and updates them in place (no copies); on CUDA the tensors are
concatenated into flat buffers, updated and copied back (a list of one contiguous tensor
is updated in place). So a step costs one kernel launch per distinct step count instead
of ~20 per tensor. The per-element
arithmetic is :mod:`pam.optim_bits`, the same on CPU and CUDA.
"""
import numpy as np
import torch

from . import dispatch as D
from . import library as L
from . import optim_bits as OB

__all__ = ["adamw_step", "sgd_step", "gelu_forward", "gelu_backward", "softmax_forward",
           "softmax_backward", "log_softmax_forward", "log_softmax_backward",
           "layer_norm_forward", "layer_norm_backward", "cross_entropy_forward",
           "cross_entropy_backward"]


def _check_lists(device, **lists):
    n = None
    for name, ts in lists.items():
        if ts is None:
            continue
        if n is None:
            n = len(ts)
        elif len(ts) != n:
            raise ValueError(f"{name} has {len(ts)} tensors, expected {n}")
        for i, t in enumerate(ts):
            D.check_float32(t, f"{name}[{i}]")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {device}")
    return n


def _flat(tensors):
    """One contiguous float32 buffer holding ``tensors`` (a view when that is possible)."""
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].detach().view(-1)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _write_back(tensors, flat):
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return                                     # updated in place
    chunks = torch.split(flat, [t.numel() for t in tensors])
    torch._foreach_copy_([t.detach() for t in tensors],
                         [c.view(t.shape) for c, t in zip(chunks, tensors)])


def _bits(flat):
    return flat.view(torch.int32)


def _by_step(steps):
    """{step value: [indices]} in first-seen order."""
    groups = {}
    for i, s in enumerate(steps):
        value = float(s.item() if isinstance(s, torch.Tensor) else s)
        groups.setdefault(value, []).append(i)
    return groups


def _address_table(lists, idx, written):
    """(addresses int64 (len(lists), len(idx)), sizes int64, stand-ins) for a CPU table
    kernel: the data addresses of ``lists[r][i]`` for i in ``idx`` (a list may be None: its
    row stays 0). A non-contiguous tensor is replaced by a contiguous copy (kept alive in
    ``stand-ins``, as (original, copy) pairs to copy back for the lists in ``written``)."""
    addresses = np.zeros((len(lists), len(idx)), np.int64)
    sizes = np.empty(len(idx), np.int64)
    keep = []
    for r, ts in enumerate(lists):
        if ts is None:
            continue
        row = addresses[r]
        for c, i in enumerate(idx):
            t = ts[i]
            if not t.is_contiguous():
                copy = t.detach().contiguous()
                keep.append((t, copy, r in written))
                t = copy
            row[c] = t.data_ptr()
            if r == 0:
                sizes[c] = t.numel()
    return addresses, sizes, keep


def _disjoint(addresses, sizes):
    """True when the byte ranges of all non-empty tensors in the table are disjoint (the
    table kernels update in place; overlapping tensors take the flat path instead, whose
    copies give them the concatenate-and-write-back semantics)."""
    used = np.flatnonzero((addresses != 0).any(axis=1))
    starts = addresses[used].reshape(-1)
    lengths = np.tile(sizes, used.size) * 4
    nonempty = lengths > 0
    starts, ends = starts[nonempty], (starts + lengths)[nonempty]
    order = np.argsort(starts, kind="stable")
    return bool(np.all(starts[order][1:] >= ends[order][:-1]))


def _finish_table(lists, idx, written, keep):
    """After a table kernel: copy the stand-ins of non-contiguous tensors back and bump
    the autograd version counter of every tensor the kernel wrote behind torch's back (so
    a tensor saved for backward and then stepped is reported, as torch.optim's in-place
    ops would)."""
    for original, copy, was_written in keep:
        if was_written:
            original.detach().copy_(copy)
    torch.autograd.graph.increment_version(
        [lists[r][i] for r in written if lists[r] is not None for i in idx])


MOMENTS = ("paper", "unbiased")


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1,
               beta2, eps, weight_decay, amsgrad=False, maximize=False, offset=None,
               moments="paper"):
    """One PAM AdamW step, in place, for lists of float32 tensors on one device.

    ``steps``: each parameter's step count t after this step's increment (numbers or
    scalar tensors). Per element, :func:`pam.optim_bits.adamw_update` with the group
    scalars of :func:`pam.optim_bits.adamw_scalars` (bias corrections from pa_log2 /
    pa_exp2, PAD step size): the same bits as the op-by-op :class:`pam.optim.AdamW` of
    earlier versions. ``max_exp_avg_sqs`` is required with ``amsgrad`` (else ignored).
    ``offset`` applies to the products with tensor operands.

    ``moments="unbiased"`` runs :func:`pam.optim_bits.adamw_update_unbiased` instead:
    EMA coefficients 1 - beta snapped to powers of two (exact products), squares with the
    unbiasing offset, bias corrections and step size in exact host arithmetic.

    One kernel launch per distinct step count: on CPU the kernel walks a table of the
    tensors' addresses (no copies), on CUDA it runs over concatenated flat buffers. Under
    ``torch.compile`` the step is the custom op ``torch.ops.pam.adamw_step`` (declared
    to mutate params, exp_avgs, exp_avg_sqs and max_exp_avg_sqs): no graph break.
    """
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    if not params:
        return
    device = params[0].device
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    n = _check_lists(device, params=params, grads=grads, exp_avgs=exp_avgs,
                     exp_avg_sqs=exp_avg_sqs,
                     max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else None)
    if len(steps) != n:
        raise ValueError(f"steps has {len(steps)} entries, expected {n}")
    off = D.offset_constant(offset)
    flags = ((OB.ADAMW_MAXIMIZE if maximize else 0)
             | (OB.ADAMW_DECAY if weight_decay != 0.0 else 0)
             | (OB.ADAMW_AMSGRAD if amsgrad else 0))
    hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    mxs = list(max_exp_avg_sqs) if amsgrad else []
    if L.direct_list(params, grads, exp_avgs, exp_avg_sqs, mxs, steps):
        adamw_step_impl(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), mxs,
                        list(steps), hyper, off, flags, moments)
    else:
        L.adamw_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), mxs,
                     list(steps), hyper, off, flags, moments)


def adamw_step_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper,
                    off, flags, moments):
    """The kernel launches of :func:`adamw_step` (checked arguments; ``max_exp_avg_sqs``
    empty without amsgrad; ``hyper`` = (lr, beta1, beta2, eps, weight_decay))."""
    device = params[0].device
    amsgrad = bool(flags & OB.ADAMW_AMSGRAD)
    for step, idx in _by_step(steps).items():
        if moments == "paper":
            name, scal = "adamw", (*OB.adamw_scalars(*hyper, step), off)
        else:
            name = "adamw_unbiased"
            scal = (*OB.adamw_unbiased_scalars(*hyper, step), off,
                    D.offset_constant(OB.UNBIASED_SQUARE_OFFSET))
        if device.type == "cpu":
            lists = (params, grads, exp_avgs, exp_avg_sqs,
                     max_exp_avg_sqs if amsgrad else None)
            addresses, sizes, keep = _address_table(lists, idx, (0, 2, 3, 4))
            if _disjoint(addresses, sizes):
                D.launch(name + "_table", device, addresses, sizes, *scal, flags)
                _finish_table(lists, idx, (0, 2, 3, 4), keep)
                continue
        sel = [[ts[i] for i in idx] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        fp, fg, fm, fv = (_flat(ts) for ts in sel)
        if amsgrad:
            mxs = [max_exp_avg_sqs[i] for i in idx]
            fmx = _flat(mxs)
        else:
            fmx = torch.zeros(1, dtype=torch.float32, device=device)
        arrays = (_bits(fp), _bits(fg), _bits(fm), _bits(fv), _bits(fmx))
        D.launch(name, device, *arrays, *scal, flags)
        _write_back(sel[0], fp)
        _write_back(sel[2], fm)
        _write_back(sel[3], fv)
        if amsgrad:
            _write_back(mxs, fmx)


def sgd_step(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, first_step=None,
             offset=None):
    """One PAM SGD step, in place, for lists of float32 tensors on one device.

    Per element :func:`pam.optim_bits.sgd_update`. With momentum, ``momentum_buffers``
    holds one tensor per parameter and ``first_step`` one bool per parameter (True: the
    buffer is initialised to the gradient, as torch does when it has none yet). One
    launch per distinct ``first_step`` value (CPU: over an address table, no copies);
    under ``torch.compile`` the custom op ``torch.ops.pam.sgd_step``.
    """
    if not params:
        return
    device = params[0].device
    use_mom = momentum != 0.0
    n = _check_lists(device, params=params, grads=grads,
                     momentum_buffers=momentum_buffers if use_mom else None)
    off = D.offset_constant(offset)
    flags = ((OB.SGD_MAXIMIZE if maximize else 0)
             | (OB.SGD_DECAY if weight_decay != 0.0 else 0)
             | (OB.SGD_MOMENTUM if use_mom else 0)
             | (OB.SGD_DAMPENING if dampening != 0.0 else 0)
             | (OB.SGD_NESTEROV if nesterov else 0))
    firsts = [False] * n if first_step is None or not use_mom else [bool(f) for f in first_step]
    if len(firsts) != n:
        raise ValueError(f"first_step has {len(firsts)} entries, expected {n}")
    bufs = list(momentum_buffers) if use_mom else []
    hyper = (float(lr), float(weight_decay), float(momentum), float(dampening))
    if L.direct_list(params, grads, bufs):
        sgd_step_impl(list(params), list(grads), bufs, firsts, hyper, off, flags)
    else:
        L.sgd_step(list(params), list(grads), bufs, firsts, hyper, off, flags)


def sgd_step_impl(params, grads, momentum_buffers, first_step, hyper, off, flags):
    """The kernel launches of :func:`sgd_step` (checked arguments; ``momentum_buffers``
    empty without momentum; ``hyper`` = (lr, weight_decay, momentum, dampening))."""
    device = params[0].device
    use_mom = bool(flags & OB.SGD_MOMENTUM)
    lr, weight_decay, momentum, dampening = hyper
    scal = (OB.f32_bits(lr), OB.f32_bits(weight_decay), OB.f32_bits(momentum),
            OB.f32_bits(1.0 - dampening))
    groups = {}
    for i, f in enumerate(first_step):
        groups.setdefault(bool(f), []).append(i)
    for first, idx in groups.items():
        fl = flags | (OB.SGD_FIRST if first else 0)
        if device.type == "cpu":
            lists = (params, grads, momentum_buffers if use_mom else None)
            addresses, sizes, keep = _address_table(lists, idx, (0, 2))
            if _disjoint(addresses, sizes):
                D.launch("sgd_table", device, addresses, sizes, *scal, off, fl)
                _finish_table(lists, idx, (0, 2), keep)
                continue
        ps = [params[i] for i in idx]
        fp, fg = _flat(ps), _flat([grads[i] for i in idx])
        if use_mom:
            bufs = [momentum_buffers[i] for i in idx]
            fb = _flat(bufs)
        else:
            fb = torch.zeros(1, dtype=torch.float32, device=device)
        D.launch("sgd", device, _bits(fp), _bits(fg), _bits(fb), *scal, off, fl)
        _write_back(ps, fp)
        if use_mom:
            _write_back(bufs, fb)


# --------------------------------------------------------------------------- GELU
_GELU_TABLES = {}


def _gelu_tables(device):
    """int32 tensors of the knot and slope-change bit patterns on ``device`` (cached)."""
    tables = _GELU_TABLES.get(device)
    if tables is None:
        from .functional import GELU_KNOTS, GELU_SLOPE_CHANGES
        tables = tuple(torch.tensor(v, dtype=torch.float32).view(torch.int32).to(device)
                       for v in (GELU_KNOTS, GELU_SLOPE_CHANGES))
        _GELU_TABLES[device] = tables
    return tables


def gelu_forward(x):
    """Piecewise-affine GELU of float32 tensor ``x`` (no autograd), one launch.

    Bit for bit the composite sum_j PAM(relu(x - k_j), d_j) of pam.functional (see
    :func:`pam.rows_bits.gelu_forward_bits`). Traceable: under ``torch.compile`` it is the
    custom op ``torch.ops.pam.gelu_forward``.
    """
    D.check_float32(x, "x")
    return L.gelu_forward(x)


def gelu_forward_kernel(x):
    """:func:`gelu_forward` without checks, launching the kernel directly (the custom
    op's implementation)."""
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    if out.numel():
        knots, slopes = _gelu_tables(x.device)
        D.launch("gelu_forward", x.device, D.as_bits(x).reshape(-1), knots, slopes,
                 out.view(-1))
    return out.view(torch.float32)


def gelu_backward(grad, x, backward="exact"):
    """Input gradient of :func:`gelu_forward` at ``x`` for output gradient ``grad``.

    ``backward``: "exact" or "approx" (they differ only where x is NaN); bit for bit the
    gradient autograd computes through the composite definition. Traceable (the custom op
    ``torch.ops.pam.gelu_backward``).
    """
    D.check_float32(x, "x")
    D.check_float32(grad, "grad")
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} must equal x shape "
                         f"{tuple(x.shape)}")
    return L.gelu_backward(grad, x, backward)


def gelu_backward_kernel(grad, x, exact):
    """:func:`gelu_backward` without checks, ``exact`` a bool, launching the kernel
    directly (the custom op's implementation)."""
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    if out.numel():
        knots, slopes = _gelu_tables(x.device)
        D.launch("gelu_backward", x.device, D.as_bits(x).reshape(-1),
                 D.as_bits(grad).reshape(-1), knots, slopes, bool(exact), out.view(-1))
    return out.view(torch.float32)


# --------------------------------------------------------------------------- softmax
def _dim(x, dim):
    """``dim`` as a non-negative index into ``x``'s dimensions (IndexError if out of
    range, as torch)."""
    dim = int(dim)
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"dim {dim} is out of range for a tensor with {x.dim()} "
                         f"dimensions")
    return dim % x.dim()


def _rows(x, dim):
    """x with ``dim`` moved last, contiguous, as flat int32 bits, and the row length."""
    xm = x.detach().movedim(dim, -1).contiguous()
    return xm, xm.view(torch.int32).view(-1), xm.shape[-1]


def softmax_forward(x, dim=-1, offset=None, safe=False, stats=False):
    """PA softmax of float32 ``x`` along ``dim`` (no autograd), one launch.

    Per row (see :func:`pam.rows_bits.softmax_row_forward`): x' = PAM(x, log2 e; offset),
    m = floor(max x') (0 if not finite), e = pa_exp2(x' - m), s = sum e in increasing
    index order, result PAD(e, s). ``safe``: a row whose sum is 0 gives zeros, not NaN
    (scaled_dot_product_attention's fully masked rows). ``stats=True`` returns
    (result, statistics): the rows' m and s (before the ``safe`` replacement) as a float32
    tensor shaped like ``x`` with ``dim`` removed and a last dimension of 2, which
    :func:`softmax_backward` takes to skip recomputing them. Traceable: under
    ``torch.compile`` it is the custom op ``torch.ops.pam.softmax_forward``.
    """
    D.check_float32(x, "x")
    y, st = softmax_rows_forward(x, dim, D.offset_constant(offset), safe)
    return (y, st) if stats else y


def _softmax_stats_shape(x, dim):
    """The shape of the softmax row statistics of ``x`` along non-negative ``dim``."""
    from .rows_bits import SOFTMAX_STATS
    return (*x.shape[:dim], *x.shape[dim + 1:], SOFTMAX_STATS)


def softmax_rows_forward(x, dim, off, safe):
    """:func:`softmax_forward` with the offset given as its integer constant ``off``:
    (result, row statistics)."""
    if x.dim() == 0:
        y, st = softmax_rows_forward(x.reshape(1), 0, off, safe)
        return y.reshape(()), st
    return L.softmax_forward(x, _dim(x, dim), off, bool(safe))


def softmax_forward_kernel(x, dim, off, safe):
    """:func:`softmax_rows_forward` of an input with at least one dimension and ``dim``
    in range, launching the kernel directly (the custom op's implementation)."""
    xm, xb, n = _rows(x, dim)
    out = torch.empty(xm.shape, dtype=torch.int32, device=x.device)
    stats = torch.empty(_softmax_stats_shape(x, dim), dtype=torch.int32, device=x.device)
    if out.numel():
        D.launch("softmax_forward", x.device, xb, out.view(-1), stats.view(-1), n, off,
                 bool(safe))
    else:
        stats.zero_()                     # empty rows: m = 0, s = 0
    return out.view(torch.float32).movedim(-1, dim), stats.view(torch.float32)


def softmax_backward(grad, x, dim=-1, offset=None, safe=False, backward="exact",
                     stats=None):
    """Input gradient of :func:`softmax_forward` at ``x`` for output gradient ``grad``.

    The chain rule through the composite's pieces, per row (see
    :func:`pam.rows_bits.softmax_row_backward`): ``backward="exact"`` uses the exact
    power-of-two slopes, ``"approx"`` PAM/PAD as if exact (the paper's choice).
    ``stats``: the row statistics ``softmax_forward(x, dim, offset, safe, stats=True)``
    returned for this ``x`` (statistics of another input give a wrong gradient); None
    computes them first (a forward launch).
    """
    D.check_float32(x, "x")
    D.check_float32(grad, "grad")
    if backward not in ("exact", "approx"):
        raise ValueError(f"backward must be 'exact' or 'approx', got {backward!r}")
    off = D.offset_constant(offset)
    if stats is None:
        stats = softmax_rows_forward(x, dim, off, safe)[1]
    return softmax_rows_backward(grad, x, stats, dim, off, safe, backward == "exact")


def softmax_rows_backward(grad, x, stats, dim, off, safe, exact):
    """:func:`softmax_backward` with the row statistics ``stats``, the integer offset
    constant ``off`` and ``exact`` a bool."""
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} must equal x shape "
                         f"{tuple(x.shape)}")
    if x.dim() == 0:
        return softmax_rows_backward(grad.reshape(1), x.reshape(1), stats, 0, off, safe,
                                     exact).reshape(())
    dim = _dim(x, dim)
    _check_stats(stats, _softmax_stats_shape(x, dim), x)
    return L.softmax_backward(grad, x, stats, dim, off, bool(safe), bool(exact))


def _check_stats(stats, shape, x):
    """TypeError / ValueError naming ``stats`` unless it is a float32 tensor of ``shape``
    on ``x``'s device."""
    D.check_float32(stats, "stats")
    if tuple(stats.shape) != tuple(shape):
        raise ValueError(f"stats must have shape {tuple(shape)}, got {tuple(stats.shape)}")
    if stats.device != x.device:
        raise ValueError(f"stats is on {stats.device}, expected {x.device}")


def _stats_bits(stats):
    return stats.detach().contiguous().view(torch.int32).view(-1)


def softmax_backward_kernel(grad, x, stats, dim, off, safe, exact):
    """:func:`softmax_rows_backward` of inputs with at least one dimension and ``dim`` in
    range, launching the kernel directly (the custom op's implementation)."""
    xm, xb, n = _rows(x, dim)
    _, gb, _ = _rows(grad, dim)
    out = torch.empty(xm.shape, dtype=torch.int32, device=x.device)
    if out.numel():
        D.launch("softmax_backward", x.device, xb, gb, _stats_bits(stats), out.view(-1), n,
                 off, bool(safe), bool(exact))
    return out.view(torch.float32).movedim(-1, dim)


# ------------------------------------------------------------------------- log_softmax, layer_norm
def rows_launch(name, device, *args):
    """Run row kernel ``name`` of :mod:`pam.kernels.cpu_rows` / ``cuda_rows`` on
    ``device`` (tensor arguments passed zero-copy, on CPU as NumPy views)."""
    return D.launch_in("rows", name, device, *args)


def _check_row_grad(grad, x, backward):
    """The checks of a fused row backward: float32 ``x`` and ``grad`` of one shape, and
    ``backward`` "exact" or "approx" (TypeError / ValueError naming the argument)."""
    D.check_float32(x, "x")
    D.check_float32(grad, "grad")
    if backward not in ("exact", "approx"):
        raise ValueError(f"backward must be 'exact' or 'approx', got {backward!r}")
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} must equal x shape "
                         f"{tuple(x.shape)}")


def log_softmax_forward(x, dim=-1, offset=None):
    """PA log-softmax of float32 ``x`` along ``dim`` (no autograd), one launch.

    Per row (:func:`pam.rows_bits.log_softmax_row_forward`): x' = PAM(x, log2 e; offset),
    m = floor(max x') (0 if not finite), z = x' - m, s = sum pa_exp2(z) from +0 in
    increasing index, result PAD(z - pa_log2(s), log2 e): the composite
    :func:`pam.nn.functional.log_softmax` of earlier versions with its row sum made
    sequential (the only change of definition). Traceable: the custom op
    ``torch.ops.pam.log_softmax_forward``.
    """
    D.check_float32(x, "x")
    if x.dim() == 0:
        return log_softmax_forward(x.reshape(1), 0, offset).reshape(())
    return L.log_softmax_forward(x, _dim(x, dim), D.offset_constant(offset))


def log_softmax_forward_kernel(x, dim, off):
    """:func:`log_softmax_forward` of an input with at least one dimension and ``dim`` in
    range, launching the kernel directly (the custom op's implementation)."""
    xm, xb, n = _rows(x, dim)
    out = torch.empty(xm.shape, dtype=torch.int32, device=x.device)
    if out.numel():
        rows_launch("log_softmax_forward", x.device, xb, out.view(-1), n, off)
    return out.view(torch.float32).movedim(-1, dim)


def log_softmax_backward(grad, x, dim=-1, offset=None, backward="exact"):
    """Input gradient of :func:`log_softmax_forward` at ``x`` for output gradient ``grad``.

    The chain rule through the composite's pieces as autograd runs it, its row sum of
    the lse gradient sequential (:func:`pam.rows_bits.log_softmax_row_backward`);
    ``backward``: "exact" (power-of-two slopes) or "approx" (PAM/PAD as if exact).
    """
    _check_row_grad(grad, x, backward)
    if x.dim() == 0:
        return log_softmax_backward(grad.reshape(1), x.reshape(1), 0, offset,
                                    backward).reshape(())
    return L.log_softmax_backward(grad, x, _dim(x, dim), D.offset_constant(offset),
                                  backward == "exact")


def log_softmax_backward_kernel(grad, x, dim, off, exact):
    """:func:`log_softmax_backward` of checked inputs with at least one dimension,
    launching the kernel directly (the custom op's implementation)."""
    xm, xb, n = _rows(x, dim)
    _, gb, _ = _rows(grad, dim)
    out = torch.empty(xm.shape, dtype=torch.int32, device=x.device)
    if out.numel():
        rows_launch("log_softmax_backward", x.device, xb, gb, out.view(-1), n, off,
                    bool(exact))
    return out.view(torch.float32).movedim(-1, dim)


def _ln_args(x, normalized_shape, weight, bias, eps):
    """(n, the bits of float32(n) and float32(eps), flags) of a layer norm over the
    trailing ``normalized_shape`` dimensions of ``x``, after checking the shapes."""
    from . import rows_bits as RB
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(L.static_int(s) for s in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or tuple(x.shape[-k:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} must match the trailing "
                         f"dimensions of input {tuple(x.shape)}")
    n = 1
    for s in normalized_shape:
        n = n * s
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            D.check_float32(t, name)
            if tuple(t.shape) != normalized_shape:
                raise ValueError(f"{name} must have shape {normalized_shape}, got "
                                 f"{tuple(t.shape)}")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device}, expected {x.device}")
    flags = (RB.LN_WEIGHT if weight is not None else 0) | (RB.LN_BIAS if bias is not None
                                                           else 0)
    return n, L.f32_bits_scalar(float(n)), L.f32_bits_scalar(float(eps)), flags


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, offset=None,
                       stats=False):
    """PA layer norm of float32 ``x`` over its trailing ``normalized_shape`` dimensions
    (no autograd), one launch.

    Per row of N elements (:func:`pam.rows_bits.layer_norm_row_forward`): mu = PAD(sum x,
    N), refined twice (mu += PAD(sum (x - mu), N)) when N is not a power of two;
    xc = x - mu; var = PAD(sum PAM(xc, xc; offset), N); std = pa_exp2(PAM(pa_log2(var +
    eps), 0.5)); y = PAD(xc, std), PAM(y, weight; offset), + bias: the composite
    :func:`pam.nn.functional.layer_norm` of earlier versions with its row sums taken from
    +0 in increasing index (the only change of definition). ``stats=True`` returns
    (y, statistics): the rows' statistics of :func:`pam.rows_bits.layer_norm_row_stats`,
    a float32 tensor (rows, 9), which :func:`layer_norm_backward` takes to skip recomputing
    them. Traceable: the custom op ``torch.ops.pam.layer_norm_forward``.
    """
    D.check_float32(x, "x")
    n, nb, eps_b, flags = _ln_args(x, normalized_shape, weight, bias, eps)
    y, st = L.layer_norm_forward(x, weight, bias, n, nb, eps_b, D.offset_constant(offset),
                                 flags)
    return (y, st) if stats else y


def _ln_stats_shape(x, n):
    """The shape (rows, LN_STATS) of the layer-norm row statistics of ``x`` in rows of
    ``n`` elements (no rows when n is 0)."""
    from .rows_bits import LN_STATS
    return (x.numel() // n if n else 0, LN_STATS)


def _ln_operand(t, n, like):
    """Flat int32 bits of an optional per-column operand (a 1-element stand-in if None)."""
    if t is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    return D.as_bits(t).reshape(n)


def layer_norm_forward_kernel(x, weight, bias, n, nb, eps_b, off, flags):
    """:func:`layer_norm_forward` of checked arguments, launching the kernel directly
    (the custom op's implementation): (y, row statistics)."""
    xb = D.as_bits(x).reshape(-1)
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    stats = torch.empty(_ln_stats_shape(x, n), dtype=torch.int32, device=x.device)
    if out.numel():
        rows_launch("layer_norm_forward", x.device, xb, _ln_operand(weight, n, x),
                    _ln_operand(bias, n, x), out.view(-1), stats.view(-1), n, nb, eps_b,
                    off, flags)
    return out.view(torch.float32), stats.view(torch.float32)


def layer_norm_backward(grad, x, normalized_shape, weight=None, bias=None, eps=1e-5,
                        offset=None, backward="exact", stats=None):
    """Gradients (x, weight or None, bias or None) of :func:`layer_norm_forward` for output
    gradient ``grad``.

    The chain rule through the composite's pieces in autograd's order, its row sums
    sequential (:func:`pam.rows_bits.layer_norm_row_backward`); the weight and bias
    gradients sum the rows' terms in increasing row index (float32 from +0).
    ``backward``: "exact" or "approx". ``stats``: the row statistics
    ``layer_norm_forward(..., stats=True)`` returned for this ``x`` (and eps, offset;
    statistics of another input give wrong gradients); None computes them first (a
    forward launch).
    """
    from . import rows_bits as RB
    _check_row_grad(grad, x, backward)
    n, nb, eps_b, flags = _ln_args(x, normalized_shape, weight, bias, eps)
    off = D.offset_constant(offset)
    if stats is None:
        stats = L.layer_norm_forward(x, weight, bias, n, nb, eps_b, off, flags)[1]
    _check_stats(stats, _ln_stats_shape(x, n), x)
    flags |= RB.LN_EXACT if backward == "exact" else 0
    gx, gw, gb = L.layer_norm_backward(grad, x, weight, stats, n, nb, off, flags)
    return (gx, gw.view(weight.shape) if weight is not None else None,
            gb.view(bias.shape) if bias is not None else None)


def layer_norm_backward_kernel(grad, x, weight, stats, n, nb, off, flags):
    """:func:`layer_norm_backward` of checked arguments, launching the kernel directly
    (the custom op's implementation): (gx, gw, gb), gw / gb flat of length n, or empty
    when ``flags`` lacks LN_WEIGHT / LN_BIAS."""
    from . import rows_bits as RB
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    gw = torch.empty(n if flags & RB.LN_WEIGHT else 0, dtype=torch.int32, device=x.device)
    gb = torch.empty(n if flags & RB.LN_BIAS else 0, dtype=torch.int32, device=x.device)
    if out.numel():
        rows_launch("layer_norm_backward", x.device, D.as_bits(x).reshape(-1),
                    _ln_operand(weight, n, x), D.as_bits(grad).reshape(-1),
                    _stats_bits(stats), out.view(-1),
                    gw if gw.numel() else torch.zeros(1, dtype=torch.int32, device=x.device),
                    gb if gb.numel() else torch.zeros(1, dtype=torch.int32, device=x.device),
                    n, nb, off, flags)
    else:
        gw.zero_()
        gb.zero_()
    return out.view(torch.float32), gw.view(torch.float32), gb.view(torch.float32)


# ------------------------------------------------------------------------- cross entropy
def cross_entropy_args(weight, classes, reduction, label_smoothing, backward="exact"):
    """(flags, bits of a = float32(1 - e), bits of s = PAD(e, C), reduction code) of a
    fused cross entropy over ``classes`` classes: checks ``reduction`` ("mean", "sum",
    "none"), ``label_smoothing`` e in [0, 1], ``backward`` and the weight's shape (ValueError
    naming the argument)."""
    from . import xent_bits as XB
    if reduction not in XB.REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(XB.REDUCTIONS)}, got {reduction!r}")
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if backward not in ("exact", "approx"):
        raise ValueError(f"backward must be 'exact' or 'approx', got {backward!r}")
    flags = XB.CE_EXACT if backward == "exact" else 0
    if weight is not None:
        D.check_float32(weight, "weight")
        if tuple(weight.shape) != (classes,):
            raise ValueError(f"weight must have shape ({classes},), got {tuple(weight.shape)}")
        flags |= XB.CE_WEIGHT
    a_b = s_b = 0
    if ls > 0.0:
        flags |= XB.CE_SMOOTH
        a_b = L.f32_bits_scalar(1.0 - ls)
        s_b = L.f32_bits_scalar(L.pad_scalar(ls, classes))
    return flags, a_b, s_b, XB.REDUCTIONS[reduction]


def _check_targets(x, target, ignore_index):
    """Checks of fused cross-entropy arguments: float32 (rows, classes) logits and an
    integer target per row, each class index in [0, classes) or ``ignore_index``."""
    D.check_float32(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be (rows, classes), got shape {tuple(x.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or \
            target.dtype == torch.bool:
        raise TypeError(f"target must hold class indices (an integer dtype), got "
                        f"{target.dtype}")
    if tuple(target.shape) != (x.shape[0],):
        raise ValueError(f"target must have shape ({x.shape[0]},), got "
                         f"{tuple(target.shape)}")
    check_class_indices(target, x.shape[1], ignore_index)


def check_class_indices(target, classes, ignore_index):
    """IndexError unless every target is in [0, classes) or ``ignore_index`` (an async
    assert under torch.compile, not a graph break)."""
    valid = (target == ignore_index) | ((target >= 0) & (target < classes))
    message = f"target values must be in [0, {classes}) or ignore_index={ignore_index}"
    if torch.compiler.is_compiling():
        torch._assert_async(valid.all(), message)
    elif not bool(valid.all()):
        raise IndexError(message)


def cross_entropy_forward(x, target, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, offset=None):
    """Cross entropy of float32 logits ``x`` (rows, classes) and class indices ``target``
    (rows,), no autograd, one launch: the definition of :mod:`pam.xent_bits` (the
    composite of earlier versions with its sums made sequential). Returns the loss: one
    value per row for ``reduction="none"``, else a 0-dim tensor."""
    _check_targets(x, target, ignore_index)
    flags, a_b, s_b, red = cross_entropy_args(weight, x.shape[1], reduction,
                                              label_smoothing)
    return L.cross_entropy_forward(x, target.long(), weight, int(ignore_index), a_b, s_b,
                                   D.offset_constant(offset), flags, red)


def cross_entropy_backward(grad, x, target, weight=None, ignore_index=-100,
                           reduction="mean", label_smoothing=0.0, offset=None,
                           backward="exact"):
    """Input gradient of :func:`cross_entropy_forward` for the loss gradient ``grad``
    (shaped like the loss): the chain rule through the composite's operations as autograd
    runs them (:mod:`pam.xent_bits`); ``backward``: "exact" or "approx"."""
    _check_targets(x, target, ignore_index)
    flags, a_b, s_b, red = cross_entropy_args(weight, x.shape[1], reduction,
                                              label_smoothing, backward)
    D.check_float32(grad, "grad")
    want = (x.shape[0],) if reduction == "none" else ()
    if tuple(grad.shape) != want:
        raise ValueError(f"grad must have the loss's shape {want}, got {tuple(grad.shape)}")
    return L.cross_entropy_backward(grad, x, target.long(), weight, int(ignore_index), a_b,
                                    s_b, D.offset_constant(offset), flags, red)


def _xent_inputs(x, target, weight):
    """Flat int32 bits of x, contiguous int64 targets, int32 bits of the weights (a
    one-element placeholder without weights)."""
    xb = x.detach().contiguous().view(torch.int32).view(-1)
    tg = target.detach().contiguous()
    if weight is None:
        wb = torch.zeros(1, dtype=torch.int32, device=x.device)
    else:
        wb = weight.detach().contiguous().view(torch.int32)
    return xb, tg, wb


def cross_entropy_forward_kernel(x, target, weight, ignore, a_b, s_b, off, flags, red):
    """:func:`cross_entropy_forward` of checked arguments (``weight`` may be None),
    launching the kernel directly (the custom op's implementation)."""
    from . import xent_bits as XB
    rows, n = x.shape
    out = torch.empty(rows if red == XB.REDUCE_NONE else (), dtype=torch.float32,
                      device=x.device)
    if red == XB.REDUCE_NONE and rows == 0:
        return out
    xb, tg, wb = _xent_inputs(x, target, weight)
    D.launch_in("xent", "cross_entropy_forward", x.device, xb, wb, tg, n, ignore, a_b, s_b,
                off, flags, red, out.view(torch.int32).view(-1))
    return out


def cross_entropy_backward_kernel(grad, x, target, weight, ignore, a_b, s_b, off, flags,
                                  red):
    """:func:`cross_entropy_backward` of checked arguments, launching the kernel directly
    (the custom op's implementation)."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    xb, tg, wb = _xent_inputs(x, target, weight)
    gb = grad.detach().contiguous().view(torch.int32).view(-1)
    D.launch_in("xent", "cross_entropy_backward", x.device, xb, wb, tg, n, ignore, a_b, s_b,
                off, flags, red, gb, out.view(torch.int32).view(-1))
    return out


# --------------------------------------------------------------------------- attention core
def attention_args(q, k, attn_mask, batch):
    """(mask3, mode) of the fused attention core for heads q (P, L, E), k (P, S, E) and
    the composite's ``attn_mask`` broadcasting to ``batch + (L, S)`` (``batch`` the heads'
    batch shape, P its product): ``mode`` an attn_bits MASK_* code and ``mask3`` an int32 tensor
    (1, L, S) for one mask shared by every head or (P, L, S), bool masks as 0 / 1 and
    float masks as their bits; a 1-element dummy without a mask. The caller has checked
    that the mask broadcasts to the scores' shape without growing it."""
    from .attn_bits import MASK_BOOL, MASK_FLOAT, MASK_NONE
    P, L = q.shape[0], q.shape[1]
    S = k.shape[1]
    if attn_mask is None:
        return torch.zeros(1, dtype=torch.int32, device=q.device), MASK_NONE
    mode = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_FLOAT
    m = attn_mask.detach()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() <= 2:
        m = m.expand(L, S).reshape(1, L, S)
    else:
        m = m.expand(*batch, L, S).reshape(P, L, S)
    m = m.to(torch.int32) if mode == MASK_BOOL else m.contiguous().view(torch.int32)
    return m.contiguous(), mode


def _attn_bits(t):
    return t.detach().contiguous().view(torch.int32).view(-1)


def _attn_dims(q, k, v, mask):
    """(heads P, query rows L, head dim E, key rows S, value dim Ev, the mask's stride
    between heads: 0 for one (L, S) mask shared by every head, else L * S)."""
    P, L, E = q.shape
    S, Ev = k.shape[1], v.shape[2]
    return P, L, E, S, Ev, (0 if mask.dim() < 3 or mask.shape[0] == 1 else L * S)


def attention_forward_kernel(q, k, v, mask, causal, mode, scb, off):
    """The fused attention forward of float32 heads q (P, L, E), k (P, S, E), v (P, S, Ev)
    (no autograd; ``mask``, ``mode`` from :func:`attention_args`, ``scb`` the bits of the
    scale, ``off`` the offset constant): (out (P, L, Ev), masked scores (P, L, S),
    probabilities (P, L, S), softmax row statistics (P, L, 2)), one launch
    (pam.kernels.cpu_attn / cuda_attn, definitions in :mod:`pam.attn_bits`)."""
    P, L, E, S, Ev, mstride = _attn_dims(q, k, v, mask)
    dev = q.device
    out = torch.empty((P, L, Ev), dtype=torch.int32, device=dev)
    scores = torch.empty((P, L, S), dtype=torch.int32, device=dev)
    probs = torch.empty((P, L, S), dtype=torch.int32, device=dev)
    stats = torch.empty((P, L, 2), dtype=torch.int32, device=dev)
    D.launch_in("attn", "attention_forward", dev, _attn_bits(q), _attn_bits(k),
                _attn_bits(v), mask.view(-1), L, S, E, Ev, mstride, bool(causal), int(mode),
                int(scb), int(off), out.view(-1), scores.view(-1), probs.view(-1),
                stats.view(-1))
    f = torch.float32
    return out.view(f), scores.view(f), probs.view(f), stats.view(f)


def attention_lanes_forward_kernel(query, k, v, causal, scb, off, sm_off):
    """The attention forward of the composite's kernels (:func:`pam.functional._node_forward`
    without a mask) in one CPU launch over heads in vector lanes
    (``pam.kernels.cpu_attn.attention_forward_lanes``), for float32 heads query (P, L, E),
    k (P, S, E), v (P, S, Ev) (any layout: contiguous copies are taken): (q3 = PAM(query,
    scale), out (P, L, Ev), scores (P, L, S), probabilities (P, L, S), softmax row
    statistics (P, L, 2)), with the composite's bits."""
    P, L, E = query.shape
    S, Ev = v.shape[1:]
    dev = query.device
    q3, out, scores, probs, stats = (torch.empty(shape, dtype=torch.int32, device=dev)
                                     for shape in ((P, L, E), (P, L, Ev), (P, L, S),
                                                   (P, L, S), (P, L, 2)))
    D.launch_in("attn", "attention_forward_lanes", dev, _attn_bits(query), _attn_bits(k),
                _attn_bits(v), L, S, E, Ev, bool(causal), int(scb), int(off), int(sm_off),
                q3.view(-1), out.view(-1), scores.view(-1), probs.view(-1), stats.view(-1))
    f = torch.float32
    return q3.view(f), out.view(f), scores.view(f), probs.view(f), stats.view(f)


def attention_backward_kernel(grad, q, k, v, mask, scores, probs, stats, causal, mode, scb,
                              off, exact):
    """Gradients (dq, dk, dv) of :func:`attention_forward_kernel` at q, k, v for output
    gradient ``grad`` (P, L, Ev), given the scores, probabilities and statistics it
    returned for these inputs, one launch; ``exact``: the exact (True) or approximate
    backward of every piece."""
    P, L, E, S, Ev, mstride = _attn_dims(q, k, v, mask)
    dev = q.device
    dq = torch.empty((P, L, E), dtype=torch.int32, device=dev)
    dk = torch.empty((P, S, E), dtype=torch.int32, device=dev)
    dv = torch.empty((P, S, Ev), dtype=torch.int32, device=dev)
    D.launch_in("attn", "attention_backward", dev, _attn_bits(q), _attn_bits(k),
                _attn_bits(v), _attn_bits(grad), mask.view(-1), _attn_bits(scores),
                _attn_bits(probs), _attn_bits(stats), L, S, E, Ev, mstride, bool(causal),
                int(mode), int(scb), int(off), bool(exact), dq.view(-1), dk.view(-1),
                dv.view(-1))
    f = torch.float32
    return dq.view(f), dk.view(f), dv.view(f)
