"""The CPU kernels' on-disk cache is keyed on the definitions they compile (pam.kernels._cache)."""
import os
import shutil
import subprocess
import sys
import textwrap

from pam.kernels import _cache, cpu, cpu_rows, cpu_xent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_use_the_definitions_locator():
    for kernel in (cpu.mul, cpu_rows._column_sums, cpu_rows._layer_norm_forward_rows_wb,
                   cpu_xent._finish, cpu_xent._backward_rows_exact):
        locator = kernel._cache._impl.locator
        assert isinstance(locator, _cache.DefinitionsStampedLocator), kernel
        inner_stamp, digest = locator.get_source_stamp()
        assert digest == _cache.definitions_digest()
        assert inner_stamp == locator._inner.get_source_stamp()


def test_every_definition_file_is_stamped():
    """Every pam module whose compiled code the cached kernel modules reach (a module they
    import, or the module of a function they import) and that defines jitted code is in
    the stamp: an edit there must recompile the cached kernels."""
    import importlib
    import inspect
    import types
    stamped = {os.path.normcase(p) for p in _cache.DEFINITIONS}
    for name in ("cpu", "cpu_conv", "cpu_rows", "cpu_xent"):
        module = importlib.import_module(f"pam.kernels.{name}")
        for value in vars(module).values():
            source = value if isinstance(value, types.ModuleType) else \
                inspect.getmodule(value)
            if source is None or not source.__name__.startswith("pam."):
                continue
            text = inspect.getsource(source)
            if any(mark in text for mark in ("register_jitable", "@intrinsic", "njit(")):
                assert os.path.normcase(source.__file__) in stamped, (name, source.__name__)


def test_other_files_keep_numbas_locators():
    def f():
        return 1
    assert _cache.DefinitionsStampedLocator.from_function(f, __file__) is None


def test_editing_a_definition_file_recompiles_cached_kernels(tmp_path):
    """A copy of pam with a warm cache: a second process loads the kernel from the cache;
    after a comment is appended to pam/bits.py only, a third process compiles it again."""
    shutil.copytree(os.path.join(ROOT, "pam"), tmp_path / "pam",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # pam.kernels needs only numpy and numba: an empty package __init__ spares each
    # process the import of torch and the rest of pam.
    (tmp_path / "pam" / "__init__.py").write_text('"""pam.kernels alone."""\n')
    script = textwrap.dedent("""
        import numpy as np
        from pam.kernels import cpu
        a = np.arange(4, dtype=np.int32)
        cpu.mul(a, a, 0, np.empty(4, np.int32))
        print(cpu.mul.stats.cache_hits)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def hits():
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    assert hits() == "Counter()"                        # cold: compiled
    assert hits() != "Counter()"                        # warm: loaded from the cache
    with open(tmp_path / "pam" / "bits.py", "a") as fh:
        fh.write("\n# edited\n")
    assert hits() == "Counter()"                        # stale entry refused: compiled
