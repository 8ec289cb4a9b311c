"""Kernel backends: :mod:`pam.kernels.cpu` (Numba, cached on disk; see
:mod:`pam.kernels._cache`) and :mod:`pam.kernels.cuda` (numba-cuda)."""
from ._cache import install as _install_cache_locator

_install_cache_locator()
