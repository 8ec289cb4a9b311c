"""Layer 1 of ``pam.arithmetic()``: a TorchFunctionMode that takes the torch functions with
a PAM definition and its own autograd rule (exact or approximate backward)."""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import functional as PF
from .. import location as _loc
from .._internal import LAYER_ATTR, call_without_layers
from .. import ops as P
from .semantics import (UnsupportedOpError, _is_f32, div, exp, gelu, layer_norm, log,
                        log_softmax, matmul, mean, mul, pow_, reciprocal, rsqrt, sigmoid,
                        silu, softmax, sqrt, tanh, addmm)


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
                    backward=c.backward, family=c.family, operands=c.operands)


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
        a = _args(("input", "inplace"), args, kwargs, {"inplace": False})
        if a["inplace"] or set(a) != {"input", "inplace"} or not _is_f32(a["input"]):
            return NotImplemented          # in place / out=: the dispatch layer computes it
        return fn(c, a["input"])
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
                                           offset=c.offset, backward=c.backward,
                                           family=c.family)


def _l1_conv(n):
    def h(c, args, kwargs):
        from .. import conv as C
        a = _args(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  args, kwargs, {"bias": None, "stride": 1, "padding": 0, "dilation": 1,
                                 "groups": 1})
        if not _all_f32(a["input"], a["weight"], a["bias"]):
            return NotImplemented
        fn = C.conv1d if n == 1 else C.conv2d
        return fn(a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                  a["dilation"], a["groups"], offset=c.offset, backward=c.backward,
                  family=c.family, operands=c.operands)
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
        self.family, self.operands = c.family, c.operands
        w, b = a["out_proj_weight"], a["out_proj_bias"]
        self.out_proj = lambda x: P.linear(x, w, b, **self._gemm())

    def _gemm(self):
        return {"offset": self.offset, "backward": self.backward, "family": self.family,
                "operands": self.operands}


def _bind_mha():
    from ..nn.modules import MultiheadAttention as M
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
            out = call_without_layers(entry[0], self.cfg, args, kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            _loc.tag_outputs(out)    # compiled: the FX nodes' metadata
        return out


setattr(_FunctionLayer, LAYER_ATTR, True)


