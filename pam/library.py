"""PAM kernels as torch custom ops (``torch.ops.pam.*``), for ``torch.compile``.

Every kernel entry point reached from :mod:`pam.ops`, :mod:`pam.conv` and :mod:`pam.fused`
(GELU, softmax rows) is a ``torch.library.custom_op`` that returns a new tensor and mutates
none of its inputs (``mutates_args=()``), with a fake implementation giving the result's
shape, dtype and device. Dynamo records these ops as single graph nodes (it cannot trace a
Numba dispatcher), and AOT autograd's functionalization sees every result as a fresh
tensor: the kernels' writes into their own output buffers happen inside the op, never
behind torch's back.

The fused optimizer steps (:func:`pam.fused.adamw_step`, :func:`pam.fused.sgd_step`) are
the exception: they update parameters and optimizer state in place, so their ops
``pam::adamw_step`` and ``pam::sgd_step`` return nothing and declare the lists they mutate
(``mutates_args``); functionalization then sees the writes (it clones the mutated inputs
and copies the results back), and ``torch.compile(opt.step, fullgraph=True)`` of
:class:`pam.optim.AdamW` / :class:`pam.optim.SGD` traces without a graph break.

Autograd stays in the ``torch.autograd.Function`` classes of :mod:`pam.ops`,
:mod:`pam.conv` and :mod:`pam.functional`: their ``forward`` and ``backward`` call the
functions below, and Dynamo traces those Functions (forward and backward) into the graph.
The custom ops themselves have no autograd formula (differentiating through them directly
raises torch's "no autograd kernel" error).

Eager cost. Going through the torch dispatcher costs tens of microseconds per call, a
large share of a small PAM op; so the Python functions below (``binary_map``,
``unary_map``, ``matmul3``, ...) call the implementation directly unless Dynamo is tracing
(``torch.compiler.is_compiling()``) or an operand is not a plain tensor (a fake or
functional tensor of another tracer); both paths run the same implementation, so they
give the same bits (tests/test_compile.py checks that).

Scalars. :func:`pam_scalar` and :func:`pad_scalar` compute PAM/PAD of two Python numbers in
pure Python on the bit patterns (the :mod:`pam.bits` definitions the kernels compile), so
code that derives constants (an attention scale, a dropout scale) neither launches a
kernel nor reads a tensor back with ``.item()``; they are marked
``torch._dynamo.assume_constant_result`` (their arguments are Python numbers, constants of
the trace), so Dynamo evaluates them while tracing and sees a constant, not a graph break.
"""
import operator
from typing import Optional, Tuple

import numpy as np
import torch

from . import bits
from . import dispatch as D

__all__ = ["binary_map", "unary_map", "quantize", "pow2_part", "matmul3",
           "matmul_exact_grads", "conv_forward", "conv_grad_input", "conv_grad_weight",
           "gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward",
           "direct_list", "adamw_step", "sgd_step", "pam_scalar", "pad_scalar",
           "pa_sqrt_scalar", "static_int", "lmul_scalar", "quantize_scalar",
           "f32_bits_scalar"]


