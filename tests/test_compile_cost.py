"""What keeps the kernels' first compilation small (validation/README.md section 9c).

Numba's cost is mostly per compiled function: every definition a kernel reaches is
compiled (per argument types and kind of caller), optimized and turned into machine code
on its own. These tests pin the measures that cut it: the definitions and the kernels'
inner helpers are ``pam.bits.jitable`` (no C entry point), the kernels have no C entry
point either, and a helper called with a constant compiles one signature for all callers.
"""
import ast
import pathlib
import re

import numpy as np

from pam import bits
from pam.kernels import cpu

PAM = pathlib.Path(bits.__file__).parent
DEFINITION_FILES = ("bits.py", "optim_bits.py", "rows_bits.py", "xent_bits.py", "attn_bits.py",
                    "kernels/cpu.py", "kernels/cpu_rows.py", "kernels/cpu_xent.py",
                    "kernels/cpu_attn.py")


def test_definitions_are_registered_with_jitable():
    """No definition file registers a function with plain ``register_jitable`` (which
    would build a C wrapper per compiled signature): bits.jitable is the one decorator."""
    for name in DEFINITION_FILES:
        src = (PAM / name).read_text()
        assert not re.search(r"^\s*@register_jitable\b", src, re.M), name
        if name != "bits.py":
            assert "register_jitable" not in src, name
        else:
            assert "def jitable(" in src


def test_jitable_turns_off_the_c_wrapper():
    """bits.jitable registers with no_cfunc_wrapper (an explicit option still wins), and
    the registered function stays a plain Python function."""
    seen = []

    def fake(**options):
        seen.append(options)
        return lambda fn: fn

    real = bits.register_jitable
    bits.register_jitable = fake
    try:
        def f(x):
            return x + 1
        assert bits.jitable(f) is f and f(1) == 2
        bits.jitable(forceinline=True)(f)
        bits.jitable(no_cfunc_wrapper=False)(f)
    finally:
        bits.register_jitable = real
    assert seen == [dict(no_cfunc_wrapper=True),
                    dict(forceinline=True, no_cfunc_wrapper=True),
                    dict(no_cfunc_wrapper=False)]


def test_kernels_have_no_c_entry_point():
    """A compiled kernel (fresh or loaded from Numba's cache) defines its CPython wrapper
    and no C wrapper."""
    a = np.arange(1, 9, dtype=np.float32).view(np.int32)
    out = np.empty(8, np.int32)
    cpu.mul_bs(a, a[:1], 0, out)
    assert cpu.mul_bs.overloads
    for cres in cpu.mul_bs.overloads.values():
        lib = cres.library
        assert lib.get_pointer_to_function(cres.fndesc.llvm_cpython_wrapper_name) != 0
        assert lib.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name) == 0


def test_live_span_calls_share_one_signature():
    """Every call of _live_span in the kernels passes its row count as a run-time int64
    (``np.int64(...)``), not as a constant: Numba types a constant argument as a literal
    and compiled one signature of _live_span per constant (2 and MM_TILE_ROWS)."""
    tree = ast.parse((PAM / "kernels" / "cpu.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "_live_span"]
    assert len(calls) >= 2
    for call in calls:
        count = call.args[2]
        assert (isinstance(count, ast.Call) and isinstance(count.func, ast.Attribute)
                and count.func.attr == "int64"), ast.unparse(call)
