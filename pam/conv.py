"""PAM convolutions: ``conv1d`` and ``conv2d`` with autograd, and raw autograd-free kernels.

``conv1d``/``conv2d`` follow ``torch.nn.functional`` (cross-correlation; stride, padding
as ints, tuples, ``"same"`` or ``"valid"``, dilation, groups; batched or unbatched input;
optional bias) with every product a PAM product. Per output element the sum is float32,
from +0.0, over the input channels of the group, then kh, then kw, increasing; the bias is
added once at the end with one float addition. Zero padding takes part as +0.0 inputs.
The exact definitions and the backward orders are in :mod:`pam.kernels.cpu_conv`; CPU
and CUDA give the same bits. A 1-D convolution is the 2-D one with H = 1.

``backward``: ``"exact"`` (default) differentiates the piecewise-affine products exactly
(terms PAM(grad, slope)); ``"approx"`` uses PAM(grad, w) for the input and PAM(grad, x)
for the weight (a transposed convolution and a correlation with PAM products). The bias
gradient is a plain sum of the output gradient (additions only).

Memory: the output, weight-sized tables and per-thread tile buffers of bounded size
(:mod:`pam.kernels.cpu_conv`); never an im2col matrix.

``conv_forward`` and ``conv_backward`` are the same computations on plain tensors, without
autograd, with ``aten.convolution`` / ``aten.convolution_backward`` style arguments, for
callers that dispatch below autograd.
"""
import torch

from . import dispatch as D
from ._internal import without_layers
from . import families as FAM
from . import library as L
from .ops import _check_mode, _multiplier

__all__ = ["conv1d", "conv2d", "conv_forward", "conv_backward"]


# --------------------------------------------------------------------------- geometry
def _pair(value, name, dims, minimum):
    """``value`` (int or sequence of ``dims`` ints) as a tuple of ``dims`` ints >= minimum."""
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * dims
    else:
        try:
            values = tuple(value)
        except TypeError:
            values = None
        if (values is None or len(values) not in (1, dims)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
            raise ValueError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}")
        values = values * dims if len(values) == 1 else values
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def _output_size(size, lo, hi, dilation, kernel, stride):
    return (size + lo + hi - dilation * (kernel - 1) - 1) // stride + 1


def _forward_bits(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind="pam"):
    """(N, C, H, W) x (O, C/groups, KH, KW) convolution with ``kind`` ("pam" or "lmul")
    products, float32, no bias/autograd."""
    N, _, H, W = x4.shape
    O, _, KH, KW = w4.shape
    sizes = [_output_size(s, lo, hi, d, k, st) for s, lo, hi, d, k, st in
             zip((H, W), pad_lo, pad_hi, dilation, (KH, KW), stride)]
    if min(sizes) < 1:
        extent = (dilation[0] * (KH - 1) + 1, dilation[1] * (KW - 1) + 1)
        raise ValueError(f"convolution output would be empty: input spatial size "
                         f"{(H, W)} with padding {pad_lo}/{pad_hi} is smaller than the "
                         f"dilated kernel {extent}")
    return L.conv_forward(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind)


def _backward_bits(grad4, x4, w4, stride, pad_lo, dilation, groups, off, exact,
                   need_input, need_weight, kind="pam"):
    """(grad_input, grad_weight) of ``_forward_bits`` (None where not needed).

    L-Mul's exact derivative d/dx lmul(x, w) = sign(w) 2^E(w) does not depend on x: its
    exact backward is the approximate PAM backward with the power-of-two parts of the
    operands (PAM by a power of two is exact)."""
    if kind == "lmul" and exact:
        x4, w4 = L.unary_map("pow2_part", x4), L.unary_map("pow2_part", w4)
        off, exact, kind = 0, False, "pam"
    geometry = (stride, pad_lo, dilation, groups, bool(exact), off, kind)
    gx = L.conv_grad_input(grad4, x4, w4, *geometry) if need_input else None
    gw = L.conv_grad_weight(grad4, x4, w4, *geometry) if need_weight else None
    return gx, gw


