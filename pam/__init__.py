"""pam: piecewise-affine (multiplication-free) float32 arithmetic for PyTorch.

Multiply two float32 by adding their bit patterns as integers (Mogami's PAM); likewise
division, exp2/log2 and everything built from them. CPU kernels (Numba) and CUDA kernels
(numba-cuda) compile the same scalar definitions (:mod:`pam.bits`), so results agree bit
for bit across devices.
"""
import os as _os
import sys as _sys

_TORCH_LOADED_FIRST = "torch" in _sys.modules
if not _TORCH_LOADED_FIRST:
    # torch's OpenMP threads spin-wait after each parallel op, on the cores pam's kernel
    # threads need (pam.kernels.threads); a passive wait leaves those cores free. Only
    # effective before torch loads: otherwise the first split kernel warns once.
    _os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from .ops import (BACKWARD_MODES, div, exp, exp2, linear, log, log2, matmul, mul, pow,
                  sqrt)
from .conv import conv1d, conv2d
from . import audit, families, functional, fused, nn, optim
from .families import FAMILIES, FORMATS
from .mode import arithmetic, UnsupportedOpError
from .mode import compile  # noqa: A004 (torch.compile for pam.arithmetic)
from .nn.convert import convert
from .kernels import threads as _threads

_threads.note_openmp_wait(_TORCH_LOADED_FIRST)

__version__ = "0.1.0"


def warm_up(processes=None):
    """Compile the CPU kernels a training step uses, in parallel worker processes (one per
    core by default), into Numba's on-disk cache; later calls and later runs skip it at once.
    Call it at the start of a script on a fresh install to shorten the first step's JIT
    (``bdia-pam train`` does; see :mod:`pam.kernels.warmup`). Returns a summary dict."""
    from .kernels import warmup
    return warmup.warm(processes)

__all__ = ["mul", "div", "exp2", "log2", "exp", "log", "pow", "sqrt", "matmul", "linear",
           "conv1d", "conv2d",
           "BACKWARD_MODES", "arithmetic", "compile", "UnsupportedOpError", "nn",
           "functional", "fused", "optim", "audit", "convert", "families", "FAMILIES",
           "FORMATS", "warm_up"]
