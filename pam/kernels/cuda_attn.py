"""CUDA kernels of the fused attention core (numba-cuda), bit-identical to
:mod:`pam.kernels.cpu_attn`: the same names and arguments, the definitions of
:mod:`pam.attn_bits` and :mod:`pam.rows_bits`.

Forward: one thread per (head, query row) computes the row's scores (each a sequential
sum over e), its masks, its softmax and its output row. Backward: one block per head; its
threads first take the query rows (probability gradients, softmax backward, where, dQ),
then, after a ``syncthreads``, the key rows (dK, dV: sums over query rows in increasing
order). These kernels take every term, masked or not (no zero skipping; the sums are the
composite's, so the bits are the CPU kernels'). Arguments are torch CUDA tensors
(zero-copy, torch's current stream) or NumPy arrays (copied to the device and back: what
the tests use under NUMBA_ENABLE_CUDASIM=1). Importing this module needs neither a GPU nor
numba-cuda.
"""
import numpy as np

from .. import attn_bits as AB
from .. import optim_bits, rows_bits
from .cuda import cuda, lazy_kernels
from .cuda_rows import THREADS, _grid, _run, _scratch

__all__ = ["attention_forward", "attention_backward"]

SM_STATS = rows_bits.SOFTMAX_STATS
BACKWARD_THREADS = 64
MAX_BLOCKS = 8192
_f = rows_bits._f
_b = rows_bits._b


def _attention_forward_kernel(q, k, v, mask, P, L, S, E, Ev, mstride, causal, mode, scb,
                              off, out, scores, probs, stats):
    for r in range(cuda.grid(1), P * L, cuda.gridsize(1)):
        p = r // L
        i = r - p * L
        rb = r * S
        mb = p * mstride + i * S
        for j in range(S):
            sb = np.int32(0)
            if not AB.where_masked(i, j, causal != 0, mode, mask, mb):
                acc = np.float32(0.0)
                for e in range(E):
                    acc += _f(optim_bits.mul32_bits(AB.scale_bits(q[r * E + e], scb),
                                                    k[(p * S + j) * E + e], off))
                sb = _b(acc)
            scores[rb + j] = AB.masked_score_bits(sb, i, j, causal != 0, mode, mask, mb)
        rows_bits.softmax_row_forward(scores, probs, rb, S, off, True, stats, SM_STATS * r)
        for c in range(Ev):
            acc = np.float32(0.0)
            for j in range(S):
                acc += _f(optim_bits.mul32_bits(probs[rb + j], v[(p * S + j) * Ev + c], off))
            out[r * Ev + c] = _b(acc)


def _attention_backward_kernel(q, k, v, go, mask, scores, probs, stats, P, L, S, E, Ev,
                               mstride, causal, mode, scb, off, exact, gp, gs, dq, dk, dv):
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    ex = exact != 0
    for p in range(cuda.blockIdx.x, P, cuda.gridDim.x):
        for i in range(tid, L, nt):
            r = p * L + i
            rb = r * S
            mb = p * mstride + i * S
            for j in range(S):
                acc = np.float32(0.0)
                for c in range(Ev):
                    acc += _f(AB.grad_term(go[r * Ev + c], probs[rb + j],
                                           v[(p * S + j) * Ev + c], off, ex))
                gp[rb + j] = _b(acc)
            rows_bits.softmax_row_backward(scores, gp, gs, rb, S, off, True, ex, stats,
                                           SM_STATS * r)
            for j in range(S):
                if AB.where_masked(i, j, causal != 0, mode, mask, mb):
                    gs[rb + j] = 0
            for e in range(E):
                acc = np.float32(0.0)
                for j in range(S):
                    acc += _f(AB.grad_term(gs[rb + j], AB.scale_bits(q[r * E + e], scb),
                                           k[(p * S + j) * E + e], off, ex))
                dq[r * E + e] = AB.scale_grad_bits(_b(acc), q[r * E + e], scb, ex)
        cuda.syncthreads()
        for j in range(tid, S, nt):
            kj = (p * S + j) * E
            for e in range(E):
                acc = np.float32(0.0)
                for i in range(L):
                    r = p * L + i
                    acc += _f(AB.grad_term(gs[r * S + j], k[kj + e],
                                           AB.scale_bits(q[r * E + e], scb), off, ex))
                dk[kj + e] = _b(acc)
            vj = (p * S + j) * Ev
            for c in range(Ev):
                acc = np.float32(0.0)
                for i in range(L):
                    r = p * L + i
                    acc += _f(AB.grad_term(go[r * Ev + c], v[vj + c], probs[r * S + j], off,
                                           ex))
                dv[vj + c] = _b(acc)
        cuda.syncthreads()


KERNEL_FUNCTIONS = {
    "attention_forward": _attention_forward_kernel,
    "attention_backward": _attention_backward_kernel,
}

_compiled = lazy_kernels(KERNEL_FUNCTIONS)


def _heads(L, S, E, Ev, mstride, mode, mask, **arrays):
    """The CPU kernels' checks (pam.kernels.cpu_attn._check) on these arrays' shapes."""
    from .cpu_attn import _check

    class _Shape:                       # shape / dtype stand-in for torch or NumPy arrays
        def __init__(self, a):
            self.ndim = len(a.shape)
            self.size = int(np.prod(a.shape))
            self.shape = tuple(a.shape)
            self.dtype = np.int32 if str(a.dtype) in ("int32", "torch.int32") else a.dtype
    return _check(L, S, E, Ev, mstride, mode, _Shape(mask),
                  **{n: _Shape(a) for n, a in arrays.items()})


def attention_forward(q, k, v, mask, L, S, E, Ev, mstride, causal, mode, scb, off, out,
                      scores, probs, stats):
    """The fused attention forward (see pam.kernels.cpu_attn.attention_forward)."""
    optim_bits.check_offset(int(off))
    P = _heads(L, S, E, Ev, mstride, mode, mask, q=q, k=k, v=v, out=out, scores=scores,
               probs=probs, stats=stats)
    kern = _compiled("attention_forward")
    _run((q, k, v, mask), (out, scores, probs, stats), lambda d, o, s: kern[
        _grid(P * L), THREADS, s](d[0], d[1], d[2], d[3], P, L, S, E, Ev, mstride,
                                  int(bool(causal)), int(mode), int(scb), int(off), o[0],
                                  o[1], o[2], o[3]))
    return out


def attention_backward(q, k, v, go, mask, scores, probs, stats, L, S, E, Ev, mstride, causal,
                       mode, scb, off, exact, dq, dk, dv):
    """The fused attention backward (see pam.kernels.cpu_attn.attention_backward)."""
    optim_bits.check_offset(int(off))
    P = _heads(L, S, E, Ev, mstride, mode, mask, q=q, k=k, v=v, go=go, scores=scores,
               probs=probs, stats=stats, dq=dq, dk=dk, dv=dv)
    gp = _scratch(q, P * L * S)
    gs = _scratch(q, P * L * S)
    kern = _compiled("attention_backward")
    _run((q, k, v, go, mask, scores, probs, stats), (gp, gs, dq, dk, dv),
         lambda d, o, s: kern[min(P, MAX_BLOCKS), BACKWARD_THREADS, s](
             *d, P, L, S, E, Ev, mstride, int(bool(causal)), int(mode), int(scb), int(off),
             int(bool(exact)), *o))
    return dq
