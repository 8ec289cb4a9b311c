"""The 2^-l fixed-point grid of BDIA, with exact float <-> integer conversion.

An activation x on the grid is stored as the integer X = x * 2^l (``l = frac_bits``).
Conversions never round silently:

* :func:`to_grid` rounds ``x * 2^l`` to the nearest integer, ties to even (IEEE
  ``roundTiesToEven``, what :func:`torch.round` does); ``x * 2^l`` itself is formed exactly
  (float64 exponent adjustment on the bit pattern, no float multiply).
* :func:`from_grid` turns X back into float32 exactly; that requires ``|X| < 2^24``
  (:func:`grid_limit`), which every function here checks, raising :class:`GridRangeError`.

Nothing in this module calls a float multiply or divide (``aten.mul``/``aten.div`` on float
tensors): scaling by powers of two edits the exponent field through an integer view, so the
code runs inside ``pam.audit.no_float_multiply``. Integer arithmetic (shifts, adds, int64
products in the checksum) is used freely.

Under ``pam.arithmetic()`` these functions run with the mode's layers off
(``pam._internal.without_layers``), as pam's own code does: they only do integer and exact
float64 work the mode would pass through unchanged, at 10-20 us per torch call (the audit
still sees every op).

Side bits and gamma signs are packed 8 per byte (bit i of byte j holds element 8 j + i;
padding bits are 0) with :func:`pack_bits` / :func:`unpack_bits`.
"""
from __future__ import annotations

import math

import torch

from pam._internal import without_layers

__all__ = [
    "MIN_FRAC_BITS", "MAX_FRAC_BITS", "MANTISSA_LIMIT", "GridRangeError", "check_frac_bits",
    "grid_limit", "ldexp_exact", "to_grid", "from_grid", "round_grid", "bdia_combine",
    "pack_bits", "unpack_bits", "checksum",
]

MIN_FRAC_BITS = 1
MAX_FRAC_BITS = 20
#: |X| must stay below 2^24 so that X (and x = X 2^-l) is exact in float32.
MANTISSA_LIMIT = 1 << 24

_F64_EXP_SHIFT = 52
_F64_EXP_MASK = 0x7FF << 52


class GridRangeError(ValueError):
    """An activation left the range the 2^-l grid represents exactly in float32."""


def check_frac_bits(frac_bits) -> int:
    """Validate ``frac_bits`` (an int in 1..20) and return it."""
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int):
        raise TypeError(f"frac_bits must be an int in {MIN_FRAC_BITS}..{MAX_FRAC_BITS}, "
                        f"got {frac_bits!r}")
    if not MIN_FRAC_BITS <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"frac_bits must be in {MIN_FRAC_BITS}..{MAX_FRAC_BITS}, "
                         f"got {frac_bits}")
    return frac_bits


def grid_limit(frac_bits: int) -> float:
    """Largest magnitude bound for grid values: |x| < 2^(24 - frac_bits) (32768 at l = 9)."""
    return float(2.0 ** (24 - frac_bits))


def _ldexp64(x64: torch.Tensor, e: int) -> torch.Tensor:
    """x64 * 2^e for a float64 tensor whose nonzero finite entries are normal and stay normal.

    Zeros, infinities and NaNs pass through unchanged. Works by adding ``e`` to the exponent
    field through an int64 view (no float multiply)."""
    bits = x64.view(torch.int64)
    special = (bits & _F64_EXP_MASK) == _F64_EXP_MASK
    zero = x64 == 0
    shifted = bits + (e << _F64_EXP_SHIFT)
    return torch.where(zero | special, bits, shifted).view(torch.float64)


def _ldexp32(x32: torch.Tensor, e: int) -> torch.Tensor:
    """x32 * 2^e for a float32 tensor whose nonzero entries are finite, normal and stay
    normal (zeros pass through), by adding ``e`` to the exponent field of the int32 view:
    half the memory traffic of :func:`_ldexp64` where the result is float32 anyway."""
    bits = x32.view(torch.int32)
    return torch.where(x32 == 0, bits, bits + (e << 23)).view(torch.float32)


@without_layers
def ldexp_exact(x: torch.Tensor, e: int) -> torch.Tensor:
    """``x * 2^e`` rounded once to ``x.dtype`` (float32/16/bf16): bit-identical to ``x * 2.0**e``.

    Computed as float64 (exact for any float32 input, subnormals included, for |e| <= 500)
    followed by one conversion back, which rounds ties to even like the float multiply would.
    Never calls aten.mul, so it is allowed inside the no-float-multiply audit."""
    if x.dtype == torch.float64:
        raise TypeError("ldexp_exact expects float32/float16/bfloat16, got float64")
    return _ldexp64(x.to(torch.float64), e).to(x.dtype)


