"""``pam.convert(model)``: swap torch layers for their PAM versions in place.

Replaced (same Parameter objects are moved over, so weights, devices and any optimizer
already holding them are kept): ``nn.Linear`` (and ``NonDynamicallyQuantizableLinear``),
``nn.Conv1d``, ``nn.Conv2d`` (padding_mode "zeros"), ``nn.LayerNorm``,
``nn.MultiheadAttention`` (without add_bias_kv/add_zero_attn), ``nn.Dropout``, ``nn.GELU``,
``nn.ReLU``, ``nn.Softmax``, ``nn.LogSoftmax``.

Kept as they are, because they do no float multiplication (``KEPT_MODULES``): containers
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``), ``nn.Identity``,
``nn.Flatten``, ``nn.Unflatten``, and ``nn.Embedding`` (a table lookup; its backward is an
index-add) when it has no ``max_norm`` and no ``scale_grad_by_freq``.

Anything else from ``torch.nn`` (e.g. ``nn.Conv3d``, ``nn.BatchNorm1d``, ``nn.Tanh``,
``nn.TransformerEncoderLayer``, whose forward calls fused float kernels) is unsupported:
with ``strict=True`` (default) ``convert`` raises :class:`UnsupportedModuleError` listing
every such module by qualified name before changing anything; with ``strict=False`` it
warns with the same list and leaves them in place. Modules defined outside ``torch.nn``
(your own blocks) are descended into and kept; their own ``forward`` code is not
inspected: float arithmetic written there (``x * y``, ``F.gelu``...) stays float. Use
:func:`pam.audit.no_float_multiply` to check a training step end to end.
"""
import warnings

from torch import nn

from . import modules as M

__all__ = ["convert", "KEPT_MODULES", "UnsupportedModuleError"]


class UnsupportedModuleError(TypeError):
    """``convert(strict=True)`` met torch layers it cannot make multiplication-free."""


KEPT_MODULES = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten,
                nn.Unflatten, nn.Embedding)


def _linear(m, offset, backward):
    new = M.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                   device="meta", offset=offset, backward=backward)
    new.weight, new.bias = m.weight, m.bias
    return new


def _conv(cls):
    def make(m, offset, backward):
        new = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                  padding=m.padding, dilation=m.dilation, groups=m.groups,
                  bias=m.bias is not None, device="meta", offset=offset, backward=backward)
        new.weight, new.bias = m.weight, m.bias
        return new
    return make


def _layer_norm(m, offset, backward):
    new = M.LayerNorm(m.normalized_shape, eps=m.eps,
                      elementwise_affine=m.elementwise_affine,
                      bias=getattr(m, "bias", None) is not None, device="meta",
                      offset=offset, backward=backward)
    new.weight, new.bias = m.weight, m.bias
    return new


def _mha(m, offset, backward):
    new = M.MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout,
                               bias=m.in_proj_bias is not None, kdim=m.kdim, vdim=m.vdim,
                               batch_first=m.batch_first, device="meta", offset=offset,
                               backward=backward)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "in_proj_bias"):
        setattr(new, name, getattr(m, name))
    new.out_proj.weight, new.out_proj.bias = m.out_proj.weight, m.out_proj.bias
    new.train(m.training)
    return new


_FACTORIES = {
    nn.Linear: _linear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: _linear,
    nn.Conv1d: _conv(M.Conv1d),
    nn.Conv2d: _conv(M.Conv2d),
    nn.LayerNorm: _layer_norm,
    nn.MultiheadAttention: _mha,
    nn.Dropout: lambda m, o, b: M.Dropout(m.p, m.inplace, backward=b),
    nn.GELU: lambda m, o, b: M.GELU(m.approximate, backward=b),
    nn.ReLU: lambda m, o, b: M.ReLU(m.inplace),
    nn.Softmax: lambda m, o, b: M.Softmax(m.dim, offset=o, backward=b),
    nn.LogSoftmax: lambda m, o, b: M.LogSoftmax(m.dim, offset=o, backward=b),
}


def _why_unsupported(m):
    """None if ``m`` can be converted or kept, else a short reason."""
    t = type(m)
    if isinstance(m, M.PamModule):
        return None
    if t is nn.MultiheadAttention and (m.bias_k is not None or m.add_zero_attn):
        return "add_bias_kv/add_zero_attn are not supported"
    if t in (nn.Conv1d, nn.Conv2d) and m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
    if t in _FACTORIES:
        return None
    if t is nn.Embedding:
        if m.max_norm is not None or m.scale_grad_by_freq:
            return "Embedding with max_norm or scale_grad_by_freq uses float multiply"
        return None
    if t in KEPT_MODULES:
        return None
    if t.__module__.startswith("torch."):
        return "no PAM version"
    return None                          # user-defined: descend into its children


def _plan(module, prefix, out_replace, out_bad):
    for name, child in module.named_children():
        qual = f"{prefix}.{name}" if prefix else name
        why = _why_unsupported(child)
        if why is not None:
            out_bad.append((qual, type(child).__name__, why))
            continue
        if isinstance(child, M.PamModule):
            continue
        if type(child) in _FACTORIES:
            out_replace.append((module, name))
            continue
        _plan(child, qual, out_replace, out_bad)


def convert(module, offset=None, backward="exact", strict=True):
    """Replace supported torch layers of ``module`` by PAM layers, recursively, in place.

    Returns ``module`` (or the replacement if ``module`` itself is a supported layer).
    ``offset``/``backward`` configure every new layer. ``strict``: raise (True, default)
    or warn (False) about unsupported torch layers; see the module docstring.
    """
    M._check_config(offset, backward)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    why = _why_unsupported(module)
    bad = [("", type(module).__name__, why)] if why is not None else []
    replace = []
    if why is None and not isinstance(module, M.PamModule) and type(module) not in _FACTORIES:
        _plan(module, "", replace, bad)
    if bad:
        listing = "; ".join(f"{q or '<root>'} ({t}: {w})" for q, t, w in bad)
        msg = f"pam.convert: unsupported layers: {listing}"
        if strict:
            raise UnsupportedModuleError(msg + " (pass strict=False to keep them as float)")
        warnings.warn(msg + "; they are kept and compute in float", stacklevel=2)
    if why is None and type(module) in _FACTORIES:
        new = _FACTORIES[type(module)](module, offset, backward)
        new.train(module.training)
        return new
    for parent, name in replace:
        child = getattr(parent, name)
        new = _FACTORIES[type(child)](child, offset, backward)
        new.train(child.training)
        setattr(parent, name, new)
    return module
