"""Layer 2 of ``pam.arithmetic()``: a TorchDispatchMode that computes, with PAM kernels,
every float32 multiply-family ATen operator still running (backward formulas of native
ops, optimizers' ``_foreach_*`` and in-place ops, internals of torch composites), and
refuses, with its location, any it cannot emulate."""
import math
import threading
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import functional as PF
from .. import location as _loc
from .._internal import LAYER_ATTR, layers_off
from .. import ops as P
from ..audit import _alpha_not_one, is_banned
from .. import families as FAM
from . import optimizers as _optim
from .semantics import (LOG2_E, UnsupportedOpError, _is_f32, _operand, add_scaled, addcdiv,
                        addcmul, addmm, div, exp, gelu, gelu_slope, lerp, log, log_softmax,
                        matmul, mean, mul, pow_, reciprocal, rsqrt, sigmoid, silu, softmax,
                        sqrt, tanh, vector_norm)


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
    from .. import conv as C
    m = c.multiplier
    x, w = FAM.round_operand(x, m), FAM.round_operand(w, m)
    return C.conv_forward(x, w, bias, stride, padding, dilation, groups, m.off, m.kind)


def _l2_convolution_backward(c, grad, x, w, bias_sizes, stride, padding, dilation,
                             transposed, output_padding, groups, mask):
    if transposed:
        raise UnsupportedOpError("transposed convolution is not emulated")
    from .. import conv as C
    m = c.multiplier
    x, w = FAM.round_operand(x, m), FAM.round_operand(w, m)
    return C.conv_backward(grad, x, w, stride, padding, dilation, groups, m.off, False,
                           tuple(mask), m.kind)


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


_BANNED = {}            # OpOverload -> is it of the multiply family (cached)
_ALPHA_OPS = {}         # OpOverload -> is it add/sub/rsub (a multiply when alpha != 1)
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


_COMPILING = threading.local()     # .depth: pam.compile'd calls running on this thread


class _DispatchLayer(TorchDispatchMode):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def ignore_compile_internals(cls):
        """True only while a :func:`pam.compile`'d callable runs on this thread: Dynamo then
        compiles frames under this mode, whose graphs ``pam.mode.backend`` makes PAM, and
        this layer stays on for the code Dynamo runs eagerly. Under any other
        ``torch.compile`` Dynamo skips every frame (eager, still PAM; ``fullgraph=True``
        raises)."""
        return getattr(_COMPILING, "depth", 0) > 0

    def _where(self):
        """Text naming where the op now handled came from (module path, source line)."""
        return _loc.current_location()

    def _refuse(self, name, why):
        where = self._where()
        msg = (f"pam.arithmetic(): aten.{name} {why}" + (f" ({where})" if where else ""))
        if self.cfg.strict:
            raise UnsupportedOpError(msg)
        if name not in self.cfg.reported:
            self.cfg.reported.add(name)
            warnings.warn(msg + "; it runs in float (strict=False)", stacklevel=2)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        banned = _BANNED.get(func)
        if banned is None:          # torch.ops.pam.* are the PAM kernels themselves
            banned = _BANNED[func] = func.namespace != "pam" and is_banned(_packet(func))
            _ALPHA_OPS[func] = (func.namespace == "aten"
                                and _split(_packet(func))[0] in ("add", "sub", "rsub"))
        if not banned and not (_ALPHA_OPS.get(func) and _alpha_not_one(func, args, kwargs)):
            return func(*args, **kwargs)
        full = _packet(func)
        base, inplace, foreach = _split(full)
        if inplace and base in _optim.FUSED_STEPS:    # a whole optimizer step
            try:
                with layers_off():
                    return _optim.fused_step(self.cfg, base, func, args, kwargs)
            except UnsupportedOpError as e:            # raised before any tensor changed
                if self.cfg.strict:
                    raise
                _optim.report(self.cfg, full, f"{e}; it runs in float (strict=False)")
                return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        floats = _float_args(flat)
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
        with torch.no_grad(), layers_off():
            if foreach:
                return self._foreach(handler, base, vals, inplace)
            res = handler(self.cfg, *vals)
        if inplace:
            target = vals[0]
            if isinstance(res, tuple):
                res = res[0]
            return target.copy_(res)          # broadcasts like the in-place op
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


setattr(_DispatchLayer, LAYER_ATTR, True)

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
    """``res`` as aten's schema returns it: a tuple when the op has several results."""
    if len(func._schema.returns) > 1 and not isinstance(res, tuple):
        return tuple(res)
    return res


