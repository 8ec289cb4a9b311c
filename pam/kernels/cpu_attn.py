"""CPU kernels of the fused attention core (Numba, work split over threads).

``attention_forward`` computes scale, QK^T, masks, the PA softmax and PV for every head
(the flat leading batch index) in one launch, ``attention_backward`` dQ, dK and dV in one
launch; the definitions are :mod:`pam.attn_bits` and :mod:`pam.rows_bits` (the lines the
CUDA kernels of :mod:`pam.kernels.cuda_attn` compile). Both are serial ``nogil`` range
kernels split over threads by :func:`pam.kernels.threads.run`: the forward's work items
are (head, block of ROW_BLOCK query rows), the backward's are heads (dK and dV sum over
every query row of their head). Every sum runs in increasing index from +0, so the bits
do not depend on the split. ``attention_forward_lanes`` (end of this file) is the forward
of the attention node (pam.functional._node_forward) for short rows without a mask, with
LANES heads per vector instead of one head per work item.

Loop forms. Each sum's order is fixed, so the inner loops vectorize across independent
sums: the scores of a query row are accumulated over e with j innermost on K^T (packed
once per head per work item), the probability gradients of a row over c with j innermost
on V^T (packed once per head), dQ / dK / dV rows over j or i with e or c innermost on
rows of K, q, v and the output gradient (contiguous). Each sum takes the fast form of
pam.kernels.cpu's matmul paths when the ranges of its operands (per head, or per row)
guarantee normal products and slopes (:func:`_fast_products`, :func:`_fast_slope_terms`):
a PAM product is bits(b) plus a signed constant of a, an exact gradient term
((M(a) + off + bits(b)) & NOT_MANT) + bits(g) - ONE, zeros masked to +0; otherwise the
select forms of :mod:`pam.attn_bits`. Zero terms (attn_bits docstring) are skipped per
(i, j): products with a zero splatted factor on the fast forms, zero probabilities in
the forward's PV when the head's V is finite, where-masked entries in the backward when
the head is bounded. Bool masks and the causal mask bound the score columns computed.

Arguments: flat int32 bit arrays q (P*L*E), k (P*S*E), v (P*S*Ev), the mask (MASK_BOOL:
0 / 1, MASK_FLOAT: bits; (Pm, L, S) with ``mstride`` 0 for one mask shared by every head
or L*S; a 1-element dummy for MASK_NONE) and the outputs. ``off`` must be an offset
constant of pam.dispatch.offset_constant.
"""
import numpy as np

from .. import attn_bits as AB
from .. import bits, optim_bits, rows_bits
from . import threads, vec8
from ..bits import jitable
from .cpu import FUSED_PARALLEL_MIN

SM_STATS = rows_bits.SOFTMAX_STATS
ROW_BLOCK = 32                     # query rows per forward work item

__all__ = ["attention_forward", "attention_backward", "attention_forward_lanes", "ROW_BLOCK",
           "LANES"]

_f = rows_bits._f
_b = rows_bits._b


@jitable
def _normal_range(x, base, n, mk):
    """(lo, hi, finite) of the |bits| of the normal numbers among x[base:base + n] (lo
    > hi when there is none) and whether all are finite; mk[t] = -1 where x[base + t] is
    normal, 0 where it is zero or subnormal (pass mk of size 0 to skip it)."""
    lo = np.int64(bits.INF)
    hi = np.int64(0)
    top = np.int64(0)
    for t in range(n):
        u = np.int64(x[base + t] & bits.ABS_MASK)
        top = max(top, u)
        normal = u >= bits.MIN_NORMAL
        lo = min(lo, u if normal else np.int64(bits.INF))
        hi = max(hi, u if normal else np.int64(0))
    if mk.size:
        for t in range(n):
            mk[t] = np.int32(-1) if (x[base + t] & bits.ABS_MASK) >= bits.MIN_NORMAL else 0
    return lo, hi, top < bits.INF


