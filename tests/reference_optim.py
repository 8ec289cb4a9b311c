"""The op-by-op PAM optimizers (pam.optim before the fused kernels), kept as the reference
that pam.fused / pam.optim must match bit for bit. Every step issues one PAM op per term."""
import torch

from pam import ops as P

def _f32(value, like):
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _check_grad(p):
    if p.grad.is_sparse:
        raise RuntimeError("pam.optim does not support sparse gradients")
    if p.dtype != torch.float32:
        raise TypeError(f"pam.optim needs float32 parameters, got {p.dtype}")


class _PamOptimizer(torch.optim.Optimizer):
    """Shared plumbing of the PAM optimizers: the offset check and closure evaluation."""

    def __init__(self, params, defaults, offset):
        from pam.dispatch import offset_constant
        offset_constant(offset)
        self.offset = offset
        super().__init__(params, defaults)

    @staticmethod
    def _evaluate(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class RefAdamW(_PamOptimizer):
    """AdamW (decoupled weight decay) on PAM arithmetic; torch's arguments and state.

    Per parameter p with gradient g, at step t (PAM written *, PAD written /):

        p   <- p - PAM(p, lr * wd)                       (skipped when wd == 0)
        m   <- beta1 * m + (1 - beta1) * g
        v   <- beta2 * v + (1 - beta2) * (g * g)
        bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t            (beta^t = pa_exp2(t * pa_log2 beta))
        p   <- p - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps))

    ``amsgrad`` keeps the running max of v; ``maximize`` ascends. ``offset`` applies the
    PAM offset to the tensor products (None: no offset).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, offset=None):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        off = self.offset
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, wd = float(group["eps"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_grad(p)
                g = p.grad
                if group["maximize"]:
                    g = -g
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
                state["step"] += 1
                step_t = state["step"].to(device=p.device, dtype=torch.float32)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                # decoupled weight decay: p <- p - PAM(p, PAM(lr, wd))
                if wd != 0.0:
                    decay = P.mul(_f32(lr, p), wd)
                    p.sub_(P.mul(p, decay, offset=off))
                # moments
                m.copy_(P.mul(m, beta1, offset=off) + P.mul(g, 1.0 - beta1, offset=off))
                v.copy_(P.mul(v, beta2, offset=off)
                        + P.mul(P.mul(g, g, offset=off), 1.0 - beta2, offset=off))
                # bias corrections on scalars: beta^t = pa_exp2(PAM(pa_log2(beta), t))
                bc1 = _f32(1.0, p) - P.pow(_f32(beta1, p), step_t)
                bc2 = _f32(1.0, p) - P.pow(_f32(beta2, p), step_t)
                step_size = P.div(_f32(lr, p), bc1)
                if group["amsgrad"]:
                    mx = state["max_exp_avg_sq"]
                    torch.maximum(mx, v, out=mx)
                    vv = mx
                else:
                    vv = v
                denom = P.div(P.sqrt(vv), P.sqrt(bc2)) + eps
                p.sub_(P.mul(P.div(m, denom), step_size, offset=off))
        return loss


class RefSGD(_PamOptimizer):
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
        off = self.offset
        for group in self.param_groups:
            lr, mom = float(group["lr"]), float(group["momentum"])
            damp, wd = float(group["dampening"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_grad(p)
                g = p.grad
                if group["maximize"]:
                    g = -g
                if wd != 0.0:
                    g = g + P.mul(p, wd, offset=off)
                if mom != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = torch.clone(g).detach()
                        state["momentum_buffer"] = buf
                    else:
                        upd = P.mul(buf, mom, offset=off)
                        if damp != 0.0:
                            upd = upd + P.mul(g, 1.0 - damp, offset=off)
                        else:
                            upd = upd + g
                        buf.copy_(upd)
                    g = g + P.mul(buf, mom, offset=off) if group["nesterov"] else buf
                p.sub_(P.mul(g, lr, offset=off))
        return loss
