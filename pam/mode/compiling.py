"""``torch.compile`` under ``pam.arithmetic()``: :func:`compile` and :func:`backend`.

Eager ``pam.arithmetic()`` has two layers (see :mod:`pam.mode`). Under compilation:

* Layer 1 (the ``TorchFunctionMode``) is traced by Dynamo like user code: the torch
  functions it sends to pam ops become ``torch.ops.pam.*`` custom-op nodes and the pam
  autograd Functions' backward, exactly as in eager.
* Layer 2 (the ``TorchDispatchMode``) cannot be traced; its job is done on the ATen graphs
  instead. :func:`backend` runs AOT autograd without decompositions (the graphs hold the
  ATen ops eager autograd runs), then re-traces each forward and backward graph with
  layer 2's own ``TorchDispatchMode`` pushed (:func:`make_pam`): every float32
  multiply-family node goes through the handler layer 2 calls in eager (one table,
  ``pam.mode.aten._LAYER2``), so it becomes the pam ops that compute it; an op with no PAM
  version raises :class:`UnsupportedOpError` naming the op and the user's source line (and
  the module path when the node records one), at compile time. The inner compiler (``"aot_eager"``: run the graph as is;
  ``"inductor"``: Inductor's ``compile_fx_inner``) gets the PAM graph.

:func:`compile` is the user entry point: ``pam.compile(model, backend="aot_eager")``
returns a callable that, called inside ``pam.arithmetic()``, compiles ``model`` with
``backend(...)`` for that arithmetic (one compiled version per distinct context
configuration) and lets Dynamo compile under the mode's dispatch layer, which stays on for
whatever Dynamo runs eagerly (graph breaks) and for backward outside compiled graphs.
Called outside any ``pam.arithmetic()`` it is ``torch.compile(model, backend=...)``: float,
as the eager model is there. A plain ``torch.compile`` under the mode is never compiled:
Dynamo skips its frames (they run eagerly, in PAM) and ``fullgraph=True`` raises.

Bits: forward outputs and gradients are those of eager ``pam.arithmetic()``, with
``"aot_eager"`` and with ``"inductor"``. Inductor would generate its own loops for the
float32 ``sum`` reductions left in the graph (bias gradients, softmax and layer-norm sums),
which round differently in the last bits from ATen's; :func:`keep_aten_sums` makes each an
opaque ``pam.ordered_sum`` op calling ATen's ``sum`` (the price: Inductor does not fuse
them). The elementwise float32 additions, subtractions, comparisons and copies Inductor
fuses are each one correctly rounded IEEE operation computed in the graph's order (Inductor
does not reassociate them), so fusing them changes no bit. Random ops
(dropout with p > 0) draw from AOT autograd's RNG handling and are not claimed
bit-identical.
"""
import contextlib
from typing import List, Optional

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .. import location as _loc
from .aten import _COMPILING, _DispatchLayer
from .context import _ACTIVE, active
from .functions import _MHAView, _bind_mha
from .semantics import UnsupportedOpError, _is_f32

__all__ = ["compile", "backend", "make_pam", "keep_aten_sums", "INNER_BACKENDS"]

INNER_BACKENDS = ("aot_eager", "inductor")


def node_location(node):
    """Text naming the module path and user source line recorded on an FX node ("" if none)."""
    if node is None:
        return ""
    meta = node.meta
    parts = []
    stack = meta.get("nn_module_stack") or meta.get("fwd_nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        name = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")
        parts.append(f"module {_module_path(path)} ({name})")
    trace = meta.get("stack_trace") or ""
    files = [ln.strip()[len("File "):] for ln in trace.splitlines()
             if ln.strip().startswith("File ")]
    user = [f for f in files if not f.strip('"').startswith(_loc._SKIP)]
    if user:
        parts.append("at " + user[-1])
    if meta.get("partitioner_tag") == "is_backward":
        parts.insert(0, "in the backward graph")
    return ", ".join(parts)


def _module_path(path):
    """Dynamo's module key (``L['self'].layers[0].attn``) as a dotted path (``layers.0.attn``)."""
    p = path
    for pre in ("L['self'].", "L['self']", "L['fn'].", "L['fn']"):
        if p.startswith(pre):
            p = p[len(pre):]
            break
    p = p.replace("[", ".").replace("]", "").replace("'", "")
    return p or "<root>"


