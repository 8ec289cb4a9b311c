"""Numba's on-disk cache for the CPU kernels, invalidated by the definitions they compile.

The kernels of :mod:`pam.kernels.cpu`, :mod:`pam.kernels.cpu_conv`,
:mod:`pam.kernels.cpu_rows` and :mod:`pam.kernels.cpu_xent` are ``cache=True``.
Numba keys a cached kernel on its own source file only, but these kernels compile in the
scalar definitions of :mod:`pam.bits`, :mod:`pam.optim_bits`, :mod:`pam.rows_bits` and
:mod:`pam.xent_bits` (and ``cpu_conv`` compiles helpers of ``cpu``, ``cpu_xent`` kernels of
``cpu_rows``): an edit to one of those files alone would leave
every cached kernel on the old definitions. :class:`DefinitionsStampedLocator` wraps the
locator Numba would have chosen (same cache directory, so ``NUMBA_CACHE_DIR`` is honoured)
and adds the SHA-256 of every definition file to the source stamp, so a change to any of
them recompiles every kernel on first use. :func:`install` puts it first in Numba's locator
list; it applies only to functions defined in this package's kernel files.
"""
import os

from numba.core import caching

from . import warm_worker

_PAM = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The cached kernel files, and the files whose code they compile (the list lives in the
# torch- and Numba-free pam.kernels.warm_worker, which the warm-up marker needs too).
DEFINITIONS = tuple(os.path.join(_PAM, *p) for p in warm_worker.DEFINITION_FILES)
KERNEL_FILES = frozenset(os.path.normcase(os.path.join(_PAM, *p))
                         for p in warm_worker.KERNEL_FILES)


def definitions_digest():
    """SHA-256 over the contents of :data:`DEFINITIONS` (see
    :func:`pam.kernels.warm_worker.definitions_digest`)."""
    return warm_worker.definitions_digest(_PAM)


class DefinitionsStampedLocator(caching._CacheLocator):
    """Numba's own locator for a kernel file, with the definitions digest in its stamp."""

    def __init__(self, inner):
        self._inner = inner

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.normcase(os.path.abspath(py_file)) not in KERNEL_FILES:
            return None
        for other in caching.CacheImpl._locator_classes:
            if other is cls:
                continue
            inner = other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner)
        return None

    def ensure_cache_path(self):
        self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_disambiguator(self):
        return self._inner.get_disambiguator()

    def get_source_stamp(self):
        return (self._inner.get_source_stamp(), definitions_digest())


def install():
    """Put :class:`DefinitionsStampedLocator` first in Numba's locator list (once)."""
    classes = caching.CacheImpl._locator_classes
    if DefinitionsStampedLocator not in classes:
        classes.insert(0, DefinitionsStampedLocator)