@jitable
def _fast_products(lo_a, hi_a, lo_b, hi_b, off):
    """True when PAM(a, b; off) of any two normal operands in these |bits| ranges is a
    normal number: then its bits are bits(b) + the signed constant of a (one int32 add);
    True as well when either range is empty (every product is a zero)."""
    if lo_a > hi_a or lo_b > hi_b:
        return True
    return lo_a + lo_b - bits.ONE + off >= bits.MIN_NORMAL and \
        hi_a + hi_b - bits.ONE + off < bits.INF


@jitable
def _signed_const(ua, negative, off):
    """int32 |bits(a)| - ONE + off, plus 2^31 (wrapped) for a negative a: PAM(a, b; off)
    = bits(b) + this for a normal b when the product is normal (_fast_products)."""
    c = np.int64(ua) - bits.ONE + off
    return np.int32(c + 2147483648 if negative else c)


@jitable
def _row_extent(i, S, causal, mode, mask, mb):
    """1 + the last column of query row i that no ``torch.where`` mask replaces by -inf
    (causal: j <= i; bool mask: True entries), 0 when there is none: the scores past it
    are -inf whatever the products."""
    nj = min(i + 1, S) if causal else S
    if mode == AB.MASK_BOOL:
        while nj > 0 and mask[mb + nj - 1] == 0:
            nj -= 1
    return nj


@threads.splittable
def _attention_forward_range(q, k, v, mask, L, S, E, Ev, mstride, causal, mode, scb, off,
                             out, scores, probs, stats, lo, hi):
    optim_bits.check_offset(off)
    nblk = (L + ROW_BLOCK - 1) // ROW_BLOCK
    kt = np.empty(max(E * S, 1), np.int32)
    mk = np.empty(max(E * S, 1), np.int32)
    mv = np.empty(max(S * Ev, 1), np.int32)
    qs = np.empty(max(E, 1), np.int32)
    acc = np.empty(max(S, 1), np.float32)
    oacc = np.empty(max(Ev, 1), np.float32)
    none = np.empty(0, np.int32)
    cur = -1
    vfin = False
    klo = khi = vlo = vhi = np.int64(0)
    kfin = False
    evu = np.uint64(Ev)
    for task in range(lo, hi):
        p = task // nblk
        i0 = (task - p * nblk) * ROW_BLOCK
        i1 = min(i0 + ROW_BLOCK, L)
        kb = p * S * E
        vb = p * S * Ev
        if p != cur:
            cur = p
            for j in range(S):
                for e in range(E):
                    kt[e * S + j] = k[kb + j * E + e]
            klo, khi, kfin = _normal_range(kt, 0, E * S, mk)
            vlo, vhi, vfin = _normal_range(v, vb, S * Ev, mv)
        for i in range(i0, i1):
            qb = (p * L + i) * E
            for e in range(E):
                qs[e] = AB.scale_bits(q[qb + e], scb)
            qlo, qhi, qfin = _normal_range(qs, 0, E, none)
            mb = p * mstride + i * S
            nj = _row_extent(i, S, causal, mode, mask, mb)
            for j in range(nj):
                acc[j] = np.float32(0.0)
            nju = np.uint64(nj)
            if kfin and qfin and _fast_products(qlo, qhi, klo, khi, off):
                # products of a zero q are zeros (k finite): skipped; of a zero k: +0
                for e in range(E):
                    x = qs[e]
                    u = x & bits.ABS_MASK
                    if u < bits.MIN_NORMAL:
                        continue
                    c = _signed_const(u, x < 0, off)
                    eb = np.uint64(e * S)
                    for j in range(nju):
                        acc[j] += _f(np.int32((kt[eb + j] + c) & mk[eb + j]))
            else:
                for e in range(E):
                    qe = qs[e]
                    eb = np.uint64(e * S)
                    for j in range(nju):
                        acc[j] += _f(optim_bits.mul32_bits(qe, kt[eb + j], off))
            rb = (p * L + i) * S
            for j in range(nj):
                scores[rb + j] = _b(acc[j])
            for j in range(nj, S):
                scores[rb + j] = AB.NEG_INF_BITS
            if mode == AB.MASK_BOOL:
                for j in range(S):
                    scores[rb + j] = optim_bits.sel(mask[mb + j] != 0, scores[rb + j],
                                                    AB.NEG_INF_BITS)
            elif mode == AB.MASK_FLOAT:
                for j in range(S):
                    scores[rb + j] = _b(_f(scores[rb + j]) + _f(mask[mb + j]))
            rows_bits.softmax_row_forward(scores, probs, rb, S, off, True, stats,
                                          SM_STATS * (p * L + i))
            for c in range(Ev):
                oacc[c] = np.float32(0.0)
            plo, phi, pfin = _normal_range(probs, rb, S, none)
            if vfin and pfin and _fast_products(plo, phi, vlo, vhi, off):
                for j in range(S):
                    x = probs[rb + j]
                    u = x & bits.ABS_MASK
                    if u < bits.MIN_NORMAL:
                        continue
                    cp = _signed_const(u, x < 0, off)
                    vj = np.uint64(vb + j * Ev)
                    mj = np.uint64(j * Ev)
                    for c in range(evu):
                        oacc[c] += _f(np.int32((v[vj + c] + cp) & mv[mj + c]))
            else:
                for j in range(S):
                    pj = probs[rb + j]
                    if vfin and AB.is_zero_bits(pj):
                        continue
                    vj = np.uint64(vb + j * Ev)
                    for c in range(evu):
                        oacc[c] += _f(optim_bits.mul32_bits(pj, v[vj + c], off))
            ob = (p * L + i) * Ev
            for c in range(Ev):
                out[ob + c] = _b(oacc[c])


