"""PAM layers with torch's parameter names, shapes and initialisation.

``Linear``, ``LayerNorm``, ``Dropout``, ``GELU``, ``ReLU``, ``Softmax`` and ``LogSoftmax``
subclass their torch namesakes (so ``isinstance(m, torch.nn.Linear)`` still holds and
initialisation is torch's) and override ``forward`` with :mod:`pam.nn.functional`.
``Conv1d`` and ``Conv2d`` subclass theirs too and run :func:`pam.conv1d` / :func:`pam.conv2d`
(``padding_mode="zeros"`` only). ``MultiheadAttention`` is a fresh module with exactly torch's parameter names
(``in_proj_weight``, ``in_proj_bias`` or ``q_proj_weight``/``k_proj_weight``/
``v_proj_weight``, ``out_proj.weight``, ``out_proj.bias``), so state_dicts load both ways.

Every module takes ``offset`` (None or a positive float, PAM offset) and ``backward``
(``"exact"`` or ``"approx"``); ``extra_repr`` shows them. The matrix-product layers
(``Linear``, ``TransposedLinear``, ``Conv1d``, ``Conv2d``, ``MultiheadAttention``) also
have ``family`` ("pam" or "lmul") and ``operands`` (the operand format of their matmuls
and convolutions; attention's two matmuls keep float32 operands): see :mod:`pam.families`.
``pam.convert(model, family=..., operands=...)`` sets them.
"""
import torch
from torch import nn

from .. import functional as PF
from ..conv import conv1d, conv2d
from ..ops import BACKWARD_MODES
from .. import dispatch as _D

__all__ = ["PamModule", "Linear", "TransposedLinear", "Conv1d", "Conv2d", "LayerNorm",
           "MultiheadAttention", "Dropout", "GELU", "ReLU", "Tanh", "Sigmoid", "SiLU",
           "Softmax", "LogSoftmax"]


def _check_config(offset, backward):
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    _D.offset_constant(offset)          # raises a clear error for a bad offset
    return offset, backward


class PamModule:
    """Mixin marking a module whose arithmetic is PAM; holds ``offset`` and ``backward``
    (and, for the matrix-product layers, ``family`` and ``operands``)."""

    family = "pam"
    operands = "float32"

    def _pam_init(self, offset=None, backward="exact"):
        self.offset, self.backward = _check_config(offset, backward)

    def _pam_repr(self):
        extra = "" if (self.family, self.operands) == ("pam", "float32") else \
            f", family={self.family!r}, operands={self.operands!r}"
        return f"offset={self.offset}, backward={self.backward!r}{extra}"

    def _gemm(self):
        """Keyword arguments of this layer's matrix products."""
        return {"offset": self.offset, "backward": self.backward, "family": self.family,
                "operands": self.operands}


class Linear(PamModule, nn.Linear):
    """y = x W^T + b with a PAM matmul; parameters as ``torch.nn.Linear``."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 offset=None, backward="exact"):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device,
                           dtype=dtype)
        self._pam_init(offset, backward)

    def forward(self, input):
        return PF.linear(input, self.weight, self.bias, **self._gemm())

    def extra_repr(self):
        return f"{nn.Linear.extra_repr(self)}, {self._pam_repr()}"


def _check_padding_mode(padding_mode):
    if padding_mode != "zeros":
        raise ValueError(f"PAM convolutions support padding_mode='zeros' only, got "
                         f"{padding_mode!r} (pad the input explicitly with F.pad instead)")
    return padding_mode


class _Conv(PamModule):
    """Shared body of Conv1d/Conv2d: torch's constructor and parameters, PAM forward."""
    _torch = None            # the torch class
    _fn = None               # pam.conv1d / pam.conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None, offset=None, backward="exact"):
        self._torch.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias,
                             padding_mode=_check_padding_mode(padding_mode), device=device,
                             dtype=dtype)
        self._pam_init(offset, backward)

    def forward(self, input):
        _check_padding_mode(self.padding_mode)
        return type(self)._fn(input, self.weight, self.bias, self.stride, self.padding,
                              self.dilation, self.groups, **self._gemm())

    def extra_repr(self):
        return f"{self._torch.extra_repr(self)}, {self._pam_repr()}"


class Conv1d(_Conv, nn.Conv1d):
    """1-D convolution with PAM products (:func:`pam.conv1d`); parameters as ``nn.Conv1d``."""
    _torch = nn.Conv1d
    _fn = staticmethod(conv1d)


