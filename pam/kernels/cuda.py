"""CUDA kernels (numba-cuda) over int32 bit-pattern arrays, bit-identical to the CPU ones.

Same names, argument orders and semantics as :mod:`pam.kernels.cpu`; every kernel calls
the scalar definitions of :mod:`pam.bits`, so CPU and CUDA compute the same bits.

* Elementwise (``a, b, off, out`` or ``x, out``): one thread per element, grid-stride loop.
* ``matmul`` and the exact-backward kernels: tiled shared-memory kernels (``TILE`` x
  ``TILE`` threads per block, ``TILE`` x ``TILE`` tiles of both operands in shared memory).
  Each thread owns one output element and accumulates in float32 in increasing order of
  the reduced index, exactly as the CPU kernels do: no split reductions, no atomics, so the
  result is deterministic and equal to the CPU result bit for bit. Sizes need not be
  multiples of ``TILE`` (loads and stores are bounds-checked). The batch dimension is
  walked with a grid-stride loop, so any batch size works.

Arguments
---------
Either torch CUDA tensors (contiguous; passed zero-copy through
``__cuda_array_interface__`` and launched on torch's current stream of their device), or
NumPy arrays (copied to the device, launched, the result copied back into ``out``; this is
the path the tests use under the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``). Bit-pattern
arrays are int32; the matmul outputs are float32. ``off`` is a Python int (the offset
constant of :func:`pam.dispatch.offset_constant`).

Importing this module needs neither a GPU nor numba-cuda; the kernels are compiled on first
use. Calling a kernel without numba-cuda installed raises an ImportError naming the extra
to install (``pip install bdia-pam[cuda]``).
"""
import importlib.util
import sys

import numpy as np

from .. import bits, optim_bits, rows_bits

__all__ = ["mul", "div", "mul_slope", "div_slope_num", "div_slope_den", "exp2", "log2",
           "exp2_slope", "log2_slope", "matmul", "matmul_exact_grad_left",
           "matmul_exact_grad_right", "available", "TILE", "ELEMENTWISE_THREADS"]

# Side of the square thread block and of the shared-memory tiles of the matmul kernels.
TILE = 16
# Threads per block of the elementwise kernels, and the most blocks launched (grid stride).
ELEMENTWISE_THREADS = 256
ELEMENTWISE_MAX_BLOCKS = 8192
# CUDA limits the y and z grid dimensions to 65535 blocks.
_MAX_GRID_YZ = 65535

try:
    _HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
except (ImportError, ValueError):  # pragma: no cover - a broken or blocked installation
    _HAVE_NUMBA_CUDA = False
if _HAVE_NUMBA_CUDA:
    from numba import cuda, int32
else:  # pragma: no cover - exercised only where numba-cuda is absent
    cuda = int32 = None


def available():
    """True when numba-cuda is installed and a GPU (or the CUDA simulator) is usable."""
    return _HAVE_NUMBA_CUDA and cuda.is_available()


def _require_numba_cuda():
    if not _HAVE_NUMBA_CUDA:
        raise ImportError("PAM on CUDA tensors needs numba-cuda: install the 'cuda' extra, "
                          "pip install 'bdia-pam[cuda]' (or pip install numba-cuda)")


# =========================================================================== kernels
# Plain Python functions; _compiled() applies cuda.jit on first use. The test suite also
# compiles them to PTX (cuda.compile_ptx) to check that no float multiply is emitted.

# ----------------------------------------------------------------- elementwise, binary
def _mul_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_bits(a[i], b[i], off)


def _div_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_bits(a[i], b[i], off)


def _mul_slope_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_slope_bits(a[i], b[i], off)


def _div_slope_num_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_num_bits(a[i], b[i], off)


def _div_slope_den_kernel(a, b, off, out):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_den_bits(a[i], b[i], off)


# ----------------------------------------------------------------- elementwise, unary
def _exp2_kernel(y, out):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        out[i] = bits.exp2_bits(y[i])