@jitable
def _mant_off(x, base, n, y, off):
    """y[t] = M(x[base + t]) + off, M the mantissa bits of a normal number, 0 for zeros
    and subnormals: the exact slope of PAM(a, b; off) w.r.t. a has the exponent field of
    M(a) + off + |bits(b)| (bits.mul_slope_bits)."""
    for t in range(n):
        u = x[base + t] & bits.ABS_MASK
        y[t] = np.int32((u & bits.MANT_MASK if u >= bits.MIN_NORMAL else 0) + off)


@jitable
def _fast_slope_terms(lo_b, hi_b, lo_g, hi_g, off):
    """True when every exact gradient term PAM(g, slope(a, b; off)) with finite a, normal b
    and normal g in these |bits| ranges has a normal slope and a normal result: then its
    bits are ((M(a) + off + bits(b)) & NOT_MANT) + bits(g) - ONE (wrapping int32); True as
    well when a range is empty (every term is a zero)."""
    if lo_b > hi_b or lo_g > hi_g:
        return True
    p_lo = lo_b + off
    p_hi = hi_b + bits.MANT_MASK + off
    if p_lo < bits.MIN_NORMAL or p_hi >= bits.INF:
        return False
    return lo_g + (p_lo & bits.EXP_MASK) - bits.ONE >= bits.MIN_NORMAL and \
        hi_g + (p_hi & bits.EXP_MASK) - bits.ONE < bits.INF


_NOT_MANT = np.int64(-8388608)          # ~MANT_MASK: the sign and exponent bits


