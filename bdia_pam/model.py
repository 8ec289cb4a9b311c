"""BDIA transformers: a ViT-style image classifier and a causal byte/character language model.

Read top to bottom:

* :class:`BDIAConfig` -- every knob, validated with one-line errors saying what to change.
* :func:`arithmetic_context` -- the model is plain torch code; its arithmetic comes from the
  op-level mode users wrap any model in: none (``"float"``), ``pam.arithmetic(ops="matmul")``
  (PAM for the matrix products only, ``"pam_matmul"``) or ``pam.arithmetic()`` (``"pam"``:
  no native float multiply anywhere in the step). ``forward`` and ``loss`` enter it; a
  training step should run its backward and optimizer step inside ``model.arithmetic()``
  too (the reversible stack re-enters it for its recompute).
* :class:`Block` -- one pre-norm residual branch ``h_k(x) = a + mlp(LN(x + a))`` with
  ``a = attn(LN(x))``. It is a function of ``x_k`` only, as BDIA requires.
* :class:`BDIATransformer` -- embedding, the stack of blocks (``bdia_pam.ReversibleStack``
  when ``reversible=True``, a plain ``x + h(x)`` stack otherwise), final norm and head.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

ARITHMETICS = ("float", "pam_matmul", "pam")
KINDS = ("vit", "lm")
try:  # the grid limits are owned by bdia_pam.quant
    from .quant import MAX_FRAC_BITS as _MAX_L, MIN_FRAC_BITS as _MIN_L
except ImportError:  # pragma: no cover
    _MIN_L, _MAX_L = 1, 20
FRAC_BITS_RANGE = (_MIN_L, _MAX_L)  # activations live on the 2^-frac_bits grid
BACKWARDS = ("exact", "approx")


@dataclass
class BDIAConfig:
    """Model configuration. ``kind`` is ``"vit"`` (image classifier) or ``"lm"`` (causal LM)."""

    kind: str = "vit"
    arithmetic: str = "pam"
    reversible: bool = True
    depth: int = 4
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 2
    frac_bits: int = 9
    dropout: float = 0.0
    activation: str = "gelu"  # "gelu" | "relu"
    pam_backward: str = "exact"  # PAM matmul gradients: "exact" slopes or "approx" (paper)
    # vision
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    num_classes: int = 10
    pool: str = "cls"  # "cls" | "mean"
    # language model
    vocab_size: int = 256
    context: int = 64
    tie_weights: bool = True

    def validate(self) -> "BDIAConfig":
        """Raise ValueError (one line, naming the option and what to change) if impossible."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        need(self.arithmetic in ARITHMETICS,
             f"arithmetic must be one of {', '.join(ARITHMETICS)}, got {self.arithmetic!r}")
        need(isinstance(self.depth, int) and self.depth >= 1, f"depth must be >= 1, got {self.depth}")
        need(isinstance(self.width, int) and self.width >= 1, f"width must be >= 1, got {self.width}")
        need(isinstance(self.heads, int) and self.heads >= 1, f"heads must be >= 1, got {self.heads}")
        need(self.width % self.heads == 0,
             f"heads ({self.heads}) must divide width ({self.width}); "
             f"choose heads from {[h for h in range(1, self.width + 1) if self.width % h == 0][:8]}")
        need(isinstance(self.mlp_ratio, int) and self.mlp_ratio >= 1,
             f"mlp_ratio must be an integer >= 1, got {self.mlp_ratio}")
        lo, hi = FRAC_BITS_RANGE
        need(isinstance(self.frac_bits, int) and lo <= self.frac_bits <= hi,
             f"frac_bits must be an integer in [{lo}, {hi}], got {self.frac_bits}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.pam_backward in BACKWARDS,
             f"pam_backward must be one of {BACKWARDS}, got {self.pam_backward!r}")
        need(self.activation in ("gelu", "relu"),
             f"activation must be 'gelu' or 'relu', got {self.activation!r}")
        if self.kind == "vit":
            need(self.patch_size >= 1 and self.image_size % self.patch_size == 0,
                 f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
            need(self.channels >= 1, f"channels must be >= 1, got {self.channels}")
            need(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
            need(self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}")
        else:
            need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
            need(self.context >= 1, f"context must be >= 1, got {self.context}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BDIAConfig":
        """Build from a dict; unknown keys raise ValueError (an incompatible checkpoint)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; was this written by a newer bdia_pam?")
        return cls(**d).validate()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# --------------------------------------------------------------------------- arithmetic
def arithmetic_context(name: str, backward: str = "exact"):
    """The context the model computes in: nothing for ``"float"``, ``pam.arithmetic()`` with
    only the matrix-product families for ``"pam_matmul"``, all families for ``"pam"``.

    The model itself is plain torch code; PAM comes from the same op-level mode users wrap
    their own models in (:func:`pam.arithmetic`).
    """
    if name not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {', '.join(ARITHMETICS)}, got {name!r}")
    if name == "float":
        return contextlib.nullcontext()
    import pam
    return pam.arithmetic(backward=backward, ops="matmul" if name == "pam_matmul" else "all")


# --------------------------------------------------------------------------- layers
def _dropout(x, p, training):
    """F.dropout, skipped where it is the identity (p = 0 or eval: no op, no RNG draw)."""
    return F.dropout(x, p, training) if training and p > 0 else x


class Attention(nn.Module):
    """Multi-head self-attention (batch first), optionally causal.

    The core is ``F.scaled_dot_product_attention`` with its default scale 1/sqrt(head_dim):
    under ``pam.arithmetic()`` (both PAM arithmetics) the mode computes it with PAM's
    definition (scale PAD(1, pa_sqrt(head_dim)), exact for head dims that are powers of 4;
    PAM products; the PA softmax, with -inf for masked keys), as one fused kernel per pass
    where pam has one."""

    def __init__(self, cfg: BDIAConfig, causal: bool):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.causal = causal
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, D)
        # One call for the attention core: torch's fused kernel in float, PAM's attention
        # (pam.nn.functional.scaled_dot_product_attention) under pam.arithmetic()
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return _dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: BDIAConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)
        self.activation = cfg.activation
        self.dropout = cfg.dropout

    def forward(self, x):
        h = self.fc1(x)
        h = F.gelu(h) if self.activation == "gelu" else torch.relu(h)
        return _dropout(self.fc2(h), self.dropout, self.training)


class Block(nn.Module):
    """Residual branch h(x) = a + mlp(LN2(x + a)), a = attn(LN1(x)); returns h(x), not x + h(x)."""

    def __init__(self, cfg: BDIAConfig, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg, causal)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x):
        a = self.attn(self.ln1(x))
        return a + self.mlp(self.ln2(x + a))


class PlainStack(nn.Module):
    """The standard (non-reversible) transformer: x_{k+1} = x_k + h_k(x_k), no quantization."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


def make_stack(blocks, cfg: BDIAConfig) -> nn.Module:
    """ReversibleStack(blocks, frac_bits) when cfg.reversible, else PlainStack(blocks)."""
    if not cfg.reversible:
        return PlainStack(blocks)
    from .reversible import ReversibleStack
    return ReversibleStack(blocks, frac_bits=cfg.frac_bits, reversible=True)


# --------------------------------------------------------------------------- model
class BDIATransformer(nn.Module):
    """ViT classifier (``kind="vit"``) or causal LM (``kind="lm"``) around a BDIA stack.

    ``forward(x, generator=None)``: images (B, C, H, W) float32 -> logits (B, num_classes), or
    token ids (B, T) int64 with T <= context -> logits (B, T, vocab_size). ``generator`` (a
    torch.Generator) drives the per-sample gamma draws of the reversible stack in training.
    """

    def __init__(self, config: BDIAConfig):
        super().__init__()
        config.validate()
        self.config = config
        cfg = config
        causal = cfg.kind == "lm"
        if cfg.kind == "vit":
            self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.width)
            n_tok = cfg.num_patches + (1 if cfg.pool == "cls" else 0)
            if cfg.pool == "cls":
                self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
            self.head = nn.Linear(cfg.width, cfg.num_classes)
        else:
            self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width)
            n_tok = cfg.context
            if not cfg.tie_weights:
                self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, cfg.width))
        self.stack = make_stack([Block(cfg, causal) for _ in range(cfg.depth)], cfg)
        self.norm = nn.LayerNorm(cfg.width)
        self._init_weights()

    def arithmetic(self):
        """A context computing in this model's arithmetic (see :func:`arithmetic_context`)."""
        return arithmetic_context(self.config.arithmetic, self.config.pam_backward)

    def _init_weights(self):
        """Linear layers keep torch's default init (uniform, std 1/sqrt(3 fan_in)); positions,
        class token and token embedding start as N(0, 0.02^2)."""
        for name, p in self.named_parameters():
            if name in ("pos_embed", "cls_token", "tok_embed.weight"):
                nn.init.trunc_normal_(p, std=0.02)

    def _stack(self, x, generator):
        if generator is not None and self.training and self.config.reversible:
            bits = torch.randint(0, 2, (x.shape[0], self.config.depth - 1), generator=generator)
            half = torch.full(bits.shape, 0.5)
            gamma = torch.where(bits.bool(), half, -half).to(x.device)
            return self.stack(x, gamma=gamma)
        return self.stack(x)

    def forward(self, x, generator=None):
        with self.arithmetic():
            return self._forward(x, generator)

    def _forward(self, x, generator):
        cfg = self.config
        if cfg.kind == "vit":
            if x.dim() != 4 or x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
                raise ValueError(f"expected images of shape (B, {cfg.channels}, {cfg.image_size}, "
                                 f"{cfg.image_size}), got {tuple(x.shape)}")
            B, p = x.shape[0], cfg.patch_size
            patches = x.unfold(2, p, p).unfold(3, p, p)  # B, C, h, w, p, p
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, cfg.num_patches, -1)
            h = self.patch_embed(patches.contiguous())
            if cfg.pool == "cls":
                h = torch.cat([self.cls_token.expand(B, -1, -1), h], dim=1)
            h = h + self.pos_embed
            h = self.norm(self._stack(h, generator))
            pooled = h[:, 0] if cfg.pool == "cls" else h.sum(1) * (1.0 / h.shape[1])
            return self.head(pooled)
        if x.dim() != 2 or x.shape[1] > cfg.context:
            raise ValueError(f"expected token ids of shape (B, T<= {cfg.context}), got {tuple(x.shape)}")
        T = x.shape[1]
        h = self.tok_embed(x) + self.pos_embed[:, :T]
        h = self.norm(self._stack(h, generator))
        w = self.tok_embed.weight if cfg.tie_weights else self.head.weight
        return F.linear(h, w)

    def loss(self, logits, target, label_smoothing: float = 0.0):
        """Training loss in the model's arithmetic (mean cross entropy, nats)."""
        with self.arithmetic():
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   label_smoothing=label_smoothing)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
