"""torch.optim optimizers under ``pam.arithmetic()``: one fused PAM kernel per group.

Two pieces:

1. Global ``torch.optim`` step hooks (registered once, on the first ``pam.arithmetic``
   entered). While a context with ``optimizers="fused"`` (the default) is active on the
   calling thread and the optimizer is a ``torch.optim.Adam``, ``AdamW`` or ``SGD`` (those
   classes exactly; subclasses and other optimizers keep the op-by-op path), the pre-hook
   checks every group and sets its ``fused`` key to True for the duration of the step, so
   torch calls ``aten._fused_adam_`` / ``_fused_adamw_`` / ``_fused_sgd_``; the post-hook
   (or, if the step raised, the context's exit) puts the old value back, so
   ``state_dict()`` is what torch would save (on CUDA the ``step`` counters created under the
   mode live on the parameters' device, as torch's fused path keeps them).
2. :func:`fused_step`, called by the dispatch layer for those three ATen ops (also when
   the user constructed the optimizer with ``fused=True``): the update of
   :class:`pam.optim.AdamW` / :class:`pam.optim.SGD` (no offset; AdamW's ``moments`` as
   ``pam.arithmetic(moments=...)`` says, "unbiased" by default) by
   :func:`pam.fused.adamw_step` / :func:`pam.fused.sgd_step`, one kernel launch per device
   and step count. ``Adam``'s L2 weight decay (g + wd p, after maximize's negation, as
   torch) is one more elementwise PAM launch before the fused step, then the step runs with
   no decoupled decay.

The fused path applies to the PAM family without an offset with both the "elementwise"
and "nonlinear" op families on (an offset or another family: op by op; both families
off: torch's float step). Refused with :class:`UnsupportedOpError` naming the option:
``capturable=True``, ``differentiable=True``, AMP gradient scaling (``grad_scale`` /
``found_inf``), sparse gradients, parameters that are not float32 (complex included), an
SGD group whose momentum buffers exist for only some parameters; these need
``pam.arithmetic(optimizers="ops")`` (today's op-by-op step) or a change of the option.
Under ``strict=False`` such a step is reported once and runs op by op (a refused
``aten._fused_*_`` op: in float, as any refused op).
A tensor ``lr`` is read as its float32 value (exact).
"""
import threading
import warnings

import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook as _register_post_hook,
                                   register_optimizer_step_pre_hook as _register_pre_hook)

from .. import fused as _fused
from .semantics import UnsupportedOpError, add_scaled

OPTIMIZERS = ("fused", "ops")
MOMENTS = _fused.MOMENTS           # pam.arithmetic(moments=...) of the fused Adam/AdamW step
# aten op names (overload packets, trailing underscore stripped) handled by fused_step
FUSED_STEPS = frozenset({"_fused_adam", "_fused_adamw", "_fused_sgd"})
_OPS_HINT = "; pam.arithmetic(optimizers='ops') runs it op by op"

_PENDING = threading.local()      # .items: [(optimizer, group, old fused)] flipped, this thread
_ABSENT = object()                # a group that had no 'fused' key
_HOOKS = []                       # the two global hook handles, once registered
_LOCK = threading.Lock()