def _add_bias(out4, bias):
    if bias is not None:
        out4 = out4 + bias.detach().reshape(1, -1, 1, 1)
    return out4


# --------------------------------------------------------------------------- raw API
def _raw_geometry(x, w, stride, padding, dilation):
    """4-D views and 2-D geometry of an (N, C, L) or (N, C, H, W) raw call."""
    if x.dim() not in (3, 4) or w.dim() != x.dim():
        raise ValueError(f"expected x (N, C, L) with w (O, C/groups, K) or x (N, C, H, W) "
                         f"with w (O, C/groups, KH, KW); got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}")
    dims = x.dim() - 2
    stride = _pair(stride, "stride", dims, 1)
    padding = _pair(padding, "padding", dims, 0)
    dilation = _pair(dilation, "dilation", dims, 1)
    if dims == 1:
        return (x.unsqueeze(2), w.unsqueeze(2), (1, *stride), (0, *padding),
                (1, *dilation))
    return x, w, stride, padding, dilation


def _check_groups(x4, w4, groups):
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    C, O, Cg = x4.shape[1], w4.shape[0], w4.shape[1]
    if O % groups:
        raise ValueError(f"out_channels ({O}) must be divisible by groups ({groups})")
    if Cg * groups != C:
        raise ValueError(f"input has {C} channels but the weight expects "
                         f"{Cg} x groups ({groups}) = {Cg * groups}")


def conv_forward(x, w, bias, stride, padding, dilation, groups, off, kind="pam"):
    """PAM convolution of plain float32 tensors, no autograd (``aten.convolution`` style).

    x: (N, C, L) or (N, C, H, W); w: (O, C // groups, K) or (O, C // groups, KH, KW);
    bias: (O,) or None; stride, padding (symmetric), dilation: ints or int tuples of one
    entry per spatial dimension; ``off``: the PAM offset constant
    (:func:`pam.dispatch.offset_constant`, or L-Mul's constant for ``kind="lmul"``).
    Returns (N, O, OL) or (N, O, OH, OW).
    """
    x4, w4, stride, padding, dilation = _raw_geometry(x, w, stride, padding, dilation)
    _check_groups(x4, w4, groups)
    out = _add_bias(_forward_bits(x4, w4, stride, padding, padding, dilation, groups, off,
                                  kind), bias)
    return out.squeeze(2) if x.dim() == 3 else out


def conv_backward(grad, x, w, stride, padding, dilation, groups, off, exact,
                  output_mask=(True, True, True), kind="pam"):
    """(grad_input, grad_weight, grad_bias) of ``conv_forward``, no autograd.

    ``exact``: True for the exact derivative of the PAM products, False for the approximate
    one (see the module docstring). ``output_mask`` says which of the three to compute;
    the others are None. grad_bias is ``grad`` summed over the batch and spatial dimensions.
    """
    x4, w4, stride, padding, dilation = _raw_geometry(x, w, stride, padding, dilation)
    _check_groups(x4, w4, groups)
    grad4 = grad.unsqueeze(2) if x.dim() == 3 else grad
    gx, gw = _backward_bits(grad4, x4, w4, stride, padding, dilation, groups, off, exact,
                            output_mask[0], output_mask[1], kind)
    if x.dim() == 3:
        gx = gx.squeeze(2) if gx is not None else None
        gw = gw.squeeze(2) if gw is not None else None
    gbias = grad.sum(dim=[d for d in range(grad.dim()) if d != 1]) if output_mask[2] else None
    return gx, gw, gbias


