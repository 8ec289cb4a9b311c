"""Neural-network functions on PAM arithmetic (exposed as ``pam.nn.functional``).

Every function mirrors its ``torch.nn.functional`` namesake and is built only from
additions, subtractions, comparisons, selections, reductions by summation or maximum,
index operations and the PAM core ops (:func:`pam.mul`, :func:`pam.div`, :func:`pam.exp2`,
:func:`pam.log2`, :func:`pam.pow`, :func:`pam.matmul`). No native float multiply, divide,
exp, log, pow or sqrt reaches ATen, in the forward or in the backward pass
(``pam.audit.no_float_multiply`` checks this in the tests). Scalar constants (1/N, the
dropout scale 1/(1-p), the attention scale 1/sqrt(d), label-smoothing weights) are
computed with the PAM ops on float32 scalar tensors too.

Backward. Every composite is a chain of PAM ops whose autograd rules are in
:mod:`pam.ops`; its backward is the chain of its pieces' backwards, so ``backward="exact"``
(default) gives the true derivative of the piecewise-affine function and
``backward="approx"`` (the paper's choice) uses, piece by piece, PAM as if it were the
exact product. The maximum subtracted in (log-)softmax is detached: it is floored to an
integer and the function does not depend on it except through rounding.

Fused rows. softmax (and the attention softmax), log_softmax (and so cross_entropy) and
layer_norm run as one fused row kernel per pass (:mod:`pam.fused`, definitions in
:mod:`pam.rows_bits`), with the composite's PA operations in the same order; the one
change of definition is that their row sums (and the reductions of broadcast gradients,
and layer norm's weight / bias gradients over rows) are float32 sums from +0 in increasing
index instead of torch's vectorized order: portable, and the CUDA kernels' order. The
results differ from the earlier torch-order chains (``_softmax_chain``,
``_log_softmax_chain``, ``_layer_norm_chain``) by less than 5e-7 relative to the largest
output; see :mod:`pam.rows_bits` for the gradients.

``offset`` is applied to the PAM products of two data operands (matmuls, squares in
layer_norm, the gain, the log2(e) scaling of softmax, class weights); divisions (PAD) and
products by powers of two never take it.

Accuracy against the float torch counterparts (measured by
``tests/test_functional.py::test_accuracy_table``, which pins these numbers x 1.25; no
offset). Error = |pam - torch| / rms(torch), elementwise over the output (forward) or over
the input gradient of sum(out * R), R ~ N(0, 1) (backward); "max / mean":

==============  ==================================  ===============  ===============  ===============
op              inputs                              forward          grad approx      grad exact
==============  ==================================  ===============  ===============  ===============
softmax         x ~ N(0, 3^2), (64, 32)             1.12 / 0.031     2.43 / 0.041     11.3 / 0.132
log_softmax     same                                0.222 / 0.034    0.842 / 0.016    4.90 / 0.279
cross_entropy   same logits, 32 classes, ls 0.1     0.0003 (scalar)  0.691 / 0.019    7.67 / 0.140
layer_norm      x ~ N(1, 2^2), (64, 48), affine     0.254 / 0.021    0.400 / 0.025    4.72 / 0.168
gelu            x ~ U(-4, 4), 4096                  0.0078 / 0.0037  0.553 / 0.028    (= approx)
sdpa (causal)   q, k, v ~ N(0, 1), (2, 4, 16, 16)   0.712 / 0.045    1.48 / 0.127     4.76 / 0.338
linear          x ~ N(0,1) (32, 64), W ~ N(0, 1/64)  0.131 / 0.025    0.198 / 0.038    1.31 / 0.206
==============  ==================================  ===============  ===============  ===============

Softmax's large max is relative to the rms of the probabilities (~0.1): the PA error of
PAM(x, log2 e) grows with |x - max| (11 % of it at worst), so with logits spread over
+-9 a probability can be off by ~0.1 absolute. Softmax keeps the order of its inputs
and sums to [1, 1.125]. The exact backward (true derivative of the PA function, power-
of-two slopes) is much further from torch's gradient than the approximate one: the
paper's choice of ``backward="approx"`` for training is borne out here.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from . import dispatch as D
from ._internal import without_layers
from . import fused
from . import library as L
from . import ops as P
from .rows_bits import LN_EXACT

__all__ = ["linear", "matmul", "bmm", "softmax", "log_softmax", "cross_entropy",
           "nll_loss", "layer_norm", "scaled_dot_product_attention", "dropout", "relu",
           "gelu", "sigmoid", "tanh", "silu", "mean", "attention_scale", "GELU_KNOTS", "GELU_SLOPE_CHANGES", "ACCURACY"]

LOG2_E = P.LOG2_E
MEAN_REFINEMENTS = 2       # extra PAD passes for layer_norm's mean when N is not 2^k

# Measured accuracy, (forward max, forward mean) of the table in the module docstring.
ACCURACY = {"softmax": (1.1162, 0.0313), "log_softmax": (0.2221, 0.0335),
            "cross_entropy": (0.0003, 0.0003), "layer_norm": (0.2540, 0.0206),
            "gelu": (0.0078, 0.0037), "sdpa_causal": (0.7123, 0.0449),
            "linear": (0.1310, 0.0246)}

# ----------------------------------------------------------------------------- GELU
# Piecewise-affine GELU: f(x) = sum_j d_j * relu(x - k_j). Every slope change d_j is a
# power of two, so every product is an exact PAM and f is exactly piecewise affine with
# slopes 0, -1/16, -1/8, 0, 1/8, 1/4, 1/2, 3/4, 1, 9/8, 1 (left to right). The knots were
# fitted (Nelder-Mead on the maximum absolute error over [-8, 8]) with these slopes fixed.
# Error against the true GELU x * Phi(x): max |f - gelu| = 0.0129 (at x = 2.28 and
# for x -> +inf, where f(x) = x - 0.0128), mean |f - gelu| = 0.0061 over x ~ U(-4, 4);
# f(x) = 0 for x <= -2.819 (true GELU there is in (-0.0068, 0)).
GELU_KNOTS = (-2.81858, -1.66256, -0.92053, -0.65426, -0.38807, -0.18968, 0.21499,
              0.50752, 1.04069, 2.2813)
GELU_SLOPE_CHANGES = (-0.0625, -0.0625, 0.125, 0.125, 0.125, 0.25, 0.25, 0.25, 0.125,
                      -0.125)


def _scalar(value, like):
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _pam_scalar(a, b):
    """PAM product of two Python numbers, as a Python float (float32 result); pure Python
    on the bit patterns (no tensor, no ``.item()``: a constant under ``torch.compile``)."""
    return L.pam_scalar(a, b)


def _pad_scalar(a, b):
    """PAD quotient of two Python numbers, as a Python float (float32 result); pure
    Python on the bit patterns, like :func:`_pam_scalar`."""
    return L.pad_scalar(a, b)


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype torch.float32, got {x.dtype}")
    return x


# ----------------------------------------------------------------------------- linear
def linear(input, weight, bias=None, offset=None, backward="exact", family="pam",
           operands="float32"):
    """y = input W^T + bias with a PAM matmul (see :func:`pam.linear`)."""
    return P.linear(input, weight, bias, offset=offset, backward=backward, family=family,
                    operands=operands)


def matmul(input, other, offset=None, backward="exact", family="pam", operands="float32"):
    """PAM matrix product with ``torch.matmul`` semantics (see :func:`pam.matmul`)."""
    return P.matmul(input, other, offset=offset, backward=backward, family=family,
                    operands=operands)


def bmm(input, mat2, offset=None, backward="exact", family="pam", operands="float32"):
    """Batched PAM product of (b, n, k) and (b, k, m) tensors, like ``torch.bmm``."""
    if input.dim() != 3 or mat2.dim() != 3 or input.shape[0] != mat2.shape[0]:
        raise ValueError(f"bmm expects (b, n, k) and (b, k, m) tensors with equal b, got "
                         f"{tuple(input.shape)} and {tuple(mat2.shape)}")
    return P.matmul(input, mat2, offset=offset, backward=backward, family=family,
                    operands=operands)


def mean(input, dim=None, keepdim=False, backward="exact"):
    """Mean as PAD(sum, N): exact when N is a power of two, else up to 12.5 % too large.

    ``dim=None`` or an empty ``dim=()`` / ``[]`` reduce over every dimension (as torch.mean;
    ``keepdim`` applies); a mean over zero elements is NaN (as torch)."""
    _check_tensor(input, "input")
    if dim is not None and not isinstance(dim, int) and len(tuple(dim)) == 0:
        dim = None if not keepdim else tuple(range(input.dim()))
    if dim is None:
        n = input.numel()
        s = input.sum()
    else:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        n = 1
        for d in dims:
            n = n * input.shape[d]          # integer arithmetic
        s = input.sum(dim=dims, keepdim=keepdim)
    return P.div(s, float(n), backward=backward)


# ----------------------------------------------------------------------------- softmax
def _shifted_log2(input, dim, offset, backward):
    """x' = PAM(x, log2 e) - floor(max x') along ``dim`` (the max detached).

    Rows whose maximum is not finite (all -inf) are shifted by 0 instead, so they stay
    -inf rather than becoming NaN here.
    """
    xl = P.mul(input, LOG2_E, offset=offset, backward=backward)
    with torch.no_grad():
        m = xl.amax(dim=dim, keepdim=True)
        m = torch.where(torch.isfinite(m), torch.floor(m), torch.zeros_like(m))
    return xl - m


def _softmax(input, dim, offset, backward, safe):
    """PA softmax as one fused row kernel per pass (pam.fused.softmax_forward /
    softmax_backward); ``safe``: a row whose sum is 0 gives zeros (attention)."""
    _check_tensor(input, "input")
    if backward not in P.BACKWARD_MODES:
        raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
    if input.numel() == 0:  # nothing to normalize (a 0-size dim): an empty result, as torch
        return input.clone()
    if input.dim() == 0:
        return _softmax(input.reshape(1), 0, offset, backward, safe).reshape(())
    d = fused._dim(input, dim)
    off = D.offset_constant(offset)
    if not (torch.is_grad_enabled() and input.requires_grad):
        return L.softmax_forward(input, d, off, bool(safe))[0]
    return _SoftmaxRows.apply(input, d, off, bool(safe), backward == "exact")


class _SoftmaxRows(torch.autograd.Function):
    """softmax as one row kernel per pass (pam.fused); the backward reads the rows'
    statistics (m, s) the forward kernel wrote instead of recomputing them."""

    @staticmethod
    def forward(ctx, x, dim, off, safe, exact):
        y, stats = L.softmax_forward(x, dim, off, safe)
        ctx.save_for_backward(x, stats)
        ctx.args = (dim, off, safe, exact)
        return y

    @staticmethod
    @without_layers
    @once_differentiable
    def backward(ctx, grad):
        x, stats = ctx.saved_tensors
        return (L.softmax_backward(grad.contiguous(), x, stats, *ctx.args), None, None, None,
                None)


def _softmax_chain(input, dim, offset, backward, safe):
    """softmax as the chain of PAM ops of earlier versions (row sum in torch's order):
    the definition the fused kernel restates, kept for validation/bench_rows.py."""
    _check_tensor(input, "input")
    if input.numel() == 0:
        return input.clone()
    z = _shifted_log2(input, dim, offset, backward)
    e = P.exp2(z, backward=backward)
    s = e.sum(dim=dim, keepdim=True)
    if safe:
        s = torch.where(s == 0, torch.ones_like(s), s)
    return P.div(e, s, backward=backward)


def softmax(input, dim=-1, offset=None, backward="exact"):
    """PA softmax: x' = PAM(x, log2 e), subtract floor(max x'), pa_exp2, PAD by the sum.

    -inf entries get probability 0; a row that is entirely -inf gives NaN (as torch). An
    empty input (e.g. a 0-size ``dim``) gives an empty result.
    pa_exp2(y - n) = 2^-n pa_exp2(y) for integer n, so the shift changes the result only
    through the rounding of y - n (last bits of entries far below the max). One fused row
    kernel per pass (:func:`pam.fused.softmax_forward` / ``softmax_backward``): the row
    sums are float32 sums from +0 in increasing index (earlier versions summed in torch's
    order; see :func:`_softmax_chain`).
    """
    return _softmax(input, dim, offset, backward, safe=False)


def log_softmax(input, dim=-1, offset=None, backward="exact"):
    """PA log-softmax: PAD((x' - m) - pa_log2(sum pa_exp2(x' - m)), log2 e).

    x' = PAM(x, log2 e) and m = floor(max x'). -inf entries stay -inf; an all -inf row
    gives NaN (as torch). An empty input gives an empty result. One fused row kernel per
    pass (:func:`pam.fused.log_softmax_forward` / ``log_softmax_backward``): the row sum
    is a float32 sum from +0 in increasing index (earlier versions summed in torch's
    order; see :func:`_log_softmax_chain`, kept as the reference of that definition).
    """
    _check_tensor(input, "input")
    if backward not in P.BACKWARD_MODES:
        raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
    if input.numel() == 0:
        return input.clone()
    if input.dim() == 0:
        return log_softmax(input.reshape(1), 0, offset, backward).reshape(())
    d = fused._dim(input, dim)
    off = D.offset_constant(offset)
    if not (torch.is_grad_enabled() and input.requires_grad):
        return L.log_softmax_forward(input, d, off)
    return _LogSoftmaxRows.apply(input, d, off, backward == "exact")


class _LogSoftmaxRows(torch.autograd.Function):
    """log_softmax as one row kernel per pass (pam.fused)."""

    @staticmethod
    def forward(ctx, x, dim, off, exact):
        ctx.save_for_backward(x)
        ctx.args = (dim, off, exact)
        return L.log_softmax_forward(x, dim, off)

    @staticmethod
    @without_layers
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return L.log_softmax_backward(grad.contiguous(), x, *ctx.args), None, None, None


def _log_softmax_chain(input, dim=-1, offset=None, backward="exact"):
    """log_softmax as the chain of PAM ops of earlier versions (row sum in torch's order):
    the definition the fused kernel restates, kept for validation/bench_rows.py."""
    _check_tensor(input, "input")
    if input.numel() == 0:
        return input.clone()
    z = _shifted_log2(input, dim, offset, backward)
    e = P.exp2(z, backward=backward)
    lse = P.log2(e.sum(dim=dim, keepdim=True), backward=backward)
    return P.div(z - lse, LOG2_E, backward=backward)


# ----------------------------------------------------------------------------- losses
_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss, reduction, denom, backward):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return P.div(total, denom, backward=backward)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, offset=None, backward="exact"):
    """Cross entropy on PA log_softmax, with torch's semantics.

    ``input``: (C,), (N, C) or (N, C, d1, ...) logits; ``target``: class indices of shape
    (), (N,) or (N, d1, ...) (int64), or class probabilities with the shape of ``input``.
    ``weight``: optional (C,) class weights; ``ignore_index`` (index targets only);
    ``reduction``: "mean" (weighted mean over non-ignored targets, as torch), "sum" or
    "none"; ``label_smoothing`` in [0, 1]: the loss is (1 - e) nll + e/C * smooth, where
    smooth = -sum_c w_c log p_c, both reduced like torch (mean: divided by the summed
    weights of the non-ignored targets). All products by weights and smoothing factors
    are PAM, all divisions PAD. A mean over zero non-ignored targets is NaN (as torch).

    Class-index targets run as one fused kernel per pass (:func:`pam.fused.cross_entropy_forward`
    / ``cross_entropy_backward``, definition in :mod:`pam.xent_bits`): every sum (over
    classes for the smoothing term, over rows for the reductions and the mean's weights)
    is a float32 sum from +0 in increasing index; earlier versions summed in torch's order
    (:func:`_cross_entropy_chain`, still used when the class weights require grad).
    Probability targets run the composite (log_softmax fused, the rest op by op).
    """
    _check_tensor(input, "input")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (the classes)")
    if input.dim() == 1:
        input = input.unsqueeze(0)
        target = target.unsqueeze(0)
    C = input.shape[1]
    if weight is not None:
        _check_tensor(weight, "weight")
        if weight.shape != (C,):
            raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
    x = input.movedim(1, -1)                       # (N, d..., C)
    if target.dtype.is_floating_point:             # class probabilities
        return _cross_entropy_probabilities(x, target, input.shape, weight, reduction, ls,
                                            offset, backward)
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold class indices (an integer dtype) or class "
                        f"probabilities (float32), got {target.dtype}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(x.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    target = target.long()
    fused.check_class_indices(target, C, ignore_index)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return _cross_entropy_chain(x, target, weight, ignore_index, reduction, ls, offset,
                                    backward)
    flags, a_b, s_b, red = fused.cross_entropy_args(weight, C, reduction, ls, backward)
    args = (target.reshape(-1), None if weight is None else weight.detach(),
            int(ignore_index), a_b, s_b, D.offset_constant(offset), flags, red)
    x2 = x.reshape(-1, C)
    if torch.is_grad_enabled() and x2.requires_grad:
        loss = _CrossEntropyRows.apply(x2, *args)
    else:
        loss = L.cross_entropy_forward(x2, *args)
    return loss.reshape(target.shape) if reduction == "none" else loss


class _CrossEntropyRows(torch.autograd.Function):
    """Cross entropy with class-index targets as one kernel per pass (pam.fused)."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore, a_b, s_b, off, flags, red):
        ctx.save_for_backward(x, target, weight)
        ctx.args = (ignore, a_b, s_b, off, flags, red)
        return L.cross_entropy_forward(x, target, weight, ignore, a_b, s_b, off, flags, red)

    @staticmethod
    @without_layers
    @once_differentiable
    def backward(ctx, grad):
        x, target, weight = ctx.saved_tensors
        gx = L.cross_entropy_backward(grad.contiguous(), x, target, weight, *ctx.args)
        return (gx,) + (None,) * 8


def _weighted_log_probs(x, weight, offset, backward):
    logp = log_softmax(x, dim=-1, offset=offset, backward=backward)
    if weight is None:
        return logp
    return P.mul(logp, weight, offset=offset, backward=backward)


def _cross_entropy_probabilities(x, target, input_shape, weight, reduction, ls, offset,
                                 backward):
    """The probability-target cross entropy (composite; sums over classes in torch's
    order)."""
    if target.shape != input_shape:
        raise ValueError(f"probability target must have the input's shape "
                         f"{tuple(input_shape)}, got {tuple(target.shape)}")
    _check_tensor(target, "target")
    C = input_shape[1]
    wlogp = _weighted_log_probs(x, weight, offset, backward)
    t = target.movedim(1, -1)
    if ls > 0:
        t = (P.mul(t, 1.0 - ls, backward=backward)
             + _scalar(_pad_scalar(ls, C), t))
    loss = -(P.mul(wlogp, t, offset=offset, backward=backward).sum(dim=-1))
    count = float(loss.numel())
    return _reduce(loss, reduction, count, backward)


def _cross_entropy_chain(x, target, weight, ignore_index, reduction, ls, offset, backward):
    """Index-target cross entropy as the composite of earlier versions (fused log_softmax,
    the rest op by op; sums in torch's order): the definition the fused kernel restates
    with sequential sums, used when the class weights require grad."""
    C = x.shape[-1]
    wlogp = _weighted_log_probs(x, weight, offset, backward)
    ignore = target == ignore_index
    t = torch.where(ignore, torch.zeros_like(target), target)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    picked = wlogp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(ignore, zero, -picked)
    if reduction == "mean":
        if weight is not None:
            denom = torch.where(ignore, zero, weight[t]).sum()
        else:
            denom = (~ignore).sum().to(torch.float32)
    else:
        denom = None
    loss = _reduce(nll, reduction, denom, backward)
    if ls == 0.0:
        return loss
    smooth = torch.where(ignore, zero, -wlogp.sum(dim=-1))
    smooth = _reduce(smooth, reduction, denom, backward)
    return (P.mul(loss, 1.0 - ls, backward=backward)
            + P.mul(smooth, _pad_scalar(ls, C), backward=backward))


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean",
             backward="exact"):
    """Negative log-likelihood of log-probabilities ``input`` (N, C) for index targets."""
    _check_tensor(input, "input")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if input.dim() == 1:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    x = input.movedim(1, -1)
    if weight is not None:
        x = P.mul(x, _check_tensor(weight, "weight"), backward=backward)
    ignore = target == ignore_index
    t = torch.where(ignore, torch.zeros_like(target), target).long()
    zero = torch.zeros((), dtype=torch.float32, device=input.device)
    nll = torch.where(ignore, zero, -x.gather(-1, t.unsqueeze(-1)).squeeze(-1))
    denom = None
    if reduction == "mean":
        denom = (torch.where(ignore, zero, weight[t]).sum() if weight is not None
                 else (~ignore).sum().to(torch.float32))
    return _reduce(nll, reduction, denom, backward)


# ----------------------------------------------------------------------------- layer norm
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, offset=None,
               backward="exact"):
    """PA LayerNorm over the trailing ``normalized_shape`` dimensions.

    mean = PAD(sum x, N) (refined MEAN_REFINEMENTS = 2 times when N is not a power of two:
    mean += PAD(sum(x - mean), N), error <= 12.5 %^3 = 0.2 % of |mean|); xc = x - mean;
    var = PAD(sum PAM(xc, xc), N) (biased, as torch); y = PAD(xc, pow(var + eps, 0.5));
    then PAM by ``weight`` and + ``bias``. PAD by N is exact when N is a power of two. A
    constant row gives 0 (then the bias). One fused row kernel per pass
    (:func:`pam.fused.layer_norm_forward` / ``layer_norm_backward``): the row sums are
    float32 sums from +0 in increasing index, and the weight / bias gradients sum over
    rows in increasing row index (earlier versions summed in torch's order; see
    :func:`_layer_norm_chain`, kept as the reference of that definition).
    """
    _check_tensor(input, "input")
    if backward not in P.BACKWARD_MODES:
        raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            _check_tensor(t, name)
    n, nb, eps_b, flags = fused._ln_args(input, normalized_shape, weight, bias, eps)
    off = D.offset_constant(offset)
    tensors = [t for t in (input, weight, bias) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return L.layer_norm_forward(input, weight, bias, n, nb, eps_b, off, flags)[0]
    if backward == "exact":
        flags |= LN_EXACT
    return _LayerNormRows.apply(input, weight, bias, n, nb, eps_b, off, flags)


class _LayerNormRows(torch.autograd.Function):
    """layer_norm as one row kernel per pass (pam.fused); the backward reads the rows'
    statistics the forward kernel wrote instead of recomputing them."""

    @staticmethod
    def forward(ctx, x, weight, bias, n, nb, eps_b, off, flags):
        y, stats = L.layer_norm_forward(x, weight, bias, n, nb, eps_b, off, flags)
        ctx.save_for_backward(x, weight, stats)
        ctx.args = (n, nb, off, flags)
        ctx.bias_shape = None if bias is None else bias.shape
        return y

    @staticmethod
    @without_layers
    @once_differentiable
    def backward(ctx, grad):
        x, weight, stats = ctx.saved_tensors
        gx, gw, gb = L.layer_norm_backward(grad.contiguous(), x, weight, stats, *ctx.args)
        gw = None if weight is None else gw.view(weight.shape)
        gb = None if ctx.bias_shape is None else gb.view(ctx.bias_shape)
        return gx, gw, gb, None, None, None, None, None


def _layer_norm_chain(input, normalized_shape, weight=None, bias=None, eps=1e-5, offset=None,
                      backward="exact"):
    """layer_norm as the chain of PAM ops of earlier versions (row sums in torch's order):
    the definition the fused kernel restates, kept for validation/bench_rows.py.


    mean = PAD(sum x, N) (refined MEAN_REFINEMENTS = 2 times when N is not a power of two,
    see below); xc = x - mean; var = PAD(sum PAM(xc, xc), N) (biased, as torch);
    y = PAD(xc, pow(var + eps, 0.5)); then PAM by ``weight`` and + ``bias``. PAD by N is
    exact when N is a power of two. A constant row gives 0 (then the bias).
    """
    _check_tensor(input, "input")
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0 or tuple(input.shape[-k:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} must match the trailing "
                         f"dimensions of input {tuple(input.shape)}")
    dims = tuple(range(-k, 0))
    n = 1
    for s in normalized_shape:
        n = n * s                                   # integer arithmetic
    mu = P.div(input.sum(dim=dims, keepdim=True), float(n), backward=backward)
    if n & (n - 1):
        # N is not a power of two: PAD by N overestimates |mean| by up to 12.5 %, which
        # would swamp the spread of rows with |mean| >> std. Refine twice with the same
        # PA operations: mu += PAD(sum(x - mu), N) (error <= 12.5 %^3 = 0.2 % of |mean|).
        for _ in range(MEAN_REFINEMENTS):
            mu = mu + P.div((input - mu).sum(dim=dims, keepdim=True), float(n),
                            backward=backward)
    xc = input - mu
    var = P.div(P.mul(xc, xc, offset=offset, backward=backward).sum(dim=dims, keepdim=True),
                float(n), backward=backward)
    std = P.pow(var + float(eps), 0.5, backward=backward)
    y = P.div(xc, std, backward=backward)
    if weight is not None:
        y = P.mul(y, _check_tensor(weight, "weight"), offset=offset, backward=backward)
    if bias is not None:
        y = y + _check_tensor(bias, "bias")
    return y


# ----------------------------------------------------------------------------- activations
def relu(input, inplace=False):
    """max(x, 0): a comparison, no arithmetic."""
    return torch.relu_(input) if inplace else torch.relu(input)


def gelu(input, approximate="none", backward="exact"):
    """Piecewise-affine GELU: sum_j d_j relu(x - k_j) (see GELU_KNOTS).

    Slopes are powers of two or sums of two (0, -1/16, -1/8, 0, 1/8, 1/4, 1/2, 3/4, 1,
    9/8, 1), every product is an exact PAM by a power of two, so the forward is exact up
    to float32 rounding of the additions. max |f - gelu| = 0.0129, mean 0.0061 on
    U(-4, 4). ``approximate`` is accepted for torch compatibility and ignored (both torch
    forms are approximated by the same function; their difference is < 0.0005). The exact
    backward is the slope of the segment (0 at x = k_j from the left, as relu).
    """
    _check_tensor(input, "input")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if backward not in P.BACKWARD_MODES:
        raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
    return _Gelu.apply(input, backward)


class _Gelu(torch.autograd.Function):
    """The GELU composite fused into one kernel per pass (pam.fused.gelu_forward /
    gelu_backward give the composite's bits)."""

    @staticmethod
    def forward(ctx, x, backward):
        ctx.save_for_backward(x)
        ctx.mode = backward
        return L.gelu_forward(x)

    @staticmethod
    @without_layers
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return L.gelu_backward(grad.contiguous(), x, ctx.mode), None


# ----------------------------------------------------------------------------- dropout
def _keep_mask(shape, p, device, generator=None):
    """Bernoulli(1 - p) mask from integer random numbers: keep where r >= p 2^24."""
    threshold = int(round(math.ldexp(p, 24)))      # exact scaling by a power of two
    r = torch.randint(0, 1 << 24, shape, device=device, generator=generator)
    return r >= threshold


def dropout(input, p=0.5, training=True, inplace=False, backward="exact", generator=None):
    """Zero each element with probability ``p`` and scale the rest by PAM(x, PAD(1, 1 - p)).

    The mask comes from integer random numbers (p is resolved to multiples of 2^-24), the
    scale 1/(1 - p) is a PAD (exact when 1 - p is a power of two). p = 1 gives zeros;
    ``training=False`` or p = 0 return the input unchanged. ``inplace=True`` writes the result
    into ``input`` and returns it (as torch; autograd raises for a leaf that requires grad).
    """
    _check_tensor(input, "input")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    zero = torch.zeros((), dtype=torch.float32, device=input.device)
    if p == 1.0:
        out = torch.where(torch.ones_like(input, dtype=torch.bool), zero, input)
    else:
        keep = _keep_mask(input.shape, p, input.device, generator)
        scale = _pad_scalar(1.0, 1.0 - p)
        out = torch.where(keep, P.mul(input, scale, backward=backward), zero)
    return input.copy_(out) if inplace else out


# ----------------------------------------------------------------------------- attention
def attention_scale(head_dim):
    """PAD(1, pa_sqrt(head_dim)) as a Python float: exact when head_dim is a power of 4.

    Computed in pure Python on the bit patterns (the bits of ``pam.div(1, pam.sqrt(d))`` on
    tensors), so it is a constant under ``torch.compile`` (a symbolic head_dim of a
    dynamic-shape trace is specialized to its value)."""
    d = float(L.static_int(head_dim))
    if torch.compiler.is_compiling():
        return L.pad_scalar(1.0, L.pa_sqrt_scalar(d))
    sc = _SCALES.get(d)
    if sc is None:                          # (~15 us of Python bit arithmetic per call)
        sc = _SCALES[d] = L.pad_scalar(1.0, L.pa_sqrt_scalar(d))
    return sc


_SCALES = {}        # attention_scale per head dim, eager calls


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, offset=None,
                                 backward="exact", family="pam"):
    """PA attention, with ``torch.nn.functional.scaled_dot_product_attention`` semantics.

    softmax(PAM(q, scale) k^T + mask) v with PAM matmuls and the PA softmax. ``attn_mask``:
    bool (True = may attend) or float (added), broadcastable to (..., L, S); ``is_causal``
    adds the lower-triangular mask. ``scale`` defaults to PAD(1, pa_sqrt(E)). Rows with
    every key masked output 0 with zero gradient (as torch's math path). ``dropout_p``
    drops attention weights (always applied when > 0, as torch). ``family``: the products
    of the two matmuls ("pam" or "lmul"; the softmax is PAM's in every family).
    """
    out, _ = _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, offset,
                        backward, False, family)
    return out


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, offset, backward,
               need_weights, family="pam"):
    """SDPA returning (output, attention weights after dropout or None).

    Where :func:`_core_covers` the call: the fused attention core when FUSED_ATTENTION is
    set and the family is "pam" (:func:`_attention_fused`: one kernel launch per pass),
    else the composite's kernels as one autograd node (:func:`_attention_node`) unless
    two of query / key / value are the same tensor; every other call runs the composite
    :func:`_attention_composite`. All three give the composite's bits."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(t, name)
    E = query.shape[-1]
    if key.shape[-1] != E:
        raise ValueError(f"query and key must share the last dimension, got {E} and "
                         f"{key.shape[-1]}")
    if backward not in P.BACKWARD_MODES:
        raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
    sc = attention_scale(E) if scale is None else float(scale)
    if _core_covers(query, key, value, attn_mask, dropout_p, need_weights):
        if FUSED_ATTENTION and family == "pam":
            return _attention_fused(query, key, value, attn_mask, is_causal, sc, offset,
                                    backward), None
        mult = P._multiplier(family, "float32", offset)
        if mult.kind != "float" and (query is not key and key is not value
                                     and query is not value):
            return _attention_node(query, key, value, attn_mask, is_causal, sc, offset,
                                   backward, mult), None
    return _attention_composite(query, key, value, attn_mask, dropout_p, is_causal, sc,
                                offset, backward, need_weights, family)


# Whether _attention uses the fused attention core where _core_covers the call. Off by
# default: on 2 CPU threads the fused kernels are still slower than the composite, whose
# matmuls run the register-blocked vec8 micro-kernels (validation/bench_attention.py,
# validation/README.md); set True to use them (same bits).
FUSED_ATTENTION = False


def _core_covers(query, key, value, attn_mask, dropout_p, need_weights):
    """True when the attention core can run as one unit (the fused kernels, or the
    composite's kernels as one autograd node) with the composite's bits: no dropout, no
    weights returned, query / key / value of one batch shape (at least 2-D, no empty
    dimension) on one CPU or CUDA device, and a mask that is None, bool, or float32
    without a gradient to compute, broadcasting to the scores' shape (..., L, S) without
    growing it. Anything else goes to the composite, which also raises the errors of
    invalid calls."""
    if need_weights or dropout_p > 0.0:
        return False
    nd = query.dim()
    if nd < 2 or key.dim() != nd or value.dim() != nd:
        return False
    batch = query.shape[:-2]
    if key.shape[:-2] != batch or value.shape[:-2] != batch:
        return False
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return False
    dev = query.device
    if key.device != dev or value.device != dev or not (query.is_cpu or query.is_cuda):
        return False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != dev:
            return False
        if attn_mask.dtype != torch.bool and attn_mask.dtype != torch.float32:
            return False
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return False
        shape = (*batch, query.shape[-2], key.shape[-2])
        try:
            if tuple(torch.broadcast_shapes(attn_mask.shape, shape)) != shape:
                return False
        except RuntimeError:
            return False
    return True


def _attention_fused(query, key, value, attn_mask, is_causal, sc, offset, backward):
    """The attention output of a call :func:`_core_covers`: the heads as
    (P, L, E) / (P, S, E) / (P, S, Ev) through :class:`_AttentionCore`."""
    nq, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    batch = query.shape[:-2]
    q3 = query.reshape(-1, nq, E)
    k3 = key.reshape(-1, S, E)
    v3 = value.reshape(-1, S, Ev)
    mask, mode = fused.attention_args(q3, k3, attn_mask, batch)
    scb = L.f32_bits_scalar(sc)
    off = D.offset_constant(offset)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        out = _AttentionCore.apply(q3, k3, v3, mask, bool(is_causal), mode, scb, off,
                                   backward == "exact")
    else:
        out = L.attention_forward(q3, k3, v3, mask, bool(is_causal), mode, scb, off)[0]
    return out.reshape(*batch, nq, Ev)


class _AttentionCore(torch.autograd.Function):
    """Scale, QK^T, masks, softmax and PV as one kernel launch per pass (pam.fused's
    attention core); the backward reads the masked scores, probabilities and softmax row
    statistics the forward kernel wrote."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, mode, scb, off, exact):
        out, scores, probs, stats = L.attention_forward(q, k, v, mask, causal, mode, scb,
                                                        off)
        ctx.save_for_backward(q, k, v, mask, scores, probs, stats)
        ctx.args = (causal, mode, scb, off, exact)
        return out

    @staticmethod
    @without_layers
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, mask, scores, probs, stats = ctx.saved_tensors
        dq, dk, dv = L.attention_backward(grad.contiguous(), q, k, v, mask, scores, probs,
                                          stats, *ctx.args)
        return (dq, dk, dv) + (None,) * 6


def _attention_composite(query, key, value, attn_mask, dropout_p, is_causal, sc, offset,
                         backward, need_weights, family="pam"):
    """SDPA as the chain of PAM ops (scale, matmul, masks, fused softmax, dropout, matmul):
    the definition the fused attention core restates; every call it does not cover."""
    L, S = query.shape[-2], key.shape[-2]
    q = P.mul(query, sc, backward=backward)
    scores = P.matmul(q, key.transpose(-2, -1), offset=offset, backward=backward,
                      family=family)
    ninf = torch.full((), float("-inf"), dtype=torch.float32, device=query.device)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = torch.where(causal, scores, ninf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, ninf)
        else:
            scores = scores + _check_tensor(attn_mask, "attn_mask")
    attn = _softmax(scores, -1, offset, backward, safe=True)
    if dropout_p > 0.0:
        attn = dropout(attn, dropout_p, training=True, backward=backward)
    out = P.matmul(attn, value, offset=offset, backward=backward, family=family)
    return out, (attn if need_weights else None)


def _causal_keep(Lq, S, device):
    """The composite's causal mask: (Lq, S) bool, True on and below the diagonal."""
    return torch.ones(Lq, S, dtype=torch.bool, device=device).tril()


def _node_forward(query, key, value, attn_mask, is_causal, sct, off, sm_off, kind):
    """The composite's forward with its kernels called directly: (out, q3, kt3, masked
    scores, softmax statistics, attention weights (P, L, S), value (P, S, Ev)). Short
    rows without a mask on CPU run as one launch with the heads in vector lanes
    (:func:`pam.fused.attention_lanes_forward_kernel`, the same bits), except while
    torch.compile traces (the kernels' custom ops then)."""
    batch = query.shape[:-2]
    Lq, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    if attn_mask is None and kind == "pam" and query.is_cpu and max(Lq, S) <= LANES_MAX_ROWS \
            and not torch.compiler.is_compiling():
        k3 = key.reshape(-1, S, E).contiguous()
        v3 = value.reshape(-1, S, Ev).contiguous()
        q3, out, scores, attn3, stats = fused.attention_lanes_forward_kernel(
            query.reshape(-1, Lq, E), k3, v3, is_causal, sct.view(torch.int32).item(), off,
            sm_off)
        return (out.view(*batch, Lq, Ev), q3, k3.transpose(1, 2), scores.view(*batch, Lq, S),
                stats.view(*batch, Lq, 2), attn3, v3)
    q3 = L.binary_map("mul", query, sct, 0).reshape(-1, Lq, E)      # P.mul(query, sc)
    kt3 = key.reshape(-1, S, E).transpose(1, 2)
    scores = L.matmul3(q3, kt3, off, kind).view(*batch, Lq, S)
    if is_causal or attn_mask is not None:
        ninf = torch.full((), float("-inf"), dtype=torch.float32, device=query.device)
        if is_causal:
            scores = torch.where(_causal_keep(Lq, S, query.device), scores, ninf)
        if attn_mask is not None:
            scores = (torch.where(attn_mask, scores, ninf) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
    attn, stats = L.softmax_forward(scores, scores.dim() - 1, sm_off, True)
    attn3 = attn.view(-1, Lq, S)
    v3 = value.reshape(-1, S, Ev)
    out = L.matmul3(attn3, v3, off, kind).view(*batch, Lq, Ev)
    return out, q3, kt3, scores, stats, attn3, v3


# The longest query or key rows (L, S) that _node_forward runs with the heads in vector
# lanes; longer ones go through the matmul kernels, faster there (validation/README.md
# section 9). 0 turns the lane kernel off.
LANES_MAX_ROWS = 16


def _attention_node(query, key, value, attn_mask, is_causal, sc, offset, backward, mult):
    """The composite attention (:func:`_attention_composite`) of a call
    :func:`_core_covers`, its kernels called directly and its backward one autograd node
    (:class:`_AttentionNode`) instead of a chain of a dozen ops and five nodes: the same
    kernels on the same operands, so the same bits. ``mult``: the matmuls' multiplier
    (pam.families; the scale product is PAM without offset, the softmax takes
    ``offset`` as the composite's do). One difference: where gradients of query, key and
    value meet in one sum (distinct views of one tensor, whose gradients autograd adds),
    the sum's order is this node's (query, key, value) rather than the order in which
    the composite's nodes ran; the same tensor passed twice goes to the composite."""
    sct = D.as_operand(sc, "scale", query)
    args = (attn_mask, bool(is_causal), sct, mult.off, D.offset_constant(offset), mult.kind)
    if P._needs_grad(query, key, value):
        return _AttentionNode.apply(query, key, value, *args, backward == "exact")
    return _node_forward(query, key, value, *args)[0]


class _AttentionNode(torch.autograd.Function):
    """The composite attention as one node: its backward runs the composite's node
    backwards in their order (PV matmul, softmax, masks, QK^T matmul, the scale's
    product) on the tensors the forward saved."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, sct, off, sm_off, kind,
                exact):
        out, q3, kt3, scores, stats, attn3, v3 = _node_forward(
            query, key, value, attn_mask, is_causal, sct, off, sm_off, kind)
        keep = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else None
        ctx.save_for_backward(query, sct, q3, kt3, scores, stats, attn3, v3, keep)
        ctx.args = (is_causal, off, sm_off, kind, exact)
        ctx.shapes = (key.shape, value.shape)
        return out

    @staticmethod
    @P._first_order
    @once_differentiable
    def backward(ctx, grad):
        query, sct, q3, kt3, scores, stats, attn3, v3, keep = ctx.saved_tensors
        is_causal, off, sm_off, kind, exact = ctx.args
        key_shape, value_shape = ctx.shapes
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        mode = "exact" if exact else "approx"
        need_w = need_q or need_k
        gw, gv = P._matmul3_grads(attn3, v3, grad.reshape(v3.shape[0], -1, v3.shape[2]),
                                  off, mode, kind, need_w, need_v)
        dq = dk = None
        if need_w:
            gs = L.softmax_backward(gw.view(scores.shape), scores, stats, scores.dim() - 1,
                                    sm_off, True, exact)
            if keep is not None or is_causal:           # torch.where's gradient: 0 masked
                zero = torch.zeros((), dtype=torch.float32, device=gs.device)
                if keep is not None:
                    gs = torch.where(keep, gs, zero)
                if is_causal:
                    gs = torch.where(_causal_keep(*gs.shape[-2:], gs.device), gs, zero)
            gq3, gkt3 = P._matmul3_grads(q3, kt3, gs.reshape(q3.shape[0], q3.shape[1], -1),
                                         off, mode, kind, need_q, need_k)
            if need_k:
                # the composite's layout too (a transposed view of a contiguous (.., E, S)):
                # torch's reductions of it downstream (a bias's sum_to_size) sum in an
                # order that depends on the layout
                dk = gkt3.view(*key_shape[:-2], *gkt3.shape[1:]).transpose(-2, -1)
            if need_q:
                gq = gq3.view(query.shape)
                dq = L.binary_map("mul", gq, (L.binary_map("mul_slope", query, sct, 0)
                                              if exact else sct), 0)
        dv = gv.reshape(value_shape) if need_v else None
        return (dq, dk, dv) + (None,) * 7


# ----------------------------------------------------------------------------- sigmoid family
def sigmoid(input, backward="exact"):
    """PA logistic function PAD(1, 1 + pa_exp(-x)), with pa_exp = pa_exp2(PAM(x, log2 e)).

    sigmoid(0) = 0.5 exactly; 0 for x below about -88.7 (pa_exp overflows to inf, PAD by
    inf is 0) and 1 for large x. Error against the true sigmoid on [-8, 8] (100k points):
    max abs 0.074, mean abs 0.014 (pa_exp's -29 % .. +43 % error); tanh: max 0.149, mean
    0.014; silu: max 0.099, mean 0.013 (pinned by tests/test_mode.py).
    """
    _check_tensor(input, "input")
    e = P.exp(input.neg(), backward=backward)
    return P.div(torch.ones((), dtype=torch.float32, device=input.device), e + 1.0,
                 backward=backward)


def tanh(input, backward="exact"):
    """PA tanh as 2 sigmoid(2 x) - 1 (both scalings by 2 are exact); tanh(0) = 0."""
    s = sigmoid(P.mul(input, 2.0, backward=backward), backward=backward)
    return P.mul(s, 2.0, backward=backward) - 1.0


def silu(input, backward="exact"):
    """PA SiLU: PAM(x, sigmoid(x)) with the PA sigmoid above."""
    return P.mul(input, sigmoid(input, backward=backward), backward=backward)