class _GraphLayer(_DispatchLayer):
    """Layer 2 applied while re-tracing a graph: same handlers, locations from the node."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.node = None

    def _where(self):
        return node_location(self.node)


class _Runner(torch.fx.Interpreter):
    def __init__(self, gm, layer):
        super().__init__(gm)
        self.layer = layer

    def run_node(self, n):
        self.layer.node = n
        return super().run_node(n)


def make_pam(gm, example_inputs, cfg):
    """``gm`` (an ATen graph from AOT autograd) re-traced with every float32 multiply-family
    node computed as layer 2 of ``pam.arithmetic()`` computes it in eager: a new graph of
    ``torch.ops.pam.*`` kernels and ATen ops that multiply nothing. Ops with no PAM version
    raise :class:`pam.UnsupportedOpError` (``strict=True``) naming the node's
    source line, or stay float32 and are reported once (``strict=False``); op families the
    configuration leaves out (``ops=``) stay float, as in eager."""
    fake = torch._guards.detect_fake_mode(example_inputs)
    layer = _GraphLayer(cfg)

    def run(*args):
        with layer:
            return _Runner(gm, layer).run(*args)

    old = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True     # pam code takes its traceable paths
    try:                                         # (fresh scalar constants, custom ops)
        with torch.fx.traceback.preserve_node_meta(), \
                (fake if fake is not None else contextlib.nullcontext()):
            return make_fx(run, tracing_mode="real" if fake is not None else "fake")(
                *example_inputs)
    finally:
        torch.compiler._is_compiling_flag = old


@torch.library.custom_op("pam::ordered_sum", mutates_args=())
def _ordered_sum(x: torch.Tensor, dim: Optional[List[int]], keepdim: bool) -> torch.Tensor:
    return torch.sum(x) if dim is None else torch.sum(x, dim, keepdim)


@_ordered_sum.register_fake
def _(x, dim, keepdim):
    return torch.sum(x) if dim is None else torch.sum(x, dim, keepdim)


_SUMS = (torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList)


def keep_aten_sums(gm):
    """Replace, in place, each float32 ``aten.sum`` node of ``gm`` by ``pam.ordered_sum``,
    an opaque custom op that calls ATen's ``sum``: Inductor then keeps ATen's summation
    order (its own generated reduction loops round differently in the last bits) and the
    graph gives eager's bits. Returns ``gm``."""
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _SUMS:
            continue
        val = n.meta.get("val")
        x = n.args[0]
        xval = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not (_is_f32(val) and _is_f32(xval)) or n.kwargs.get("dtype") not in (
                None, torch.float32):
            continue
        if n.target is torch.ops.aten.sum.default:
            args = (x, None, False)
        else:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
            args = (x, None if dim is None else list(dim), bool(keep))
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(torch.ops.pam.ordered_sum.default, args)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def _graph_runner(gm, example_inputs):
    """aot_eager's runner for a PAM graph, run with the mode's dispatch layers off: the
    graph holds nothing they would change (``make_pam`` applied their table), and each of
    its ops would otherwise pass through their Python ``__torch_dispatch__``."""
    from torch._dynamo.backends.debugging import boxed_nop
    run = boxed_nop(gm, example_inputs)
    if not callable(run) or not getattr(run, "_boxed_call", False) \
            or not isinstance(run, type(_graph_runner)):
        return run                           # an output-code object (AOT cache on): as is

    def call(args):
        with _layers_off():
            return run(args)
    call._boxed_call = True
    return call


@contextlib.contextmanager
def _layers_off():
    """Pop the dispatch stack for the block when it holds only pam.arithmetic layers."""
    modes = _dispatch_stack()
    if modes and all(isinstance(m, _DispatchLayer) for m in modes):
        with torch.utils._python_dispatch._disable_current_modes():
            yield
    else:
        yield


def backend(inner="aot_eager", context=None, graphs=None):
    """A ``torch.compile`` backend computing in PAM arithmetic: AOT autograd without
    decompositions, each forward/backward graph made PAM by :func:`make_pam`, then the
    ``inner`` compiler (``"aot_eager"`` or ``"inductor"``).

    ``context``: the ``pam.arithmetic`` whose configuration (``backward``, ``offset``,
    ``ops``, ``strict``) the graphs follow; default the innermost one active when Dynamo
    calls the backend (none active: RuntimeError). ``graphs``: a list that receives every
    final (PAM) graph, for inspection or :func:`pam.audit.graph_float_ops`. Used by
    :func:`compile`; with plain ``torch.compile`` Dynamo does not compile under the mode.
    """
    if inner not in INNER_BACKENDS:
        raise ValueError(f"inner backend must be one of {INNER_BACKENDS}, got {inner!r}")

    def compile_fn(gm, example_inputs):
        ctx = context if context is not None else active()
        if ctx is None:
            raise RuntimeError("pam.mode.backend compiles PAM graphs for a pam.arithmetic() "
                               "context: call the compiled model inside one, or pass "
                               "context=")
        cfg = ctx.cfg

        def wrap(compiler):
            def compile_graph(g, ex, **kw):
                g = make_pam(g, ex, cfg)
                if inner == "inductor":
                    g = keep_aten_sums(g)
                if graphs is not None:
                    graphs.append(g)
                return compiler(g, ex, **kw)
            return compile_graph

        if inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs, fw_compiler=wrap(_graph_runner),
                             bw_compiler=wrap(_graph_runner))
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        return compile_fx(gm, example_inputs, inner_compile=wrap(compile_fx_inner),
                          decompositions={})

    return compile_fn