def _make_backward_range(exact):
    """The backward range kernel with ``exact`` fixed (a captured bool, pruned by Numba:
    each variant compiles only its own terms). Each of the four gradient sums takes its
    fast form (one int32 add, or add-and-add, per term; pam.kernels.cpu's fast matmul
    paths) when the ranges of its operands guarantee normal slopes and products
    (_fast_products, _fast_slope_terms), else the select forms of attn_bits."""
    def kernel(q, k, v, go, mask, scores, probs, stats, L, S, E, Ev, mstride, causal, mode,
               scb, off, dq, dk, dv, lo, hi):
        optim_bits.check_offset(off)
        qs = np.empty(max(L * E, 1), np.int32)
        mq = np.empty(max(L * E, 1), np.int32)
        mk = np.empty(max(S * E, 1), np.int32)
        vt = np.empty(max(Ev * S, 1), np.int32)
        mvt = np.empty(max(Ev * S, 1), np.int32)
        mgo = np.empty(max(L * Ev, 1), np.int32)
        yq = np.empty(max(L * E, 1), np.int32)
        yk = np.empty(max(S * E, 1), np.int32)
        yv = np.empty(max(S * Ev, 1), np.int32)
        yp = np.empty(max(S, 1), np.int32)
        gp = np.empty(max(L * S, 1), np.int32)
        gs = np.empty(max(L * S, 1), np.int32)
        acc = np.empty(max(S, E, Ev, 1), np.float32)
        none = np.empty(0, np.int32)
        eu = np.uint64(E)
        evu = np.uint64(Ev)
        for p in range(lo, hi):
            qb = p * L * E
            kb = p * S * E
            vb = p * S * Ev
            gb = p * L * Ev
            hb = p * L * S
            for t in range(L * E):
                qs[t] = AB.scale_bits(q[qb + t], scb)
            for j in range(S):
                for c in range(Ev):
                    vt[c * S + j] = v[vb + j * Ev + c]
            qlo, qhi, qfin = _normal_range(qs, 0, L * E, mq)
            klo, khi, kfin = _normal_range(k, kb, S * E, mk)
            vlo, vhi, vfin = _normal_range(vt, 0, Ev * S, mvt)
            glo, ghi, gfin = _normal_range(go, gb, L * Ev, mgo)
            plo, phi, pfin = _normal_range(probs, hb, L * S, none)
            big = max(qhi if qfin else bits.INF, khi if kfin else bits.INF,
                      vhi if vfin else bits.INF, ghi if gfin else bits.INF)
            skip = big < AB.BOUND_BITS and mode != AB.MASK_FLOAT
            if exact:
                _mant_off(qs, 0, L * E, yq, off)
                _mant_off(k, kb, S * E, yk, off)
                _mant_off(v, vb, S * Ev, yv, off)
                fast_gp = vfin and gfin and pfin and _fast_slope_terms(vlo, vhi, glo, ghi,
                                                                       off)
                fast_dv = vfin and gfin and pfin and _fast_slope_terms(plo, phi, glo, ghi,
                                                                       off)
            else:
                fast_gp = vfin and gfin and _fast_products(glo, ghi, vlo, vhi, off)
                fast_dv = pfin and gfin and _fast_products(plo, phi, glo, ghi, off)
            sc_h = scores[hb:hb + L * S]
            pr_h = probs[hb:hb + L * S]
            st_h = stats[p * L * SM_STATS:(p + 1) * L * SM_STATS]
            # rows: probability gradients, softmax backward, where, dQ
            for i in range(L):
                rb = i * S
                mb = p * mstride + i * S
                nj = _row_extent(i, S, causal, mode, mask, mb) if skip else S
                for j in range(nj):
                    acc[j] = np.float32(0.0)
                nju = np.uint64(nj)
                rbu = np.uint64(rb)
                if fast_gp:
                    if exact:
                        _mant_off(pr_h, rb, nj, yp, off)
                    for c in range(Ev):
                        g = go[gb + i * Ev + c]
                        if (g & bits.ABS_MASK) < bits.MIN_NORMAL:
                            continue
                        cb = np.uint64(c * S)
                        if exact:
                            cg = np.int64(g) - bits.ONE
                            for j in range(nju):
                                acc[j] += _f(np.int32(
                                    (((yp[j] + vt[cb + j]) & _NOT_MANT) + cg) & mvt[cb + j]))
                        else:
                            cc = _signed_const(g & bits.ABS_MASK, g < 0, off)
                            for j in range(nju):
                                acc[j] += _f(np.int32((vt[cb + j] + cc) & mvt[cb + j]))
                else:
                    for c in range(Ev):
                        g = go[gb + i * Ev + c]
                        cb = np.uint64(c * S)
                        for j in range(nju):
                            acc[j] += _f(AB.grad_term(g, pr_h[rbu + j], vt[cb + j], off,
                                                      exact))
                for j in range(nj):
                    gp[rb + j] = _b(acc[j])
                for j in range(nj, S):
                    gp[rb + j] = 0
                if skip and mode == AB.MASK_BOOL:
                    for j in range(S):
                        gp[rb + j] = AB.sel_zero(mask[mb + j] != 0, gp[rb + j])
                if exact:
                    rows_bits.softmax_row_backward_exact(sc_h, gp, gs, rb, S, off, True, st_h,
                                                         SM_STATS * i)
                else:
                    rows_bits.softmax_row_backward_approx(sc_h, gp, gs, rb, S, off, True,
                                                          st_h, SM_STATS * i)
                if causal:
                    for j in range(S):
                        gs[rb + j] = AB.sel_zero(j <= i, gs[rb + j])
                if mode == AB.MASK_BOOL:
                    for j in range(S):
                        gs[rb + j] = AB.sel_zero(mask[mb + j] != 0, gs[rb + j])
                for e in range(E):
                    acc[e] = np.float32(0.0)
                slo, shi, sfin = _normal_range(gs, rb, S, none)
                qi = np.uint64(i * E)
                if exact:
                    fast = kfin and qfin and sfin and _fast_slope_terms(klo, khi, slo, shi, off)
                else:
                    fast = kfin and sfin and _fast_products(slo, shi, klo, khi, off)
                if fast:
                    for j in range(S):
                        g = gs[rb + j]
                        if (g & bits.ABS_MASK) < bits.MIN_NORMAL:
                            continue
                        kj = np.uint64(kb + j * E)
                        kl = np.uint64(j * E)
                        if exact:
                            cg = np.int64(g) - bits.ONE
                            for e in range(eu):
                                acc[e] += _f(np.int32(
                                    (((yq[qi + e] + k[kj + e]) & _NOT_MANT) + cg) & mk[kl + e]))
                        else:
                            cc = _signed_const(g & bits.ABS_MASK, g < 0, off)
                            for e in range(eu):
                                acc[e] += _f(np.int32((k[kj + e] + cc) & mk[kl + e]))
                else:
                    for j in range(S):
                        g = gs[rb + j]
                        if skip and AB.is_zero_bits(g):
                            continue
                        kj = np.uint64(kb + j * E)
                        for e in range(eu):
                            acc[e] += _f(AB.grad_term(g, qs[qi + e], k[kj + e], off, exact))
                for e in range(E):
                    t = qb + i * E + e
                    dq[t] = AB.scale_grad_bits(_b(acc[e]), q[t], scb, exact)
            # columns: dK, dV
            slo, shi, sfin = _normal_range(gs, 0, L * S, none)
            if exact:
                fast_dk = qfin and kfin and sfin and _fast_slope_terms(qlo, qhi, slo, shi, off)
            else:
                fast_dk = qfin and sfin and _fast_products(slo, shi, qlo, qhi, off)
            for j in range(S):
                i0 = j if (causal and skip) else 0
                kj = kb + j * E
                kju = np.uint64(kj)
                kl = np.uint64(j * E)
                for e in range(E):
                    acc[e] = np.float32(0.0)
                for i in range(i0, L):
                    g = gs[i * S + j]
                    qi = np.uint64(i * E)
                    if fast_dk:
                        if (g & bits.ABS_MASK) < bits.MIN_NORMAL:
                            continue
                        if exact:
                            cg = np.int64(g) - bits.ONE
                            for e in range(eu):
                                acc[e] += _f(np.int32(
                                    (((yk[kl + e] + qs[qi + e]) & _NOT_MANT) + cg) & mq[qi + e]))
                        else:
                            cc = _signed_const(g & bits.ABS_MASK, g < 0, off)
                            for e in range(eu):
                                acc[e] += _f(np.int32((qs[qi + e] + cc) & mq[qi + e]))
                    else:
                        if skip and AB.is_zero_bits(g):
                            continue
                        for e in range(eu):
                            acc[e] += _f(AB.grad_term(g, k[kju + e], qs[qi + e], off, exact))
                for e in range(E):
                    dk[kj + e] = _b(acc[e])
                vj = vb + j * Ev
                vju = np.uint64(vj)
                vl = np.uint64(j * Ev)
                for c in range(Ev):
                    acc[c] = np.float32(0.0)
                for i in range(i0, L):
                    pij = pr_h[i * S + j]
                    gi = np.uint64(gb + i * Ev)
                    gl = np.uint64(i * Ev)
                    if fast_dv:
                        if (pij & bits.ABS_MASK) < bits.MIN_NORMAL:
                            continue
                        if exact:
                            for c in range(evu):
                                acc[c] += _f(np.int32(
                                    (((yv[vl + c] + pij) & _NOT_MANT) + go[gi + c] - bits.ONE)
                                    & mgo[gl + c]))
                        else:
                            cc = _signed_const(pij & bits.ABS_MASK, pij < 0, off)
                            for c in range(evu):
                                acc[c] += _f(np.int32((go[gi + c] + cc) & mgo[gl + c]))
                    else:
                        if skip and AB.is_zero_bits(pij):
                            continue
                        for c in range(evu):
                            acc[c] += _f(AB.grad_term(go[gi + c], v[vju + c], pij, off,
                                                      exact))
                for c in range(Ev):
                    dv[vj + c] = _b(acc[c])
    return threads.splittable(
        kernel, name=f"_attention_backward_range_{'exact' if exact else 'approx'}")


