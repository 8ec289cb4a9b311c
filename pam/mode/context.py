"""The ``pam.arithmetic`` context manager: configuration, the two layers pushed together,
and the per-thread stack of active contexts."""
import threading

import torch

from .. import families as FAM
from .. import location as _loc
from .. import ops as P
from .aten import _DispatchLayer
from .functions import _FunctionLayer
from . import optimizers as _optim

FAMILIES = frozenset({"matmul", "conv", "elementwise", "nonlinear", "norm", "loss",
                      "dropout", "attention"})


class _Config:
    """A context's resolved settings, read by both layers and by the semantics.

    ``offset``: the PAM offset of products of two data operands (1.0552 for
    ``family="pam_offset"`` unless given; None for "lmul" and "float"); ``family``: the
    family passed to the pam ops ("pam" for both PAM families, the offset carrying the
    difference); ``operands``: the operand format of the matmul and conv families;
    ``optimizers``: "fused" (torch.optim Adam/AdamW/SGD steps as one fused PAM kernel per
    group, :mod:`.optimizers`) or "ops" (op by op); ``moments``: the fused Adam/AdamW
    step's moments, "unbiased" (default) or "paper" (:class:`pam.optim.AdamW`'s ``moments``).
    """

    def __init__(self, backward, offset, ops, strict, family="pam", operands="float32",
                 optimizers="fused", moments="unbiased"):
        if backward not in P.BACKWARD_MODES:
            raise ValueError(f"backward must be one of {P.BACKWARD_MODES}, got {backward!r}")
        self.multiplier = FAM.resolve(family, operands, offset)
        offset = self.multiplier.offset
        self.family = "pam" if self.multiplier.kind == "pam" else family
        self.operands = operands
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
        if self.multiplier.kind == "float":
            ops = ops & FLOAT_FAMILY_OPS       # the baseline: only the matrix products change
        if optimizers not in _optim.OPTIMIZERS:
            raise ValueError(f"optimizers must be one of {_optim.OPTIMIZERS}, got "
                             f"{optimizers!r}")
        self.backward, self.offset, self.ops, self.strict = backward, offset, ops, strict
        self.optimizers = optimizers
        if moments not in _optim.MOMENTS:
            raise ValueError(f"moments must be one of {_optim.MOMENTS}, got {moments!r}")
        self.moments = moments
        self.reported = set()


# Under family="float" the mode only rounds the operands of these op families (torch
# computes them, and everything else, in float32).
FLOAT_FAMILY_OPS = frozenset({"matmul", "conv"})

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

    def __init__(self, backward="approx", offset=None, ops="all", strict=True, family="pam",
                 operands="float32", optimizers="fused", moments="unbiased"):
        self.cfg = _Config(backward, offset, ops, strict, family, operands, optimizers,
                           moments)
        self._spec = {"backward": backward, "offset": offset,
                      "ops": ops if isinstance(ops, str) else frozenset(ops),
                      "strict": strict, "family": family, "operands": operands,
                      "optimizers": optimizers, "moments": moments}
        self._entered = []

    @property
    def spec(self):
        """The constructor arguments: ``pam.arithmetic(**ctx.spec)`` is an equal context."""
        return dict(self._spec)

    def __enter__(self):
        if self.cfg.optimizers == "fused" and self.cfg.multiplier.kind != "float":
            _optim.install()
        _loc.Tracker.start()
        fmode = _FunctionLayer(self.cfg)
        # family="float" is torch's own arithmetic below the matrix products: no layer 2.
        dmode = _DispatchLayer(self.cfg) if self.cfg.multiplier.kind != "float" else None
        fastpath = _mha_fastpath(False)
        fmode.__enter__()
        if dmode is not None:
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
            if dmode is not None:
                dmode.__exit__(*exc)
            fmode.__exit__(*exc)
            if not _ACTIVE.stack:
                _optim.restore()            # flags left flipped by a step that raised
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
