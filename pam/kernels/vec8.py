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
splat operands read by flat index without taking a view); ``store_i8(a, i, v)``: write
the I8 ``v`` to the int32 ``a.flat[i:i + 8]``; ``gt_i8(x, y)``: lane-wise signed x > y as
-1 (all ones) or 0; ``min_i8`` / ``max_i8`` / ``umin_i8``: lane-wise signed / signed /
unsigned minimum and maximum; ``hmin_i8`` / ``hmax_i8`` / ``humin_i8``: the signed /
signed / unsigned minimum or maximum of the eight lanes, as an int64;
``transpose8(src, i, si, dst, j, sj)``: the 8 x 8 block whose row r is
``src.flat[i + r si:i + r si + 8]`` written transposed, row c to
``dst.flat[j + c sj:j + c sj + 8]`` (4-byte elements: int32 or float32, either array;
unchecked like ``load_i8``; src and dst blocks must not overlap).
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


def _is_c_word_array(a):
    """A C-contiguous array of 4-byte words (int32 or float32)."""
    return _is_c_array(a, types.int32) or _is_c_array(a, types.float32)


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
def store_i8(typingctx, a, i, v):
    """a.flat[i:i + 8] = v (int32, unchecked)."""
    if not (_is_c_array(a, types.int32) and isinstance(i, types.Integer) and v == I8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _lanes_pointer(context, builder, sig, args, _VI), align=4)
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


def _select_lanes(predicate):
    """Codegen of a lane-wise ``predicate(x, y) ? x : y`` (LLVM matches vpminsd & co.)."""
    def codegen(context, builder, sig, args):
        return builder.select(_compare(builder, predicate, args[0], args[1]), args[0], args[1])
    return codegen


def _compare(builder, predicate, x, y):
    """Lane-wise comparison: ``predicate`` is "<" / ">" (signed) or "u<" (unsigned)."""
    if predicate.startswith("u"):
        return builder.icmp_unsigned(predicate[1:], x, y)
    return builder.icmp_signed(predicate, x, y)


def _named_intrinsic(name, doc, typer):
    """``typer`` registered as the intrinsic ``name`` (the factories below make several)."""
    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


def _binary_i8(name, predicate, doc):
    def typer(typingctx, x, y):
        if not (x == I8 and y == I8):
            return None
        return I8(x, y), _select_lanes(predicate)
    return _named_intrinsic(name, doc, typer)


min_i8 = _binary_i8("min_i8", "<", "Lane-wise signed min(x, y).")
max_i8 = _binary_i8("max_i8", ">", "Lane-wise signed max(x, y).")
umin_i8 = _binary_i8("umin_i8", "u<", "Lane-wise unsigned min(x, y).")


@intrinsic
def gt_i8(typingctx, x, y):
    """Lane-wise signed x > y: -1 (all ones) where true, 0 where false."""
    if not (x == I8 and y == I8):
        return None

    def codegen(context, builder, sig, args):
        return builder.sext(builder.icmp_signed(">", args[0], args[1]), _VI)
    return I8(x, y), codegen


def _horizontal(name, predicate, signed, doc):
    """Intrinsic: the ``predicate``-extreme of the eight lanes of an I8, as an int64."""
    def typer(typingctx, x):
        if x != I8:
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            for width in (4, 2, 1):          # fold the upper half onto the lower one
                mask = [w + width if w < width else w for w in range(8)]
                hi = builder.shuffle_vector(v, ir.Constant(_VI, ir.Undefined),
                                            ir.Constant(_VI, mask))
                v = builder.select(_compare(builder, predicate, v, hi), v, hi)
            lane = builder.extract_element(v, ir.Constant(_I32, 0))
            extend = builder.sext if signed else builder.zext
            return extend(lane, ir.IntType(64))
        return types.int64(x), codegen
    return _named_intrinsic(name, doc, typer)


hmin_i8 = _horizontal("hmin_i8", "<", True, "The signed minimum of the eight lanes (int64).")
hmax_i8 = _horizontal("hmax_i8", ">", True, "The signed maximum of the eight lanes (int64).")
humin_i8 = _horizontal("humin_i8", "u<", False,
                       "The unsigned minimum of the eight lanes (int64, 0 .. 2^32 - 1).")


def _shuffle(builder, x, y, mask):
    return builder.shuffle_vector(x, y, ir.Constant(_VI, mask))


@intrinsic
def transpose8(typingctx, src, i, si, dst, j, sj):
    """dst.flat[j + c sj + r] = src.flat[i + r si + c] for 0 <= r, c < 8 (unchecked)."""
    if not (_is_c_word_array(src) and _is_c_word_array(dst)
            and all(isinstance(x, types.Integer) for x in (i, si, j, sj))):
        return None

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)

        def pointers(arr_ty, arr, start_ty, start, stride_ty, stride):
            data = builder.bitcast(context.make_array(arr_ty)(context, builder, arr).data,
                                   _I32.as_pointer())
            start = context.cast(builder, start, start_ty, types.intp)
            stride = context.cast(builder, stride, stride_ty, types.intp)
            return [builder.bitcast(builder.gep(data, [builder.add(
                start, builder.mul(stride, ir.Constant(intp, r)))]), _VI.as_pointer())
                for r in range(8)]

        a = sig.args
        rows = [builder.load(q, align=4) for q in pointers(a[0], args[0], a[1], args[1],
                                                            a[2], args[2])]
        # 32-bit interleave of row pairs, 64-bit interleave of those, then 128-bit halves.
        lo32, hi32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
        t = []
        for r in range(0, 8, 2):
            t += [_shuffle(builder, rows[r], rows[r + 1], lo32),
                  _shuffle(builder, rows[r], rows[r + 1], hi32)]
        lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        u = []
        for q in (0, 4):                 # t[q], t[q + 2] hold columns 0,1,4,5 / 2,3,6,7
            u += [_shuffle(builder, t[q], t[q + 2], lo64), _shuffle(builder, t[q], t[q + 2], hi64),
                  _shuffle(builder, t[q + 1], t[q + 3], lo64),
                  _shuffle(builder, t[q + 1], t[q + 3], hi64)]
        lo128, hi128 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
        cols = [None] * 8
        for c in range(4):               # u[c]: columns c (low half) and c + 4 (high half)
            cols[c] = _shuffle(builder, u[c], u[c + 4], lo128)
            cols[c + 4] = _shuffle(builder, u[c], u[c + 4], hi128)
        for q, v in zip(pointers(a[3], args[3], a[4], args[4], a[5], args[5]), cols):
            builder.store(v, q, align=4)
        return context.get_dummy_value()
    return types.none(src, i, si, dst, j, sj), codegen


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


__all__ = ["I8", "F8", "load_i8", "load_f8", "store_f8", "store_i8", "get_i32", "splat_i8",
           "add_i8", "and_i8", "gt_i8", "min_i8", "max_i8", "umin_i8", "hmin_i8", "hmax_i8",
           "humin_i8", "transpose8", "zero_f8", "fadd_bits"]
