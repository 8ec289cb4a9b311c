"""Optimizers on PAM arithmetic: ``AdamW`` and ``SGD``.

Subclasses of ``torch.optim.Optimizer`` with torch's hyper-parameter names, param-group
keys and state layout (``'step'`` as a float32 scalar tensor, ``'exp_avg'``,
``'exp_avg_sq'``, ``'max_exp_avg_sq'``, ``'momentum_buffer'``), so ``state_dict()`` /
``load_state_dict()`` interoperate with ``torch.optim.AdamW`` / ``torch.optim.SGD``.

Every tensor operation is PAM, PAD (see :func:`pam.mul`, :func:`pam.div`), pa_sqrt, an
addition/subtraction or a max; the scalars shared by a group use the same ops: the bias
corrections beta^t = pa_exp2(PAM(pa_log2(beta), t)), the step size PAD(lr, 1 - beta1^t),
the decay factor PAM(lr, weight_decay). The only Python float operations left are
subtractions ``1 - beta``, ``1 - dampening``. No ATen multiply-family operator runs
(checked with :func:`pam.audit.no_float_multiply`). A step is fused: each parameter group
(per device and step count) is updated by one kernel (:func:`pam.fused.adamw_step`,
:func:`pam.fused.sgd_step`) whose per-element arithmetic is :mod:`pam.optim_bits`, bit for
bit the chain of PAM ops listed above (tests/test_fused.py compares them with the op-by-op
reference). On CPU that kernel updates the tensors in place through a table of their
addresses (no copies) with vectorized per-element code; under ``torch.compile`` a step is
the custom op ``pam::adamw_step`` / ``pam::sgd_step`` (tests/test_fused_compile.py).

Because PAM is approximate, these are not bit-identical to torch's optimizers: PAM
products are 0 to 11 % smaller in magnitude (mean -3.85 % without offset), PAD quotients
0 to 12.5 % larger, and beta^t via pa_log2/pa_exp2 deviates from the true power (e.g.
0.999^1000 gives 0.25 instead of 0.37), which changes the bias correction in early steps.
Only dense gradients of float32 parameters are supported.
"""
import torch

from . import fused as _fused

__all__ = ["AdamW", "SGD"]


def _check_grad(p):
    if p.grad.is_sparse:
        raise RuntimeError("pam.optim does not support sparse gradients")
    if p.dtype != torch.float32:
        raise TypeError(f"pam.optim needs float32 parameters, got {p.dtype}")


class _PamOptimizer(torch.optim.Optimizer):
    """Shared plumbing of the PAM optimizers: the offset check and closure evaluation."""

    def __init__(self, params, defaults, offset):
        from .dispatch import offset_constant
        offset_constant(offset)
        self.offset = offset
        super().__init__(params, defaults)

    @staticmethod
    def _evaluate(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class AdamW(_PamOptimizer):
    """AdamW (decoupled weight decay) on PAM arithmetic; torch's arguments and state.

    Per parameter p with gradient g, at step t (PAM written *, PAD written /):

        p   <- p - PAM(p, lr * wd)                       (skipped when wd == 0)
        m   <- beta1 * m + (1 - beta1) * g
        v   <- beta2 * v + (1 - beta2) * (g * g)
        bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t            (beta^t = pa_exp2(t * pa_log2 beta))
        p   <- p - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps))

    ``amsgrad`` keeps the running max of v; ``maximize`` ascends. ``offset`` applies the
    PAM offset to the tensor products (None: no offset).

    ``moments``: ``"paper"`` (default) is the update above, every product a plain PAM.
    Its updates are smaller than ``torch.optim.AdamW``'s from the same gradients (each PAM
    in the EMAs underestimates and pa_exp2(t pa_log2 beta) overestimates beta^t; measured
    in validation/adamw_bias.py). ``"unbiased"`` keeps the moments unbiased in expectation:
    m += PAM(g - m, c1), v += PAM(PAM(g, g; 1.0552) - v, c2) with c_i = 1 - beta_i snapped
    to the nearest power of two (so betas (0.9, 0.999) act as (0.875, 0.9990234375)),
    bias corrections (1 - c)^t and the step size in exact integer/rational host
    arithmetic, and a constant compensating the mean PA error of the final PAD/pa_sqrt/PAM
    (see :mod:`pam.optim_bits`). Still no float multiply on tensors.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, offset=None, moments="paper"):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if moments not in _fused.MOMENTS:
            raise ValueError(f"moments must be one of {_fused.MOMENTS}, got {moments!r}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable or differentiable or fused:
            raise ValueError("pam.optim.AdamW does not support capturable, differentiable "
                             "or fused")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults, offset)
        self.moments = moments

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            lists = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_grad(p)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
                ls = lists.setdefault(p.device, ([], [], [], [], [], []))
                for dst, x in zip(ls, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                       state.get("max_exp_avg_sq"), state["step"])):
                    dst.append(x)
            for ps, gs, ms, vs, mxs, steps in lists.values():
                torch._foreach_add_(steps, 1.0)
                _fused.adamw_step(ps, gs, ms, vs, mxs if group["amsgrad"] else None, steps,
                                 lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                 eps=float(group["eps"]),
                                 weight_decay=float(group["weight_decay"]),
                                 amsgrad=group["amsgrad"], maximize=group["maximize"],
                                 offset=self.offset, moments=self.moments)
        return loss


class SGD(_PamOptimizer):
    """SGD with momentum, dampening, Nesterov and (coupled) weight decay on PAM arithmetic.

    Same update as ``torch.optim.SGD`` with every product a PAM:
    g <- g + wd * p; buf <- momentum * buf + (1 - dampening) * g (buf = g at the first
    step); g <- g + momentum * buf (nesterov) or g <- buf; p <- p - lr * g.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, offset=None):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable or fused:
            raise ValueError("pam.optim.SGD does not support differentiable or fused")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, offset)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        for group in self.param_groups:
            mom = float(group["momentum"])
            lists = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_grad(p)
                buf, first = None, False
                if mom != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = torch.empty_like(p, memory_format=torch.contiguous_format)
                        state["momentum_buffer"] = buf
                        first = True
                ls = lists.setdefault(p.device, ([], [], [], []))
                for dst, x in zip(ls, (p, p.grad, buf, first)):
                    dst.append(x)
            for ps, gs, bufs, firsts in lists.values():
                _fused.sgd_step(ps, gs, bufs, lr=float(group["lr"]), momentum=mom,
                               dampening=float(group["dampening"]),
                               weight_decay=float(group["weight_decay"]),
                               nesterov=group["nesterov"], maximize=group["maximize"],
                               first_step=firsts, offset=self.offset)
        return loss