def _classes():
    return (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fusable(cfg):
    """Whether context ``cfg`` computes optimizer steps with the fused kernels: PAM without
    offset, with the elementwise and nonlinear op families emulated."""
    return (cfg.multiplier.kind == "pam" and cfg.offset is None
            and {"elementwise", "nonlinear"} <= cfg.ops)


def install():
    """Register the global torch.optim step hooks (once per process)."""
    with _LOCK:
        if not _HOOKS:
            _HOOKS.append(_register_pre_hook(_pre_hook))
            _HOOKS.append(_register_post_hook(_post_hook))


def _pending():
    items = getattr(_PENDING, "items", None)
    if items is None:
        items = _PENDING.items = []
    return items


def _refuse(opt, what):
    raise UnsupportedOpError(f"pam.arithmetic(): torch.optim.{type(opt).__name__} with "
                             f"{what}: the fused PAM step does not support it" + _OPS_HINT)


def _check_group(opt, group):
    """Raise for what the fused PAM step cannot do exactly (see the module docstring)."""
    if group.get("differentiable"):
        _refuse(opt, "differentiable=True")
    if group.get("capturable"):
        _refuse(opt, "capturable=True")
    with_grad = [p for p in group["params"] if p.grad is not None]
    for p in with_grad:
        if p.dtype != torch.float32:
            _refuse(opt, f"{p.dtype} parameters (pam emulates float32 only)")
        if p.grad.is_sparse:
            _refuse(opt, "sparse gradients")
    if isinstance(opt, torch.optim.SGD) and group["momentum"] != 0:
        has = {opt.state.get(p, {}).get("momentum_buffer") is not None for p in with_grad}
        if len(has) > 1:
            _refuse(opt, "momentum buffers for only some parameters of a group "
                         "(a parameter without a gradient at the first step)")


def _pre_hook(opt, args, kwargs):
    from .context import active
    ctx = active()
    if (ctx is None or ctx.cfg.optimizers != "fused" or not fusable(ctx.cfg)
            or type(opt) not in _classes()):
        return None
    try:
        with torch._C.DisableTorchFunction():     # plain attribute reads, not via layer 1
            for group in opt.param_groups:
                _check_group(opt, group)
    except UnsupportedOpError as e:
        if ctx.cfg.strict:
            raise
        report(ctx.cfg, type(opt).__name__, str(e) + "; it runs op by op (strict=False)")
        return None
    items = _pending()
    for group in opt.param_groups:
        if group.get("fused") is not True:
            items.append((opt, group, group.get("fused", _ABSENT)))
            group["fused"] = True
    return None


def report(cfg, name, msg):
    """Warn once per context about ``name`` (``strict=False``)."""
    if name not in cfg.reported:
        cfg.reported.add(name)
        warnings.warn(msg, stacklevel=3)


def _post_hook(opt, args, kwargs):
    items = getattr(_PENDING, "items", None)
    if items:
        restore(lambda o: o is opt)


def restore(which=lambda opt: True):
    """Put back the ``fused`` keys flipped on this thread (for optimizers ``which`` accepts);
    called after each step and on a context's exit (a step that raised)."""
    items = _pending()
    keep = []
    for opt, group, old in items:
        if which(opt):
            if old is _ABSENT:
                del group["fused"]
            else:
                group["fused"] = old
        else:
            keep.append((opt, group, old))
    items[:] = keep


def _bind(func, args, kwargs):
    """The op's arguments by schema name (defaults filled in)."""
    vals = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            vals[a.name] = args[i]
        elif a.name in kwargs:
            vals[a.name] = kwargs[a.name]
        elif a.has_default_value():
            vals[a.name] = a.default_value
    return vals


def fused_step(cfg, name, func, args, kwargs):
    """Compute ``aten.<name>_`` (``_fused_adam`` / ``_fused_adamw`` / ``_fused_sgd``) with
    the fused PAM kernels, in place; returns None as the op does."""
    fam = {"elementwise", "nonlinear"} & cfg.ops
    if not fam:
        return func(*args, **kwargs)          # the user chose float for these families
    if not fusable(cfg):
        raise UnsupportedOpError(
            f"pam.arithmetic(): aten.{name}_ (an optimizer built with fused=True) has a PAM "
            f"version only for family 'pam' without offset and with the 'elementwise' and "
            f"'nonlinear' op families; construct the optimizer without fused=True to run "
            f"it op by op")
    v = _bind(func, args, kwargs)
    if v.get("grad_scale") is not None or v.get("found_inf") is not None:
        raise UnsupportedOpError(
            f"pam.arithmetic(): aten.{name}_ with grad_scale/found_inf (torch.amp.GradScaler "
            f"with a fused optimizer) is not supported by the fused PAM step" + _OPS_HINT)
    params = list(v["self"])
    for i, t in enumerate(params):
        if t.dtype != torch.float32:
            raise UnsupportedOpError(f"pam.arithmetic(): aten.{name}_ on {t.dtype} "
                                     f"parameters (pam emulates float32 only)")
    lr = float(v["lr"])
    with torch.no_grad():
        if name == "_fused_sgd":
            mom = float(v["momentum"])
            _fused.sgd_step(params, list(v["grads"]),
                            list(v["momentum_buffer_list"]) if mom != 0 else None, lr=lr,
                            momentum=mom, dampening=float(v["dampening"]),
                            weight_decay=float(v["weight_decay"]), nesterov=v["nesterov"],
                            maximize=v["maximize"],
                            first_step=[v["is_first_step"]] * len(params))
            return None
        grads, maximize, wd = list(v["grads"]), v["maximize"], float(v["weight_decay"])
        if name == "_fused_adam" and wd != 0.0:
            grads = _l2_grads(cfg, params, grads, wd, maximize)
            maximize, wd = False, 0.0
        _fused.adamw_step(params, grads, list(v["exp_avgs"]), list(v["exp_avg_sqs"]),
                          list(v["max_exp_avg_sqs"]) if v["amsgrad"] else None,
                          list(v["state_steps"]), lr=lr, beta1=float(v["beta1"]),
                          beta2=float(v["beta2"]), eps=float(v["eps"]), weight_decay=wd,
                          amsgrad=v["amsgrad"], maximize=maximize, moments=cfg.moments)
    return None


def _l2_grads(cfg, params, grads, wd, maximize):
    """Adam's coupled decay: (-g if maximize else g) + PAM(p, wd) for every tensor, as one
    elementwise launch over the concatenated tensors (new tensors; the .grad are kept)."""
    g = torch.cat([t.reshape(-1) for t in grads])
    if maximize:
        g = -g
    p = torch.cat([t.reshape(-1) for t in params])
    out = add_scaled(cfg, g, p, wd).split([t.numel() for t in params])
    return [o.view_as(t) for o, t in zip(out, params)]
