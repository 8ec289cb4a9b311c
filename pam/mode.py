"""``pam.arithmetic()``: run any PyTorch model's float32 multiply-family ops as PAM.

Mechanism (two torch modes, pushed together by :class:`arithmetic`):

1. A ``TorchFunctionMode`` (above autograd) takes the torch-level functions that have a PAM
   definition with its own autograd rule -- ``torch.matmul``/``@``, ``F.linear``,
   ``mm``/``bmm``/``addmm``/``baddbmm``, ``*``, ``/``, ``exp``/``log``/``pow``/``sqrt``...,
   ``F.softmax``/``log_softmax``/``layer_norm``/``gelu``/``silu``/``sigmoid``/``tanh``,
   ``F.cross_entropy``/``nll_loss``, ``F.dropout``, ``F.scaled_dot_product_attention``,
   ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``), ``F.conv1d``/``conv2d``
   -- and runs :mod:`pam.ops` / :mod:`pam.nn.functional` instead,
   so ``backward="exact"`` gives the true derivative of the piecewise-affine function
   (power-of-two slopes) exactly as :func:`pam.convert` would. Fused fast paths (the
   flash/efficient attention kernels, ``nn.MultiheadAttention``'s and
   ``nn.TransformerEncoderLayer``'s native fast path) never run: a torch function mode
   turns them off, and SDPA is computed by the PAM definition.
2. A ``TorchDispatchMode`` (below autograd) sees every ATen operator that still runs:
   the backward formulas of native ops (``mean``'s division, ``tanh_backward``...), the
   optimizer's ``_foreach_*`` / in-place ops (``torch.optim.AdamW``'s ``lerp_``,
   ``addcmul_``, ``addcdiv_``, ``sqrt``...), gradient clipping, in-place arithmetic, and
   anything layer 1 passed on. Every float32 multiply-family operator it knows is computed
   with PAM kernels (for backward formulas this is PAM used as if it were the product: the
   approximate backward). An operator of the multiply family it cannot emulate raises
   :class:`UnsupportedOpError` naming the op, the module path and the source line
   (``strict=True``, default) or is reported once and runs in float (``strict=False``).

Everything in ``pam.audit.no_float_multiply()``'s operator list is covered by one of the
two layers or refused; put the audit *around* ``pam.arithmetic()`` to prove it for a
training step.

Options: ``backward`` ("approx", the paper's choice and default here, or "exact"),
``offset`` (None or a positive float, PAM offset for products of two data operands),
``ops`` ("all", "matmul", or a set of :data:`FAMILIES` names: families left out run in
float by the user's explicit choice), ``strict``.

Not covered: float64/float16/bfloat16 tensors in multiply-family ops (refused, strict);
code outside the ``with`` block (a ``loss.backward()`` after the block runs float: keep
backward and the optimizer step inside); other threads' work; random sampling with
float parameters (``randn``, ``normal_``: refused), ``torch.compile``d code.
"""
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import functional as PF
from . import ops as P
from . import location as _loc
from .audit import is_banned
from .dispatch import offset_constant

__all__ = ["arithmetic", "active", "UnsupportedOpError", "FAMILIES"]

FAMILIES = frozenset({"matmul", "conv", "elementwise", "nonlinear", "norm", "loss",
                      "dropout", "attention"})
LOG2_E = P.LOG2_E


class UnsupportedOpError(RuntimeError):
    """A float multiply-family op ran inside ``pam.arithmetic()`` with no PAM version."""


class _Config:
    def __init__(self, backward, offset, ops, strict):
        if backward not in P.BACKWARD_MODES:
            raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
        offset_constant(offset)
        if ops == "all":
            ops = FAMILIES
        elif ops == "matmul":
            ops = frozenset({"matmul", "conv", "attention"})
        else:
            ops = frozenset(ops)
            bad = ops - FAMILIES
            if bad:
                raise ValueError(f"unknown op families {sorted(bad)}; choose from "
                                 f"{sorted(FAMILIES)}, 'all' or 'matmul'")
        self.backward, self.offset, self.ops, self.strict = backward, offset, ops, strict
        self.reported = set()


# ============================================================================ semantics
# Shared by both layers. Each takes plain arguments in ATen order; under layer 1 autograd
# records the pam ops' own backward, under layer 2 they run below autograd (no_grad).

def _is_f32(t):
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32


