"""PAM operations on torch tensors, with autograd.

Every operation takes float32 tensors on CPU or CUDA, broadcasts like its torch
counterpart and is differentiable. ``backward`` chooses the gradient:

* ``"exact"`` (default): the true derivative of the piecewise-affine function. Its slopes
  are powers of two, so the backward pass multiplies by them exactly (PAM with a power of
  two is exact) and needs no real multiplication.
* ``"approx"``: PAM used as if it were the exact product, as in the paper's training runs
  (for mul: dA = PAM(dC, B), dB = PAM(dC, A)).

Accuracy (measured on 2M random normal pairs, see validation/pam_error.py): PAM(a, b) / (a b)
lies in [8/9, 1], mean -3.85 %; with offset 1.0552 the mean error is about -0.1 %.
"""
import functools
import math

import torch
from torch.autograd.function import once_differentiable

from . import dispatch as D
from ._internal import layers_off
from . import families as FAM
from . import library as L

__all__ = ["mul", "div", "exp2", "log2", "exp", "log", "pow", "sqrt", "matmul", "linear",
           "BACKWARD_MODES"]

BACKWARD_MODES = ("exact", "approx")
LOG2_E = 1.4426950408889634   # log2(e): exp(x) = 2^(x log2 e)
LN_2 = 0.6931471805599453     # ln(2): d/dy 2^y = ln2 2^y (approximate backward)


def _first_order(backward):
    """Make a Function's backward refuse to build a graph (``create_graph=True``) through
    tensors it saved that require grad: its result would lack the second-order term.
    ``once_differentiable`` (applied inside) covers the incoming gradient; this covers the
    saved inputs, whose dependence it cannot see. The backward runs with the
    pam.arithmetic() layers off (:mod:`pam._internal`)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ctx.saved_tensors):
            raise RuntimeError("PAM ops are first-order only (once_differentiable): their backward "
                               "cannot be differentiated again; use create_graph=False")
        with layers_off():
            return backward(ctx, *grads)
    return wrapper


def _check_mode(backward):
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    return backward


def _reduce_to(grad, shape):
    """Sum a broadcast gradient back to ``shape`` (additions only)."""
    if grad.shape == shape:
        return grad
    return grad.sum_to_size(shape)


def _pam(a, b, off=0):
    return L.binary_map("mul", a, b, off)


def _scalar(value, like):
    return torch.tensor(value, dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------- mul / div
_MUL_KERNEL = {"pam": "mul", "lmul": "mul_lmul"}


def _slope(kind, x, y, off):
    """Exact derivative of the ``kind`` product with respect to ``x`` (a power of two)."""
    if kind == "lmul":
        return L.unary_map("pow2_part", y)        # sign(y) 2^E(y), whatever x
    return L.binary_map("mul_slope", x, y, off)


class _Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, off, mode, kind):
        ctx.save_for_backward(a, b)
        ctx.off, ctx.mode, ctx.kind = off, mode, kind
        return L.binary_map(_MUL_KERNEL[kind], a, b, off)

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.mode == "exact":
            if ctx.needs_input_grad[0]:
                ga = _pam(grad, _slope(ctx.kind, a, b, ctx.off))
            if ctx.needs_input_grad[1]:
                gb = _pam(grad, _slope(ctx.kind, b, a, ctx.off))
        else:
            name = _MUL_KERNEL[ctx.kind]
            if ctx.needs_input_grad[0]:
                ga = L.binary_map(name, grad, b, ctx.off)
            if ctx.needs_input_grad[1]:
                gb = L.binary_map(name, grad, a, ctx.off)
        if ga is not None:
            ga = _reduce_to(ga, a.shape)
        if gb is not None:
            gb = _reduce_to(gb, b.shape)
        return ga, gb, None, None, None


class _Div(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, off, mode):
        c = L.binary_map("div", a, b, off)
        ctx.save_for_backward(a, b, c)
        ctx.off, ctx.mode = off, mode
        return c

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        a, b, c = ctx.saved_tensors
        ga = gb = None
        if ctx.mode == "exact":
            if ctx.needs_input_grad[0]:
                ga = _pam(grad, L.binary_map("div_slope_num", a, b, ctx.off))
            if ctx.needs_input_grad[1]:
                gb = _pam(grad, L.binary_map("div_slope_den", a, b, ctx.off))
        else:
            # d(a/b)/da = 1/b; d(a/b)/db = -(a/b)/b
            if ctx.needs_input_grad[0]:
                ga = L.binary_map("div", grad, b, ctx.off)
            if ctx.needs_input_grad[1]:
                gb = L.binary_map("div", _pam(grad, c), b, ctx.off).neg()
        if ga is not None:
            ga = _reduce_to(ga, a.shape)
        if gb is not None:
            gb = _reduce_to(gb, b.shape)
        return ga, gb, None, None


def _distinct(a, b):
    """``b``, or an alias of it when it is the very tensor ``a``: Dynamo cannot trace an
    autograd.Function given one tensor twice. Autograd then sums the two gradients into
    ``a`` as before (one addition, same bits)."""
    return b.view_as(b) if b is a else b


def _needs_grad(*tensors):
    """True when autograd would record a graph node for an op on ``tensors``; otherwise
    the ops call their kernels directly, skipping autograd.Function's per-call cost (the
    result is the same tensor Function.apply would return, without a grad_fn)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _binary_args(a, b):
    a = D.check_float32(a, "a")
    b = D.as_operand(b, "b", a)
    if a.device != b.device:
        D.check_same_device(a=a, b=b)
    b = _distinct(a, b)
    if a.shape == b.shape or b.dim() == 0:
        return a, b
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"shapes of a {tuple(a.shape)} and b {tuple(b.shape)} "
                         f"cannot be broadcast together") from None
    return a, b


