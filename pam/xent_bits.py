"""Fused cross entropy over rows of logits with class-index targets: the scalar and row
definitions the CPU kernels (:mod:`pam.kernels.cpu_xent`) and the CUDA kernels
(:mod:`pam.kernels.cuda_xent`) compile, so their bits agree.

Definition: the composite :func:`pam.nn.functional.cross_entropy` of earlier versions,
op for op, with its two torch sums made float32 sums from +0 in increasing index (the
row sum of the smoothing term over classes, and the sums over rows of the reductions and
of the mean's weights) -- the convention of the fused row kernels (:mod:`pam.rows_bits`).
For a row r of n logits with target t (``ignored`` when t equals ignore_index):

* logp = the PA log_softmax row (:func:`pam.rows_bits.log_softmax_row_forward`, offset
  ``off``); wlogp_c = PAM(logp_c, w_c; off) with class weights, else logp_c;
* nll_r = -wlogp_t, smooth_r = -(wlogp_0 + wlogp_1 + ...), weight_r = w_t (1 without
  weights); all three +0 for an ignored row;
* reduction "none": nll_r; "sum": total = nll_0 + nll_1 + ...; "mean": PAD(total, denom),
  denom = weight_0 + weight_1 + ... (the count of non-ignored rows without weights;
  0 / 0 = NaN when every row is ignored, as torch);
* label smoothing e > 0: PAM(loss, a) + PAM(smooth, s) with a = float32(1 - e),
  s = PAD(e, C), ``smooth`` reduced like the loss.

The backward is the chain rule through those operations as autograd runs the composite
(the exact power-of-two slopes of PAM/PAD with ``CE_EXACT``, else PAM/PAD used as if
exact), signed zeros included: the gather's gradient is scattered by addition into
+0 entries, the smoothing sum's gradient is broadcast to every class and added to it, an
ignored row receives +0 through ``where`` and -0 after the negation. Every value is an
int32 float32 bit pattern.

The kernels run a row in two steps: the log_softmax row of :mod:`pam.rows_bits`, then
:func:`ce_row_terms` (forward) or :func:`ce_row_grad` then the log_softmax row backward.
On CPU the log_softmax rows are the compiled row functions of
:mod:`pam.kernels.cpu_rows`, so that their (large) code compiles once for both.
"""
import numpy as np

from . import bits
from .bits import jitable
from .rows_bits import _b, _f

__all__ = ["CE_WEIGHT", "CE_SMOOTH", "CE_EXACT", "REDUCE_NONE", "REDUCE_SUM", "REDUCE_MEAN",
           "REDUCTIONS", "ce_row_terms", "ce_finish", "ce_grad_scalars", "ce_row_grad"]

CE_WEIGHT = 1          # class weights are given
CE_SMOOTH = 2          # label smoothing > 0
CE_EXACT = 4           # backward: exact slopes (else the approximate rule)

REDUCE_NONE, REDUCE_SUM, REDUCE_MEAN = 0, 1, 2
REDUCTIONS = {"none": REDUCE_NONE, "sum": REDUCE_SUM, "mean": REDUCE_MEAN}

_ZERO = np.int32(0)
_ONE = np.int32(bits.ONE)


@jitable
def _neg(i):
    """-x on bit patterns (the sign bit flipped, NaN payloads kept)."""
    return np.int32(np.int64(i) ^ bits.SIGN)


@jitable
def _add(i, j):
    """float32 x + y on bit patterns."""
    return _b(_f(i) + _f(j))


@jitable
def _pam(i, j, off):
    return np.int32(bits.mul_bits(i, j, off))


@jitable
def _target(target, r, n, ignore):
    """(class index, ignored) of row r; an index outside [0, n) that is not ignore_index
    raises ValueError (the Python entry points check first; CUDA kernels rely on that)."""
    t = target[r]
    if t == ignore:
        return 0, True
    if t < 0 or t >= n:
        raise ValueError("target index out of range")
    return t, False


@jitable
def ce_row_terms(w, target, lp, nll, sm, wt, r, n, ignore, off, flags):
    """Row r: nll[r], sm[r] (with CE_SMOOTH, else +0) and wt[r] of the definition above,
    from the row's log-probabilities ``lp[r n : (r + 1) n]`` (the kernels compute them
    first with :func:`pam.rows_bits.log_softmax_row_forward`; unused for an ignored row)."""
    base = r * n
    t, ignored = _target(target, r, n, ignore)
    if ignored:
        nll[r] = _ZERO
        sm[r] = _ZERO
        wt[r] = _ZERO
        return
    weighted = (flags & CE_WEIGHT) != 0
    p = lp[base + t]
    nll[r] = _neg(_pam(p, w[t], off) if weighted else p)
    wt[r] = w[t] if weighted else _ONE
    s = _ZERO
    if (flags & CE_SMOOTH) != 0:
        acc = np.float32(0.0)
        for c in range(n):
            v = lp[base + c]
            acc += _f(_pam(v, w[c], off) if weighted else v)
        s = _neg(_b(acc))
    sm[r] = s


@jitable
def _seq(a, rows):
    acc = np.float32(0.0)
    for r in range(rows):
        acc += _f(a[r])
    return _b(acc)