def _operand(x, like):
    """A float32 tensor or Python float for a second operand (numbers and 0-dim non-float32
    tensors become Python floats; integer/bool tensors become float32)."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.float32:
            return x
        if x.dim() == 0 and not x.requires_grad:
            return float(x)
        if not x.dtype.is_floating_point and not x.dtype.is_complex:
            return x.to(torch.float32)
        return x           # another float dtype: P ops raise a clear error
    if isinstance(x, bool):
        return float(x)
    return x


def _scalar_is(x, value):
    return not isinstance(x, torch.Tensor) and x == value


def mul(c, a, b):
    a, b = _operand(a, None), _operand(b, None)
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor):
        return a * b                                    # two Python numbers
    return P.mul(a, b, offset=_data_offset(c, b), backward=c.backward)


def _data_offset(c, b):
    """Offset for a product of two data operands; none for a product by a constant."""
    return c.offset if isinstance(b, torch.Tensor) and b.dim() > 0 else None


def div(c, a, b):
    a, b = _operand(a, None), _operand(b, None)
    if not isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return a / b
        a = torch.full((), float(a), dtype=torch.float32, device=b.device)
    return P.div(a, b, backward=c.backward)


def reciprocal(c, x):
    return div(c, 1.0, x)


def pow_(c, base, exponent):
    """base ** exponent. Small integer exponents are repeated PAM (so negative bases work as
    in torch); 0.5 / -0.5 are pa_sqrt; other exponents pa_exp2(PAM(pa_log2(base), e))."""
    if not isinstance(base, torch.Tensor):                  # number ** tensor
        e = _operand(exponent, None)
        lb = P.log2(torch.full((), float(base), dtype=torch.float32, device=e.device))
        return P.exp2(P.mul(e, lb, backward=c.backward), backward=c.backward)
    e = _operand(exponent, None)
    if not isinstance(e, torch.Tensor):
        e = float(e)
        if e == 0.0:
            return torch.ones_like(base)
        if e == 1.0:
            return base.clone()
        if e in (2.0, 3.0, 4.0):
            y = mul(c, base, base)
            for _ in range(int(e) - 2):
                y = mul(c, y, base)
            return y
        if e == -1.0:
            return reciprocal(c, base)
        if e == 0.5:
            return P.sqrt(base, backward=c.backward)
        if e == -0.5:
            return reciprocal(c, P.sqrt(base, backward=c.backward))
        if e == -2.0:
            return reciprocal(c, mul(c, base, base))
    return P.pow(base, e, backward=c.backward)


def exp(c, x):
    return P.exp(x, backward=c.backward)


def log(c, x):
    return P.log(x, backward=c.backward)


def sqrt(c, x):
    return P.sqrt(x, backward=c.backward)


def rsqrt(c, x):
    return reciprocal(c, P.sqrt(x, backward=c.backward))


def matmul(c, a, b):
    return P.matmul(a, b, offset=c.offset, backward=c.backward)


def addmm(c, bias, m1, m2, beta=1, alpha=1):
    """beta * bias + alpha * (m1 @ m2) (mm, then the scalings by PAM, then a float add)."""
    y = matmul(c, m1, m2)
    if not _scalar_is(alpha, 1):
        y = mul(c, y, alpha)
    if _scalar_is(beta, 0):
        return y
    if not _scalar_is(beta, 1):
        bias = mul(c, bias, beta)
    return y + bias


def add_scaled(c, a, b, alpha=1, subtract=False):
    """a + alpha b (a - alpha b): PAM for alpha != 1, then a float add."""
    b = mul(c, b, alpha) if not _scalar_is(alpha, 1) else _operand(b, None)
    return a - b if subtract else a + b


def addcmul(c, x, t1, t2, value=1):
    p = mul(c, t1, t2)
    if not _scalar_is(value, 1):
        p = mul(c, p, value)
    return x + p


def addcdiv(c, x, t1, t2, value=1):
    q = div(c, t1, t2)
    if not _scalar_is(value, 1):
        q = mul(c, q, value)
    return x + q


def lerp(c, x, end, weight):
    """x + weight (end - x)."""
    return x + mul(c, end - x, weight)


def sigmoid(c, x):
    return PF.sigmoid(x, backward=c.backward)


def tanh(c, x):
    return PF.tanh(x, backward=c.backward)


def silu(c, x):
    return PF.silu(x, backward=c.backward)


def gelu(c, x, approximate="none"):
    return PF.gelu(x, approximate, backward=c.backward)


def gelu_slope(x):
    """Slope of the PA GELU at x: a sum of exact power-of-two slope changes (additions)."""
    s = torch.zeros_like(x)
    for k, d in zip(PF.GELU_KNOTS, PF.GELU_SLOPE_CHANGES):
        s = s + torch.where(x > k, torch.full((), d, dtype=x.dtype, device=x.device),
                            torch.zeros((), dtype=x.dtype, device=x.device))
    return s


def softmax(c, x, dim, safe=False):
    return PF._softmax(x, dim, c.offset, c.backward, safe)


def log_softmax(c, x, dim):
    return PF.log_softmax(x, dim, offset=c.offset, backward=c.backward)


def layer_norm(c, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return PF.layer_norm(x, normalized_shape, weight, bias, eps, offset=c.offset,
                         backward=c.backward)


def mean(c, x, dim=None, keepdim=False, dtype=None):
    if dtype is not None and dtype != torch.float32:
        raise UnsupportedOpError(f"mean with dtype={dtype} is not emulated (float32 only)")
    if dim is not None and not isinstance(dim, int) and len(dim) == 0:
        dim = None
    if dim is None and keepdim:
        dim = tuple(range(x.dim()))
    return PF.mean(x, dim, keepdim=keepdim, backward=c.backward)


def vector_norm(c, x, ord=2, dim=None, keepdim=False, dtype=None):
    """||x||_2 as pa_sqrt(sum PAM(x, x)); inf-norms are max(|x|) (no arithmetic)."""
    if ord in (math.inf, float("inf")):
        return x.abs().amax(dim=dim if dim is not None else tuple(range(x.dim())),
                            keepdim=keepdim)
    if ord != 2:
        raise UnsupportedOpError(f"vector_norm with ord={ord} is not emulated (2, inf only)")
    dims = tuple(range(x.dim())) if dim is None else dim
    s = mul(c, x, x).sum(dim=dims, keepdim=keepdim)
    return P.sqrt(s, backward=c.backward)


# ============================================================================ layer 1
def _all_f32(*ts):
    return all(_is_f32(t) for t in ts if isinstance(t, torch.Tensor))


def _binary_ok(a, b):
    ta = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    if not ta:
        return False
    if not any(_is_f32(t) for t in ta):
        return False
    for t in ta:
        if not _is_f32(t) and (t.dtype.is_floating_point or t.dtype.is_complex) \
                and not (t.dim() == 0 and not t.requires_grad):
            return False                 # mixed float dtypes: torch promotes; layer 2 refuses
    return True


def _f(handler, family, check=None):
    return handler, family, check


def _args(names, args, kwargs, defaults=None):
    """Bind positional/keyword arguments to ``names`` (missing ones from ``defaults``)."""
    out = dict(defaults or {})
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _l1_binary(fn, swap=False):
    def h(c, args, kwargs):
        if kwargs.get("out") is not None or len(args) != 2 or set(kwargs) - {"out"}:
            return NotImplemented
        a, b = (args[1], args[0]) if swap else args
        if not _binary_ok(a, b):
            return NotImplemented
        return fn(c, a, b)
    return h


def _l1_div(c, args, kwargs):
    if kwargs.get("rounding_mode") is not None or kwargs.get("out") is not None \
            or len(args) != 2:
        return NotImplemented
    if not _binary_ok(*args):
        return NotImplemented
    return div(c, *args)


def _l1_unary(fn):
    def h(c, args, kwargs):
        if len(args) != 1 or kwargs or not _is_f32(args[0]):
            return NotImplemented
        return fn(c, args[0])
    return h


def _l1_pow(swap=False):
    def h(c, args, kwargs):
        if kwargs.get("out") is not None or len(args) + len(kwargs) != 2:
            return NotImplemented
        a = _args(("input", "exponent"), args, kwargs)
        base, e = a.get("input", a.get("self")), a["exponent"]
        if swap:
            base, e = e, base
        if not _binary_ok(base, e):
            return NotImplemented
        return pow_(c, base, e)
    return h


def _l1_matmul(swap=False):
    def h(c, args, kwargs):
        if kwargs or len(args) != 2:
            return NotImplemented
        a, b = (args[1], args[0]) if swap else args
        if not (_is_f32(a) and _is_f32(b)):
            return NotImplemented
        return matmul(c, a, b)
    return h


def _l1_linear(c, args, kwargs):
    a = _args(("input", "weight", "bias"), args, kwargs, {"bias": None})
    if not _all_f32(a["input"], a["weight"], a["bias"]):
        return NotImplemented
    return P.linear(a["input"], a["weight"], a["bias"], offset=c.offset,
                    backward=c.backward)


def _l1_addmm(c, args, kwargs):
    if kwargs.get("out") is not None:
        return NotImplemented
    a = _args(("input", "mat1", "mat2"), args, kwargs, {"beta": 1, "alpha": 1})
    if "batch1" in a:
        a["mat1"], a["mat2"] = a.pop("batch1"), a.pop("batch2")
    if not _all_f32(a["input"], a["mat1"], a["mat2"]):
        return NotImplemented
    return addmm(c, a["input"], a["mat1"], a["mat2"], a["beta"], a["alpha"])


def _l1_activation(fn):
    def h(c, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "inplace" or not v}
        if "inplace" in kwargs:
            kwargs.pop("inplace")
        if len(args) > 1 and args[1] is True:              # F.silu(x, True): in place
            return NotImplemented
        if len(args) < 1 or not _is_f32(args[0]) or kwargs:
            return NotImplemented
        return fn(c, args[0])
    return h


def _l1_gelu(c, args, kwargs):
    a = _args(("input", "approximate"), args, kwargs, {"approximate": "none"})
    if not _is_f32(a["input"]):
        return NotImplemented
    return gelu(c, a["input"], a["approximate"])


def _l1_softmax(log):
    def h(c, args, kwargs):
        a = _args(("input", "dim", "_stacklevel", "dtype"), args, kwargs,
                  {"dim": None, "dtype": None})
        x = a["input"]
        if not _is_f32(x) or a["dtype"] not in (None, torch.float32):
            return NotImplemented
        dim = a["dim"]
        if dim is None:
            dim = 0 if x.dim() in (0, 1, 3) else 1         # torch's legacy implicit dim
        return log_softmax(c, x, dim) if log else softmax(c, x, dim)
    return h


def _l1_layer_norm(c, args, kwargs):
    a = _args(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs,
              {"weight": None, "bias": None, "eps": 1e-5})
    if not _all_f32(a["input"], a["weight"], a["bias"]):
        return NotImplemented
    return layer_norm(c, a["input"], a["normalized_shape"], a["weight"], a["bias"],
                      a["eps"])


def _l1_mean(c, args, kwargs):
    if kwargs.get("out") is not None:
        return NotImplemented
    a = _args(("input", "dim", "keepdim"), args, kwargs, {"dim": None, "keepdim": False})
    if not _is_f32(a["input"]):
        return NotImplemented
    return mean(c, a["input"], a["dim"], a["keepdim"], a.get("dtype"))


def _l1_cross_entropy(c, args, kwargs):
    a = _args(("input", "target", "weight", "size_average", "ignore_index", "reduce",
               "reduction", "label_smoothing"), args, kwargs,
              {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
               "reduction": "mean", "label_smoothing": 0.0})
    if a["size_average"] is not None or a["reduce"] is not None:
        return NotImplemented
    if not _all_f32(a["input"], a["weight"]):
        return NotImplemented
    return PF.cross_entropy(a["input"], a["target"], a["weight"], a["ignore_index"],
                            a["reduction"], a["label_smoothing"], offset=c.offset,
                            backward=c.backward)


def _l1_nll(c, args, kwargs):
    a = _args(("input", "target", "weight", "size_average", "ignore_index", "reduce",
               "reduction"), args, kwargs,
              {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
               "reduction": "mean"})
    if a["size_average"] is not None or a["reduce"] is not None:
        return NotImplemented
    if not _all_f32(a["input"], a["weight"]):
        return NotImplemented
    return PF.nll_loss(a["input"], a["target"], a["weight"], a["ignore_index"],
                       a["reduction"], backward=c.backward)


def _l1_dropout(c, args, kwargs):
    a = _args(("input", "p", "training", "inplace"), args, kwargs,
              {"p": 0.5, "training": True, "inplace": False})
    if not _is_f32(a["input"]) or a["inplace"]:
        return NotImplemented
    return PF.dropout(a["input"], a["p"], a["training"], backward=c.backward)


def _l1_sdpa(c, args, kwargs):
    a = _args(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
              args, kwargs, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False,
                             "scale": None})
    if a.pop("enable_gqa", False):
        raise UnsupportedOpError("scaled_dot_product_attention(enable_gqa=True) is not "
                                 "emulated by pam.arithmetic()")
    if not _all_f32(a["query"], a["key"], a["value"]):
        return NotImplemented
    mask = a["attn_mask"]
    if mask is not None and mask.dtype != torch.bool and not _is_f32(mask):
        return NotImplemented
    return PF.scaled_dot_product_attention(a["query"], a["key"], a["value"], mask,
                                           a["dropout_p"], a["is_causal"], a["scale"],
                                           offset=c.offset, backward=c.backward)


def _l1_conv(n):
    def h(c, args, kwargs):
        try:
            from . import conv as C
        except ImportError:
            return NotImplemented
        a = _args(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  args, kwargs, {"bias": None, "stride": 1, "padding": 0, "dilation": 1,
                                 "groups": 1})
        if not _all_f32(a["input"], a["weight"], a["bias"]):
            return NotImplemented
        fn = C.conv1d if n == 1 else C.conv2d
        return fn(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                  a["dilation"], a["groups"], offset=c.offset, backward=c.backward)
    return h


class _MHAView:
    """The attributes pam.nn.MultiheadAttention.forward reads, taken from
    F.multi_head_attention_forward's arguments (inputs there are sequence-first)."""

    _mask = None
    _attend = None
    forward = None

    def __init__(self, c, a):
        E = a["embed_dim_to_check"]
        self.embed_dim, self.num_heads = E, a["num_heads"]
        self.head_dim = E // self.num_heads
        self.batch_first = False
        self._qkv_same_embed_dim = not a["use_separate_proj_weight"]
        self.in_proj_weight, self.in_proj_bias = a["in_proj_weight"], a["in_proj_bias"]
        self.q_proj_weight = a["q_proj_weight"]
        self.k_proj_weight = a["k_proj_weight"]
        self.v_proj_weight = a["v_proj_weight"]
        self.dropout, self.training = a["dropout_p"], a["training"]
        self.offset, self.backward = c.offset, c.backward
        w, b = a["out_proj_weight"], a["out_proj_bias"]
        self.out_proj = lambda x: P.linear(x, w, b, offset=c.offset, backward=c.backward)