def _refuse_float_in_mode(m):
    """``family="float"`` computes with torch ops; inside a PAM ``pam.arithmetic`` block the
    mode would recompute them with PAM, so refuse rather than silently change the family."""
    if m.kind != "float":
        return
    from .mode.context import active
    ctx = active()
    if ctx is not None and ctx.cfg.multiplier.kind != "float":
        raise ValueError(f"family='float' inside pam.arithmetic(family="
                         f"{ctx.cfg.multiplier.family!r}) would run in that family: leave the "
                         f"block or use pam.arithmetic(family='float')")


def _multiplier(family, operands, offset):
    m = FAM.resolve(family, operands, offset)
    _refuse_float_in_mode(m)
    return m


def mul(a, b, offset=None, backward="exact", family="pam", operands="float32"):
    """Product of ``a`` and ``b`` in ``family`` arithmetic (broadcasting like ``torch.mul``).

    PAM: bits(|c|) = bits(|a|) + bits(|b|) - bits(1.0) (+ the offset's constant); exact when
    an operand is a power of two, otherwise 0 to 11.1 % below the true product in magnitude.
    Zero and subnormal inputs count as zero; underflow flushes to a signed zero, overflow
    saturates to a signed infinity; 0 * inf is NaN. ``b`` may be a Python number.
    ``family`` ("pam", "pam_offset", "lmul", "float") and ``operands`` (the format both
    operands are rounded to first): see :mod:`pam.families`.
    """
    a, b = _binary_args(a, b)
    m = _multiplier(family, operands, offset)
    mode = _check_mode(backward)
    a, b = FAM.round_operand(a, m), FAM.round_operand(b, m)
    if m.kind == "float":
        return torch.mul(a, b)
    if not _needs_grad(a, b):
        return L.binary_map(_MUL_KERNEL[m.kind], a, b, m.off)
    return _Mul.apply(a, b, m.off, mode, m.kind)


def div(a, b, offset=None, backward="exact", family="pam", operands="float32"):
    """Quotient a / b; PAD for the PAM families and L-Mul (which defines no division of its
    own: PAD without offset), torch's float division for ``family="float"``.

    PAD: bits(|c|) = bits(|a|) - bits(|b|) + bits(1.0) (- offset); exact when ``b`` is a
    power of two, otherwise 0 to 12.5 % above the true quotient in magnitude. 0/0 and
    inf/inf are NaN; x/0 is a signed infinity; x/inf is a signed zero. ``operands``: the
    format both operands are rounded to first (:mod:`pam.families`).
    """
    a, b = _binary_args(a, b)
    m = _multiplier(family, operands, offset)
    mode = _check_mode(backward)
    a, b = FAM.round_operand(a, m), FAM.round_operand(b, m)
    if m.kind == "float":
        return torch.div(a, b)
    off = m.off if m.kind == "pam" else 0
    if not _needs_grad(a, b):
        return L.binary_map("div", a, b, off)
    return _Div.apply(a, b, off, mode)


