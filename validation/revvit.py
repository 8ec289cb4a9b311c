"""A RevViT-style two-stream reversible coupling stack: the BDIA paper's second baseline.

Reversible ViT (Mangalam et al., CVPR 2022) keeps two streams and splits each transformer
block into its attention half F_k and MLP half G_k:

    x1 = x2 = input
    y1 = x1 + F_k(x2),   F_k(x) = attn(LN1(x))
    y2 = x2 + G_k(y1),   G_k(x) = mlp(LN2(x))
    output = (x1_K + x2_K) / 2      (the original concatenates the streams; averaging keeps
                                     the width, so the model's final norm and head are reused)

Each step is inverted from its outputs, ``x2 = y2 - G_k(y1)``, ``x1 = y1 - F_k(x2)``, so
training keeps only the two final streams and recomputes every block's activations in the
backward pass (:class:`CouplingStack`). Unlike BDIA the inversion is in floating point: the
recovered activations differ from the forward ones by rounding (RevViT's known drift), which
the backward pass inherits; nothing here is bit-exact.

The blocks are ``bdia_pam.model.Block`` modules (the same parameters as a BDIA / ViT block:
F_k uses its ln1 + attn, G_k its ln2 + mlp), so :class:`RevViTTransformer` has exactly the
parameters of a ``BDIATransformer`` of the same config. Only dropout = 0 is supported (the
recomputation would need the RNG replayed).
"""
from __future__ import annotations

import torch
from torch import nn

from bdia_pam.model import BDIATransformer


def _f(blk, x):
    return blk.attn(blk.ln1(x))


def _g(blk, x):
    return blk.mlp(blk.ln2(x))


class _CouplingFunction(torch.autograd.Function):
    """Forward without a graph; backward inverts block by block and accumulates parameter grads.

    The parameter gradients are accumulated into ``.grad`` by ``torch.autograd.backward`` on
    each block's recomputed graph (the parameters are leaves), so they are not inputs here."""

    @staticmethod
    def forward(ctx, x, stack):
        with torch.no_grad():
            x1, x2 = x, x
            for blk in stack.blocks:
                x1 = x1 + _f(blk, x2)
                x2 = x2 + _g(blk, x1)
        ctx.stack = stack
        ctx.save_for_backward(x1.detach(), x2.detach())
        return x1, x2

    @staticmethod
    def backward(ctx, d1, d2):
        y1, y2 = ctx.saved_tensors
        stack = ctx.stack
        ctx.stack = None
        d1 = torch.zeros_like(y1) if d1 is None else d1
        d2 = torch.zeros_like(y2) if d2 is None else d2
        for blk in reversed(stack.blocks):
            with torch.enable_grad():
                y1_ = y1.detach().requires_grad_(True)
                g = _g(blk, y1_)
                torch.autograd.backward(g, d2)
            with torch.no_grad():
                x2 = y2 - g
                d1 = d1 + y1_.grad
            del g, y1_
            with torch.enable_grad():
                x2_ = x2.detach().requires_grad_(True)
                f = _f(blk, x2_)
                torch.autograd.backward(f, d1)
            with torch.no_grad():
                x1 = y1 - f
                d2 = d2 + x2_.grad
            del f, x2_
            y1, y2 = x1, x2
        return d1 + d2, None  # x1 = x2 = x: both streams' gradients reach the input


class CouplingStack(nn.Module):
    """Two-stream reversible coupling over ``blocks`` (``bdia_pam.model.Block``); see module doc.

    ``forward(x)``: (B, T, C) -> (B, T, C), the mean of the two final streams. In training
    with grad enabled only the two final streams are kept for the backward pass; otherwise
    (eval, no_grad, or ``reversible=False``) ordinary autograd runs through the same
    computation. ``gamma`` is not accepted (RevViT has none)."""

    def __init__(self, blocks, reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible
        if not len(self.blocks):
            raise ValueError("CouplingStack needs at least one block")
        for k, blk in enumerate(self.blocks):
            for name in ("ln1", "attn", "ln2", "mlp"):
                if not hasattr(blk, name):
                    raise TypeError(f"block {k} ({type(blk).__name__}) has no {name!r}; CouplingStack "
                                    "needs bdia_pam.model.Block modules")
            if getattr(blk.attn, "dropout", 0.0) or getattr(blk.mlp, "dropout", 0.0):
                raise ValueError("CouplingStack supports dropout = 0 only (the backward pass recomputes "
                                 "blocks without replaying the dropout RNG); set dropout=0.0")

    def forward(self, x):
        if self.reversible and self.training and torch.is_grad_enabled() and x.requires_grad:
            x1, x2 = _CouplingFunction.apply(x, self)
        else:
            x1, x2 = x, x
            for blk in self.blocks:
                x1 = x1 + _f(blk, x2)
                x2 = x2 + _g(blk, x1)
        # (x1 + x2) / 2 in the model's arithmetic (under pam.arithmetic: PAM by a power of
        # two, exact)
        return (x1 + x2) * 0.5


class RevViTTransformer(BDIATransformer):
    """``BDIATransformer`` whose stack is a :class:`CouplingStack` of its own blocks.

    Build it with ``reversible=False`` in the config (no gamma, no 2^-l grid); the parameter
    names and count are those of the ``BDIATransformer`` of the same config."""

    def __init__(self, config):
        if config.reversible:
            raise ValueError("RevViTTransformer takes reversible=False (it has its own coupling "
                             "reversibility, no gamma or activation grid)")
        super().__init__(config)
        self.stack = CouplingStack(list(self.stack.blocks))

    def _stack(self, x, generator):
        return self.stack(x)