def _inductor_aten_sums(gm, example_inputs):
    """Inductor with the float32 sums kept as ATen's (:func:`keep_aten_sums`), for models
    compiled outside any context (``pam.convert`` models, float models): the other float
    ops of the graph are single IEEE operations, so the compiled model gives eager's bits."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(g, ex, **kw):
        return compile_fx_inner(keep_aten_sums(g), ex, **kw)
    return compile_fx(gm, example_inputs, inner_compile=inner, decompositions={})


@contextlib.contextmanager
def _scope():
    """The block may be compiled by Dynamo under the mode's dispatch layer (what a
    :class:`Compiled` call runs in): ``_COMPILING`` raised, torch's mode flag cleared, the
    location tracker's global module hooks removed (Dynamo would trace them and guard on
    them; module paths of refused ops come from the FX nodes instead)."""
    depth = getattr(_COMPILING, "depth", 0)
    _COMPILING.depth = depth + 1
    try:
        with _compilable(), _loc.Tracker.paused():
            yield
    finally:
        _COMPILING.depth = depth


@contextlib.contextmanager
def _compilable():
    """Clear, for the block, torch's "inside a dispatch mode that does not ignore compile
    internals" flag (Python and the C++ copy guards read): it was set when the mode's layer
    was entered, before ``_COMPILING`` said that this call may compile. Restored after."""
    pd = torch.utils._python_dispatch
    old = pd._is_in_any_mode_without_ignore_compile_internals
    now = any(not m.ignore_compile_internals() for m in _dispatch_stack())
    pd._is_in_any_mode_without_ignore_compile_internals = now
    torch._C._dynamo.guards.set_is_in_mode_without_ignore_compile_internals(now)
    try:
        yield
    finally:
        pd._is_in_any_mode_without_ignore_compile_internals = old
        torch._C._dynamo.guards.set_is_in_mode_without_ignore_compile_internals(old)


def _dispatch_stack():
    pd = torch.utils._python_dispatch
    return [pd._get_dispatch_stack_at(i) for i in range(torch._C._len_torch_dispatch_stack())]


def _stack_key():
    """The configurations of the entered pam.arithmetic contexts, outermost first."""
    stack = getattr(_ACTIVE, "stack", None) or []
    return tuple(tuple(sorted(c.spec.items())) for c in stack)


class Compiled:
    """What :func:`compile` returns: call it like the model; other attributes are the
    model's. ``graphs``: the final PAM graphs compiled so far (forward, backward...)."""

    def __init__(self, model, inner, options):
        self._model, self._inner, self._options = model, inner, options
        self._compiled = {}
        self.graphs = []

    def _for(self, key, ctx):
        fn = self._compiled.get(key)
        if fn is None:
            if _MHAView.forward is None:
                _bind_mha()        # layer 1's lazy import, done eagerly (not traced)
            if ctx is not None:
                be = backend(self._inner, ctx, self.graphs)
            else:
                be = _inductor_aten_sums if self._inner == "inductor" else self._inner
            fn = self._compiled[key] = torch.compile(self._model, backend=be,
                                                     **self._options)
        return fn

    def __call__(self, *args, **kwargs):
        ctx = active()
        if ctx is not None and not all(isinstance(m, _DispatchLayer)
                                       for m in _dispatch_stack()):
            # Another dispatch mode (pam.audit.no_float_multiply...) must see every op:
            # run eagerly (Dynamo would skip these frames and, worse, mark their code
            # skipped for later calls too).
            return self._model(*args, **kwargs)
        fn = self._for(None if ctx is None else _stack_key(), ctx)
        if ctx is None:
            return fn(*args, **kwargs)
        try:
            with _scope():
                return fn(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, UnsupportedOpError):
                raise e.inner_exception from None      # the op, where, and "no PAM version"
            raise

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)


def compile(model, backend="aot_eager", **options):
    """``torch.compile`` for ``pam.arithmetic()``: ``cmodel = pam.compile(model,
    backend="inductor", fullgraph=True)``, then ``with pam.arithmetic(): loss =
    loss_fn(cmodel(x), y); loss.backward()``.

    ``model``: a module or function. ``backend``: ``"aot_eager"`` or ``"inductor"``
    (both bit-identical to eager ``pam.arithmetic()``, see the module docstring). ``options``: passed to
    ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``...). Inside a context the model
    is compiled for that context's configuration (one compiled version per distinct
    configuration); outside any, it is ``torch.compile(model, backend=backend)`` (float,
    like the eager model there; ``pam.convert`` models compute in PAM), with Inductor's
    float32 sums replaced by ATen's so that the bits stay eager's. Under another dispatch mode as well (e.g. inside
    ``pam.audit.no_float_multiply()``) the model runs eagerly, so that mode sees every op.
    Ops with no PAM version raise ``pam.UnsupportedOpError`` when the graph is compiled
    (first call).
    """
    if backend not in INNER_BACKENDS:
        raise ValueError(f"pam.compile backend must be one of {INNER_BACKENDS}, "
                         f"got {backend!r}")
    return Compiled(model, backend, options)