# --------------------------------------------------------------------------- exp2 / log2
class _Exp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mode):
        c = L.unary_map("exp2", y)
        ctx.save_for_backward(y, c)
        ctx.mode = mode
        return c

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        y, c = ctx.saved_tensors
        if ctx.mode == "exact":
            return _pam(grad, L.unary_map("exp2_slope", y)), None
        return _pam(grad, _pam(c, _scalar(LN_2, c))), None


class _Log2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode):
        ctx.save_for_backward(x)
        ctx.mode = mode
        return L.unary_map("log2", x)

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.mode == "exact":
            return _pam(grad, L.unary_map("log2_slope", x)), None
        return L.binary_map("div", grad, _pam(x, _scalar(LN_2, x)), 0), None


def exp2(y, backward="exact"):
    """pa_exp2(y) = 2^floor(y) (1 + y - floor(y)): exact at integers, at most 6.1 % above 2^y.

    Exact derivative: 2^floor(y). Results below the smallest normal are +0, above the
    largest float +inf; exp2(-inf) = 0, exp2(nan) = nan.
    """
    y, mode = D.check_float32(y, "y"), _check_mode(backward)
    if not _needs_grad(y):
        return L.unary_map("exp2", y)
    return _Exp2.apply(y, mode)


def log2(x, backward="exact"):
    """pa_log2(x) = E + M read from the bit pattern (rounded once to float32).

    Exact at powers of two, otherwise up to 0.086 below log2(x). 0 and subnormals give -inf,
    negative x gives NaN. Exact derivative: 2^-E.
    """
    x, mode = D.check_float32(x, "x"), _check_mode(backward)
    if not _needs_grad(x):
        return L.unary_map("log2", x)
    return _Log2.apply(x, mode)


def exp(x, backward="exact"):
    """e^x as pa_exp2(PAM(x, log2 e)).

    The PAM error of x log2 e lands in the exponent: measured on [-5, 5] the relative
    error is -29 % .. +43 % (exact at x = 0).
    """
    x = D.check_float32(x, "x")
    return exp2(mul(x, LOG2_E, backward=backward), backward=backward)


def log(x, backward="exact"):
    """ln x as PAD(pa_log2(x), log2 e). Measured on [0.01, 10]: absolute error <= 0.345."""
    x = D.check_float32(x, "x")
    return div(log2(x, backward=backward), LOG2_E, backward=backward)


def pow(a, b, backward="exact"):
    """a^b as pa_exp2(PAM(pa_log2(a), b)), for a >= 0 (negative a gives NaN; 0^b = 0 for b > 0).

    Crude away from b = 0.5: measured for b = 1.5 on [0.01, 10], relative error -29 % .. +100 %.
    """
    a = D.check_float32(a, "a")
    return exp2(mul(log2(a, backward=backward), b, backward=backward), backward=backward)