class Conv2d(_Conv, nn.Conv2d):
    """2-D convolution with PAM products (:func:`pam.conv2d`); parameters as ``nn.Conv2d``."""
    _torch = nn.Conv2d
    _fn = staticmethod(conv2d)


class LayerNorm(PamModule, nn.LayerNorm):
    """PA LayerNorm (see :func:`pam.nn.functional.layer_norm`); parameters as torch's."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, offset=None, backward="exact"):
        nn.LayerNorm.__init__(self, normalized_shape, eps=eps,
                              elementwise_affine=elementwise_affine, bias=bias,
                              device=device, dtype=dtype)
        self._pam_init(offset, backward)

    def forward(self, input):
        return PF.layer_norm(input, self.normalized_shape, self.weight, self.bias,
                             self.eps, offset=self.offset, backward=self.backward)

    def extra_repr(self):
        return f"{nn.LayerNorm.extra_repr(self)}, {self._pam_repr()}"


class Dropout(PamModule, nn.Dropout):
    """Dropout scaling kept elements by PAM(x, PAD(1, 1 - p)); identity in eval mode."""

    def __init__(self, p=0.5, inplace=False, backward="exact"):
        nn.Dropout.__init__(self, p=p, inplace=inplace)
        self._pam_init(None, backward)

    def forward(self, input):
        return PF.dropout(input, self.p, self.training, backward=self.backward)

    def extra_repr(self):
        return f"p={self.p}, backward={self.backward!r}"


class GELU(PamModule, nn.GELU):
    """Piecewise-affine GELU (max abs error 0.0129, see :func:`pam.nn.functional.gelu`)."""

    def __init__(self, approximate="none", backward="exact"):
        nn.GELU.__init__(self, approximate=approximate)
        self._pam_init(None, backward)

    def forward(self, input):
        return PF.gelu(input, backward=self.backward)

    def extra_repr(self):
        return f"piecewise-affine, backward={self.backward!r}"


class ReLU(PamModule, nn.ReLU):
    """max(x, 0) (no arithmetic); here for completeness of ``convert``."""

    def __init__(self, inplace=False):
        nn.ReLU.__init__(self, inplace=inplace)
        self._pam_init(None, "exact")

    def forward(self, input):
        return PF.relu(input, inplace=self.inplace)


class Softmax(PamModule, nn.Softmax):
    """PA softmax along ``dim`` (see :func:`pam.nn.functional.softmax`)."""

    def __init__(self, dim=None, offset=None, backward="exact"):
        nn.Softmax.__init__(self, dim=dim)
        self._pam_init(offset, backward)

    def forward(self, input):
        dim = -1 if self.dim is None else self.dim
        return PF.softmax(input, dim, offset=self.offset, backward=self.backward)

    def extra_repr(self):
        return f"dim={self.dim}, {self._pam_repr()}"


class LogSoftmax(PamModule, nn.LogSoftmax):
    """PA log-softmax along ``dim`` (see :func:`pam.nn.functional.log_softmax`)."""

    def __init__(self, dim=None, offset=None, backward="exact"):
        nn.LogSoftmax.__init__(self, dim=dim)
        self._pam_init(offset, backward)

    def forward(self, input):
        dim = -1 if self.dim is None else self.dim
        return PF.log_softmax(input, dim, offset=self.offset, backward=self.backward)

    def extra_repr(self):
        return f"dim={self.dim}, {self._pam_repr()}"


class MultiheadAttention(PamModule, nn.Module):
    """Multi-head attention on PAM arithmetic, with ``torch.nn.MultiheadAttention``'s API.

    Same constructor (``add_bias_kv`` and ``add_zero_attn`` are not supported and raise),
    same parameter names and initialisation, same ``forward`` signature and mask
    conventions: ``attn_mask`` bool True = NOT allowed, or float added, shape (L, S) or
    (N * num_heads, L, S); ``key_padding_mask`` (N, S) bool True = ignore, or float
    added. ``is_causal=True`` without ``attn_mask`` applies the causal mask. Returns
    (output, weights) where weights (after dropout, averaged over heads unless
    ``average_attn_weights=False``) are None when ``need_weights=False``. Query rows with
    every key masked give 0 (torch gives NaN there).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
                 device=None, dtype=None, offset=None, backward="exact"):
        nn.Module.__init__(self)
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("pam.nn.MultiheadAttention does not support "
                                      "add_bias_kv or add_zero_attn")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        self._pam_init(offset, backward)
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, offset=offset,
                               backward=backward, **fk)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"{self._pam_repr()}")

    def _mask(self, attn_mask, key_padding_mask, B, L, S, device):
        """Combine torch-convention masks into SDPA form (bool allowed, or float added)."""
        H = self.num_heads
        masks = []
        for m, name in ((attn_mask, "attn_mask"), (key_padding_mask, "key_padding_mask")):
            if m is None:
                continue
            if name == "attn_mask":
                if m.dim() == 2:
                    if m.shape != (L, S):
                        raise ValueError(f"attn_mask must be (L, S) = {(L, S)}, got "
                                         f"{tuple(m.shape)}")
                    m = m.view(1, 1, L, S)
                elif m.dim() == 3:
                    if m.shape != (B * H, L, S):
                        raise ValueError(f"attn_mask must be (N*num_heads, L, S) = "
                                         f"{(B * H, L, S)}, got {tuple(m.shape)}")
                    m = m.view(B, H, L, S)
                else:
                    raise ValueError(f"attn_mask must be 2-D or 3-D, got {m.dim()}-D")
            else:
                if m.shape != (B, S):
                    raise ValueError(f"key_padding_mask must be (N, S) = {(B, S)}, got "
                                     f"{tuple(m.shape)}")
                m = m.view(B, 1, 1, S)
            if m.dtype == torch.bool:
                masks.append(("bool", ~m))
            else:
                if m.dtype != torch.float32:
                    raise TypeError(f"{name} must be bool or float32, got {m.dtype}")
                masks.append(("float", m))
        if not masks:
            return None
        if all(kind == "bool" for kind, _ in masks):
            out = masks[0][1]
            for _, m in masks[1:]:
                out = out & m
            return out
        ninf = torch.full((), float("-inf"), device=device)
        zero = torch.zeros((), device=device)
        out = None
        for kind, m in masks:
            f = torch.where(m, zero, ninf) if kind == "bool" else m
            out = f if out is None else out + f
        return out

    def _attend(self, q, k, v, mask, dropout_p, is_causal, need_weights):
        """(B, H, L, D) heads -> (output, weights or None); overridable for experiments."""
        return PF._attention(q, k, v, mask, dropout_p, is_causal, None, self.offset,
                             self.backward, need_weights, self.family)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if self.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim:
            raise ValueError(f"query's last dimension must be embed_dim={self.embed_dim}, "
                             f"got {E}")
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        kw = self._gemm()
        H, D = self.num_heads, self.head_dim
        q = PF.linear(query, wq, bq, **kw).view(B, L, H, D).transpose(1, 2)
        k = PF.linear(key, wk, bk, **kw).view(B, S, H, D).transpose(1, 2)
        v = PF.linear(value, wv, bv, **kw).view(B, S, H, D).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, B, L, S, query.device)
        causal = is_causal and attn_mask is None
        p = self.dropout if self.training else 0.0
        out, weights = self._attend(q, k, v, mask, p, causal, need_weights)
        out = out.transpose(1, 2).reshape(B, L, E)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = PF.mean(weights, dim=1, backward=self.backward)
        if unbatched:
            weights = weights.squeeze(0)
        return out, weights