def _bind_mha():
    from .nn.modules import MultiheadAttention as M
    _MHAView._mask, _MHAView._attend, _MHAView.forward = M._mask, M._attend, M.forward


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
             "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p",
             "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
             "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v",
             "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True,
                 "attn_mask": None, "use_separate_proj_weight": False, "q_proj_weight": None,
                 "k_proj_weight": None, "v_proj_weight": None, "static_k": None,
                 "static_v": None, "average_attn_weights": True, "is_causal": False}


def _l1_mha(c, args, kwargs):
    """nn.MultiheadAttention's functional core, computed as pam.nn.MultiheadAttention does."""
    a = _args(_MHA_ARGS, args, kwargs, _MHA_DEFAULTS)
    if (a["bias_k"] is not None or a["add_zero_attn"] or a["static_k"] is not None
            or a["static_v"] is not None):
        return NotImplemented                 # rare options: layer 2 sees the internals
    tensors = [a[k] for k in ("query", "key", "value", "in_proj_weight", "in_proj_bias",
                              "out_proj_weight", "out_proj_bias", "q_proj_weight",
                              "k_proj_weight", "v_proj_weight")]
    if not _all_f32(*tensors):
        return NotImplemented
    if _MHAView.forward is None:
        _bind_mha()
    view = _MHAView(c, a)
    return view.forward(a["query"], a["key"], a["value"], a["key_padding_mask"],
                        a["need_weights"], a["attn_mask"], a["average_attn_weights"],
                        a["is_causal"])


