"""bdia_pam: BDIA exact bit-level reversible transformers (optionally on PAM arithmetic).

Public entry points:
    ReversibleStack     BDIA forward / bit-exact inverse / recomputing backward
    ForwardRecord       what a reversible forward keeps (x_K, x_{K-1}, side bits, gamma)
    NonDeterministicBlockError, GridRangeError
    quant               the 2^-l fixed-point grid helpers (to_grid, from_grid, pack_bits, ...)
"""
import pam  # noqa: F401  (before torch: sets OMP_WAIT_POLICY, see pam.kernels.threads)

from . import quant
from .quant import GridRangeError
from .reversible import ForwardRecord, NonDeterministicBlockError, ReversibleStack
from .model import BDIAConfig, BDIATransformer

__version__ = "0.1.0"
__all__ = ["ReversibleStack", "ForwardRecord", "NonDeterministicBlockError", "GridRangeError",
           "quant"]
