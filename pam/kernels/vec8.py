"""Eight-lane int32 / float32 vector values for Numba CPU kernels (LLVM ``<8 x i32>`` and
``<8 x float>``), so that a register-blocked micro-kernel can keep its accumulators in
registers across a whole reduction loop.

LLVM's loop vectorizer only vectorizes an innermost loop over arrays, so an accumulator
tile ``acc[j] += p[j]`` is loaded and stored once per reduced index; with these values a
kernel keeps ``acc`` as a loop-carried SSA value (an AVX2 ymm register) instead. Every
operation here is lane-wise and exact: wrapping int32 adds and ands, float32 adds rounded
to nearest (IEEE, no fast-math flags), so a kernel written with them computes the same
bits as the scalar loop it replaces, lane by lane.

Values: ``I8`` (eight int32) and ``F8`` (eight float32). Operations (all ``@intrinsic``):
``load_i8(a, i)`` / ``load_f8(a, i)``: the eight elements ``a.flat[i:i + 8]`` of a
C-contiguous int32 / float32 array (no bounds check: the caller guarantees
``0 <= i <= a.size - 8``); ``splat_i8(x)``: eight copies of the int32 ``x``; ``add_i8``,
``and_i8``: lane-wise wrapping int32 add / bitwise and; ``zero_f8()``: eight +0.0;
``fadd_bits(acc, v)``: ``acc + v`` with ``v``'s lanes read as float32 bit patterns;
``store_f8(a, i, v)``: write ``v`` to ``a.flat[i:i + 8]`` (float32, same contract as
``load_f8``); ``get_i32(a, i)``: the int32 scalar ``a.flat[i]`` (same contract, for
splat operands read by flat index without taking a view).
"""
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, models, register_model

_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_VI = ir.VectorType(_I32, 8)
_VF = ir.VectorType(_F32, 8)


class I8Type(types.Type):
    """Numba type of eight int32 lanes."""

    def __init__(self):
        super().__init__(name="pam.I8")


class F8Type(types.Type):
    """Numba type of eight float32 lanes."""

    def __init__(self):
        super().__init__(name="pam.F8")


I8 = I8Type()
F8 = F8Type()


@register_model(I8Type)
class _I8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI)


@register_model(F8Type)
class _F8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _element_pointer(context, builder, sig, args):
    """Pointer to element ``args[1]`` (any integer type) of the flat C-contiguous array
    ``args[0]``: the addressing every accessor below shares."""
    index = context.cast(builder, args[1], sig.args[1], types.intp)
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    return builder.gep(data, [index])


def _lanes_pointer(context, builder, sig, args, vecty):
    """The pointer of ``_element_pointer`` as a pointer to an 8-lane vector."""
    return builder.bitcast(_element_pointer(context, builder, sig, args), vecty.as_pointer())


def _load_lanes(vecty):
    """Codegen of an unchecked 8-lane load at flat index ``args[1]`` of ``args[0]``."""
    def codegen(context, builder, sig, args):
        return builder.load(_lanes_pointer(context, builder, sig, args, vecty), align=4)
    return codegen


def _is_c_array(a, dtype):
    return isinstance(a, types.Array) and a.dtype == dtype and a.layout == "C"


@intrinsic
def load_i8(typingctx, a, i):
    """Eight int32 elements a.flat[i:i + 8] (unchecked)."""
    if not (_is_c_array(a, types.int32) and isinstance(i, types.Integer)):
        return None
    return I8(a, i), _load_lanes(_VI)


@intrinsic
def load_f8(typingctx, a, i):
    """Eight float32 elements a.flat[i:i + 8] (unchecked)."""
    if not (_is_c_array(a, types.float32) and isinstance(i, types.Integer)):
        return None
    return F8(a, i), _load_lanes(_VF)


@intrinsic
def store_f8(typingctx, a, i, v):
    """a.flat[i:i + 8] = v (float32, unchecked)."""
    if not (_is_c_array(a, types.float32) and isinstance(i, types.Integer) and v == F8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _lanes_pointer(context, builder, sig, args, _VF), align=4)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def get_i32(typingctx, a, i):
    """The int32 element a.flat[i] (unchecked: no bounds check, no negative-index wrap)."""
    if not (_is_c_array(a, types.int32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_element_pointer(context, builder, sig, args))
    return types.int32(a, i), codegen


@intrinsic
def splat_i8(typingctx, x):
    """Eight copies of the integer x truncated to int32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.int32)
        one = builder.insert_element(ir.Constant(_VI, ir.Undefined), v, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(_VI, ir.Undefined),
                                      ir.Constant(_VI, [0] * 8))
    return I8(x), codegen


@intrinsic
def add_i8(typingctx, x, y):
    """Lane-wise x + y, wrapping int32."""
    if not (x == I8 and y == I8):
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return I8(x, y), codegen


@intrinsic
def and_i8(typingctx, x, y):
    """Lane-wise x & y."""
    if not (x == I8 and y == I8):
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], args[1])
    return I8(x, y), codegen


@intrinsic
def zero_f8(typingctx):
    """Eight +0.0."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF, [0.0] * 8)
    return F8(), codegen


@intrinsic
def fadd_bits(typingctx, acc, v):
    """acc + (v's lanes as float32 bit patterns), float32 round to nearest per lane."""
    if not (acc == F8 and v == I8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.bitcast(args[1], _VF))
    return F8(acc, v), codegen


__all__ = ["I8", "F8", "load_i8", "load_f8", "store_f8", "get_i32", "splat_i8", "add_i8",
           "and_i8", "zero_f8", "fadd_bits"]