class _RootAtZero(torch.autograd.Function):
    """+0 where a = +-0, with torch's sqrt gradient there: grad / (2 sqrt(a)) = +-inf (sign of
    grad times sign of the zero), NaN where grad is 0 or NaN; gradient 0 where a != 0. Selects
    only (no float multiply or divide)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return torch.zeros_like(a)

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        inf = torch.full_like(grad, math.inf)
        g = torch.where(torch.signbit(a) ^ torch.signbit(grad), -inf, inf)
        g = torch.where((grad == 0) | torch.isnan(grad), torch.full_like(grad, math.nan), g)
        return torch.where(a == 0, g, torch.zeros_like(grad))


def sqrt(a, backward="exact"):
    """sqrt(a) = pow(a, 0.5); PAM by 0.5 is exact, so this is pa_exp2(pa_log2(a) / 2).

    Never below the true root; measured on [0.01, 10] at most 6.1 % above (exact at even
    powers of two). sqrt(+-0) = +0, with torch's gradient there (+-inf; NaN for a zero
    incoming gradient) rather than the composite's NaN.
    """
    a = D.check_float32(a, "a")
    if not (torch.is_grad_enabled() and a.requires_grad):
        return pow(a, 0.5, backward=backward)
    zero = a == 0
    safe = torch.where(zero, torch.ones_like(a), a)
    return torch.where(zero, _RootAtZero.apply(a), pow(safe, 0.5, backward=backward))


# --------------------------------------------------------------------------- matmul
def _transpose(x):
    return x.transpose(-1, -2)


class _Matmul(torch.autograd.Function):
    """Matmul of 3-D operands with equal batch size (broadcasting is done outside), with
    ``kind`` "pam" or "lmul" products."""

    @staticmethod
    def forward(ctx, a3, b3, off, mode, kind, gb_t=False):
        ctx.save_for_backward(a3, b3)
        ctx.off, ctx.mode, ctx.kind, ctx.gb_t = off, mode, kind, gb_t
        return L.matmul3(a3, b3, off, kind)

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        a3, b3 = ctx.saved_tensors
        ga, gb = _matmul3_grads(a3, b3, grad, ctx.off, ctx.mode, ctx.kind,
                                ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.gb_t)
        return ga, gb, None, None, None, None


def _matmul3_grads(a3, b3, grad, off, mode, kind, need_a, need_b, gb_t=False):
    """(dL/da3 or None, dL/db3 or None) of c = matmul3(a3, b3) for dL/dc = ``grad``:
    ``mode`` "approx" (PAM used as the product), else the exact derivative (for L-Mul a
    PAM product with the power-of-two part, exact); ``gb_t``: the exact dL/db3 may come as
    the transpose of a contiguous tensor."""
    grad = grad.contiguous()
    ga = gb = None
    if mode == "approx":
        if need_a:
            ga = L.matmul3(grad, _transpose(b3), off, kind)
        if need_b:
            gb = L.matmul3(_transpose(a3), grad, off, kind)
        return ga, gb
    if kind == "lmul":
        # d/da lmul(a, b) = sign(b) 2^E(b): PAM products with a power of two are exact.
        if need_a:
            ga = L.matmul3(grad, _transpose(L.unary_map("pow2_part", b3)), 0, "pam")
        if need_b:
            gb = L.matmul3(_transpose(L.unary_map("pow2_part", a3)), grad, 0, "pam")
        return ga, gb
    if a3.shape[2] == 0 or grad.numel() == 0:
        return (torch.zeros_like(a3) if need_a else None,
                torch.zeros_like(b3) if need_b else None)
    return L.matmul_exact_grads(a3, b3, grad, off, need_a, need_b, grad_b_transposed=gb_t)


def _rows3(x):
    """x (..., k) as (1, rows, k) (a view when x's layout allows)."""
    return x.reshape(1, math.prod(x.shape[:-1]), x.shape[-1])


def _linear_forward(x, weight, bias, off, kind):
    """(x W^T (+ bias), and the matmul's operands (1, rows, k), (1, k, out) as views)."""
    a3 = _rows3(x)
    b3 = weight.t().unsqueeze(0)
    y = L.matmul3(a3, b3, off, kind, bias).reshape(*x.shape[:-1], weight.shape[0])
    return y, a3, b3


class _Linear(torch.autograd.Function):
    """y = x W^T (+ bias, a float add) for float32 operands, one autograd node: the
    gradients of x, W and the bias come from one backward (the matmul's, and the bias's
    ``grad.sum_to_size``, the bits autograd's broadcast add would give), without the
    transpose, reshape and add nodes of the composite."""

    @staticmethod
    def forward(ctx, x, weight, bias, off, mode, kind):
        y, a3, b3 = _linear_forward(x, weight, bias, off, kind)
        ctx.save_for_backward(a3, b3)
        ctx.off, ctx.mode, ctx.kind = off, mode, kind
        ctx.x_shape = x.shape
        ctx.bias_shape = None if bias is None else bias.shape
        return y

    @staticmethod
    @_first_order
    @once_differentiable
    def backward(ctx, grad):
        a3, b3 = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g3 = grad.reshape(1, a3.shape[1], b3.shape[2])
        # (the transposed exact weight gradient is the weight's own layout: no copy)
        ga, gb = _matmul3_grads(a3, b3, g3, ctx.off, ctx.mode, ctx.kind, need_x, need_w,
                                gb_t=not torch.compiler.is_compiling())
        gx = ga.reshape(ctx.x_shape) if need_x else None
        gw = gb[0].t() if need_w else None
        gbias = grad.sum_to_size(ctx.bias_shape) if need_b else None
        return gx, gw, gbias, None, None, None


def _matmul3(a3, b3, off, mode, kind, gb_t=False):
    if not _needs_grad(a3, b3):
        return L.matmul3(a3, b3, off, kind)
    return _Matmul.apply(a3, _distinct(a3, b3), off, mode, kind, gb_t)


def matmul(a, b, offset=None, backward="exact", family="pam", operands="float32"):
    """Matrix product in ``family`` arithmetic with ``torch.matmul`` semantics (1-D, 2-D,
    batched, broadcast).

    C[..., i, j] = sum over k of PAM(a[..., i, k], b[..., k, j]), accumulated in float32 in
    increasing k order: deterministic, and identical on CPU and CUDA. Memory is that of the
    inputs and the output (broadcast batch dimensions are materialized). ``family`` and
    ``operands`` (the format the operands are rounded to first): :mod:`pam.families`;
    ``family="float"`` is ``torch.matmul`` of the rounded operands.
    """
    return _matmul(a, b, offset, backward, family, operands)


def _matmul(a, b, offset, backward, family, operands, weight_grad=False):
    """:func:`matmul`; ``weight_grad``: b is a leaf's transpose (linear's weight.t()) whose
    gradient only accumulates into that leaf, so the exact gradient of a 2-D b may be
    returned as the transpose of a contiguous tensor (the leaf's layout: no copy)."""
    a = D.check_float32(a, "a")
    b = D.check_float32(b, "b")
    D.check_same_device(a=a, b=b)
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"matmul needs at least 1-D operands, got a {tuple(a.shape)} and "
                         f"b {tuple(b.shape)}")
    mult = _multiplier(family, operands, offset)
    mode = _check_mode(backward)
    b_in = b
    a, b = FAM.round_operand(a, mult), FAM.round_operand(b, mult)
    if mult.kind == "float":
        return torch.matmul(a, b)
    off, kind = mult.off, mult.kind
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul shapes do not match: a {tuple(a.shape)} has "
                         f"{a2.shape[-1]} columns, b {tuple(b.shape)} has {b2.shape[-2]} rows")
    n, k = a2.shape[-2:]
    m = b2.shape[-1]
    if b2.dim() == 2:
        # Shared right operand: fold every batch dimension of a into its rows (no copies).
        batch = a2.shape[:-2]
        rows = math.prod(batch) * n
        c = _matmul3(a2.reshape(1, rows, k), b2.unsqueeze(0), off, mode, kind,
                     weight_grad and b is b_in)
        c = c.reshape(*batch, n, m)
    else:
        try:
            batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except RuntimeError:
            raise ValueError(f"batch dimensions of a {tuple(a.shape)} and b {tuple(b.shape)} "
                             f"cannot be broadcast together") from None
        a3 = a2.expand(*batch, n, k).reshape(-1, n, k)
        b3 = b2.expand(*batch, k, m).reshape(-1, k, m)
        c = _matmul3(a3, b3, off, mode, kind).reshape(*batch, n, m)
    if a.dim() == 1:
        c = c.squeeze(-2)
    if b.dim() == 1:
        c = c.squeeze(-1)
    return c