T = torch.Tensor
_LAYER1 = {}


def _register(family, handler, *funcs):
    for f in funcs:
        _LAYER1[f] = (handler, family)


_register("matmul", _l1_matmul(), torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm,
          torch.bmm, T.bmm)
_register("matmul", _l1_matmul(swap=True), T.__rmatmul__)
_register("matmul", _l1_linear, F.linear)
_register("matmul", _l1_addmm, torch.addmm, T.addmm, torch.baddbmm, T.baddbmm)
_register("elementwise", _l1_binary(mul), torch.mul, torch.multiply, T.mul, T.multiply,
          T.__mul__)
_register("elementwise", _l1_binary(mul, swap=True), T.__rmul__)
_register("elementwise", _l1_div, torch.div, torch.divide, torch.true_divide, T.div,
          T.divide, T.true_divide, T.__truediv__)
_register("elementwise", _l1_binary(div, swap=True), T.__rtruediv__, T.__rdiv__)
_register("elementwise", _l1_unary(reciprocal), torch.reciprocal, T.reciprocal)
_register("elementwise", _l1_unary(lambda c, x: mul(c, x, x)), torch.square, T.square)
_register("nonlinear", _l1_unary(exp), torch.exp, T.exp)
_register("nonlinear", _l1_unary(lambda c, x: P.exp2(x, backward=c.backward)),
          torch.exp2, T.exp2)