class TransposedLinear(PamModule, nn.Module):
    """y = x W + b with a PAM matmul, W of shape (in, out): Hugging Face's ``Conv1D``
    (GPT-2's c_attn, c_proj, c_fc) made PAM by :func:`pam.convert`, same Parameters."""

    def __init__(self, weight, bias, offset=None, backward="exact"):
        nn.Module.__init__(self)
        self.weight, self.bias = weight, bias
        self.nf = weight.shape[1]
        self._pam_init(offset, backward)

    def forward(self, x):
        y = PF.matmul(x, self.weight, **self._gemm())
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"in_features={self.weight.shape[0]}, out_features={self.nf}, "
                f"{self._pam_repr()}")


class _Activation(PamModule, nn.Module):
    _fn = None

    def __init__(self, backward="exact"):
        nn.Module.__init__(self)
        self._pam_init(None, backward)

    def forward(self, input):
        return type(self)._fn(input, backward=self.backward)

    def extra_repr(self):
        return f"piecewise-affine, backward={self.backward!r}"


class Tanh(_Activation):
    """PA tanh, 2 sigmoid(2x) - 1 (see :func:`pam.nn.functional.tanh`)."""
    _fn = staticmethod(PF.tanh)


class Sigmoid(_Activation):
    """PA sigmoid, PAD(1, 1 + pa_exp(-x)) (see :func:`pam.nn.functional.sigmoid`)."""
    _fn = staticmethod(PF.sigmoid)


class SiLU(_Activation):
    """PA SiLU, PAM(x, sigmoid(x)) (see :func:`pam.nn.functional.silu`)."""
    _fn = staticmethod(PF.silu)