def linear(x, weight, bias=None, offset=None, backward="exact", family="pam",
           operands="float32"):
    """``torch.nn.functional.linear`` in ``family`` arithmetic: y = x W^T + bias (the bias
    add is a float add); ``family``/``operands`` as for :func:`matmul`."""
    x = D.check_float32(x, "x")
    weight = D.check_float32(weight, "weight")
    D.check_same_device(x=x, weight=weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal in_features={weight.shape[1]}, got "
                         f"x of shape {tuple(x.shape)}")
    if bias is not None:
        bias = D.check_float32(bias, "bias")
        D.check_same_device(x=x, bias=bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    mult = _multiplier(family, operands, offset)
    if mult.kind != "float" and mult.fmt.code == 0:     # float32 operands: one node
        mode = _check_mode(backward)
        if not _needs_grad(x, weight, *(() if bias is None else (bias,))):
            return _linear_forward(x, weight, bias, mult.off, mult.kind)[0]
        return _Linear.apply(x, _distinct(x, weight), bias, mult.off, mode, mult.kind)
    # (traced code uses the custom ops, which ignore the hint; Dynamo cannot read grad_fn)
    y = _matmul(x, weight.t(), offset, backward, family, operands,
                weight_grad=not torch.compiler.is_compiling() and weight.grad_fn is None)
    return y if bias is None else y + bias