_register("nonlinear", _l1_unary(log), torch.log, T.log)
_register("nonlinear", _l1_unary(lambda c, x: P.log2(x, backward=c.backward)),
          torch.log2, T.log2)
_register("nonlinear", _l1_unary(sqrt), torch.sqrt, T.sqrt)
_register("nonlinear", _l1_unary(rsqrt), torch.rsqrt, T.rsqrt)
_register("nonlinear", _l1_pow(), torch.pow, T.pow, T.__pow__)
_register("nonlinear", _l1_pow(swap=True), T.__rpow__)
_register("nonlinear", _l1_activation(sigmoid), torch.sigmoid, T.sigmoid, F.sigmoid)
_register("nonlinear", _l1_activation(tanh), torch.tanh, T.tanh, F.tanh)
_register("nonlinear", _l1_activation(silu), F.silu)
_register("nonlinear", _l1_gelu, F.gelu)
_register("nonlinear", _l1_softmax(False), F.softmax, torch.softmax, T.softmax)
_register("nonlinear", _l1_softmax(True), F.log_softmax, torch.log_softmax, T.log_softmax)
_register("norm", _l1_layer_norm, F.layer_norm)
_register("norm", _l1_mean, torch.mean, T.mean)
_register("loss", _l1_cross_entropy, F.cross_entropy)
_register("loss", _l1_nll, F.nll_loss)
_register("dropout", _l1_dropout, F.dropout)
_register("attention", _l1_sdpa, F.scaled_dot_product_attention)
_register("attention", _l1_mha, F.multi_head_attention_forward)
_register("conv", _l1_conv(1), F.conv1d)
_register("conv", _l1_conv(2), F.conv2d)


