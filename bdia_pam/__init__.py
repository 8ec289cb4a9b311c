"""bdia_pam: BDIA exact bit-level reversible transformers (optionally on PAM arithmetic).

Public entry points:
    ReversibleStack     BDIA forward / bit-exact inverse / recomputing backward
    ForwardRecord       what a reversible forward keeps (x_K, x_{K-1}, side bits, gamma)
    NonDeterministicBlockError, GridRangeError
    BDIAConfig, BDIATransformer
    quant               the 2^-l fixed-point grid helpers (to_grid, from_grid, pack_bits, ...)

The names load on first use (PEP 562): ``import bdia_pam`` alone imports neither torch nor
pam, so the ``bdia-pam`` command (:mod:`bdia_pam._entry`) can start compiling the PAM
kernels in worker processes before it loads them. It sets ``OMP_WAIT_POLICY=passive``
when torch is not loaded yet, as ``import pam`` does (submodules import torch directly;
see :mod:`pam.kernels.threads` for why).
"""
import importlib
import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")

__version__ = "0.1.0"
__all__ = ["ReversibleStack", "ForwardRecord", "NonDeterministicBlockError", "GridRangeError",
           "BDIAConfig", "BDIATransformer", "quant"]

_HOME = {"quant": "quant", "GridRangeError": "quant", "ReversibleStack": "reversible",
         "ForwardRecord": "reversible", "NonDeterministicBlockError": "reversible",
         "BDIAConfig": "model", "BDIATransformer": "model"}


def __getattr__(name):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'bdia_pam' has no attribute {name!r}")
    sub = importlib.import_module(f".{module}", __name__)
    value = sub if name == module else getattr(sub, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
