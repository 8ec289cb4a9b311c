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
   approximate backward). ``torch.optim.Adam``/``AdamW``/``SGD`` steps take the fused
   path (:mod:`.optimizers`): each parameter group is updated by one fused PAM kernel per
   device and step count through :mod:`pam.fused`, with the definition of
   :class:`pam.optim.AdamW` / :class:`pam.optim.SGD` (their bits; AdamW with
   ``moments="unbiased"`` unless ``pam.arithmetic(moments="paper")``), whatever
   the optimizer's foreach/fused flags (a torch.optim step hook sets the group's ``fused``
   key for the duration of the step and puts it back, so ``state_dict()`` is unchanged;
   the ``aten._fused_adam_``/``_fused_adamw_``/``_fused_sgd_`` ops it makes torch call are
   computed by the fused kernels). ``optimizers="ops"`` keeps the op-by-op step.
   An operator of the multiply family it cannot emulate raises
   :class:`UnsupportedOpError` naming the op, the module path and the source line
   (``strict=True``, default) or is reported once and runs in float (``strict=False``).

pam's own code -- the ops either layer hands over and their backward functions -- runs
with both layers off (:mod:`pam._internal`): its allocations, views and kernel launches
would otherwise pass through the layers again at 10-20 us per torch call (one-element
``x * y`` under the mode: 133 -> 55 us). Other modes stay on; an audit still sees every
ATen op pam runs.

Everything in ``pam.audit.no_float_multiply()``'s operator list is covered by one of the
two layers or refused; put the audit *around* ``pam.arithmetic()`` to prove it for a
training step.

Options: ``backward`` ("approx", the paper's choice and default here, or "exact"),
``offset`` (None or a positive float, PAM offset for products of two data operands),
``ops`` ("all", "matmul", or a set of :data:`FAMILIES` names: families left out run in
float by the user's explicit choice), ``strict``, ``optimizers`` ("fused", default, or
"ops": torch.optim steps op by op, ~20 launches per tensor on the single-tensor path or one
per ``_foreach_*`` op, with torch's sequence of PAM ops as their definition), ``moments``
(the fused Adam/AdamW step's moments: "unbiased", default, so that torch.optim's AdamW
keeps torch's update size and real models train as in float, or "paper", as
:class:`pam.optim.AdamW`'s ``moments``).

The fused optimizer step covers ``torch.optim.Adam``, ``AdamW`` and ``SGD`` (these classes
exactly; subclasses and other optimizers run op by op) under the PAM family without an
offset (with an offset or another family the step runs op by op: the fused kernels apply
no offset rule of the mode). Adam's L2 ``weight_decay`` adds one elementwise launch (the
gradient plus PAM(p, wd)) before the fused step. Refused with :class:`UnsupportedOpError`
naming the option: ``capturable=True``, ``differentiable=True``, AMP gradient scaling
(``grad_scale``/``found_inf``), sparse gradients, non-float32 (or complex) parameters, an
SGD group with momentum buffers for only some parameters. A tensor ``lr`` is read exactly.

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