class _FunctionLayer(TorchFunctionMode):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _LAYER1.get(func)
        out = NotImplemented
        if entry is not None and entry[1] in self.cfg.ops:
            out = entry[0](self.cfg, args, kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            _loc.tag_outputs(out, _loc.where_now())
        return out


# ============================================================================ layer 2
def _bind(func, args, kwargs):
    """ATen arguments in schema order (defaults filled in) as a list, plus ``out``."""
    vals = []
    out = None
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            v = args[i]
        elif a.name in kwargs:
            v = kwargs[a.name]
        elif a.has_default_value():
            v = a.default_value
        else:
            v = None
        if a.is_out:
            out = v
        else:
            vals.append(v)
    return vals, out


def _outputs_like(res, func):
    return res


def _l2_softmax_backward(c, grad, out, dim, input_dtype):
    """y (g - sum(g y)) with PAM products (approximate backward)."""
    s = mul(c, grad, out).sum(dim=dim, keepdim=True)
    return mul(c, out, grad - s)


def _l2_log_softmax_backward(c, grad, out, dim, input_dtype):
    """g - pa_exp(y) sum(g)."""
    s = grad.sum(dim=dim, keepdim=True)
    return grad - mul(c, exp(c, out), s)


def _l2_native_layer_norm(c, x, normalized_shape, weight, bias, eps):
    k = len(normalized_shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    n = math.prod(normalized_shape)
    mu = PF.mean(x, dims, keepdim=True)
    if n & (n - 1):
        for _ in range(PF.MEAN_REFINEMENTS):
            mu = mu + P.div((x - mu).sum(dim=dims, keepdim=True), float(n))
    xc = x - mu
    var = P.div(mul(c, xc, xc).sum(dim=dims, keepdim=True), float(n))
    rstd = reciprocal(c, P.pow(var + float(eps), 0.5))
    y = P.div(xc, P.pow(var + float(eps), 0.5))
    if weight is not None:
        y = mul(c, y, weight)
    if bias is not None:
        y = y + bias
    return y, mu, rstd


def _l2_native_layer_norm_backward(c, grad, x, normalized_shape, mu, rstd, weight, bias,
                                   mask):
    k = len(normalized_shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    outer = tuple(range(x.dim() - k))
    n = math.prod(normalized_shape)
    xhat = mul(c, x - mu, rstd)
    g = mul(c, grad, weight) if weight is not None else grad
    gx = gw = gb = None
    if mask[0]:
        s1 = g.sum(dim=dims, keepdim=True)
        s2 = mul(c, g, xhat).sum(dim=dims, keepdim=True)
        inner = mul(c, g, float(n)) - s1 - mul(c, xhat, s2)
        gx = mul(c, P.div(rstd, float(n)), inner)
    if mask[1] and weight is not None:
        gw = mul(c, grad, xhat).sum(dim=outer)
    if mask[2] and bias is not None:
        gb = grad.sum(dim=outer)
    return gx, gw, gb


def _l2_nll_forward(c, x, target, weight, reduction, ignore_index):
    red = {0: "none", 1: "mean", 2: "sum"}[reduction]
    loss = PF.nll_loss(x, target, weight, ignore_index, red)
    ignore = target == ignore_index
    if weight is None:
        total = (~ignore).sum().to(torch.float32)
    else:
        t = torch.where(ignore, torch.zeros_like(target), target)
        total = torch.where(ignore, torch.zeros((), dtype=x.dtype), weight[t]).sum()
    return loss, total


def _l2_nll_backward(c, grad, x, target, weight, reduction, ignore_index, total):
    """d loss / d x: -w_t (/ total for mean) at the target index, 0 elsewhere."""
    ignore = target == ignore_index
    t = torch.where(ignore, torch.zeros_like(target), target)
    if weight is None:
        w = torch.ones(t.shape, dtype=x.dtype, device=x.device)
    else:
        w = weight[t]
    w = torch.where(ignore, torch.zeros((), dtype=x.dtype, device=x.device), w)
    g = mul(c, w, grad) if grad.dim() > 0 else mul(c, w, grad.reshape(()))
    if reduction == 1:
        g = div(c, g, total)
    out = torch.zeros_like(x)
    cdim = 1 if x.dim() > 1 else 0
    return out.scatter(cdim, t.unsqueeze(cdim), g.neg().unsqueeze(cdim))


def _l2_native_dropout(c, x, p, train):
    if not train or p == 0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    keep = PF._keep_mask(x.shape, p, x.device)
    if p == 1:
        return torch.zeros_like(x), keep
    scale = PF._pad_scalar(1.0, 1.0 - p)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(keep, mul(c, x, scale), zero), keep


def _l2_dropout_backward(c, grad, mask, scale):
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return torch.where(mask, mul(c, grad, scale), zero)


def _l2_bernoulli(c, x, p=None, generator=None):
    """Bernoulli(p) samples shaped like x from integer random numbers (p resolved to 2^-24
    steps), as dropout draws its mask. Probabilities given as a tensor are refused."""
    if p is None or isinstance(p, torch.Tensor):
        raise UnsupportedOpError("bernoulli with tensor probabilities is not emulated "
                                 "(float scaling); only bernoulli(p: float)")
    keep = PF._keep_mask(x.shape, 1.0 - float(p), x.device, generator)
    return keep.to(x.dtype)


def _l2_convolution(c, x, w, bias, stride, padding, dilation, transposed, output_padding,
                    groups):
    if transposed:
        raise UnsupportedOpError("transposed convolution is not emulated")
    from . import conv as C
    return C.conv_forward(x, w, bias, stride, padding, dilation, groups,
                          offset_constant(c.offset))


def _l2_convolution_backward(c, grad, x, w, bias_sizes, stride, padding, dilation,
                             transposed, output_padding, groups, mask):
    if transposed:
        raise UnsupportedOpError("transposed convolution is not emulated")
    from . import conv as C
    return C.conv_backward(grad, x, w, stride, padding, dilation, groups,
                           offset_constant(c.offset), False, tuple(mask))


def _attention_probs(c, q, k, is_causal, attn_mask, scale):
    """(PA softmax probabilities, scaled q, scale) of SDPA, as pam's definition computes them."""
    sc = PF.attention_scale(q.shape[-1]) if scale is None else float(scale)
    qs = mul(c, q, sc)
    scores = matmul(c, qs, k.transpose(-2, -1))
    ninf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = torch.where(causal, scores, ninf)
    if attn_mask is not None:
        scores = (torch.where(attn_mask, scores, ninf) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return softmax(c, scores, -1, True), qs, sc, scores


def _l2_flash_cpu(c, q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
    """torch's fused CPU attention (used when no grad is needed), computed with PAM."""
    if dropout_p > 0:
        raise UnsupportedOpError("fused CPU attention with dropout is not emulated")
    p, _, _, scores = _attention_probs(c, q, k, is_causal, attn_mask, scale)
    out = matmul(c, p, v)
    z = mul(c, scores, LOG2_E)
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), torch.floor(m), torch.zeros_like(m))
    lse2 = P.log2(P.exp2(z - m).sum(dim=-1, keepdim=True)) + m
    return out, P.div(lse2, LOG2_E).squeeze(-1)


def _l2_flash_cpu_backward(c, grad, q, k, v, out, lse, dropout_p=0.0, is_causal=False,
                           attn_mask=None, scale=None):
    """Gradients of the fused attention from recomputed PA probabilities (approximate)."""
    if dropout_p > 0:
        raise UnsupportedOpError("fused CPU attention with dropout is not emulated")
    p, qs, sc, _ = _attention_probs(c, q, k, is_causal, attn_mask, scale)
    gv = matmul(c, p.transpose(-2, -1), grad)
    gp = matmul(c, grad, v.transpose(-2, -1))
    gs = _l2_softmax_backward(c, gp, p, -1, None)
    gq = mul(c, matmul(c, gs, k), sc)
    gk = matmul(c, gs.transpose(-2, -1), qs)
    return gq, gk, gv


def _sum_to(t, like):
    return t.sum_to_size(like.shape) if t.shape != like.shape else t


_LAYER2 = {
    # name: (family, handler(c, *schema-ordered args))
    "mul": ("elementwise", mul),
    "div": ("elementwise", lambda c, a, b, rounding_mode=None: _rounded_div(c, a, b,
                                                                             rounding_mode)),
    "true_divide": ("elementwise", div),
    "reciprocal": ("elementwise", reciprocal),
    "addcmul": ("elementwise", addcmul),
    "addcdiv": ("elementwise", addcdiv),
    "lerp": ("elementwise", lerp),
    "add": ("elementwise", lambda c, a, b, alpha=1: add_scaled(c, a, b, alpha)),
    "sub": ("elementwise", lambda c, a, b, alpha=1: add_scaled(c, a, b, alpha, True)),
    "rsub": ("elementwise", lambda c, a, b, alpha=1: add_scaled(c, _operand(b, a), a, alpha,
                                                              True)),
    "square": ("elementwise", lambda c, x: mul(c, x, x)),
    "mm": ("matmul", matmul),
    "bmm": ("matmul", matmul),
    "matmul": ("matmul", matmul),
    "mv": ("matmul", matmul),
    "dot": ("matmul", matmul),
    "addmm": ("matmul", addmm),
    "baddbmm": ("matmul", addmm),
    "addmv": ("matmul", addmm),
    "exp": ("nonlinear", exp),
    "exp2": ("nonlinear", lambda c, x: P.exp2(x)),
    "log": ("nonlinear", log),
    "log2": ("nonlinear", lambda c, x: P.log2(x)),
    "sqrt": ("nonlinear", sqrt),
    "rsqrt": ("nonlinear", rsqrt),
    "pow": ("nonlinear", pow_),
    "sigmoid": ("nonlinear", sigmoid),
    "tanh": ("nonlinear", tanh),
    "silu": ("nonlinear", silu),
    "gelu": ("nonlinear", gelu),
    "tanh_backward": ("nonlinear", lambda c, g, y: mul(c, g, 1.0 - mul(c, y, y))),
    "sigmoid_backward": ("nonlinear", lambda c, g, y: mul(c, g, mul(c, y, 1.0 - y))),
    "silu_backward": ("nonlinear", lambda c, g, x: mul(
        c, g, _silu_slope(c, x))),
    "gelu_backward": ("nonlinear", lambda c, g, x, approximate="none": mul(
        c, g, gelu_slope(x))),
    "_softmax": ("nonlinear", lambda c, x, dim, half: softmax(c, x, dim)),
    "_safe_softmax": ("nonlinear", lambda c, x, dim, dtype=None: softmax(c, x, dim, True)),
    "_log_softmax": ("nonlinear", lambda c, x, dim, half: log_softmax(c, x, dim)),
    "_softmax_backward_data": ("nonlinear", _l2_softmax_backward),
    "_log_softmax_backward_data": ("nonlinear", _l2_log_softmax_backward),
    "native_layer_norm": ("norm", _l2_native_layer_norm),
    "native_layer_norm_backward": ("norm", _l2_native_layer_norm_backward),
    "mean": ("norm", mean),
    "linalg_vector_norm": ("norm", vector_norm),
    "norm": ("norm", lambda c, x, p=2, dim=None, keepdim=False, dtype=None:
             vector_norm(c, x, 2 if p is None else p, dim, keepdim)),
    "nll_loss_forward": ("loss", _l2_nll_forward),
    "nll_loss_backward": ("loss", _l2_nll_backward),
    "native_dropout": ("dropout", _l2_native_dropout),
    "native_dropout_backward": ("dropout", _l2_dropout_backward),
    "bernoulli": ("dropout", _l2_bernoulli),
    "convolution": ("conv", _l2_convolution),
    "_scaled_dot_product_flash_attention_for_cpu": ("attention", _l2_flash_cpu),
    "_scaled_dot_product_flash_attention_for_cpu_backward": ("attention",
                                                             _l2_flash_cpu_backward),
    "convolution_backward": ("conv", _l2_convolution_backward),
}


def _silu_slope(c, x):
    s = sigmoid(c, x)
    return s + mul(c, x, mul(c, s, 1.0 - s))


def _rounded_div(c, a, b, rounding_mode):
    q = div(c, a, b)
    if rounding_mode is None:
        return q
    return torch.floor(q) if rounding_mode == "floor" else torch.trunc(q)


# Multiply-family ops that need no arithmetic emulation of their own (integer results,
# or decompositions handled above).
_ALWAYS_FLOAT_OK = frozenset()


_BANNED = {}            # OpOverload -> is it of the multiply family (cached)
# Ops whose result is floating point even for integer inputs (int / int, exp(int)...).
_FLOAT_RESULT = frozenset({"div", "true_divide", "reciprocal", "exp", "exp2", "log", "log2",
                           "sqrt", "rsqrt", "sigmoid", "tanh", "mean"})


def _packet(func):
    return func.overloadpacket.__name__


def _split(name):
    """("mul", inplace, foreach) for "mul", "mul_", "_foreach_mul_"..."""
    foreach = name.startswith("_foreach_")
    if foreach:
        name = name[len("_foreach_"):]
    inplace = name.endswith("_") and not name.endswith("__")
    if inplace:
        name = name[:-1]
    return name, inplace, foreach


def _float_args(flat):
    return [t for t in flat if isinstance(t, torch.Tensor)
            and (t.dtype.is_floating_point or t.dtype.is_complex)]


class _DispatchLayer(TorchDispatchMode):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def _refuse(self, name, why):
        where = _loc.current_location()
        msg = (f"pam.arithmetic(): aten.{name} {why}" + (f" ({where})" if where else ""))
        if self.cfg.strict:
            raise UnsupportedOpError(msg)
        if name not in self.cfg.reported:
            self.cfg.reported.add(name)
            warnings.warn(msg + "; it runs in float (strict=False)", stacklevel=2)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        banned = _BANNED.get(func)
        if banned is None:
            banned = _BANNED[func] = is_banned(_packet(func))
        if not banned:
            return func(*args, **kwargs)
        full = _packet(func)
        flat, _ = tree_flatten((args, kwargs))
        floats = _float_args(flat)
        base, inplace, foreach = _split(full)
        if not floats and not (base in _FLOAT_RESULT
                               or any(isinstance(v, float) for v in flat)):
            return func(*args, **kwargs)               # integer arithmetic
        if full == "embedding_dense_backward":
            return func(*args, **kwargs)
        entry = _LAYER2.get(base)
        if entry is None:
            self._refuse(full, "has no PAM version")
            return func(*args, **kwargs)
        family, handler = entry
        if family not in self.cfg.ops:
            return func(*args, **kwargs)               # the user chose float for it
        bad = [t.dtype for t in floats if t.dtype != torch.float32
               and not (t.dim() == 0 and t.device.type == "cpu" and t.numel() == 1
                        and not foreach)]
        if bad:
            self._refuse(full, f"on {bad[0]} tensors (pam emulates float32 only)")
            return func(*args, **kwargs)
        vals, out = _bind(func, args, kwargs)
        with torch.no_grad():
            if foreach:
                return self._foreach(handler, base, vals, inplace)
            res = handler(self.cfg, *vals)
        if inplace:
            target = vals[0]
            if isinstance(res, tuple):
                res = res[0]
            return target.copy_(_sum_to(res, target) if res.shape != target.shape else res)
        if out is not None:
            if isinstance(out, (tuple, list)):
                for o, r in zip(out, res):
                    o.copy_(r)
            else:
                out.copy_(res)
            return out
        return _match(res, func)

    def _foreach(self, handler, base, vals, inplace):
        """``_foreach_<op>`` over lists: elementwise ops run as one launch on the
        concatenated tensors (same bits: every element is computed alone); others, or
        lists that cannot be concatenated, run tensor by tensor."""
        n = len(vals[0])
        flat = _flatten_foreach(base, vals, self.cfg) if n > 1 else None
        if flat is not None:
            sizes, args = flat
            pieces = handler(self.cfg, *args).split(sizes)
            if inplace:
                for t, p in zip(vals[0], pieces):
                    t.copy_(p.view_as(t))
                return None
            return [p.view_as(t) for t, p in zip(vals[0], pieces)]
        results = []
        for i in range(n):
            args_i = [v[i] if isinstance(v, (list, tuple)) and len(v) == n else v
                      for v in vals]
            r = handler(self.cfg, *args_i)
            if inplace:
                vals[0][i].copy_(r)
            else:
                results.append(r)
        return None if inplace else results


_ELEMENTWISE = frozenset({"mul", "div", "addcmul", "addcdiv", "lerp", "add", "sub", "sqrt",
                          "rsqrt", "exp", "log", "reciprocal", "pow", "sigmoid", "tanh"})


def _flatten_foreach(base, vals, cfg):
    """(sizes, arguments on the concatenated tensors) for an elementwise foreach op whose
    tensor lists share shapes, device and dtype float32; None when it does not apply."""
    if base not in _ELEMENTWISE:
        return None
    first = vals[0]
    n = len(first)
    if not all(_is_f32(t) for t in first) or len({t.device for t in first}) != 1:
        return None
    sizes = [t.numel() for t in first]
    args = []
    for v in vals:
        if isinstance(v, (list, tuple)) and len(v) == n:
            if isinstance(v[0], torch.Tensor):
                if any(not _is_f32(t) or t.shape != f.shape or t.device != f.device
                       for t, f in zip(v, first)):
                    return None
                args.append(torch.cat([t.reshape(-1) for t in v]))
            else:                       # one scalar per tensor: a per-element operand
                if cfg.offset is not None:
                    return None         # scalars take no offset, data tensors do
                per = torch.tensor([float(x) for x in v], dtype=torch.float32,
                                   device=first[0].device)
                args.append(per.repeat_interleave(torch.tensor(sizes, device=per.device)))
        elif isinstance(v, torch.Tensor) and v.dim() > 0:
            return None
        else:
            args.append(v)
    return sizes, args


def _match(res, func):
    """Return ``res`` with the structure aten's schema promises (tuple results as tuples)."""
    rets = func._schema.returns
    if len(rets) > 1 and not isinstance(res, tuple):
        return tuple(res)
    if isinstance(res, torch.Tensor) and rets and str(rets[0].type) == "Tensor":
        return res
    return res


# ============================================================================ the context
_ACTIVE = threading.local()        # the stack of entered arithmetic contexts, per thread


def active():
    """The innermost ``pam.arithmetic`` entered on this thread, or None.

    Code that re-runs a forward computation later (a reversible stack's backward recompute,
    activation checkpointing) can record it and re-enter an equal context with
    :meth:`arithmetic.spec` to reproduce the same bits.
    """
    stack = getattr(_ACTIVE, "stack", None)
    return stack[-1] if stack else None


class arithmetic:
    """Context manager: every float32 multiply-family op inside runs in PAM arithmetic.

    ``with pam.arithmetic(): loss = F.cross_entropy(model(x), y); loss.backward();
    opt.step()`` -- see the module docstring for the mechanism and coverage. Re-entrant and
    reusable; nested contexts are allowed (the innermost handles an op first).
    """

    def __init__(self, backward="approx", offset=None, ops="all", strict=True):
        self.cfg = _Config(backward, offset, ops, strict)
        self._spec = {"backward": backward, "offset": offset,
                      "ops": ops if isinstance(ops, str) else frozenset(ops),
                      "strict": strict}
        self._entered = []

    @property
    def spec(self):
        """The constructor arguments: ``pam.arithmetic(**ctx.spec)`` is an equal context."""
        return dict(self._spec)

    def __enter__(self):
        _loc.Tracker.start()
        fmode, dmode = _FunctionLayer(self.cfg), _DispatchLayer(self.cfg)
        fastpath = _mha_fastpath(False)
        fmode.__enter__()
        dmode.__enter__()
        self._entered.append((fmode, dmode, fastpath))
        if not hasattr(_ACTIVE, "stack"):
            _ACTIVE.stack = []
        _ACTIVE.stack.append(self)
        return self

    def __exit__(self, *exc):
        fmode, dmode, fastpath = self._entered.pop()
        try:
            _ACTIVE.stack.pop()
            dmode.__exit__(*exc)
            fmode.__exit__(*exc)
        finally:
            _mha_fastpath(fastpath)
            _loc.Tracker.stop()
        return False

    @property
    def reported(self):
        """Names of ops that ran in float under ``strict=False`` (each reported once)."""
        return sorted(self.cfg.reported)


def _mha_fastpath(enabled):
    """Set torch's native MHA/TransformerEncoderLayer fast path; return the old setting."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):
        return True
    old = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(enabled)
    return old
