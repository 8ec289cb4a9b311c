"""Proof that code ran no native float multiplication: ``no_float_multiply()``.

``with pam.audit.no_float_multiply(): ...`` installs a
``torch.utils._python_dispatch.TorchDispatchMode`` that sees every ATen operator call made
by the code inside the block, in the forward pass, in autograd's backward pass (run on
this thread) and in optimizer steps, after torch's composite operators have been
decomposed (``torch.matmul`` arrives as ``mm``/``bmm``, ``F.linear`` as ``addmm``...). It
raises :class:`FloatMultiplyError` naming the operator when a call on floating-point (or
complex) tensors belongs to a multiplicative family:

* products and quotients: mul, div, true_divide, floor_divide, remainder/fmod, reciprocal,
  addcmul, addcdiv, lerp, and ``add``/``sub`` with ``alpha != 1`` (a hidden multiply);
* matrix products: mm, bmm, addmm, addbmm, baddbmm, addmv, addr, mv, dot, vdot, matmul,
  linear, einsum, tensordot, kron, outer, convolution (every conv*), _scaled_mm,
  scaled_dot_product_attention and its fused kernels;
* transcendental and root functions: exp, exp2, expm1, log, log2, log10, log1p, pow,
  float_power, sqrt, rsqrt, sigmoid, tanh, sin/cos/..., erf, erfc, erfinv, logit,
  logsumexp, logaddexp, hypot, atan2, xlogy, special_*;
* composite NN kernels: softmax, log_softmax, layer_norm, batch/group/instance norm, gelu,
  silu, mish, elu, selu, celu, softplus, hardswish, hardsigmoid, glu, dropout
  (native_dropout), all losses (nll_loss, cross_entropy, mse_loss, ...), mean, var, std,
  norm (linalg_vector_norm, ...), prod, cumprod, average pooling, interpolation;
* float random sampling that scales internally: uniform_, normal_, bernoulli with float
  probabilities, exponential_, cauchy_, log_normal_, geometric_, rand/randn and
  linspace/logspace (integer ``randint`` is allowed);
* every ``_foreach_`` and fused (``_fused_adamw_``...) variant of the above.

An operator is checked when any tensor argument is floating point or complex; an
operator whose inputs are all integer (index arithmetic) passes, unless its result is
floating point (e.g. ``exp`` of an int tensor). Everything else passes: additions,
subtractions, negation, abs, comparisons, max/min, where, clamp, floor/ceil/round, sum,
cumsum, copies and dtype conversions, views, indexing (gather, scatter_add, index),
embedding lookup, relu and its backward ``threshold_backward``.

Not covered, by construction:

* PAM kernels run in Numba on int32 views of the tensors' memory, outside ATen, so the
  mode never sees them (their LLVM IR is checked for ``fmul``/``fdiv`` by another test).
  The one float operation they contain on purpose is the float32 addition.
* Python-level arithmetic on Python floats (``lr * 0.5``) and NumPy arithmetic do not
  reach ATen and cannot be intercepted. ``pam.nn.functional`` and ``pam.optim`` do their
  scalar maths with the PAM ops on float32 scalar tensors; their remaining Python float
  operations are additions/subtractions (``1 - beta``) and exact power-of-two scalings
  (``math.ldexp``), listed in their docstrings.
* Operations inside C++/CUDA kernels of operators this mode allows are not inspected one
  by one (``sum`` adds; ``cumsum`` adds; ``randint`` is integer).
* Code outside the ``with`` block (model construction, weight initialisation, data
  loading) and other threads (DataLoader workers) are not checked.

``allow`` lets a caller exempt operator names (e.g. ``allow={"normal_"}``) explicitly.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import location as _loc
from torch.utils._pytree import tree_flatten

__all__ = ["no_float_multiply", "FloatMultiplyError", "BANNED_OPS", "is_banned",
           "graph_float_ops"]


class FloatMultiplyError(RuntimeError):
    """A float multiply-family operator ran inside ``no_float_multiply()``."""


BANNED_OPS = frozenset("""
mul div true_divide floor_divide remainder fmod reciprocal addcmul addcdiv lerp
mm bmm addmm addbmm baddbmm addmv addr mv dot vdot inner matmul linear einsum tensordot
kron outer ger chain_matmul bilinear _scaled_mm _int_mm
convolution convolution_backward conv1d conv2d conv3d conv_transpose1d conv_transpose2d
conv_transpose3d _convolution cudnn_convolution mkldnn_convolution slow_conv2d
slow_conv3d thnn_conv2d conv_depthwise2d mkldnn_linear mkldnn_matmul
scaled_dot_product_attention scaled_dot_product_attention_math
scaled_dot_product_flash_attention scaled_dot_product_efficient_attention
scaled_dot_product_cudnn_attention scaled_dot_product_flash_attention_for_cpu
scaled_dot_product_flash_attention_for_cpu_backward flash_attention_forward
efficient_attention_forward scaled_dot_product_fused_attention_overrideable
exp exp2 expm1 log log2 log10 log1p pow float_power sqrt rsqrt sigmoid tanh sin cos tan
asin acos atan sinh cosh asinh acosh atanh erf erfc erfinv logit logsumexp logaddexp
logaddexp2 hypot atan2 xlogy lgamma digamma polygamma mvlgamma i0 sinc
softmax log_softmax softmax_backward_data log_softmax_backward_data safe_softmax
layer_norm native_layer_norm native_layer_norm_backward rms_norm fused_rms_norm
batch_norm native_batch_norm native_batch_norm_backward batch_norm_with_update
group_norm native_group_norm native_group_norm_backward instance_norm
gelu gelu_backward silu silu_backward mish mish_backward elu elu_backward selu celu
softplus softplus_backward hardswish hardswish_backward hardsigmoid
hardsigmoid_backward hardtanh_backward glu glu_backward sigmoid_backward tanh_backward
logit_backward prelu rrelu leaky_relu leaky_relu_backward
dropout native_dropout native_dropout_backward feature_dropout alpha_dropout
nll_loss nll_loss2d nll_loss_forward nll_loss_backward nll_loss2d_forward
nll_loss2d_backward nll_loss_nd cross_entropy_loss mse_loss mse_loss_backward l1_loss
smooth_l1_loss huber_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div
soft_margin_loss multi_margin_loss multilabel_margin_loss poisson_nll_loss
cosine_similarity cosine_embedding_loss pairwise_distance cdist
mean var std var_mean std_mean norm linalg_vector_norm linalg_norm frobenius_norm
nuclear_norm renorm embedding_renorm prod cumprod cumulative_trapezoid trapezoid
avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d avg_pool2d_backward avg_pool3d_backward
adaptive_avg_pool2d_backward adaptive_avg_pool3d_backward
upsample_bilinear2d upsample_bicubic2d upsample_linear1d upsample_trilinear3d
grid_sampler_2d grid_sampler_3d
uniform normal bernoulli exponential cauchy log_normal geometric rand randn rand_like
randn_like linspace logspace normal_functional
fused_adam fused_adamw fused_sgd fused_adagrad
""".split())


def _base_name(func):
    name = func.overloadpacket.__name__
    if name.startswith("_foreach_"):
        name = name[len("_foreach_"):]
    name = name.strip("_")
    return name


def is_banned(name):
    """Whether an ATen operator name (``"mul_"``, ``"_foreach_mul"``...) is banned."""
    base = name
    if base.startswith("_foreach_"):
        base = base[len("_foreach_"):]
    base = base.strip("_")
    return base in BANNED_OPS or base.startswith("special_")


def _is_float(t):
    return isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)


def _alpha_not_one(func, args, kwargs):
    """add/sub(a, b, alpha=s) computes a + s b: a multiply unless s == 1."""
    alpha = kwargs.get("alpha", None)
    if alpha is None and len(args) >= 3 and not isinstance(args[2], torch.Tensor):
        alpha = args[2]
    return alpha is not None and alpha != 1


class no_float_multiply(TorchDispatchMode):
    """Context manager: raise on any float multiply-family ATen operator (see module doc).

    ``allow``: operator base names to let through (e.g. ``{"normal"}``). ``record``: if
    True, collect offending calls in ``self.violations`` (and where each ran in
    ``self.locations``) instead of raising. The error names the operator, the module path
    (``transformer.h.0.attn.c_attn (Conv1D in GPT2LMHeadModel)``) and the source line that
    issued it; for a backward op, the autograd node and its forward call's location.
    ``self.ops_seen`` counts every operator that passed, by name (useful as evidence).
    """

    def __init__(self, allow=(), record=False):
        super().__init__()
        self.allow = frozenset(a.strip("_") for a in allow)
        self.record = record
        self.violations = []
        self.locations = []
        self.ops_seen = {}

    def _flag(self, name, why):
        where = _loc.current_location()
        msg = (f"float multiply-family operator aten.{name} ran inside "
               f"pam.audit.no_float_multiply() ({why})" + (f": {where}" if where else ""))
        if self.record:
            self.violations.append(name)
            self.locations.append(where)
            return
        raise FloatMultiplyError(msg)

    def __enter__(self):
        # Location tracking: module stack hooks, and autograd nodes tagged with where
        # their forward call was issued (so backward ops are named too).
        self._location = _loc.LocationMode()
        self._location.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._location.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._location.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "pam":                 # torch.ops.pam.*: the PAM kernels
            return func(*args, **kwargs)
        full = func.overloadpacket.__name__
        base = _base_name(func)
        flat, _ = tree_flatten((args, kwargs))
        float_in = any(_is_float(t) for t in flat)
        if base not in self.allow:
            if float_in and (is_banned(full)):
                self._flag(full, "on floating-point tensors")
            if float_in and base in ("add", "sub", "rsub") and _alpha_not_one(func, args,
                                                                                kwargs):
                self._flag(full, "alpha != 1 multiplies")
            if base == "embedding_dense_backward" and len(args) >= 5 and args[4]:
                self._flag(full, "scale_grad_by_freq divides")
        out = func(*args, **kwargs)
        if base not in self.allow and not float_in and is_banned(full):
            outs, _ = tree_flatten(out)
            if any(_is_float(t) for t in outs):
                self._flag(full, "floating-point result")
        self.ops_seen[full] = self.ops_seen.get(full, 0) + 1
        return out


def _meta_float(v):
    vals, _ = tree_flatten(v)
    return any(isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)
               for t in vals)


def graph_float_ops(gm):
    """The float multiply-family ATen calls left in an FX graph (e.g. the final graphs of
    ``pam.compile``), by the rules :class:`no_float_multiply` applies at run time, read from
    the nodes' recorded values (``meta["val"]``): a banned op with a floating-point input
    (or result), ``add``/``sub`` with ``alpha != 1``. Returns ``[(op name, node name)]``;
    empty means the graph multiplies no float. ``torch.ops.pam.*`` nodes are the PAM
    kernels; higher-order or non-ATen nodes (none in AOT graphs) are reported as such.
    """
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if not isinstance(t, torch._ops.OpOverload):
            if isinstance(t, torch._ops.HigherOrderOperator):
                found.append((str(t), n.name))
            continue
        if t.namespace == "pam":
            continue
        full = t.overloadpacket.__name__
        base = _base_name(t)
        ins = [a.meta.get("val") for a in n.all_input_nodes]
        float_in = _meta_float(ins)
        if is_banned(full) and (float_in or _meta_float(n.meta.get("val"))):
            found.append((full, n.name))
        elif float_in and base in ("add", "sub", "rsub") and _alpha_not_one(
                t, n.args, n.kwargs):
            found.append((full, n.name))
    return found