_attention_backward_range_exact = _make_backward_range(True)
_attention_backward_range_approx = _make_backward_range(False)


def _check(L, S, E, Ev, mstride, mode, mask, **arrays):
    """Heads P of the flat arrays (ValueError naming the first inconsistent one)."""
    sizes = {"q": L * E, "q3": L * E, "k": S * E, "v": S * Ev, "out": L * Ev, "go": L * Ev,
             "dq": L * E, "dk": S * E, "dv": S * Ev, "scores": L * S, "probs": L * S,
             "stats": L * SM_STATS}
    P = None
    for name, a in arrays.items():
        per = sizes[name]
        if per <= 0 or a.ndim != 1 or a.dtype != np.int32 or a.size % per:
            raise ValueError(f"{name} must be a flat int32 array of whole heads of {per} "
                             f"entries, got {a.dtype} {a.shape}")
        if P is None:
            P = a.size // per
        elif a.size // per != P:
            raise ValueError(f"{name} holds {a.size // per} heads, expected {P}")
    if mode not in (AB.MASK_NONE, AB.MASK_BOOL, AB.MASK_FLOAT):
        raise ValueError(f"mode must be MASK_NONE, MASK_BOOL or MASK_FLOAT, got {mode!r}")
    if mode != AB.MASK_NONE:
        need = (P - 1) * mstride + L * S
        if mstride not in (0, L * S) or mask.ndim != 1 or mask.dtype != np.int32 \
                or mask.size < need:
            raise ValueError(f"mask must be a flat int32 array of one (L, S) mask or one "
                             f"per head (mstride 0 or L * S), got {mask.dtype} {mask.shape} "
                             f"with mstride {mstride}")
    return P