# --------------------------------------------------------------------------- autograd
class _Conv(torch.autograd.Function):
    """PAM conv of 4-D operands; geometry = (stride, pad_lo, pad_hi, dilation, groups)."""

    @staticmethod
    def forward(ctx, x4, w4, bias, geometry, off, exact, kind):
        stride, pad_lo, pad_hi, dilation, groups = geometry
        ctx.save_for_backward(x4, w4)
        ctx.geometry, ctx.off, ctx.exact, ctx.kind = geometry, off, exact, kind
        out = _forward_bits(x4, w4, stride, pad_lo, pad_hi, dilation, groups, off, kind)
        return _add_bias(out, bias)

    @staticmethod
    @without_layers
    def backward(ctx, grad):
        x4, w4 = ctx.saved_tensors
        stride, pad_lo, _, dilation, groups = ctx.geometry
        gx, gw = _backward_bits(grad, x4, w4, stride, pad_lo, dilation, groups, ctx.off,
                                ctx.exact, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                ctx.kind)
        gbias = grad.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return gx, gw, gbias, None, None, None, None


def _conv(input, weight, bias, stride, padding, dilation, groups, offset, backward, dims,
          family="pam", operands="float32"):
    name = f"conv{dims}d"
    input = D.check_float32(input, "input")
    weight = D.check_float32(weight, "weight")
    D.check_same_device(input=input, weight=weight)
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(f"{name} expects a {dims + 1}-D (unbatched) or {dims + 2}-D "
                         f"(batched) input, got shape {tuple(input.shape)}")
    if weight.dim() != dims + 2:
        raise ValueError(f"{name} expects a {dims + 2}-D weight (out_channels, "
                         f"in_channels/groups, kernel...), got shape {tuple(weight.shape)}")
    mult = _multiplier(family, operands, offset)
    exact = _check_mode(backward) == "exact"
    input, weight = FAM.round_operand(input, mult), FAM.round_operand(weight, mult)
    if mult.kind == "float":
        torch_conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv1d
        return torch_conv(input, weight, bias, stride, padding, dilation, groups)
    stride = _pair(stride, "stride", dims, 1)
    dilation = _pair(dilation, "dilation", dims, 1)
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            pad_lo = pad_hi = (0,) * dims
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' is not supported for strided "
                                 f"convolutions (stride={stride})")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pad_lo = tuple(t // 2 for t in total)
            pad_hi = tuple(t - t // 2 for t in total)
        else:
            raise ValueError(f"padding must be 'valid', 'same', an int or a tuple of "
                             f"{dims} ints, got {padding!r}")
    else:
        pad_lo = pad_hi = _pair(padding, "padding", dims, 0)
    batched = input.dim() == dims + 2
    x = input if batched else input.unsqueeze(0)
    w = weight
    if dims == 1:
        x, w = x.unsqueeze(2), w.unsqueeze(2)
        stride, dilation = (1, *stride), (1, *dilation)
        pad_lo, pad_hi = (0, *pad_lo), (0, *pad_hi)
    _check_groups(x, w, groups)
    if bias is not None:
        bias = D.check_float32(bias, "bias")
        D.check_same_device(input=input, bias=bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    out = _Conv.apply(x, w, bias, (stride, pad_lo, pad_hi, dilation, groups), mult.off, exact,
                      mult.kind)
    if dims == 1:
        out = out.squeeze(2)
    return out if batched else out.squeeze(0)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           offset=None, backward="exact", family="pam", operands="float32"):
    """``torch.nn.functional.conv2d`` with PAM products (see the module docstring).

    input: (N, C, H, W) or (C, H, W); weight: (O, C // groups, KH, KW); bias: (O,) or None.
    padding: int, pair, ``"valid"`` (no padding) or ``"same"`` (output size = input size,
    stride 1 only; an odd total padding puts the extra zero after the input, as torch).
    """
    return _conv(input, weight, bias, stride, padding, dilation, groups, offset, backward, 2,
                 family, operands)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
           offset=None, backward="exact", family="pam", operands="float32"):
    """``torch.nn.functional.conv1d`` with PAM products: conv2d with H = 1.

    input: (N, C, L) or (C, L); weight: (O, C // groups, K); bias: (O,) or None.
    """
    return _conv(input, weight, bias, stride, padding, dilation, groups, offset, backward, 1,
                 family, operands)