def _log2_kernel(x, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = bits.log2_bits(x[i])


def _exp2_slope_kernel(y, out):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        out[i] = bits.exp2_slope_bits(y[i])


def _log2_slope_kernel(x, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = bits.log2_slope_bits(x[i])


# ----------------------------------------------------------------- matmul
# Grid: x = tiles of output rows, y = tiles of output columns, z = batch (grid stride).
# threadIdx.x walks columns, so global loads of the right operand and stores are coalesced.
def _matmul_kernel(a, b, off, out):
    """out[p, i, j] = sum_t PAM(a[p, i, t], b[p, t, j]), float32, t increasing."""
    sa = cuda.shared.array((TILE, TILE), dtype=int32)
    sb = cuda.shared.array((TILE, TILE), dtype=int32)
    batch = a.shape[0]
    n = a.shape[1]
    k = a.shape[2]
    m = b.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * TILE + ty
    j = cuda.blockIdx.y * TILE + tx
    for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
        acc = np.float32(0.0)
        for t0 in range(0, k, TILE):
            # a[p, i, t0 + tx] and b[p, t0 + ty, j]; out-of-range cells are never read.
            if i < n and t0 + tx < k:
                sa[ty, tx] = a[p, i, t0 + tx]
            if t0 + ty < k and j < m:
                sb[ty, tx] = b[p, t0 + ty, j]
            cuda.syncthreads()
            for tt in range(min(TILE, k - t0)):
                acc += bits.bits_to_f32(bits.mul_bits(sa[ty, tt], sb[tt, tx], off))
            cuda.syncthreads()
        if i < n and j < m:
            out[p, i, j] = acc


def _matmul_exact_grad_left_kernel(a, bt, grad, off, out):
    """out[p, i, t] = sum_j PAM(grad[p, i, j], slope_a(a[p, i, t], bt[p, j, t])), j increasing.

    The reduction runs over j: grad (n, m) plays the left operand, bt (m, k) the right one.
    """
    sg = cuda.shared.array((TILE, TILE), dtype=int32)
    sb = cuda.shared.array((TILE, TILE), dtype=int32)
    batch = a.shape[0]
    n = a.shape[1]
    k = a.shape[2]
    m = bt.shape[1]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * TILE + ty
    t = cuda.blockIdx.y * TILE + tx
    for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
        ait = a[p, i, t] if (i < n and t < k) else 0
        acc = np.float32(0.0)
        for j0 in range(0, m, TILE):
            if i < n and j0 + tx < m:
                sg[ty, tx] = grad[p, i, j0 + tx]
            if j0 + ty < m and t < k:
                sb[ty, tx] = bt[p, j0 + ty, t]
            cuda.syncthreads()
            for jj in range(min(TILE, m - j0)):
                slope = bits.mul_slope_bits(ait, sb[jj, tx], off)
                acc += bits.bits_to_f32(bits.mul_bits(sg[ty, jj], slope, 0))
            cuda.syncthreads()
        if i < n and t < k:
            out[p, i, t] = acc


def _matmul_exact_grad_right_kernel(at, b, grad, off, out):
    """out[p, t, j] = sum_i PAM(grad[p, i, j], slope_a(b[p, t, j], at[p, t, i])), i increasing.

    The reduction runs over i: at (k, n) plays the left operand, grad (n, m) the right one.
    """
    sa = cuda.shared.array((TILE, TILE), dtype=int32)
    sg = cuda.shared.array((TILE, TILE), dtype=int32)
    batch = at.shape[0]
    k = at.shape[1]
    n = at.shape[2]
    m = b.shape[2]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t = cuda.blockIdx.x * TILE + ty
    j = cuda.blockIdx.y * TILE + tx
    for p in range(cuda.blockIdx.z, batch, cuda.gridDim.z):
        btj = b[p, t, j] if (t < k and j < m) else 0
        acc = np.float32(0.0)
        for i0 in range(0, n, TILE):
            if t < k and i0 + tx < n:
                sa[ty, tx] = at[p, t, i0 + tx]
            if i0 + ty < n and j < m:
                sg[ty, tx] = grad[p, i0 + ty, j]
            cuda.syncthreads()
            for ii in range(min(TILE, n - i0)):
                slope = bits.mul_slope_bits(btj, sa[ty, ii], off)
                acc += bits.bits_to_f32(bits.mul_bits(sg[ii, tx], slope, 0))
            cuda.syncthreads()
        if t < k and j < m:
            out[p, t, j] = acc


# Kernel name -> plain Python kernel function (what cuda.jit and cuda.compile_ptx take).
KERNEL_FUNCTIONS = {
    "mul": _mul_kernel,
    "div": _div_kernel,
    "mul_slope": _mul_slope_kernel,
    "div_slope_num": _div_slope_num_kernel,
    "div_slope_den": _div_slope_den_kernel,
    "exp2": _exp2_kernel,
    "log2": _log2_kernel,
    "exp2_slope": _exp2_slope_kernel,
    "log2_slope": _log2_slope_kernel,
    "matmul": _matmul_kernel,
    "matmul_exact_grad_left": _matmul_exact_grad_left_kernel,
    "matmul_exact_grad_right": _matmul_exact_grad_right_kernel,
}

_compiled_cache = {}


def _compiled(name):
    """The cuda.jit dispatcher of kernel ``name`` (compiled lazily, once per signature)."""
    _require_numba_cuda()
    kernel = _compiled_cache.get(name)
    if kernel is None:
        kernel = cuda.jit(KERNEL_FUNCTIONS[name])
        _compiled_cache[name] = kernel
    return kernel


# =========================================================================== launching
def _is_torch_tensor(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_array(x, name, ndim, dtype):
    """Raise a clear error unless ``x`` is a C-contiguous ``dtype`` array of ``ndim`` dims."""
    if _is_torch_tensor(x):
        torch_dtype = {np.int32: "torch.int32", np.float32: "torch.float32"}[dtype]
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor (or a NumPy array), got a tensor "
                             f"on {x.device}")
        if str(x.dtype) != torch_dtype:
            raise TypeError(f"{name} must have dtype {torch_dtype}, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    elif isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {x.dtype}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    else:
        raise TypeError(f"{name} must be a torch CUDA tensor or a NumPy array, "
                        f"got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _launch(name, griddim, blockdim, arrays, scalars, out):
    """Launch kernel ``name`` with ``(*arrays, *scalars, out)``.

    torch CUDA tensors are passed zero-copy on torch's current stream; NumPy arrays are
    copied to the device and the result is copied back into ``out``.
    """
    kernel = _compiled(name)
    tensors = [_is_torch_tensor(x) for x in (*arrays, out)]
    if all(tensors):
        import torch
        device = out.device
        for x in arrays:
            if x.device != device:
                raise ValueError(f"all tensors must be on one device, got {x.device} and "
                                 f"{device}")
        with cuda.gpus[device.index if device.index is not None else 0]:
            stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
            dev = [cuda.as_cuda_array(x.detach()) for x in (*arrays, out)]
            kernel[griddim, blockdim, stream](*dev[:-1], *scalars, dev[-1])
        return out
    if any(tensors):
        raise TypeError("pass either only torch CUDA tensors or only NumPy arrays")
    dev = [cuda.to_device(x) for x in arrays]
    dout = cuda.to_device(out)
    kernel[griddim, blockdim](*dev, *scalars, dout)
    dout.copy_to_host(out)
    return out


def _elementwise_grid(size):
    blocks = (size + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS
    return min(blocks, ELEMENTWISE_MAX_BLOCKS)


def _binary(name, a, b, off, out):
    for x, label in ((a, "a"), (b, "b"), (out, "out")):
        _check_array(x, label, 1, np.int32)
    if not (a.shape == b.shape == out.shape):
        raise ValueError(f"a, b and out must have one shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)} and {tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch(name, _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, (a, b),
                   (int(off),), out)


def _unary(name, x, out):
    _check_array(x, "x", 1, np.int32)
    _check_array(out, "out", 1, np.int32)
    if x.shape != out.shape:
        raise ValueError(f"x and out must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch(name, _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, (x,), (),
                   out)


def _tiled(name, left, right, extra, off, out, names):
    """Launch a tiled reduction kernel; ``out`` is (P, rows, cols) float32."""
    for x, label in ((*zip((left, right, *extra), names), (out, "out"))):
        _check_array(x, label, 3, np.float32 if label == "out" else np.int32)
    batch, rows, cols = out.shape
    if batch == 0 or rows == 0 or cols == 0:
        return out
    col_tiles = (cols + TILE - 1) // TILE
    if col_tiles > _MAX_GRID_YZ:
        raise ValueError(f"{name}: at most {_MAX_GRID_YZ * TILE} output columns are "
                         f"supported, got {cols}")
    griddim = ((rows + TILE - 1) // TILE, col_tiles, min(batch, _MAX_GRID_YZ))
    return _launch(name, griddim, (TILE, TILE), (left, right, *extra), (int(off),), out)


def _shape_error(what, **shapes):
    listing = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
    return ValueError(f"{what}; got {listing}")


# =========================================================================== public kernels
def mul(a, b, off, out):
    """out = PAM(a, b; off) elementwise (flat int32 bit patterns)."""
    return _binary("mul", a, b, off, out)


def div(a, b, off, out):
    """out = PAD(a, b; off) elementwise (flat int32 bit patterns)."""
    return _binary("div", a, b, off, out)


def mul_slope(a, b, off, out):
    """out = exact derivative of PAM(a, b; off) w.r.t. a (a power of two)."""
    return _binary("mul_slope", a, b, off, out)


def div_slope_num(a, b, off, out):
    """out = exact derivative of PAD(a, b; off) w.r.t. the numerator a."""
    return _binary("div_slope_num", a, b, off, out)


def div_slope_den(a, b, off, out):
    """out = exact derivative of PAD(a, b; off) w.r.t. the denominator b."""
    return _binary("div_slope_den", a, b, off, out)


def exp2(y, out):
    """out = pa_exp2(y) elementwise."""
    return _unary("exp2", y, out)


def log2(x, out):
    """out = pa_log2(x) elementwise."""
    return _unary("log2", x, out)


def exp2_slope(y, out):
    """out = exact derivative of pa_exp2 at y: 2^floor(y)."""
    return _unary("exp2_slope", y, out)


def log2_slope(x, out):
    """out = exact derivative of pa_log2 at x: 2^-E(x)."""
    return _unary("log2_slope", x, out)


def matmul(a, b, off, out):
    """out[p, i, j] = sum_t PAM(a[p, i, t], b[p, t, j]), float32, t increasing.

    a: (batch, n, k) int32, b: (batch, k, m) int32, out: (batch, n, m) float32.
    k == 0 gives zeros.
    """
    if (a.ndim == b.ndim == out.ndim == 3
            and not (a.shape[0] == b.shape[0] == out.shape[0] and a.shape[2] == b.shape[1]
                     and out.shape[1] == a.shape[1] and out.shape[2] == b.shape[2])):
        raise _shape_error("matmul expects a (P, n, k), b (P, k, m), out (P, n, m)",
                           a=a.shape, b=b.shape, out=out.shape)
    return _tiled("matmul", a, b, (), off, out, ("a", "b"))


def matmul_exact_grad_left(a, bt, grad, off, out):
    """Exact gradient w.r.t. the left operand of ``matmul`` (see the CPU kernel).

    out[p, i, t] = sum_j PAM(grad[p, i, j], slope_a(a[p, i, t], bt[p, j, t])), j increasing.
    a: (batch, n, k), bt: (batch, m, k), grad: (batch, n, m) int32; out: (batch, n, k)
    float32.
    """
    if (a.ndim == bt.ndim == grad.ndim == out.ndim == 3
            and not (a.shape[0] == bt.shape[0] == grad.shape[0] == out.shape[0]
                     and bt.shape[2] == a.shape[2] and grad.shape[1] == a.shape[1]
                     and grad.shape[2] == bt.shape[1] and tuple(out.shape) == tuple(a.shape))):
        raise _shape_error("matmul_exact_grad_left expects a (P, n, k), bt (P, m, k), "
                           "grad (P, n, m), out (P, n, k)",
                           a=a.shape, bt=bt.shape, grad=grad.shape, out=out.shape)
    # Thread layout: rows i, columns t; the extra operand a is read per thread.
    return _tiled("matmul_exact_grad_left", a, bt, (grad,), off, out, ("a", "bt", "grad"))


def matmul_exact_grad_right(at, b, grad, off, out):
    """Exact gradient w.r.t. the right operand of ``matmul`` (see the CPU kernel).

    out[p, t, j] = sum_i PAM(grad[p, i, j], slope_a(b[p, t, j], at[p, t, i])), i increasing.
    at: (batch, k, n), b: (batch, k, m), grad: (batch, n, m) int32; out: (batch, k, m)
    float32.
    """
    if (at.ndim == b.ndim == grad.ndim == out.ndim == 3
            and not (at.shape[0] == b.shape[0] == grad.shape[0] == out.shape[0]
                     and b.shape[1] == at.shape[1] and grad.shape[1] == at.shape[2]
                     and grad.shape[2] == b.shape[2] and tuple(out.shape) == tuple(b.shape))):
        raise _shape_error("matmul_exact_grad_right expects at (P, k, n), b (P, k, m), "
                           "grad (P, n, m), out (P, k, m)",
                           at=at.shape, b=b.shape, grad=grad.shape, out=out.shape)
    return _tiled("matmul_exact_grad_right", at, b, (grad,), off, out, ("at", "b", "grad"))


# ===========================================================================
# Added kernels (scalar operands, fused optimizer and row kernels). Same conventions as
# above; the matmul kernels are not touched here.
# ===========================================================================

# ----------------------------------------------------------------- scalar operand
# ``<op>_bs(a, s, off, out)``: out[i] = op(a[i], s[0]); ``<op>_as(s, b, off, out)``:
# out[i] = op(s[0], b[i]). The scalar stays a 1-element device array (no host sync).
def _mul_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_bits(a[i], sb, off)


def _mul_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.mul_bits(sa, b[i], off)


def _div_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_bits(a[i], sb, off)


def _div_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.div_bits(sa, b[i], off)


def _mul_slope_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.mul_slope_bits(a[i], sb, off)


def _mul_slope_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.mul_slope_bits(sa, b[i], off)


def _div_slope_num_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_num_bits(a[i], sb, off)


def _div_slope_num_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_num_bits(sa, b[i], off)


def _div_slope_den_bs_kernel(a, s, off, out):
    sb = s[0]
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_den_bits(a[i], sb, off)


def _div_slope_den_as_kernel(s, b, off, out):
    sa = s[0]
    for i in range(cuda.grid(1), b.size, cuda.gridsize(1)):
        out[i] = bits.div_slope_den_bits(sa, b[i], off)


def _scalar_operand(name, x, s, off, out, scalar_first):
    _check_array(x, "b" if scalar_first else "a", 1, np.int32)
    _check_array(s, "s", 1, np.int32)
    _check_array(out, "out", 1, np.int32)
    if s.shape[0] != 1:
        raise ValueError(f"s must hold exactly one element, got shape {tuple(s.shape)}")
    if x.shape != out.shape:
        raise ValueError(f"the array operand and out must have one shape, got "
                         f"{tuple(x.shape)} and {tuple(out.shape)}")
    if out.shape[0] == 0:
        return out
    arrays = (s, x) if scalar_first else (x, s)
    return _launch(name, _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS, arrays,
                   (int(off),), out)


def mul_bs(a, s, off, out):
    """out[i] = mul(a[i], s[0]) (see :func:`mul`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_bs", a, s, off, out, False)


def mul_as(s, b, off, out):
    """out[i] = mul(s[0], b[i]) (see :func:`mul`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_as", b, s, off, out, True)


def div_bs(a, s, off, out):
    """out[i] = div(a[i], s[0]) (see :func:`div`); ``s`` is a 1-element array."""
    return _scalar_operand("div_bs", a, s, off, out, False)


def div_as(s, b, off, out):
    """out[i] = div(s[0], b[i]) (see :func:`div`); ``s`` is a 1-element array."""
    return _scalar_operand("div_as", b, s, off, out, True)


def mul_slope_bs(a, s, off, out):
    """out[i] = mul_slope(a[i], s[0]) (see :func:`mul_slope`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_slope_bs", a, s, off, out, False)


def mul_slope_as(s, b, off, out):
    """out[i] = mul_slope(s[0], b[i]) (see :func:`mul_slope`); ``s`` is a 1-element array."""
    return _scalar_operand("mul_slope_as", b, s, off, out, True)


def div_slope_num_bs(a, s, off, out):
    """out[i] = div_slope_num(a[i], s[0]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_num_bs", a, s, off, out, False)


def div_slope_num_as(s, b, off, out):
    """out[i] = div_slope_num(s[0], b[i]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_num_as", b, s, off, out, True)


def div_slope_den_bs(a, s, off, out):
    """out[i] = div_slope_den(a[i], s[0]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_den_bs", a, s, off, out, False)


def div_slope_den_as(s, b, off, out):
    """out[i] = div_slope_den(s[0], b[i]); ``s`` is a 1-element array."""
    return _scalar_operand("div_slope_den_as", b, s, off, out, True)


KERNEL_FUNCTIONS.update({
    "mul_bs": _mul_bs_kernel,
    "mul_as": _mul_as_kernel,
    "div_bs": _div_bs_kernel,
    "div_as": _div_as_kernel,
    "mul_slope_bs": _mul_slope_bs_kernel,
    "mul_slope_as": _mul_slope_as_kernel,
    "div_slope_num_bs": _div_slope_num_bs_kernel,
    "div_slope_num_as": _div_slope_num_as_kernel,
    "div_slope_den_bs": _div_slope_den_bs_kernel,
    "div_slope_den_as": _div_slope_den_as_kernel,
})
__all__ += [
    "mul_bs", "mul_as", "div_bs", "div_as", "mul_slope_bs", "mul_slope_as",
    "div_slope_num_bs", "div_slope_num_as", "div_slope_den_bs", "div_slope_den_as"]


# ----------------------------------------------------------------- fused optimizers
# In place over flat int32 arrays, one thread per element (grid stride); the per-element
# arithmetic is pam.optim_bits, as in the CPU kernels of the same names.
def _adamw_kernel(p, g, m, v, mx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off,
                  flags):
    ams = (flags & optim_bits.ADAMW_AMSGRAD) != 0
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        imx = mx[i] if ams else 0
        np_, nm, nv, nmx = optim_bits.adamw_update(p[i], g[i], m[i], v[i], imx, decay, b1,
                                                   omb1, b2, omb2, step_size, sbc2, eps,
                                                   off, flags)
        p[i] = np_
        m[i] = nm
        v[i] = nv
        if ams:
            mx[i] = nmx


def _sgd_kernel(p, g, buf, lr, wd, mom, omd, off, flags):
    keep = (flags & optim_bits.SGD_MOMENTUM) != 0
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        ib = buf[i] if keep else 0
        np_, nb = optim_bits.sgd_update(p[i], g[i], ib, lr, wd, mom, omd, off, flags)
        p[i] = np_
        if keep:
            buf[i] = nb


def _launch_inplace(name, griddim, blockdim, arrays, scalars, updated):
    """Launch ``name(*arrays, *scalars)``; NumPy arrays at indices ``updated`` get the
    device results copied back (torch CUDA tensors are updated in place, zero-copy)."""
    kernel = _compiled(name)
    tensors = [_is_torch_tensor(x) for x in arrays]
    if all(tensors):
        import torch
        device = arrays[0].device
        for x in arrays:
            if x.device != device:
                raise ValueError(f"all tensors must be on one device, got {x.device} and "
                                 f"{device}")
        with cuda.gpus[device.index if device.index is not None else 0]:
            stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
            dev = [cuda.as_cuda_array(x.detach()) for x in arrays]
            kernel[griddim, blockdim, stream](*dev, *scalars)
        return
    if any(tensors):
        raise TypeError("pass either only torch CUDA tensors or only NumPy arrays")
    dev = [cuda.to_device(x) for x in arrays]
    kernel[griddim, blockdim](*dev, *scalars)
    for i in updated:
        dev[i].copy_to_host(arrays[i])


def _check_flat(named, n):
    for label, x in named:
        _check_array(x, label, 1, np.int32)
        if x.shape[0] != n:
            raise ValueError(f"{label} must have {n} elements, got {x.shape[0]}")


def adamw(p, g, m, v, mx, decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off, flags):
    """In place: p, m, v (and mx with amsgrad) <- one AdamW step (see the CPU kernel)."""
    ams = (int(flags) & optim_bits.ADAMW_AMSGRAD) != 0
    _check_array(p, "p", 1, np.int32)
    n = p.shape[0]
    _check_flat((("g", g), ("m", m), ("v", v)) + ((("mx", mx),) if ams else ()), n)
    if n == 0:
        return
    scalars = tuple(int(x) for x in (decay, b1, omb1, b2, omb2, step_size, sbc2, eps, off,
                                     flags))
    _launch_inplace("adamw", _elementwise_grid(n), ELEMENTWISE_THREADS, (p, g, m, v, mx),
                    scalars, (0, 2, 3, 4) if ams else (0, 2, 3))


def sgd(p, g, buf, lr, wd, mom, omd, off, flags):
    """In place: p (and buf with momentum) <- one SGD step (see the CPU kernel)."""
    keep = (int(flags) & optim_bits.SGD_MOMENTUM) != 0
    _check_array(p, "p", 1, np.int32)
    n = p.shape[0]
    _check_flat((("g", g),) + ((("buf", buf),) if keep else ()), n)
    if n == 0:
        return
    scalars = tuple(int(x) for x in (lr, wd, mom, omd, off, flags))
    _launch_inplace("sgd", _elementwise_grid(n), ELEMENTWISE_THREADS, (p, g, buf), scalars,
                    (0, 2) if keep else (0,))


def _adamw_unbiased_kernel(p, g, m, v, mx, decay, c1, c2, k_step, eps_s, off, sq_off, flags):
    ams = (flags & optim_bits.ADAMW_AMSGRAD) != 0
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        imx = mx[i] if ams else 0
        np_, nm, nv, nmx = optim_bits.adamw_update_unbiased(p[i], g[i], m[i], v[i], imx,
                                                            decay, c1, c2, k_step, eps_s,
                                                            off, sq_off, flags)
        p[i] = np_
        m[i] = nm
        v[i] = nv
        if ams:
            mx[i] = nmx


def adamw_unbiased(p, g, m, v, mx, decay, c1, c2, k_step, eps_s, off, sq_off, flags):
    """In place: one step of the unbiased AdamW variant (see the CPU kernel)."""
    ams = (int(flags) & optim_bits.ADAMW_AMSGRAD) != 0
    _check_array(p, "p", 1, np.int32)
    n = p.shape[0]
    _check_flat((("g", g), ("m", m), ("v", v)) + ((("mx", mx),) if ams else ()), n)
    if n == 0:
        return
    scalars = tuple(int(x) for x in (decay, c1, c2, k_step, eps_s, off, sq_off, flags))
    _launch_inplace("adamw_unbiased", _elementwise_grid(n), ELEMENTWISE_THREADS,
                    (p, g, m, v, mx), scalars, (0, 2, 3, 4) if ams else (0, 2, 3))


KERNEL_FUNCTIONS.update({"adamw": _adamw_kernel, "sgd": _sgd_kernel,
                         "adamw_unbiased": _adamw_unbiased_kernel})
__all__ += ["adamw", "sgd", "adamw_unbiased"]


# ----------------------------------------------------------------- fused composites
def _gelu_forward_kernel(x, knots, slopes, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = rows_bits.gelu_forward_bits(x[i], knots, slopes)


def _gelu_backward_kernel(x, grad, knots, slopes, exact, out):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = rows_bits.gelu_backward_bits(x[i], grad[i], knots, slopes, exact)


def gelu_forward(x, knots, slopes, out):
    """out = piecewise-affine GELU of x (see the CPU kernel); knots/slopes: int32 bits."""
    for a, label in ((x, "x"), (knots, "knots"), (slopes, "slopes"), (out, "out")):
        _check_array(a, label, 1, np.int32)
    if x.shape != out.shape or knots.shape != slopes.shape:
        raise ValueError(f"x and out, knots and slopes must have equal shapes, got "
                         f"{tuple(x.shape)}, {tuple(out.shape)}, {tuple(knots.shape)}, "
                         f"{tuple(slopes.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch("gelu_forward", _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS,
                   (x, knots, slopes), (), out)


def gelu_backward(x, grad, knots, slopes, exact, out):
    """out = input gradient of the piecewise-affine GELU (see the CPU kernel)."""
    for a, label in ((x, "x"), (grad, "grad"), (knots, "knots"), (slopes, "slopes"),
                     (out, "out")):
        _check_array(a, label, 1, np.int32)
    if not (x.shape == grad.shape == out.shape) or knots.shape != slopes.shape:
        raise ValueError(f"x, grad and out, knots and slopes must have equal shapes, got "
                         f"{tuple(x.shape)}, {tuple(grad.shape)}, {tuple(out.shape)}, "
                         f"{tuple(knots.shape)}, {tuple(slopes.shape)}")
    if out.shape[0] == 0:
        return out
    return _launch("gelu_backward", _elementwise_grid(out.shape[0]), ELEMENTWISE_THREADS,
                   (x, grad, knots, slopes), (bool(exact),), out)


def _softmax_forward_kernel(x, n, off, safe, out):
    rows = x.size // n
    for r in range(cuda.grid(1), rows, cuda.gridsize(1)):
        rows_bits.softmax_row_forward(x, out, r * n, n, off, safe)


def _softmax_backward_kernel(x, g, n, off, safe, exact, out):
    rows = x.size // n
    for r in range(cuda.grid(1), rows, cuda.gridsize(1)):
        rows_bits.softmax_row_backward(x, g, out, r * n, n, off, safe, exact)


def _check_rows(n, **arrays):
    size = None
    for label, a in arrays.items():
        _check_array(a, label, 1, np.int32)
        if size is not None and a.shape[0] != size:
            raise ValueError(f"{label} must have {size} elements, got {a.shape[0]}")
        size = a.shape[0]
    if n <= 0 or size % n:
        raise ValueError(f"row length n={n} must be positive and divide {size}")
    return size // n


def softmax_forward(x, out, n, off, safe):
    """Rows of length ``n`` -> PA softmax, one thread per row (see the CPU kernel)."""
    rows = _check_rows(int(n), x=x, out=out)
    if rows == 0:
        return out
    return _launch("softmax_forward", _elementwise_grid(rows), ELEMENTWISE_THREADS, (x,),
                   (int(n), int(off), bool(safe)), out)


def softmax_backward(x, g, out, n, off, safe, exact):
    """Input gradient of softmax_forward, one thread per row (see the CPU kernel)."""
    rows = _check_rows(int(n), x=x, g=g, out=out)
    if rows == 0:
        return out
    return _launch("softmax_backward", _elementwise_grid(rows), ELEMENTWISE_THREADS, (x, g),
                   (int(n), int(off), bool(safe), bool(exact)), out)


KERNEL_FUNCTIONS.update({"gelu_forward": _gelu_forward_kernel,
                         "gelu_backward": _gelu_backward_kernel,
                         "softmax_forward": _softmax_forward_kernel,
                         "softmax_backward": _softmax_backward_kernel})
__all__ += ["gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward"]


def PTX_SIGNATURES(nt):
    """numba signatures of the kernels added in this section that the PTX test compiles
    (the scalar-operand kernels share the elementwise signature and are listed there)."""
    i1, i64 = nt.int32[::1], nt.int64
    return {"adamw": (i1,) * 5 + (i64,) * 10, "sgd": (i1,) * 3 + (i64,) * 6,
            "adamw_unbiased": (i1,) * 5 + (i64,) * 8,
            "gelu_forward": (i1,) * 4, "gelu_backward": (i1,) * 4 + (nt.boolean, i1),
            "softmax_forward": (i1, i64, i64, nt.boolean, i1),
            "softmax_backward": (i1, i1, i64, i64, nt.boolean, nt.boolean, i1)}
