"""Where an operator came from: the module path and the user's source line.

Used by :func:`pam.audit.no_float_multiply` and :func:`pam.arithmetic` to name, in an error,
the module (``transformer.h.0.attn.c_attn``) and the source line that issued an operator,
for forward ops and for the backward ops autograd runs on their behalf.

* Module path: global forward pre/post hooks (installed only while a tracker is active)
  keep a stack of the modules being run; the path is built from the names under which
  each module is registered in its parent.
* Source line: the innermost Python frame outside torch and pam.
* Backward: a :class:`LocationMode` (a ``TorchFunctionMode``) records the location of every
  forward call whose output has an autograd node in that node's ``metadata``; during
  backward, ``torch._C._current_autograd_node()`` finds it again.

Cost: two hook calls per module call and one frame walk per recorded torch function call
(microseconds); nothing when no tracker is active.
"""
import contextlib
import os
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Tracker", "LocationMode", "describe", "where_now"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_PAM_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP = (_TORCH_DIR, _PAM_DIR, "<frozen ")
_KEY = "pam_location"


def _user_frame():
    """(filename, line number, function) of the innermost frame outside torch and pam."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_SKIP) and not name.endswith("contextlib.py"):
            return name, f.f_lineno, f.f_code.co_name
        f = f.f_back
    return None


class Tracker:
    """Maintains the stack of running modules while active (re-entrant, counted)."""

    _active = 0
    _handles = None
    _stack = []
    _names = weakref.WeakKeyDictionary()     # child module -> (parent ref, name)

    @classmethod
    def start(cls):
        if cls._active == 0:
            pre = torch.nn.modules.module.register_module_forward_pre_hook(cls._push)
            post = torch.nn.modules.module.register_module_forward_hook(cls._pop)
            cls._handles = (pre, post)
            cls._stack = []
        cls._active += 1

    @classmethod
    def stop(cls):
        cls._active -= 1
        if cls._active == 0 and cls._handles is not None:
            for h in cls._handles:
                h.remove()
            cls._handles = None
            cls._stack = []

    @classmethod
    @contextlib.contextmanager
    def paused(cls):
        """Remove the hooks for the duration of the block (the stack is kept), then put them
        back if a tracker is still active: code that Dynamo traces (``pam.compile``) must
        not see global module hooks."""
        handles = cls._handles
        if handles is not None:
            for h in handles:
                h.remove()
            cls._handles = None
        try:
            yield
        finally:
            if handles is not None and cls._active > 0 and cls._handles is None:
                pre = torch.nn.modules.module.register_module_forward_pre_hook(cls._push)
                post = torch.nn.modules.module.register_module_forward_hook(cls._pop)
                cls._handles = (pre, post)

    @classmethod
    def _push(cls, module, args):
        cls._stack.append(module)

    @classmethod
    def _pop(cls, module, args, output):
        if cls._stack and cls._stack[-1] is module:
            cls._stack.pop()
        elif module in cls._stack:                 # a forward raised inside a child
            del cls._stack[cls._stack.index(module):]

    @classmethod
    def snapshot(cls):
        """The running modules, outermost first (cheap: formatted only when needed)."""
        return tuple(cls._stack)

    @staticmethod
    def module_path(stack):
        """Dotted path of the innermost module of ``stack``, relative to the outermost one."""
        if not stack:
            return None
        parts = []
        for parent, child in zip(stack, stack[1:]):
            name = None
            for n, m in parent.named_children():
                if m is child:
                    name = n
                    break
            if name is None:                       # called, not registered, in parent
                name = f"<{type(child).__name__}>"
            parts.append(name)
        root = type(stack[0]).__name__
        leaf = type(stack[-1]).__name__
        path = ".".join(parts)
        return f"{path} ({leaf} in {root})" if path else f"<root> ({root})"


def where_now():
    """The current location as a (running modules, frame or None) pair."""
    return Tracker.snapshot(), _user_frame()


def describe(location):
    """Human-readable text for a location pair (empty when nothing is known)."""
    if location is None:
        return ""
    stack, frame = location
    path = Tracker.module_path(stack)
    parts = []
    if path:
        parts.append(f"module {path}")
    if frame:
        parts.append(f"at {frame[0]}:{frame[1]} in {frame[2]}")
    return ", ".join(parts)


def current_location():
    """The location of the op now dispatched: its forward call's, inside backward."""
    node = torch._C._current_autograd_node()
    if node is not None:
        loc = node.metadata.get(_KEY)
        tag = f"backward of {node.name()}"
        if loc is not None:
            text = describe(loc)
            return f"{tag}, forward {text}" if text else tag
        return tag
    return describe(where_now())


def tag_outputs(out, location=None):
    """Store ``location`` (default: :func:`where_now`, found only when some tensor of
    ``out`` has an untagged autograd node: most calls return none) in the autograd nodes
    of the tensors in ``out`` (first one wins). Returns the location used, or None."""
    if isinstance(out, torch.Tensor):
        fn = out.grad_fn
        if fn is not None:
            meta = fn.metadata
            if _KEY not in meta:
                if location is None:
                    location = where_now()
                meta[_KEY] = location
    elif isinstance(out, (tuple, list)):
        for o in out:
            location = tag_outputs(o, location)
    return location


class LocationMode(TorchFunctionMode):
    """Records, for every torch call that builds autograd nodes, where it was issued."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            tag_outputs(out)
        return out

    def __enter__(self):
        Tracker.start()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            Tracker.stop()
