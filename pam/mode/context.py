"""The ``pam.arithmetic`` context manager: configuration, the two layers pushed together,
and the per-thread stack of active contexts."""
import threading

import torch

from .. import location as _loc
from .. import ops as P
from ..dispatch import offset_constant
from .aten import _DispatchLayer
from .functions import _FunctionLayer

FAMILIES = frozenset({"matmul", "conv", "elementwise", "nonlinear", "norm", "loss",
                      "dropout", "attention"})


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
