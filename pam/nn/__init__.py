"""``pam.nn``: drop-in PAM versions of torch.nn layers, and :func:`convert`.

Modules hold the same parameters (same names and shapes) as their torch namesakes, so
state_dicts load in both directions; their arithmetic is in :mod:`pam.nn.functional`.
"""
from . import functional
from .modules import (GELU, Conv1d, Conv2d, Dropout, LayerNorm, Linear, LogSoftmax, MultiheadAttention,
                      ReLU, Sigmoid, SiLU, Softmax, Tanh, TransposedLinear)
from .convert import convert, float_leaves, KEPT_MODULES, UnsupportedModuleError

__all__ = ["functional", "Linear", "Conv1d", "Conv2d", "LayerNorm", "MultiheadAttention", "Dropout", "GELU",
           "ReLU", "Tanh", "Sigmoid", "SiLU", "Softmax", "LogSoftmax", "TransposedLinear",
           "convert", "float_leaves", "KEPT_MODULES",
           "UnsupportedModuleError"]