@jitable
def _reduced(target, nll, sm, wt, rows, ignore, reduction, flags):
    """(loss, smooth, total, smooth total, denom) of the reduction over rows (the last
    three are 0 for "none", the first two then unused)."""
    total = _seq(nll, rows)
    stot = _seq(sm, rows) if (flags & CE_SMOOTH) != 0 else _ZERO
    if reduction == REDUCE_SUM:
        return total, stot, total, stot, _ZERO
    if reduction == REDUCE_MEAN:
        if (flags & CE_WEIGHT) != 0:
            denom = _seq(wt, rows)
        else:
            count = 0
            for r in range(rows):
                if target[r] != ignore:
                    count += 1
            denom = _b(np.float32(count))
        return (np.int32(bits.div_bits(total, denom, 0)),
                np.int32(bits.div_bits(stot, denom, 0)), total, stot, denom)
    return _ZERO, _ZERO, _ZERO, _ZERO, _ZERO


@jitable
def _smoothed(loss, smooth, a_b, s_b):
    return _add(_pam(loss, a_b, 0), _pam(smooth, s_b, 0))


@jitable
def ce_finish(target, nll, sm, wt, rows, ignore, reduction, flags, a_b, s_b, out):
    """The loss from the rows' nll/sm/wt (sequential over rows): out[r] per row for
    "none", out[0] otherwise."""
    smoothing = (flags & CE_SMOOTH) != 0
    if reduction == REDUCE_NONE:
        for r in range(rows):
            out[r] = _smoothed(nll[r], sm[r], a_b, s_b) if smoothing else nll[r]
        return
    loss, smooth, _, _, _ = _reduced(target, nll, sm, wt, rows, ignore, reduction, flags)
    out[0] = _smoothed(loss, smooth, a_b, s_b) if smoothing else loss


@jitable
def _through_pam(g, v, k_b, exact):
    """Gradient w.r.t. v of PAM(v, k; 0) for upstream gradient g."""
    if exact:
        return _pam(g, bits.mul_slope_bits(v, k_b, 0), 0)
    return _pam(g, k_b, 0)


@jitable
def _through_pad(g, v, d, exact):
    """Gradient w.r.t. v of PAD(v, d; 0) for upstream gradient g."""
    if exact:
        return _pam(g, bits.div_slope_num_bits(v, d, 0), 0)
    return np.int32(bits.div_bits(g, d, 0))


@jitable
def ce_grad_scalars(target, nll, sm, wt, rows, ignore, reduction, flags, a_b, s_b, g, dn,
                    ds):
    """The gradients w.r.t. nll_r (dn) and smooth_r (ds) for the loss gradient ``g``
    (g[r] per row for "none", g[0] otherwise): dn[r], ds[r] per row for "none", dn[0],
    ds[0] (shared by every row) otherwise."""
    exact = (flags & CE_EXACT) != 0
    smoothing = (flags & CE_SMOOTH) != 0
    if reduction == REDUCE_NONE:
        for r in range(rows):
            if smoothing:
                dn[r] = _through_pam(g[r], nll[r], a_b, exact)
                ds[r] = _through_pam(g[r], sm[r], s_b, exact)
            else:
                dn[r] = g[r]
                ds[r] = _ZERO
        return
    loss, smooth, total, stot, denom = _reduced(target, nll, sm, wt, rows, ignore,
                                                reduction, flags)
    dl = _through_pam(g[0], loss, a_b, exact) if smoothing else g[0]
    dsm = _through_pam(g[0], smooth, s_b, exact) if smoothing else _ZERO
    if reduction == REDUCE_MEAN:
        dl = _through_pad(dl, total, denom, exact)
        if smoothing:
            dsm = _through_pad(dsm, stot, denom, exact)
    dn[0] = dl
    ds[0] = dsm


@jitable
def ce_row_grad(w, target, lp, dl, r, n, ignore, dn, ds, flags, off):
    """Row r of the gradient w.r.t. the row's log-probabilities into ``dl``, given the
    row's gradients ``dn`` w.r.t. nll_r and ``ds`` w.r.t. smooth_r (bits, from
    :func:`ce_grad_scalars`); ``lp`` holds the row's log-probabilities (read only for
    exact slopes with class weights). The kernels then run
    :func:`pam.rows_bits.log_softmax_row_backward` of ``dl`` -- also for an ignored row,
    whose signed zeros give NaN where its logits hold NaN or infinities, as the composite."""
    base = r * n
    t, ignored = _target(target, r, n, ignore)
    exact = (flags & CE_EXACT) != 0
    weighted = (flags & CE_WEIGHT) != 0
    gp = _add(_ZERO, _neg(_ZERO if ignored else dn))   # where, neg, gather (scatter-add)
    smoothing = (flags & CE_SMOOTH) != 0
    gs = _neg(_ZERO if ignored else ds)                 # where, neg, sum (broadcast)
    for c in range(n):
        v = gp if c == t else _ZERO
        if smoothing:
            v = _add(v, gs)
        if weighted:
            if exact:
                v = _pam(v, bits.mul_slope_bits(lp[base + c], w[c], off), 0)
            else:
                v = _pam(v, w[c], off)
        dl[base + c] = v


@jitable
def ce_needs_log_probs(flags):
    """Whether :func:`ce_row_grad` reads ``lp`` (exact slopes with class weights)."""
    return (flags & CE_EXACT) != 0 and (flags & CE_WEIGHT) != 0


@jitable
def ce_row_log_probs_wanted(target, r, ignore, flags):
    """Whether the kernels compute row r's log-probabilities: for every row that is not
    ignored, and for an ignored row too when :func:`ce_row_grad` reads them
    (:func:`ce_needs_log_probs`), so that it never reads unwritten scratch."""
    return target[r] != ignore or ce_needs_log_probs(flags)
