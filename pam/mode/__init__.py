"""``pam.arithmetic()``: run any PyTorch model's float32 multiply-family ops as PAM.

Mechanism (two torch modes, pushed together by :class:`arithmetic`):

1. A ``TorchFunctionMode`` (above autograd) takes the torch-level functions that have a PAM
   definition with its own autograd rule -- ``torch.matmul``/``@``, ``F.linear``,
   ``mm``/``bmm``/``addmm``/``baddbmm``, ``*``, ``/``, ``exp``/``log``/``pow``/``sqrt``...,
   ``F.softmax``/``log_softmax``/``layer_norm``/``gelu``/``silu``/``sigmoid``/``tanh``,
   ``F.cross_entropy``/``nll_loss``, ``F.dropout``, ``F.scaled_dot_product_attention``,
   ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``), ``F.conv1d``/``conv2d``
   -- and runs :mod:`pam.ops` / :mod:`pam.nn.functional` instead,
   so ``backward="exact"`` gives the true derivative of the piecewise-affine function
   (power-of-two slopes) exactly as :func:`pam.convert` would. Fused fast paths (the
   flash/efficient attention kernels, ``nn.MultiheadAttention``'s and
   ``nn.TransformerEncoderLayer``'s native fast path) never run: a torch function mode
   turns them off, and SDPA is computed by the PAM definition.
2. A ``TorchDispatchMode`` (below autograd) sees every ATen operator that still runs:
   the backward formulas of native ops (``mean``'s division, ``tanh_backward``...), the
   optimizer's ``_foreach_*`` / in-place ops (``torch.optim.AdamW``'s ``lerp_``,
   ``addcmul_``, ``addcdiv_``, ``sqrt``...), gradient clipping, in-place arithmetic, and
   anything layer 1 passed on. Every float32 multiply-family operator it knows is computed
   with PAM kernels (for backward formulas this is PAM used as if it were the product: the
   approximate backward). An operator of the multiply family it cannot emulate raises
   :class:`UnsupportedOpError` naming the op, the module path and the source line
   (``strict=True``, default) or is reported once and runs in float (``strict=False``).

Everything in ``pam.audit.no_float_multiply()``'s operator list is covered by one of the
two layers or refused; put the audit *around* ``pam.arithmetic()`` to prove it for a
training step.

Options: ``backward`` ("approx", the paper's choice and default here, or "exact"),
``offset`` (None or a positive float, PAM offset for products of two data operands),
``ops`` ("all", "matmul", or a set of :data:`FAMILIES` names: families left out run in
float by the user's explicit choice), ``strict``.

Compilation: ``pam.compile(model, backend="aot_eager" | "inductor")`` (:mod:`.compiling`)
compiles a model for the mode: Dynamo traces layer 1, and layer 2's table is applied to
the traced ATen graphs (:func:`backend`); same bits as eager. A plain ``torch.compile``
under the mode is not compiled (Dynamo skips its frames, which run eagerly in PAM;
``fullgraph=True`` raises).

Not covered: float64/float16/bfloat16 tensors in multiply-family ops (refused, strict);
code outside the ``with`` block (a ``loss.backward()`` after the block runs float: keep
backward and the optimizer step inside); other threads' work; random sampling with
float parameters (``randn``, ``normal_``: refused).
"""
from .context import FAMILIES, active, arithmetic
from .semantics import UnsupportedOpError
from .compiling import backend, compile

__all__ = ["arithmetic", "active", "UnsupportedOpError", "FAMILIES", "compile", "backend"]
