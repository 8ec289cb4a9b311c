"""``pam.convert(model)``: swap torch layers for their PAM versions in place.

For module-level control; to run *any* model in PAM arithmetic, including the functional
calls inside its own ``forward`` code, use :func:`pam.arithmetic` instead.

Replaced (same Parameter objects are moved over, so weights, devices and any optimizer
already holding them are kept): ``nn.Linear`` (and ``NonDynamicallyQuantizableLinear``),
``nn.Conv1d``, ``nn.Conv2d`` (padding_mode "zeros"), ``nn.LayerNorm``,
``nn.MultiheadAttention`` (without add_bias_kv/add_zero_attn),
``nn.Dropout``, ``nn.GELU``, ``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.SiLU``,
``nn.Softmax``, ``nn.LogSoftmax``, Hugging Face ``Conv1D`` (as
:class:`pam.nn.TransposedLinear`), and subclasses of these that do not override
``forward`` (a subclass that does is reported: its own forward code is unknown).

``nn.TransformerEncoderLayer``: its children are converted and torch's fused fast path
(``torch._transformer_encoder_layer_fwd``, float kernels) is switched off for the layer,
so eval mode computes in PAM too; a functional activation (``F.relu``/``F.gelu``) is
replaced by its PAM version. ``nn.TransformerEncoder`` is descended into.

Kept as they are, because they do no float multiplication (``KEPT_MODULES``): containers
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``), ``nn.Identity``,
``nn.Flatten``, ``nn.Unflatten``, and ``nn.Embedding`` (a table lookup; its backward is an
index-add) when it has no ``max_norm`` and no ``scale_grad_by_freq``.

Anything else from ``torch.nn`` (e.g. ``nn.BatchNorm1d``) is unsupported: with
``strict=True`` (default) ``convert`` raises :class:`UnsupportedModuleError` listing every
such module by qualified name before changing anything; with ``strict=False`` it warns
with the same list and leaves them in place. Modules defined outside ``torch.nn`` (your
own blocks) are descended into and kept; their own ``forward`` code is not inspected:
float arithmetic written there (``x * y``, ``F.gelu``...) stays float.
:func:`float_leaves` lists every leaf module with parameters that still computes in
float after conversion; :func:`pam.audit.no_float_multiply` checks a step end to end.
"""
import functools
import warnings

import torch.nn.functional as F
from torch import nn

from .. import families as FAM
from .. import functional as PF
from . import modules as M

__all__ = ["convert", "float_leaves", "KEPT_MODULES", "UnsupportedModuleError"]


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


def _hf_conv1d(m, offset, backward):
    return M.TransposedLinear(m.weight, m.bias, offset=offset, backward=backward)


def _is_hf_conv1d(m):
    t = type(m)
    return (t.__name__ == "Conv1D" and t.__module__.startswith("transformers")
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2)


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
    nn.Tanh: lambda m, o, b: M.Tanh(backward=b),
    nn.Sigmoid: lambda m, o, b: M.Sigmoid(backward=b),
    nn.SiLU: lambda m, o, b: M.SiLU(backward=b),
    nn.Softmax: lambda m, o, b: M.Softmax(m.dim, offset=o, backward=b),
    nn.LogSoftmax: lambda m, o, b: M.LogSoftmax(m.dim, offset=o, backward=b),
}


def _factory(m):
    """The factory converting ``m`` (its class or a base whose forward it keeps), or None."""
    if _is_hf_conv1d(m):
        return _hf_conv1d
    for cls in type(m).__mro__:
        if cls in _FACTORIES:
            return _FACTORIES[cls] if type(m).forward is cls.forward else None
    return None


def _overridden_base(m):
    """The supported torch class ``m`` subclasses while overriding its forward, or None."""
    for cls in type(m).__mro__[1:]:
        if cls in _FACTORIES and type(m).forward is not cls.forward:
            return cls
    return None


_ENCODER_ACTIVATIONS = {F.relu: None, F.gelu: PF.gelu}


def _why_unsupported(m):
    """None if ``m`` can be converted, kept or descended into, else a short reason."""
    t = type(m)
    if isinstance(m, M.PamModule):
        return None
    if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
        return "add_bias_kv/add_zero_attn are not supported"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
    if _factory(m) is not None:
        return None
    base = _overridden_base(m)
    if base is not None:
        return (f"subclass of nn.{base.__name__} that overrides forward (run the model "
                f"under pam.arithmetic() instead)")
    if t is nn.Embedding:
        if m.max_norm is not None or m.scale_grad_by_freq:
            return "Embedding with max_norm or scale_grad_by_freq uses float multiply"
        return None
    if isinstance(m, nn.TransformerEncoderLayer):
        act = m.activation
        if not isinstance(act, nn.Module) and act not in _ENCODER_ACTIVATIONS:
            return f"activation function {getattr(act, '__name__', act)!r} has no PAM version"
        return None
    if t in KEPT_MODULES or t is nn.TransformerEncoder:
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
        if _factory(child) is not None:
            out_replace.append((module, name))
            continue
        _plan(child, qual, out_replace, out_bad)