def _direct(*tensors):
    """True when the implementation may be called directly: eager mode, plain tensors."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in _PLAIN for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------- elementwise
def _binary_shape(a, b):
    return torch.broadcast_shapes(a.shape, b.shape)


@torch.library.custom_op("pam::binary_map", mutates_args=())
def _binary_map_op(name: str, a: torch.Tensor, b: torch.Tensor, off: int) -> torch.Tensor:
    return D.binary_map(name, a, b, off)


@_binary_map_op.register_fake
def _(name, a, b, off):
    return a.new_empty(_binary_shape(a, b))


@torch.library.custom_op("pam::unary_map", mutates_args=())
def _unary_map_op(name: str, x: torch.Tensor) -> torch.Tensor:
    return D.unary_map(name, x)


@_unary_map_op.register_fake
def _(name, x):
    return x.new_empty(x.shape)


def binary_map(name, a, b, off):
    """Elementwise kernel ``name`` over broadcast float32 a, b (see :func:`pam.dispatch.binary_map`)."""
    if _direct(a, b):
        return D.binary_map(name, a, b, off)
    return _binary_map_op(name, a, b, off)


def unary_map(name, x):
    """Elementwise kernel ``name`` over float32 x (see :func:`pam.dispatch.unary_map`)."""
    if _direct(x):
        return D.unary_map(name, x)
    return _unary_map_op(name, x)


@torch.library.custom_op("pam::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, fmt: int, flush: bool) -> torch.Tensor:
    return D.quantize(x, fmt, flush)


@_quantize_op.register_fake
def _(x, fmt, flush):
    return x.new_empty(x.shape)


def quantize(x, fmt, flush=False):
    """float32 ``x`` rounded to operand format ``fmt`` (0 float32, 1 bfloat16, 2 float16,
    3 e4m3, 4 e5m2; :func:`pam.bits.quantize_bits`): round to nearest even, the format's
    overflow rule, NaN -> 0x7FC00000; ``flush``: its subnormals become signed zeros. A new
    float32 tensor holding the rounded values exactly."""
    fmt = D.check_format(fmt)
    if _direct(x):
        return D.quantize(x, fmt, flush)
    return _quantize_op(x, fmt, bool(flush))


def pow2_part(x):
    """sign(x) 2^E(x) elementwise (:func:`pam.bits.pow2_part_bits`): zero/subnormal ->
    signed zero, inf -> inf, NaN -> NaN. The exact slope of L-Mul: d lmul(a, b)/da =
    pow2_part(b)."""
    return unary_map("pow2_part", x)


# --------------------------------------------------------------------------- matmul
def _operand_bits(x):
    """int32 view of the float32 3-D matmul operand ``x`` for the kernels: on CPU, x in
    its own layout when x or its transpose is contiguous (the CPU matmul kernels read
    either in place: a linear layer's right operand is its weight transposed), otherwise a
    contiguous copy (as on CUDA, whose kernels take contiguous operands)."""
    if x.device.type == "cpu":
        x = x.detach()
        if x.is_contiguous() or x.transpose(-1, -2).is_contiguous():
            return x.view(torch.int32)
    return D.as_bits(x)


def _matmul_impl(a3, b3, off, kind="pam", bias=None):
    P, n, k = a3.shape
    m = b3.shape[2]
    out = torch.empty((P, n, m), dtype=torch.float32, device=a3.device)
    if out.numel() == 0:
        return out
    if k == 0:
        out.zero_()
    else:
        in_kernel = bias is not None and a3.device.type == "cpu"   # the kernel's epilogue
        D.launch("matmul" + D.kernel_suffix(kind), a3.device, _operand_bits(a3),
                 _operand_bits(b3), off, out, *((bias.detach(),) if in_kernel else ()))
        if in_kernel:
            return out
    return out if bias is None else out.add_(bias.detach())


@torch.library.custom_op("pam::matmul", mutates_args=())
def _matmul_op(a3: torch.Tensor, b3: torch.Tensor, off: int,
               kind: str = "pam") -> torch.Tensor:
    return _matmul_impl(a3, b3, off, kind)


@_matmul_op.register_fake
def _(a3, b3, off, kind="pam"):
    return a3.new_empty((a3.shape[0], a3.shape[1], b3.shape[2]))


def matmul3(a3, b3, off, kind="pam", bias=None):
    """(P, n, k) @ (P, k, m) float32 -> new (P, n, m) matmul, no autograd. ``kind``: the
    product family, "pam" (``off``: the offset constant) or "lmul" (``off``: the L-Mul
    constant c of :func:`pam.bits.lmul_constant`). ``bias``: None, or float32 (m,) added
    to every sum (float32 adds, the sum first: the bits of ``matmul3(...) + bias``; eager
    on CPU in the matmul kernel's epilogue, which saves a pass over the output)."""
    D.kernel_suffix(kind)
    if _direct(a3, b3) and (bias is None or _direct(bias)):
        return _matmul_impl(a3, b3, off, kind, bias)
    out = _matmul_op(a3, b3, off, kind)
    return out if bias is None else out + bias


def _grads_impl(a3, b3, grad, off, need_a, need_b, gb_t=False):
    """(ga or None, gb or None): one launch computes both exact gradients with one range
    scan of a3, b3 and grad (pam.kernels' ``matmul_exact_grads``). On CPU the operands are
    passed in their own layouts (``_operand_bits``); with ``gb_t`` gb is the transpose of
    a contiguous (P, m, k) tensor, which the kernel writes in place, else contiguous."""
    P, n, k = a3.shape
    m = b3.shape[2]
    cpu = a3.device.type == "cpu"
    ga = torch.empty(a3.shape, dtype=torch.float32, device=a3.device) if need_a else None
    gb = None
    if need_b:
        gb = (torch.empty((P, m, k), dtype=torch.float32).transpose(1, 2) if cpu and gb_t else
              torch.empty(b3.shape, dtype=torch.float32, device=b3.device))
    if not ((ga is not None and ga.numel()) or (gb is not None and gb.numel())):
        return ga, gb
    if cpu:
        D.launch("matmul_exact_grads", a3.device, _operand_bits(a3), None, None,
                 _operand_bits(b3), D.as_bits(grad), off, ga, gb)
    else:
        D.launch("matmul_exact_grads", a3.device,
                 D.as_bits(a3) if need_a else None,
                 D.as_bits(b3.transpose(-1, -2)) if need_a else None,
                 D.as_bits(a3.transpose(-1, -2)) if need_b else None,
                 D.as_bits(b3) if need_b else None,
                 D.as_bits(grad), off, ga, gb)
    return ga, gb


# Traced code gets one single-output op per gradient: a two-output op changed the layout
# Inductor gave a later bias-gradient sum (tests/test_compile.py), so eager's bits.
@torch.library.custom_op("pam::matmul_exact_grad_left", mutates_args=())
def _grad_left_op(a3: torch.Tensor, b3: torch.Tensor, grad: torch.Tensor,
                  off: int) -> torch.Tensor:
    return _grads_impl(a3, b3, grad, off, True, False)[0]


@_grad_left_op.register_fake
def _(a3, b3, grad, off):
    return a3.new_empty(a3.shape)


@torch.library.custom_op("pam::matmul_exact_grad_right", mutates_args=())
def _grad_right_op(a3: torch.Tensor, b3: torch.Tensor, grad: torch.Tensor,
                   off: int) -> torch.Tensor:
    return _grads_impl(a3, b3, grad, off, False, True)[1]


@_grad_right_op.register_fake
def _(a3, b3, grad, off):
    return b3.new_empty(b3.shape)


def matmul_exact_grads(a3, b3, grad, off, need_a=True, need_b=True, grad_b_transposed=False):
    """(ga, gb): the exact gradients of ``matmul3(a3, b3, off)`` w.r.t. a3 and b3 for
    output gradient ``grad`` (the true derivatives of the PAM products), new tensors
    shaped like a3 and b3, None where not ``need_a`` / ``need_b`` (no k = 0 or
    empty-gradient special cases: the caller handles those). Eager: one launch and one
    range scan of the inputs for both; traced: the custom ops
    ``pam::matmul_exact_grad_left`` / ``_right``. ``grad_b_transposed``: eager CPU
    returns gb as the transpose of a contiguous tensor (for a b that is a leaf weight's
    transpose, whose gradient then needs no copy; same values)."""
    if _direct(a3, b3, grad):
        return _grads_impl(a3, b3, grad, off, need_a, need_b, grad_b_transposed)
    return (_grad_left_op(a3, b3, grad, off) if need_a else None,
            _grad_right_op(a3, b3, grad, off) if need_b else None)


# --------------------------------------------------------------------------- convolution
def _conv_launch(name, device, *args):
    """Run convolution kernel ``name`` on ``device`` (tensor arguments passed zero-copy)."""
    return D.launch_in("conv", name, device, *args)


def _conv_out_shape(x4, w4, stride, pad_lo, pad_hi, dilation):
    sizes = [(s + lo + hi - d * (k - 1) - 1) // st + 1 for s, lo, hi, d, k, st in
             zip(x4.shape[2:], pad_lo, pad_hi, dilation, w4.shape[2:], stride)]
    return (x4.shape[0], w4.shape[0], *sizes)


def _conv_forward_impl(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind="pam"):
    out = torch.empty(_conv_out_shape(x4, w4, stride, pad_lo, pad_hi, dilation),
                      dtype=torch.float32, device=x4.device)
    if out.numel():
        _conv_launch("conv_forward" + D.kernel_suffix(kind), x4.device, D.as_bits(x4),
                     D.as_bits(w4), *stride, *pad_lo, *dilation, groups, off, out)
    return out


@torch.library.custom_op("pam::conv_forward", mutates_args=())
def _conv_forward_op(x4: torch.Tensor, w4: torch.Tensor, stride: list[int],
                     pad_lo: list[int], pad_hi: list[int], dilation: list[int], groups: int,
                     off: int, kind: str = "pam") -> torch.Tensor:
    return _conv_forward_impl(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind)


@_conv_forward_op.register_fake
def _(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind="pam"):
    return x4.new_empty(_conv_out_shape(x4, w4, stride, pad_lo, pad_hi, dilation))


def conv_forward(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind="pam"):
    """(N, C, H, W) x (O, C/groups, KH, KW) convolution (no bias), a new float32 tensor;
    the caller checks that the output is not empty-sized by geometry. ``kind``: the product
    family, "pam" or "lmul" (``off``: its constant, as in :func:`matmul3`)."""
    stride, pad_lo, pad_hi, dilation = (list(v) for v in (stride, pad_lo, pad_hi, dilation))
    D.kernel_suffix(kind)
    if _direct(x4, w4):
        return _conv_forward_impl(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off,
                                  kind)
    return _conv_forward_op(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind)


def _check_grad_kind(kind, exact):
    D.kernel_suffix(kind)
    if exact and kind != "pam":
        raise ValueError(f"the exact backward has PAM kernels only, got kind={kind!r}: the "
                         f"exact L-Mul slope is a power of two, so its gradients are PAM "
                         f"products with pow2_part (approximate PAM kernel at off = 0)")


def _conv_grad_impl(name, like, grad4, x4, w4, stride, pad_lo, dilation, groups, exact, off,
                    kind="pam"):
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if out.numel():
        _conv_launch(name + D.kernel_suffix(kind), x4.device, D.as_bits(x4), D.as_bits(w4),
                     D.as_bits(grad4), *stride, *pad_lo, *dilation, groups, bool(exact), off,
                     out)
    return out


@torch.library.custom_op("pam::conv_grad_input", mutates_args=())
def _conv_grad_input_op(grad4: torch.Tensor, x4: torch.Tensor, w4: torch.Tensor,
                        stride: list[int], pad_lo: list[int], dilation: list[int],
                        groups: int, exact: bool, off: int,
                        kind: str = "pam") -> torch.Tensor:
    return _conv_grad_impl("conv_grad_input", x4, grad4, x4, w4, stride, pad_lo, dilation,
                           groups, exact, off, kind)


@_conv_grad_input_op.register_fake
def _(grad4, x4, w4, stride, pad_lo, dilation, groups, exact, off, kind="pam"):
    return x4.new_empty(x4.shape)


@torch.library.custom_op("pam::conv_grad_weight", mutates_args=())
def _conv_grad_weight_op(grad4: torch.Tensor, x4: torch.Tensor, w4: torch.Tensor,
                         stride: list[int], pad_lo: list[int], dilation: list[int],
                         groups: int, exact: bool, off: int,
                         kind: str = "pam") -> torch.Tensor:
    return _conv_grad_impl("conv_grad_weight", w4, grad4, x4, w4, stride, pad_lo, dilation,
                           groups, exact, off, kind)


@_conv_grad_weight_op.register_fake
def _(grad4, x4, w4, stride, pad_lo, dilation, groups, exact, off, kind="pam"):
    return w4.new_empty(w4.shape)


def conv_grad_input(grad4, x4, w4, stride, pad_lo, dilation, groups, exact, off, kind="pam"):
    """Gradient of :func:`conv_forward` w.r.t. x4 (exact or approximate), a new tensor.
    ``kind="lmul"``: the approximate backward with L-Mul products (``exact`` must be false)."""
    stride, pad_lo, dilation = list(stride), list(pad_lo), list(dilation)
    _check_grad_kind(kind, exact)
    if _direct(grad4, x4, w4):
        return _conv_grad_impl("conv_grad_input", x4, grad4, x4, w4, stride, pad_lo,
                               dilation, groups, exact, off, kind)
    return _conv_grad_input_op(grad4, x4, w4, stride, pad_lo, dilation, groups, bool(exact),
                               off, kind)


def conv_grad_weight(grad4, x4, w4, stride, pad_lo, dilation, groups, exact, off, kind="pam"):
    """Gradient of :func:`conv_forward` w.r.t. w4 (exact or approximate), a new tensor.
    ``kind="lmul"``: the approximate backward with L-Mul products (``exact`` must be false)."""
    stride, pad_lo, dilation = list(stride), list(pad_lo), list(dilation)
    _check_grad_kind(kind, exact)
    if _direct(grad4, x4, w4):
        return _conv_grad_impl("conv_grad_weight", w4, grad4, x4, w4, stride, pad_lo,
                               dilation, groups, exact, off, kind)
    return _conv_grad_weight_op(grad4, x4, w4, stride, pad_lo, dilation, groups,
                                bool(exact), off, kind)


# --------------------------------------------------------------------------- fused rows
# The pam.fused entry points (checks there); these run the kernels, directly in eager mode
# and as custom ops under tracing.
@torch.library.custom_op("pam::gelu_forward", mutates_args=())
def _gelu_forward_op(x: torch.Tensor) -> torch.Tensor:
    from . import fused
    return fused.gelu_forward_kernel(x)


@_gelu_forward_op.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("pam::gelu_backward", mutates_args=())
def _gelu_backward_op(grad: torch.Tensor, x: torch.Tensor, exact: bool) -> torch.Tensor:
    from . import fused
    return fused.gelu_backward_kernel(grad, x, exact)


@_gelu_backward_op.register_fake
def _(grad, x, exact):
    return x.new_empty(x.shape)


def gelu_forward(x):
    """:func:`pam.fused.gelu_forward` (the piecewise-affine GELU), traceable."""
    if _direct(x):
        from . import fused
        return fused.gelu_forward_kernel(x)
    return _gelu_forward_op(x)


def gelu_backward(grad, x, backward="exact"):
    """:func:`pam.fused.gelu_backward` (input gradient of the PA GELU), traceable."""
    if backward not in ("exact", "approx"):
        raise ValueError(f"backward must be 'exact' or 'approx', got {backward!r}")
    if _direct(grad, x):
        from . import fused
        return fused.gelu_backward_kernel(grad, x, backward == "exact")
    return _gelu_backward_op(grad, x, backward == "exact")


@torch.library.custom_op("pam::softmax_forward", mutates_args=())
def _softmax_forward_op(x: torch.Tensor, dim: int, off: int,
                        safe: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    from . import fused
    return fused.softmax_forward_kernel(x, dim, off, safe)


def _rows_like(x, dim):
    """A new tensor shaped like ``x``, laid out as the row kernels return it: ``dim``
    innermost in memory."""
    return x.new_empty(x.movedim(dim, -1).shape).movedim(-1, dim)


@_softmax_forward_op.register_fake
def _(x, dim, off, safe):
    from . import fused
    return _rows_like(x, dim), x.new_empty(fused._softmax_stats_shape(x, dim))


@torch.library.custom_op("pam::softmax_backward", mutates_args=())
def _softmax_backward_op(grad: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, dim: int,
                         off: int, safe: bool, exact: bool) -> torch.Tensor:
    from . import fused
    return fused.softmax_backward_kernel(grad, x, stats, dim, off, safe, exact)


@_softmax_backward_op.register_fake
def _(grad, x, stats, dim, off, safe, exact):
    return _rows_like(x, dim)


def softmax_forward(x, dim, off, safe):
    """:func:`pam.fused.softmax_forward` along non-negative ``dim`` with the integer offset
    constant ``off``, traceable: (result, row statistics)."""
    if _direct(x):
        from . import fused
        return fused.softmax_forward_kernel(x, dim, off, safe)
    return _softmax_forward_op(x, dim, off, safe)


def softmax_backward(grad, x, stats, dim, off, safe, exact):
    """:func:`pam.fused.softmax_backward` along non-negative ``dim`` given the forward's
    row statistics ``stats``, traceable."""
    if _direct(grad, x, stats):
        from . import fused
        return fused.softmax_backward_kernel(grad, x, stats, dim, off, safe, exact)
    return _softmax_backward_op(grad, x, stats, dim, off, safe, exact)


# --------------------------------------------------------------------------- fused optimizers
def direct_list(*lists):
    """:func:`_direct` for lists of tensors (other entries, e.g. Python numbers, pass)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in _PLAIN for ts in lists for t in ts if isinstance(t, torch.Tensor))


def _step_tensors(steps, like):
    return [s if isinstance(s, torch.Tensor)
            else torch.tensor(float(s), dtype=torch.float32, device=like.device)
            for s in steps]


@torch.library.custom_op("pam::adamw_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def _adamw_step_op(params: list[torch.Tensor], grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                   max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                   hyper: list[float], off: int, flags: int, moments: str) -> None:
    from . import fused
    fused.adamw_step_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                          tuple(hyper), off, flags, moments)


@_adamw_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, off, flags,
      moments):
    return None


@torch.library.custom_op("pam::sgd_step", mutates_args=("params", "momentum_buffers"))
def _sgd_step_op(params: list[torch.Tensor], grads: list[torch.Tensor],
                 momentum_buffers: list[torch.Tensor], first_step: list[bool],
                 hyper: list[float], off: int, flags: int) -> None:
    from . import fused
    fused.sgd_step_impl(params, grads, momentum_buffers, first_step, tuple(hyper), off,
                        flags)


@_sgd_step_op.register_fake
def _(params, grads, momentum_buffers, first_step, hyper, off, flags):
    return None


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, off,
               flags, moments):
    """:func:`pam.fused.adamw_step_impl` as the custom op ``pam::adamw_step`` (mutates
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs; steps as scalar tensors)."""
    _adamw_step_op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                   _step_tensors(steps, params[0]), list(hyper), off, flags, moments)


def sgd_step(params, grads, momentum_buffers, first_step, hyper, off, flags):
    """:func:`pam.fused.sgd_step_impl` as the custom op ``pam::sgd_step`` (mutates params
    and momentum_buffers)."""
    _sgd_step_op(params, grads, momentum_buffers, list(first_step), list(hyper), off, flags)


# --------------------------------------------------------------------------- scalars
def _f32_bits(x):
    with np.errstate(over="ignore"):
        return int(np.float32(x).view(np.int32))


def _f32(i):
    return float(np.int32(i).view(np.float32))


@torch._dynamo.assume_constant_result
def f32_bits_scalar(x):
    """The bit pattern (a Python int) of float32(x) for a Python number ``x``; a constant
    under ``torch.compile``."""
    return _f32_bits(x)


def static_int(n):
    """``n`` as a Python int; a symbolic size of a dynamic-shape trace is specialized (the
    graph is guarded on its value), so scalars derived from it are trace constants.
    (``operator.index`` specializes under Dynamo; ``int()`` would stay symbolic.)"""
    return operator.index(n)


@torch._dynamo.assume_constant_result
def pam_scalar(a, b, off=0):
    """PAM(a, b) of two Python numbers (rounded to float32 first) as a Python float.

    The same bits as ``pam.mul`` on float32 tensors (``off``: the offset constant of
    :func:`pam.dispatch.offset_constant`)."""
    return _f32(bits.mul_bits(_f32_bits(a), _f32_bits(b), off))


@torch._dynamo.assume_constant_result
def lmul_scalar(a, b, c):
    """L-Mul(a, b; c) of two Python numbers (rounded to float32 first) as a Python float:
    the same bits as the ``mul_lmul`` kernel (c = :func:`pam.bits.lmul_constant`)."""
    return _f32(bits.lmul_bits(_f32_bits(a), _f32_bits(b), c))


@torch._dynamo.assume_constant_result
def quantize_scalar(x, fmt, flush=False):
    """A Python number rounded to float32, then to operand format ``fmt``, as a Python
    float: the same bits as :func:`quantize`."""
    return _f32(bits.quantize_bits(_f32_bits(x), D.check_format(fmt), int(bool(flush))))


@torch._dynamo.assume_constant_result
def pad_scalar(a, b, off=0):
    """PAD(a, b) of two Python numbers (rounded to float32 first) as a Python float: the
    same bits as ``pam.div``."""
    return _f32(bits.div_bits(_f32_bits(a), _f32_bits(b), off))


@torch._dynamo.assume_constant_result
def pa_sqrt_scalar(a):
    """pa_sqrt(a) = pa_exp2(PAM(pa_log2(a), 0.5)) of a Python number as a Python float:
    the same bits as ``pam.sqrt`` on a float32 tensor (a >= 0; sqrt(+-0) = +0)."""
    half = bits.mul_bits(bits.log2_bits(_f32_bits(a)), _f32_bits(0.5), 0)
    return _f32(bits.exp2_bits(half))


# ------------------------------------------------------------------------- log_softmax, layer_norm
__all__ += ["log_softmax_forward", "log_softmax_backward", "layer_norm_forward",
            "layer_norm_backward"]


@torch.library.custom_op("pam::log_softmax_forward", mutates_args=())
def _log_softmax_forward_op(x: torch.Tensor, dim: int, off: int) -> torch.Tensor:
    from . import fused
    return fused.log_softmax_forward_kernel(x, dim, off)


@_log_softmax_forward_op.register_fake
def _(x, dim, off):
    return _rows_like(x, dim)


@torch.library.custom_op("pam::log_softmax_backward", mutates_args=())
def _log_softmax_backward_op(grad: torch.Tensor, x: torch.Tensor, dim: int, off: int,
                             exact: bool) -> torch.Tensor:
    from . import fused
    return fused.log_softmax_backward_kernel(grad, x, dim, off, exact)


@_log_softmax_backward_op.register_fake
def _(grad, x, dim, off, exact):
    return _rows_like(x, dim)


def log_softmax_forward(x, dim, off):
    """:func:`pam.fused.log_softmax_forward` along non-negative ``dim`` with the integer
    offset constant ``off``, traceable."""
    if _direct(x):
        from . import fused
        return fused.log_softmax_forward_kernel(x, dim, off)
    return _log_softmax_forward_op(x, dim, off)


def log_softmax_backward(grad, x, dim, off, exact):
    """:func:`pam.fused.log_softmax_backward` along non-negative ``dim``, traceable."""
    if _direct(grad, x):
        from . import fused
        return fused.log_softmax_backward_kernel(grad, x, dim, off, exact)
    return _log_softmax_backward_op(grad, x, dim, off, exact)


@torch.library.custom_op("pam::layer_norm_forward", mutates_args=())
def _layer_norm_forward_op(x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], n: int, nb: int, eps_b: int, off: int,
                           flags: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from . import fused
    return fused.layer_norm_forward_kernel(x, weight, bias, n, nb, eps_b, off, flags)


@_layer_norm_forward_op.register_fake
def _(x, weight, bias, n, nb, eps_b, off, flags):
    from . import fused
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(fused._ln_stats_shape(x, n)))


@torch.library.custom_op("pam::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(grad: torch.Tensor, x: torch.Tensor,
                            weight: Optional[torch.Tensor], stats: torch.Tensor, n: int,
                            nb: int, off: int, flags: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    from . import fused
    return fused.layer_norm_backward_kernel(grad, x, weight, stats, n, nb, off, flags)


@_layer_norm_backward_op.register_fake
def _(grad, x, weight, stats, n, nb, off, flags):
    from . import rows_bits
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    gw = x.new_empty(n if flags & rows_bits.LN_WEIGHT else 0)
    gb = x.new_empty(n if flags & rows_bits.LN_BIAS else 0)
    return gx, gw, gb


def layer_norm_forward(x, weight, bias, n, nb, eps_b, off, flags):
    """:func:`pam.fused.layer_norm_forward` of checked arguments (``nb``, ``eps_b``: bits
    of float32(n) and float32(eps)), traceable: (y, row statistics)."""
    if _direct(x, *(t for t in (weight, bias) if t is not None)):
        from . import fused
        return fused.layer_norm_forward_kernel(x, weight, bias, n, nb, eps_b, off, flags)
    return _layer_norm_forward_op(x, weight, bias, n, nb, eps_b, off, flags)


def layer_norm_backward(grad, x, weight, stats, n, nb, off, flags):
    """:func:`pam.fused.layer_norm_backward` of checked arguments given the forward's row
    statistics ``stats``: (gx, gw, gb) with gw / gb flat (empty without a weight / bias),
    traceable."""
    if _direct(grad, x, stats, *(t for t in (weight,) if t is not None)):
        from . import fused
        return fused.layer_norm_backward_kernel(grad, x, weight, stats, n, nb, off, flags)
    return _layer_norm_backward_op(grad, x, weight, stats, n, nb, off, flags)


# ------------------------------------------------------------------------- cross entropy
__all__ += ["cross_entropy_forward", "cross_entropy_backward"]


def _placeholder_weight(weight, like):
    return weight if weight is not None else like.new_zeros(1)


@torch.library.custom_op("pam::cross_entropy_forward", mutates_args=())
def _cross_entropy_forward_op(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                              has_weight: bool, ignore: int, a_b: int, s_b: int, off: int,
                              flags: int, red: int) -> torch.Tensor:
    from . import fused
    return fused.cross_entropy_forward_kernel(x, target, weight if has_weight else None,
                                              ignore, a_b, s_b, off, flags, red)


@_cross_entropy_forward_op.register_fake
def _(x, target, weight, has_weight, ignore, a_b, s_b, off, flags, red):
    from .xent_bits import REDUCE_NONE
    return x.new_empty(x.shape[0] if red == REDUCE_NONE else ())


@torch.library.custom_op("pam::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                               weight: torch.Tensor, has_weight: bool, ignore: int, a_b: int,
                               s_b: int, off: int, flags: int, red: int) -> torch.Tensor:
    from . import fused
    return fused.cross_entropy_backward_kernel(grad, x, target,
                                               weight if has_weight else None, ignore, a_b,
                                               s_b, off, flags, red)


@_cross_entropy_backward_op.register_fake
def _(grad, x, target, weight, has_weight, ignore, a_b, s_b, off, flags, red):
    return x.new_empty(x.shape)


def cross_entropy_forward(x, target, weight, ignore, a_b, s_b, off, flags, red):
    """:func:`pam.fused.cross_entropy_forward` of checked arguments (``weight`` may be
    None; the flags, smoothing bits and reduction code of
    :func:`pam.fused.cross_entropy_args`), traceable."""
    if _direct(x, target) and (weight is None or _direct(weight)):
        from . import fused
        return fused.cross_entropy_forward_kernel(x, target, weight, ignore, a_b, s_b, off,
                                                  flags, red)
    return _cross_entropy_forward_op(x, target, _placeholder_weight(weight, x),
                                     weight is not None, ignore, a_b, s_b, off, flags, red)


def cross_entropy_backward(grad, x, target, weight, ignore, a_b, s_b, off, flags, red):
    """:func:`pam.fused.cross_entropy_backward` of checked arguments, traceable."""
    if _direct(grad, x, target) and (weight is None or _direct(weight)):
        from . import fused
        return fused.cross_entropy_backward_kernel(grad, x, target, weight, ignore, a_b,
                                                   s_b, off, flags, red)
    return _cross_entropy_backward_op(grad, x, target, _placeholder_weight(weight, x),
                                      weight is not None, ignore, a_b, s_b, off, flags, red)


# ------------------------------------------------------------------------- attention core
__all__ += ["attention_forward", "attention_backward"]


@torch.library.custom_op("pam::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor, causal: bool, mode: int, scb: int,
                          off: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    from . import fused
    return fused.attention_forward_kernel(q, k, v, mask, causal, mode, scb, off)


@_attention_forward_op.register_fake
def _(q, k, v, mask, causal, mode, scb, off):
    P, L = q.shape[0], q.shape[1]
    S, Ev = k.shape[1], v.shape[2]
    return (q.new_empty((P, L, Ev)), q.new_empty((P, L, S)), q.new_empty((P, L, S)),
            q.new_empty((P, L, 2)))


@torch.library.custom_op("pam::attention_backward", mutates_args=())
def _attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                           probs: torch.Tensor, stats: torch.Tensor, causal: bool, mode: int,
                           scb: int, off: int,
                           exact: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import fused
    return fused.attention_backward_kernel(grad, q, k, v, mask, scores, probs, stats, causal,
                                           mode, scb, off, exact)


@_attention_backward_op.register_fake
def _(grad, q, k, v, mask, scores, probs, stats, causal, mode, scb, off, exact):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def attention_forward(q, k, v, mask, causal, mode, scb, off):
    """:func:`pam.fused.attention_forward_kernel` (heads (P, L, E), (P, S, E), (P, S, Ev);
    mask and mode of :func:`pam.fused.attention_args`), traceable:
    (out, scores, probabilities, row statistics)."""
    if _direct(q, k, v, mask):
        from . import fused
        return fused.attention_forward_kernel(q, k, v, mask, causal, mode, scb, off)
    return _attention_forward_op(q, k, v, mask, causal, mode, scb, off)


def attention_backward(grad, q, k, v, mask, scores, probs, stats, causal, mode, scb, off,
                       exact):
    """:func:`pam.fused.attention_backward_kernel`, traceable: (dq, dk, dv)."""
    if _direct(grad, q, k, v, mask, scores, probs, stats):
        from . import fused
        return fused.attention_backward_kernel(grad, q, k, v, mask, scores, probs, stats,
                                               causal, mode, scb, off, exact)
    return _attention_backward_op(grad, q, k, v, mask, scores, probs, stats, causal, mode,
                                  scb, off, exact)