def attention_forward(q, k, v, mask, L, S, E, Ev, mstride, causal, mode, scb, off, out,
                      scores, probs, stats):
    """Fused attention forward for P heads (pam.attn_bits): ``out`` (P*L*Ev bits), the
    masked scores and probabilities (P*L*S) and the softmax row statistics (P*L*2)."""
    P = _check(L, S, E, Ev, mstride, mode, mask, q=q, k=k, v=v, out=out, scores=scores,
               probs=probs, stats=stats)
    items = P * ((L + ROW_BLOCK - 1) // ROW_BLOCK)
    threads.run(_attention_forward_range, items, P * L * S * (E + Ev), FUSED_PARALLEL_MIN,
                q, k, v, mask, L, S, E, Ev, mstride, bool(causal), int(mode), int(scb),
                int(off), out, scores, probs, stats)


def attention_backward(q, k, v, go, mask, scores, probs, stats, L, S, E, Ev, mstride, causal,
                       mode, scb, off, exact, dq, dk, dv):
    """Fused attention backward for P heads: dq, dk, dv (bits) from the output gradient
    ``go`` and what attention_forward saved (scores, probs, stats) for these inputs."""
    P = _check(L, S, E, Ev, mstride, mode, mask, q=q, k=k, v=v, go=go, scores=scores,
               probs=probs, stats=stats, dq=dq, dk=dk, dv=dv)
    kernel = _attention_backward_range_exact if exact else _attention_backward_range_approx
    threads.run(kernel, P, P * L * S * (E + Ev), FUSED_PARALLEL_MIN, q, k, v, go, mask,
                scores, probs, stats, L, S, E, Ev, mstride, bool(causal), int(mode), int(scb),
                int(off), dq, dk, dv)


# --------------------------------------------------------------------------- head lanes
# Tiny heads (the digits ViT: 512 heads of 5 x 5 x 16) waste most of the matmul kernels'
# 4 x 16 tiles and pay a packing task each; here LANES heads share every vector lane by
# lane: their q, k, v are gathered head-minor (element t of head h at [LANES t + h], 8 x 8
# block transposes), each score, probability and output element is computed for the
# LANES heads at once, and the softmax runs in rows_bits' lane form. The products are
# attn_bits' select forms, each sum in the composite's order, so every head gets the
# composite's bits.
LANES = rows_bits.SOFTMAX_LANES


@jitable
def _to_lanes(x, p0, lanes, T, dst):
    """dst[LANES t + r] = x[(p0 + r') T + t] for t < T, r < LANES, r' = min(r, lanes - 1)
    (a partial group repeats its last head): LANES heads of T elements each, head-minor."""
    W = LANES
    T8 = T - T % 8 if lanes == W else 0
    for r0 in range(0, W, 8):
        for t0 in range(0, T8, 8):
            vec8.transpose8(x, (p0 + r0) * T + t0, T, dst, W * t0 + r0, W)
    for r in range(W):
        p = p0 + min(r, lanes - 1)
        for t in range(T8, T):
            dst[W * t + r] = x[p * T + t]


@jitable
def _from_lanes(src, T, lanes, x, p0):
    """x[(p0 + r) T + t] = src[LANES t + r] for t < T, r < lanes: the inverse of
    :func:`_to_lanes` for the group's heads."""
    W = LANES
    T8 = T - T % 8 if lanes == W else 0
    for r0 in range(0, W, 8):
        for t0 in range(0, T8, 8):
            vec8.transpose8(src, W * t0 + r0, W, x, (p0 + r0) * T + t0, T)
    for r in range(lanes):
        for t in range(T8, T):
            x[(p0 + r) * T + t] = src[W * t + r]


@threads.splittable
def _attention_lanes_forward_range(q, k, v, P, L, S, E, Ev, causal, scb, off, sm_off, q3,
                                   out, scores, probs, stats, lo, hi):
    """Head groups lo <= group < hi (LANES heads each; a last partial group repeats its
    last head in the spare lanes and stores nothing of them) of
    :func:`attention_forward_lanes`."""
    optim_bits.check_offset(off)
    optim_bits.check_offset(sm_off)
    W = LANES
    qt = np.empty(max(L * E, 1) * W, np.int32)
    kt = np.empty(max(S * E, 1) * W, np.int32)
    vt = np.empty(max(S * Ev, 1) * W, np.int32)
    st = np.empty(max(L * S, 1) * W, np.int32)
    pt = np.empty(max(L * S, 1) * W, np.int32)
    ot = np.empty(max(L * Ev, 1) * W, np.int32)
    mst = np.empty(max(L * SM_STATS, 1) * W, np.int32)
    acc = np.empty(W, np.float32)
    m = np.empty(W, np.float32)
    s = np.empty(W, np.float32)
    kmax = np.empty(W, np.int32)
    nan = np.empty(W, np.int32)
    sb = np.empty(W, np.int32)
    for g in range(lo, hi):
        p0 = g * W
        lanes = min(W, P - p0)
        _to_lanes(q, p0, lanes, L * E, qt)
        _to_lanes(k, p0, lanes, S * E, kt)
        _to_lanes(v, p0, lanes, S * Ev, vt)
        for t in range(L * E * W):
            qt[t] = AB.scale_bits(qt[t], scb)
        for i in range(L):
            nj = min(i + 1, S) if causal else S
            ri = W * i * S
            for j in range(nj):
                for r in range(W):
                    acc[r] = np.float32(0.0)
                for e in range(E):
                    a = W * (i * E + e)
                    b = W * (j * E + e)
                    for r in range(W):
                        acc[r] += _f(optim_bits.mul32_bits(qt[a + r], kt[b + r], off))
                for r in range(W):
                    st[ri + W * j + r] = _b(acc[r])
            for t in range(ri + W * nj, ri + W * S):     # torch.where's -inf: j > i
                st[t] = AB.NEG_INF_BITS
            rows_bits.softmax_lanes_forward(st[ri:ri + W * S], pt[ri:ri + W * S], S, sm_off,
                                            True, m, s, kmax, nan, sb)
            for r in range(W):
                mst[W * SM_STATS * i + r] = _b(m[r])
                mst[W * (SM_STATS * i + 1) + r] = _b(s[r])
            for c in range(Ev):
                for r in range(W):
                    acc[r] = np.float32(0.0)
                for j in range(S):
                    a = ri + W * j
                    b = W * (j * Ev + c)
                    for r in range(W):
                        acc[r] += _f(optim_bits.mul32_bits(pt[a + r], vt[b + r], off))
                for r in range(W):
                    ot[W * (i * Ev + c) + r] = _b(acc[r])
        _from_lanes(qt, L * E, lanes, q3, p0)
        _from_lanes(ot, L * Ev, lanes, out, p0)
        _from_lanes(st, L * S, lanes, scores, p0)
        _from_lanes(pt, L * S, lanes, probs, p0)
        _from_lanes(mst, L * SM_STATS, lanes, stats, p0)


def attention_forward_lanes(q, k, v, L, S, E, Ev, causal, scb, off, sm_off, q3, out, scores,
                            probs, stats):
    """The attention forward of ``pam.functional._node_forward`` without a mask for P
    heads, LANES heads at a time: from the bits of query (P*L*E, unscaled), key (P*S*E)
    and value (P*S*Ev), flat C int32, it writes q3 = PAM(query, scale) (scale bits
    ``scb``), the output (P*L*Ev), the scores (P*L*S, -inf above the diagonal when
    ``causal``), the probabilities (P*L*S) and the softmax row statistics (P*L*2): the
    bits of the composite's scale product, QK^T matmul (offset constant ``off``), causal
    mask, softmax (``sm_off``, safe) and PV matmul. Meant for short rows (the node routes
    rows of at most pam.functional.LANES_MAX_ROWS here); longer ones are faster through
    the matmul kernels."""
    P = _check(L, S, E, Ev, 0, AB.MASK_NONE, q, q=q, k=k, v=v, out=out, scores=scores,
               probs=probs, stats=stats, q3=q3)
    threads.run(_attention_lanes_forward_range, (P + LANES - 1) // LANES,
                P * L * S * (E + Ev), FUSED_PARALLEL_MIN, q, k, v, P, L, S, E, Ev,
                bool(causal), int(scb), int(off), int(sm_off), q3, out, scores, probs, stats)