def _convert_encoder_layers(module, backward):
    """Switch off the fused float fast path and make functional activations PAM."""
    for m in module.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            m.activation_relu_or_gelu = 0      # torch takes its fused float kernel only if set
            act = _ENCODER_ACTIVATIONS.get(m.activation, None) \
                if not isinstance(m.activation, nn.Module) else None
            if act is not None:
                m.activation = functools.partial(act, backward=backward)


def float_leaves(module):
    """(qualified name, class name) of every leaf module with parameters that is not PAM.

    Empty after a complete :func:`convert`: nothing with weights computes in float.
    Embedding tables (lookups) are not listed.
    """
    out = []
    for name, m in module.named_modules():
        if next(m.children(), None) is not None or isinstance(m, M.PamModule):
            continue
        if next(m.parameters(recurse=False), None) is None or type(m) is nn.Embedding:
            continue
        out.append((name or "<root>", type(m).__name__))
    return out


def convert(module, offset=None, backward="exact", strict=True, family="pam",
            operands="float32"):
    """Replace supported torch layers of ``module`` by PAM layers, recursively, in place.

    Returns ``module`` (or the replacement if ``module`` itself is a supported layer).
    ``offset``/``backward`` configure every new layer. ``strict``: raise (True, default)
    or warn (False) about unsupported torch layers; see the module docstring.
    ``family``/``operands`` (:mod:`pam.families`) set the multiplier and operand format of
    the matrix-product layers (Linear, Conv1d/2d, HF Conv1D, MultiheadAttention); the
    other layers keep PAM's definitions (with ``"pam_offset"``: its offset).
    ``family="float"`` is the baseline: only Linear, Conv1d/2d and HF Conv1D are replaced,
    by layers that round their operands to ``operands`` and compute in torch's float32;
    nothing else changes.
    """
    mult = FAM.resolve(family, operands, offset)
    M._check_config(mult.offset, backward)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if mult.kind == "float":
        return _set_family(_convert_matrix_layers(module, backward), "float", operands)
    converted = _convert_pam(module, mult.offset, backward, strict)
    return _set_family(converted, family if mult.kind != "pam" else "pam", operands)


_MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_matrix_layer(m):
    return (_is_hf_conv1d(m) or isinstance(m, _MATRIX_LAYERS)) and _factory(m) is not None \
        and _why_unsupported(m) is None


def _convert_matrix_layers(module, backward):
    """Replace only the Linear/Conv/HF Conv1D layers (for ``family="float"``)."""
    if _is_matrix_layer(module) and not isinstance(module, M.PamModule):
        new = _factory(module)(module, None, backward)
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        if isinstance(child, M.PamModule):
            continue
        new = _convert_matrix_layers(child, backward)
        if new is not child:
            setattr(module, name, new)
    return module


def _set_family(module, family, operands):
    """Set ``family``/``operands`` on every PAM layer in ``module`` (the matrix-product
    layers use them)."""
    for m in module.modules():
        if isinstance(m, M.PamModule):
            m.family, m.operands = family, operands
    return module


def _convert_pam(module, offset, backward, strict):
    """:func:`convert` for the PAM families and L-Mul."""
    why = _why_unsupported(module)
    bad = [("", type(module).__name__, why)] if why is not None else []
    replace = []
    if why is None and not isinstance(module, M.PamModule) and _factory(module) is None:
        _plan(module, "", replace, bad)
    if bad:
        listing = "; ".join(f"{q or '<root>'} ({t}: {w})" for q, t, w in bad)
        msg = f"pam.convert: unsupported layers: {listing}"
        if strict:
            raise UnsupportedModuleError(msg + " (pass strict=False to keep them as float)")
        warnings.warn(msg + "; they are kept and compute in float", stacklevel=3)
    factory = _factory(module) if why is None and not isinstance(module, M.PamModule) \
        else None
    if factory is not None:
        new = factory(module, offset, backward)
        new.train(module.training)
        return new
    for parent, name in replace:
        child = getattr(parent, name)
        new = _factory(child)(child, offset, backward)
        new.train(child.training)
        setattr(parent, name, new)
    _convert_encoder_layers(module, backward)
    return module
