"""pam's own implementation code runs without the ``pam.arithmetic()`` layers.

Under ``pam.arithmetic()`` every torch call passes through the context's two Python layers
(a ``TorchFunctionMode`` and a ``TorchDispatchMode``), 10-20 us each even for a view or an
allocation. That is the price of seeing the user's ops, but pam's own implementation (the
PAM ops, the fused kernels' wrappers and their backward functions) only allocates, views
and launches kernels that are already PAM: routing those calls through the layers again
costs time and changes nothing. :class:`layers_off` switches the layers off for such a
block; it does nothing when no ``pam.arithmetic()`` layer is active, and it leaves any
other dispatch mode (``pam.audit.no_float_multiply()`` in particular) in place: the audit
still sees every ATen op pam runs.

Mode classes mark themselves with the attribute named :data:`LAYER_ATTR`.
"""
import functools

import torch
from torch._C import _pop_torch_dispatch_stack, _push_on_torch_dispatch_stack
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["LAYER_ATTR", "layers_off", "call_without_layers", "without_layers"]

LAYER_ATTR = "_pam_arithmetic_layer"


def _function_layer_active():
    """True when a pam.arithmetic() TorchFunctionMode is on this thread's stack."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    for i in range(torch._C._len_torch_function_stack()):
        if getattr(torch._C._get_function_stack_at(i), LAYER_ATTR, False):
            return True
    return False


class layers_off:
    """Context manager: the pam.arithmetic() layers are off inside.

    * Torch-function handling is disabled when a pam function layer is on the stack (this
      disables every TorchFunctionMode and ``__torch_function__`` override for the block:
      pam's code works on plain tensors and detached views).
    * The pam dispatch layer is popped when it is the innermost dispatch mode; when another
      mode was entered inside it (e.g. the audit), the stack is left as it is (slower,
      same result).

    Inside a ``torch.compile``'d region it does nothing, so that what Dynamo compiles or
    skips does not change: while Dynamo or AOTAutograd traces
    (``torch.compiler.is_compiling()``; traced code should use
    :func:`call_without_layers`, which Dynamo reduces to the plain call), and while the
    region runs frames eagerly (Dynamo's frame callback is set: with the dispatch layer
    popped, Dynamo would compile pam's own frames that it now skips).
    """

    __slots__ = ("_function", "_dispatch")

    def __enter__(self):
        self._function = self._dispatch = None
        if torch.compiler.is_compiling() or get_eval_frame_callback() is not None:
            return self
        if _function_layer_active():
            self._function = torch._C.DisableTorchFunction()
            self._function.__enter__()
        top = _get_current_dispatch_mode()
        if top is not None and getattr(top, LAYER_ATTR, False):
            # (torch's _pop_mode_temporarily does this for a mode without a dispatch key,
            # as a generator context manager: a few microseconds more per op)
            self._dispatch = _pop_torch_dispatch_stack(None)
        return self

    def __exit__(self, *exc):
        try:
            if self._dispatch is not None:
                _push_on_torch_dispatch_stack(self._dispatch)
        finally:
            if self._function is not None:
                self._function.__exit__(*exc)
        return False


def call_without_layers(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside :class:`layers_off` (a plain call while compiling)."""
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    with layers_off():
        return fn(*args, **kwargs)


def without_layers(fn):
    """Decorator: ``fn`` runs inside :class:`layers_off` (for pam's autograd backward
    functions, which autograd calls with the user's modes active)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return call_without_layers(fn, *args, **kwargs)
    return wrapper