def _check_finite_range(v64: torch.Tensor, bound: float, what: str, frac_bits: int,
                        exp: int = 0):
    """Raise GridRangeError if any |v64| >= bound or is not finite; the values the message
    reports are v64 * 2^exp (a check of x = H 2^-l is made on H against bound 2^l, which is
    exact and saves scaling every element)."""
    if v64.numel() == 0:
        return
    bad = ~(v64.abs() < bound)  # catches NaN too
    if bool(bad.any()):
        n_bad = int(bad.sum())
        finite = v64[torch.isfinite(v64)]
        worst = (math.ldexp(float(finite.abs().max()), exp) if finite.numel()
                 else float("nan"))
        nonfinite = int((~torch.isfinite(v64)).sum())
        raise GridRangeError(
            f"{what} is outside the exactly representable range of the 2^-{frac_bits} grid: "
            f"{n_bad} element(s) with |x| >= {grid_limit(frac_bits):g} = 2^{24 - frac_bits} "
            f"(limit |x * 2^{frac_bits}| < 2^24; largest finite |x| = {worst:g}, "
            f"{nonfinite} non-finite). Scale the activations down or lower frac_bits.")


@without_layers
def to_grid(x: torch.Tensor, frac_bits: int, what: str = "input",
            dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Round a float tensor to the grid: ``X = round_half_even(x * 2^l)`` as ``dtype``
    (int64 by default; int32 suffices since |X| < 2^24).

    ``x * 2^l`` is exact (x converted to float64, exponent adjusted); one rounding, ties to
    even. Raises :class:`GridRangeError` (mentioning ``what``) unless every |X| < 2^24."""
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    x64 = x.detach().to(torch.float64)
    # float64 subnormals would break the exponent trick; they round to 0 on any grid anyway.
    x64 = torch.where(x64.abs() < 2.0 ** -900, torch.zeros_like(x64), x64)
    _check_finite_range(x64, 2.0 ** (25 - frac_bits), what, frac_bits)
    X = torch.round(_ldexp64(x64, frac_bits))
    _check_grid(X, frac_bits, what)
    return X.to(dtype)


@without_layers
def round_grid(x: torch.Tensor, frac_bits: int, what: str = "input") -> torch.Tensor:
    """Q_l[x] as a float32 tensor: ``from_grid(to_grid(x))``."""
    return from_grid(to_grid(x, frac_bits, what), frac_bits)


@without_layers
def from_grid(X: torch.Tensor, frac_bits: int, dtype=torch.float32) -> torch.Tensor:
    """Exact float value ``X * 2^-l`` of integer grid values (requires |X| < 2^24)."""
    if X.is_floating_point():
        raise TypeError(f"from_grid expects an integer tensor, got {X.dtype}")
    X = X.to(torch.int64)
    if X.numel() and bool((X.abs() >= MANTISSA_LIMIT).any()):
        raise GridRangeError(f"grid integers must satisfy |X| < 2^24 to convert exactly, "
                             f"got max |X| = {int(X.abs().max())}")
    if dtype == torch.float32:                  # |X| < 2^24: exact in float32, X 2^-l normal
        return _ldexp32(X.to(torch.float32), -frac_bits)
    return _ldexp64(X.to(torch.float64), -frac_bits).to(dtype)


def _check_grid(X: torch.Tensor, frac_bits: int, what: str):
    if X.numel() and bool((X.abs() >= MANTISSA_LIMIT).any()):
        worst = float(X.abs().max())
        raise GridRangeError(
            f"{what} is outside the exactly representable range of the 2^-{frac_bits} grid: "
            f"|x| reaches {worst / 2.0 ** frac_bits:g} >= {grid_limit(frac_bits):g} = "
            f"2^{24 - frac_bits} (limit |x * 2^{frac_bits}| < 2^24). Scale the activations "
            f"down or lower frac_bits.")


@without_layers
def check_grid(X: torch.Tensor, frac_bits: int, what: str):
    """Raise :class:`GridRangeError` naming ``what`` unless every |X| < 2^24."""
    _check_grid(X, frac_bits, what)


def _branch64(h: torch.Tensor, frac_bits: int, what: str) -> torch.Tensor:
    """H = h * 2^l exactly, as float64 (h is a float32/16/bf16 block output)."""
    if not h.is_floating_point() or h.dtype == torch.float64:
        raise TypeError(f"{what} must be float32 (or float16/bfloat16), got {h.dtype}")
    h64 = h.detach().to(torch.float64)
    if h64.numel() and not bool(torch.isfinite(h64).all()):
        _check_finite_range(h64, float("inf"), what, frac_bits)
    return _ldexp64(h64, frac_bits)


@without_layers
def residual_step(X: torch.Tensor, h: torch.Tensor, frac_bits: int, what: str) -> torch.Tensor:
    """``X + round_half_even(h * 2^l)``: the grid form of x + Q_l[h] (first block, eval mode).

    Raises :class:`GridRangeError` naming ``what`` if the result leaves |X| < 2^24."""
    H = _branch64(h, frac_bits, what)
    _check_finite_range(H, 2.0 ** 26, what, frac_bits, exp=-frac_bits)
    out = torch.round(H).to(X.dtype).add_(X)
    _check_grid(out, frac_bits, what)
    return out


@without_layers
def bdia_combine(X: torch.Tensor, h: torch.Tensor, gamma_pos: torch.Tensor, frac_bits: int,
                 what: str = "block output") -> torch.Tensor:
    """Grid integer of ``Q_l[(1 - g) x + (1 + g) h]`` for g = +0.5 (``gamma_pos``) or -0.5.

    Exact: the real number (1 - g) x + (1 + g) h (x = X 2^-l on the grid, h the float32
    block output taken at face value) is rounded once to the nearest grid point, ties to
    even. No intermediate rounding happens anywhere: with V = 2 (1 - g) X + 2 (1 + g) H,
    H = h 2^l, i.e. V = X + 3H (g = +0.5) or 3X + H (g = -0.5), 3H = H + H + H is exact in
    float64 (at most 26 significant bits); it is split into floor F (an integer) and fraction
    r in [0, 1), M = cX + F is an int64, and round_half_even((M + r) / 2) is evaluated with
    integer shifts: q = M >> 1; result = q if M even, else q + 1 if r > 0, else (tie) the
    even one of q, q + 1.

    ``gamma_pos`` is a bool tensor broadcastable to X (True where g = +0.5). Raises
    :class:`GridRangeError` naming ``what`` when the result would not fit |X| < 2^24."""
    H = _branch64(h, frac_bits, what)
    # |h| far beyond the range: refuse before the int64 conversion could overflow.
    _check_finite_range(H, 2.0 ** 26, what, frac_bits, exp=-frac_bits)
    # written to keep few full-size temporaries alive (this runs once per block)
    cH = H + H
    cH.add_(H)                                  # 3H, exact
    cH = torch.where(gamma_pos, cH, H)          # c_h H
    del H
    F = torch.floor(cH)
    frac_pos = (cH > F).to(X.dtype)             # r > 0
    del cH
    M = F.to(X.dtype)  # |F| < 2^28: fits int32 as well
    del F
    M.add_(X)
    M.add_((X + X).masked_fill_(gamma_pos, 0))  # + c_x X, c_x = 1 or 3
    odd = M & 1
    M.bitwise_right_shift_(1)                   # q = floor(M / 2)
    frac_pos.bitwise_or_(M & 1)
    frac_pos.bitwise_and_(odd)
    return M.add_(frac_pos)


@without_layers
def gamma_term_inverse_(T: torch.Tensor, side: torch.Tensor, gamma_pos: torch.Tensor) -> torch.Tensor:
    """In-place :func:`gamma_term_inverse` (overwrites and returns T; integer ops only)."""
    sign = torch.where(gamma_pos, 2, -2).to(T.dtype)  # (batch, 1, ...): small
    return T.mul_(sign).sub_(side)


@without_layers
def gamma_term(X_prev: torch.Tensor, side: torch.Tensor, gamma_pos: torch.Tensor) -> torch.Tensor:
    """Grid integer of ``Q_l[g (x_prev + s 2^-l)]``: exactly +-(X_prev + s) / 2 (even numerator).

    ``side`` is the parity bit of X_prev (int64 0/1)."""
    half = (X_prev + side) >> 1
    return torch.where(gamma_pos, half, -half)


@without_layers
def gamma_term_inverse(T: torch.Tensor, side: torch.Tensor, gamma_pos: torch.Tensor) -> torch.Tensor:
    """Invert :func:`gamma_term`: X_prev = T / g - s = +-2 T - s."""
    twice = T + T
    return torch.where(gamma_pos, twice, -twice) - side


@without_layers
def parity(X: torch.Tensor) -> torch.Tensor:
    """Side bit s = 1 where X is odd (two's complement: also for negative X), as int64."""
    return X & 1


@without_layers
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat 0/1 integer tensor into uint8, 8 per byte (bit i of byte j = element 8j+i).

    Returns a contiguous uint8 tensor of ceil(n / 8) bytes; padding bits are 0."""
    bits = bits.reshape(-1).to(torch.uint8)
    n = bits.numel()
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.int64).to(torch.uint8).contiguous()


@without_layers
def unpack_bits(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a 0/1 tensor of ``dtype``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed bits must be torch.uint8, got {packed.dtype}")
    if packed.numel() * 8 < n:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than n = {n} bits")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].to(dtype)


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # as a signed int64
_MIX = 0x632BE59BD9B4E019


@without_layers
def checksum(X: torch.Tensor) -> int:
    """64-bit position-dependent checksum of an integer tensor: sum_i X_i w_i mod 2^64.

    w_i = (i * golden) | 1 is odd, so any single changed element changes the checksum; two
    or more changes collide with probability about 2^-64. Integer ops only (wrapping int64)."""
    flat = X.reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    chunk = 1 << 16  # bounded temporaries
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk].to(torch.int64)
        w = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device)
        w.mul_(_GOLDEN).add_(_MIX).bitwise_or_(1)
        total += (part * w).sum()
    return int(total)
