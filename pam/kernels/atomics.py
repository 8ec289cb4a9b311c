"""Atomic operations on int64 array elements, and a spin-wait hint, for Numba CPU code.

:mod:`pam.kernels.threads` shares a job between the calling thread and its worker threads
through small int64 arrays that several threads read and write at once (chunk counters, a
job sequence number, worker states) while they run compiled code without the GIL. Plain
array loads and stores are not enough there: the compiler may keep a value in a register
across a spin loop, and a read-modify-write of two threads may lose an update. These
intrinsics compile to LLVM's atomic instructions on the element ``a[i]`` (C-contiguous
1-d int64 array; no bounds check):

* :func:`fetch_add` ``(a, i, v)``: ``a[i] += v`` atomically, returns the old value
  (sequentially consistent);
* :func:`load` ``(a, i)``: an acquire load (sees every write the writer made before its
  release store or read-modify-write);
* :func:`store` ``(a, i, v)``: a sequentially consistent store;
* :func:`pause` ``()``: the processor's spin-wait hint (``pause`` on x86-64, ``yield`` on
  AArch64, nothing elsewhere), which lets a spinning core run its sibling hyperthread and
  saves power.

Usable only from compiled code (``@njit`` / ``@jitable``); they have no Python
implementation.
"""
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["fetch_add", "load", "store", "pause"]

_I64_ARRAY = types.Array(types.int64, 1, "C")


def _element_pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index])


def _check(array):
    return isinstance(array, types.Array) and array.dtype == types.int64 \
        and array.ndim == 1


@intrinsic
def fetch_add(typingctx, a, i, v):
    if not (_check(a) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None
    sig = types.int64(a, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        array, index, value = args
        ptr = _element_pointer(context, builder, signature.args[0], array, index)
        return builder.atomic_rmw("add", ptr, value, "seq_cst")
    return sig, codegen


@intrinsic
def load(typingctx, a, i):
    if not (_check(a) and isinstance(i, types.Integer)):
        return None
    sig = types.int64(a, types.intp)

    def codegen(context, builder, signature, args):
        array, index = args
        ptr = _element_pointer(context, builder, signature.args[0], array, index)
        return builder.load_atomic(ptr, "acquire", 8)
    return sig, codegen


@intrinsic
def store(typingctx, a, i, v):
    if not (_check(a) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None
    sig = types.void(a, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        array, index, value = args
        ptr = _element_pointer(context, builder, signature.args[0], array, index)
        builder.store_atomic(value, ptr, "seq_cst", 8)
        return context.get_dummy_value()
    return sig, codegen


_MACHINE = platform.machine().lower()


@intrinsic
def pause(typingctx):
    sig = types.void()

    def codegen(context, builder, signature, args):
        module = builder.module
        if _MACHINE in ("x86_64", "amd64"):
            fn = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        elif _MACHINE in ("aarch64", "arm64"):
            fn = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]), "llvm.aarch64.hint")
            builder.call(fn, [ir.Constant(ir.IntType(32), 1)])        # YIELD
        return context.get_dummy_value()
    return sig, codegen
