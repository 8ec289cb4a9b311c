"""The PAM meaning of each multiply-family operation, shared by both layers of the mode.

Each function takes the mode's configuration ``c`` (``backward``, ``offset``) and plain
arguments in ATen order. Under the function layer autograd records the pam ops' own
backward; under the dispatch layer they run below autograd (no_grad).
"""
import math

import torch

from .. import functional as PF
from .. import ops as P

LOG2_E = P.LOG2_E


class UnsupportedOpError(RuntimeError):
    """A float multiply-family op ran inside ``pam.arithmetic()`` with no PAM version."""



def _is_f32(t):
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32


def _operand(x, like):
    """A float32 tensor or Python float for a second operand (numbers and 0-dim non-float32
    tensors become Python floats; integer/bool tensors become float32)."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.float32:
            return x
        if x.dim() == 0 and not x.requires_grad:
            return float(x)
        if not x.dtype.is_floating_point and not x.dtype.is_complex:
            return x.to(torch.float32)
        return x           # another float dtype: P ops raise a clear error
    if isinstance(x, bool):
        return float(x)
    return x


def _scalar_is(x, value):
    return not isinstance(x, torch.Tensor) and x == value


def mul(c, a, b):
    a, b = _operand(a, None), _operand(b, None)
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor):
        return a * b                                    # two Python numbers
    return P.mul(a, b, offset=_data_offset(c, b), backward=c.backward, family=c.family)


def _data_offset(c, b):
    """Offset for a product of two data operands; none for a product by a constant."""
    return c.offset if isinstance(b, torch.Tensor) and b.dim() > 0 else None


def div(c, a, b):
    a, b = _operand(a, None), _operand(b, None)
    if not isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return a / b
        a = torch.full((), float(a), dtype=torch.float32, device=b.device)
    return P.div(a, b, backward=c.backward, family=c.family)


def reciprocal(c, x):
    return div(c, 1.0, x)


def pow_(c, base, exponent):
    """base ** exponent. Small integer exponents are repeated PAM (so negative bases work as
    in torch); 0.5 / -0.5 are pa_sqrt; other exponents pa_exp2(PAM(pa_log2(base), e))."""
    if not isinstance(base, torch.Tensor):                  # number ** tensor
        e = _operand(exponent, None)
        lb = P.log2(torch.full((), float(base), dtype=torch.float32, device=e.device))
        return P.exp2(P.mul(e, lb, backward=c.backward), backward=c.backward)
    e = _operand(exponent, None)
    if not isinstance(e, torch.Tensor):
        e = float(e)
        if e == 0.0:
            return torch.ones_like(base)
        if e == 1.0:
            return base.clone()
        if e in (2.0, 3.0, 4.0):
            y = mul(c, base, base)
            for _ in range(int(e) - 2):
                y = mul(c, y, base)
            return y
        if e == -1.0:
            return reciprocal(c, base)
        if e == 0.5:
            return P.sqrt(base, backward=c.backward)
        if e == -0.5:
            return reciprocal(c, P.sqrt(base, backward=c.backward))
        if e == -2.0:
            return reciprocal(c, mul(c, base, base))
    return P.pow(base, e, backward=c.backward)


def exp(c, x):
    return P.exp(x, backward=c.backward)


def log(c, x):
    return P.log(x, backward=c.backward)


def sqrt(c, x):
    return P.sqrt(x, backward=c.backward)


def rsqrt(c, x):
    return reciprocal(c, P.sqrt(x, backward=c.backward))


def matmul(c, a, b):
    return P.matmul(a, b, offset=c.offset, backward=c.backward, family=c.family,
                    operands=c.operands)


def addmm(c, bias, m1, m2, beta=1, alpha=1):
    """beta * bias + alpha * (m1 @ m2) (mm, then the scalings by PAM, then a float add)."""
    y = matmul(c, m1, m2)
    if not _scalar_is(alpha, 1):
        y = mul(c, y, alpha)
    if _scalar_is(beta, 0):
        return y
    if not _scalar_is(beta, 1):
        bias = mul(c, bias, beta)
    return y + bias


def add_scaled(c, a, b, alpha=1, subtract=False):
    """a + alpha b (a - alpha b): PAM for alpha != 1, then a float add."""
    b = mul(c, b, alpha) if not _scalar_is(alpha, 1) else _operand(b, None)
    return a - b if subtract else a + b


def addcmul(c, x, t1, t2, value=1):
    p = mul(c, t1, t2)
    if not _scalar_is(value, 1):
        p = mul(c, p, value)
    return x + p


def addcdiv(c, x, t1, t2, value=1):
    q = div(c, t1, t2)
    if not _scalar_is(value, 1):
        q = mul(c, q, value)
    return x + q


def lerp(c, x, end, weight):
    """x + weight (end - x)."""
    return x + mul(c, end - x, weight)


def sigmoid(c, x):
    return PF.sigmoid(x, backward=c.backward)


def tanh(c, x):
    return PF.tanh(x, backward=c.backward)


def silu(c, x):
    return PF.silu(x, backward=c.backward)


def gelu(c, x, approximate="none"):
    return PF.gelu(x, approximate, backward=c.backward)


def gelu_slope(x):
    """Slope of the PA GELU at x: a sum of exact power-of-two slope changes (additions)."""
    s = torch.zeros_like(x)
    for k, d in zip(PF.GELU_KNOTS, PF.GELU_SLOPE_CHANGES):
        s = s + torch.where(x > k, torch.full((), d, dtype=x.dtype, device=x.device),
                            torch.zeros((), dtype=x.dtype, device=x.device))
    return s


def softmax(c, x, dim, safe=False):
    return PF._softmax(x, dim, c.offset, c.backward, safe)


def log_softmax(c, x, dim):
    return PF.log_softmax(x, dim, offset=c.offset, backward=c.backward)


def layer_norm(c, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return PF.layer_norm(x, normalized_shape, weight, bias, eps, offset=c.offset,
                         backward=c.backward)


def mean(c, x, dim=None, keepdim=False, dtype=None):
    if dtype is not None and dtype != torch.float32:
        raise UnsupportedOpError(f"mean with dtype={dtype} is not emulated (float32 only)")
    if dim is not None and not isinstance(dim, int) and len(dim) == 0:
        dim = None
    if dim is None and keepdim:
        dim = tuple(range(x.dim()))
    return PF.mean(x, dim, keepdim=keepdim, backward=c.backward)


def vector_norm(c, x, ord=2, dim=None, keepdim=False, dtype=None):
    """||x||_2 as pa_sqrt(sum PAM(x, x)); inf-norms are max(|x|) (no arithmetic)."""
    if ord in (math.inf, float("inf")):
        return x.abs().amax(dim=dim if dim is not None else tuple(range(x.dim())),
                            keepdim=keepdim)
    if ord != 2:
        raise UnsupportedOpError(f"vector_norm with ord={ord} is not emulated (2, inf only)")
    dims = tuple(range(x.dim())) if dim is None else dim
    s = mul(c, x, x).sum(dim=dims, keepdim=keepdim)
    return P.sqrt(s, backward=c.backward)


