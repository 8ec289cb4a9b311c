"""Arithmetic families and operand formats: which multiplier a product uses.

A product is chosen by two names:

``family`` -- the multiplier:

* ``"pam"``: piecewise-affine multiplication, bits(|c|) = bits(|a|) + bits(|b|) - bits(1.0)
  (Mogami; Kosson & Jaggi). An explicit ``offset=`` adds the offset's constant.
* ``"pam_offset"``: PAM with Kosson & Jaggi's offset 1.0552 (or the ``offset=`` given),
  which centers PAM's error.
* ``"lmul"``: L-Mul (Luo & Sun 2024), (1 + x_m + y_m + 2^-l) 2^(x_e + y_e) with l = m for
  m <= 3 mantissa bits, 3 for m = 4 and 4 for m > 4, m that of the operand format. Where
  x_m + y_m + 2^-l < 1 this is the integer add bits(a) + bits(b) - bits(1) + 2^(23-l);
  otherwise the paper's formula keeps the exponent E and a mantissa of up to 3, which the
  kernels normalize (one exponent step, mantissa (s - 1) / 2, rounded to nearest even:
  only float32 operands can need the rounding). An integer adder instead carries into the
  exponent and gives 2 s 2^E, i.e. PAM with offset 1 + 2^-l: that variant is
  ``family="pam_offset", offset=1 + 2**-l`` (validation/families.py measures the gap).
  Quotients under ``lmul`` are PAD without offset (L-Mul defines no division).
* ``"float"``: exact float32 arithmetic of torch on the same operand format (the
  baseline). It multiplies in float by design: ``pam.audit.no_float_multiply`` reports it.

``operands`` -- the format the operands are rounded to before the product:
``"float32"`` (no rounding), ``"bfloat16"``, ``"float16"``, ``"e4m3"`` (OCP E4M3FN),
``"e5m2"`` (OCP E5M2). Rounding is to nearest, ties to even, on the bit pattern; values
beyond the largest finite number become infinities (bfloat16, float16, e5m2: IEEE) or
saturate to +-448 (e4m3, which has no infinity; also for +-inf, as NVIDIA's satfinite
conversion); NaN stays NaN. The rounded value is held exactly in a float32, and the
product is formed on it: for the PAM families and L-Mul the narrow format's own bit fields
(sign, exponent with its bias, mantissa) give the same product as the float32 pattern of the
rounded value, with the exponent widened as a multiplier feeding a float32 accumulator
does, so the product itself neither overflows nor underflows before float32 would. The
PAM families and L-Mul count a subnormal operand of the format as zero (as they do for
float32 subnormals); ``float`` keeps subnormals. Products are accumulated in float32 in
the same order as the float32 kernels.

Gradients pass through the operand rounding unchanged (straight-through estimator: the
rounding is a step function whose derivative is zero almost everywhere). The exact
backward of each family: PAM as before (power-of-two slopes with the carry); L-Mul
d/da = sign(b) 2^E(b) everywhere (the formula is affine in a's mantissa in both cases), a
power of two, applied by an exact PAM product with it; ``float``: b, a float multiply
(torch's autograd), the baseline. Incoming gradients are float32 (not rounded): the format
is that of the forward operands.
"""
from typing import NamedTuple

import torch

from . import dispatch as D
from . import library as L

__all__ = ["FAMILIES", "FORMATS", "KOSSON_JAGGI_OFFSET", "Format", "Multiplier", "resolve",
           "lmul_l", "round_operand", "round_to"]

FAMILIES = ("pam", "pam_offset", "lmul", "float")
KOSSON_JAGGI_OFFSET = 1.0552


class Format(NamedTuple):
    """An operand format: its kernel code, field widths, exponent bias and largest finite value."""
    code: int
    exp_bits: int
    mant_bits: int
    bias: int
    max_finite: float
    overflow: str            # "inf" or "saturate"


FORMATS = {
    "float32": Format(0, 8, 23, 127, 3.4028234663852886e38, "inf"),
    "bfloat16": Format(1, 8, 7, 127, 3.3895313892515355e38, "inf"),
    "float16": Format(2, 5, 10, 15, 65504.0, "inf"),
    "e4m3": Format(3, 4, 3, 7, 448.0, "saturate"),
    "e5m2": Format(4, 5, 2, 15, 57344.0, "inf"),
}


class Multiplier(NamedTuple):
    """A resolved (family, operands, offset) choice, as the ops use it.

    ``kind``: the kernel family, ``"pam"``, ``"lmul"`` or ``"float"``; ``off``: the integer
    constant the kernels take (the PAM offset constant, or L-Mul's 2^(23 - l));
    ``fmt``: the operand :class:`Format`; ``flush``: round the format's subnormals to zero.
    """
    family: str
    operands: str
    kind: str
    off: int
    fmt: Format
    flush: bool
    offset: object           # the offset as given (None or a number), for error messages


def lmul_l(mant_bits):
    """L-Mul's l(m): m for m <= 3, 3 for m = 4, 4 for m > 4."""
    if mant_bits <= 3:
        return mant_bits
    return 3 if mant_bits == 4 else 4


def resolve(family="pam", operands="float32", offset=None):
    """Check and resolve the user's ``family``/``operands``/``offset`` into a :class:`Multiplier`.

    ``offset`` is accepted by ``"pam"`` (no offset when None) and ``"pam_offset"`` (1.0552
    when None); ``"lmul"`` and ``"float"`` have no offset and refuse one.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    fmt = FORMATS.get(operands) if isinstance(operands, str) else None
    if fmt is None:
        raise ValueError(f"operands must be one of {tuple(FORMATS)}, got {operands!r}")
    if family in ("lmul", "float") and offset is not None:
        raise ValueError(f"family={family!r} takes no offset (got offset={offset!r}); "
                         f"offsets belong to 'pam' and 'pam_offset'")
    if family == "pam_offset" and offset is None:
        offset = KOSSON_JAGGI_OFFSET
    if family in ("pam", "pam_offset"):
        return Multiplier(family, operands, "pam", D.offset_constant(offset), fmt, True, offset)
    if family == "lmul":
        return Multiplier(family, operands, "lmul", 1 << (23 - lmul_l(fmt.mant_bits)), fmt,
                          True, None)
    return Multiplier(family, operands, "float", 0, fmt, False, None)


def round_to(x, operands, flush=False):
    """``x`` (float32) rounded to format ``operands``, as float32 values, no autograd.

    Round to nearest even; overflow per the format (see the module docstring); ``flush``
    rounds results that are subnormal in the format to a signed zero.
    """
    fmt = FORMATS[operands]
    return L.quantize(D.check_float32(x, "x"), fmt.code, bool(flush))


class _RoundSTE(torch.autograd.Function):
    """Operand rounding with the straight-through gradient (identity)."""

    @staticmethod
    def forward(ctx, x, code, flush):
        return L.quantize(x, code, flush)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def round_operand(x, m):
    """``x`` rounded to the operand format of Multiplier ``m`` (gradient passes through).

    float32 operands are returned unchanged: the PAM and L-Mul kernels already count
    float32 subnormals as zero, and ``float`` keeps them.
    """
    if m.fmt.code == 0 or not isinstance(x, torch.Tensor):
        return x
    return _RoundSTE.apply(x, m.fmt.code, m.flush)
