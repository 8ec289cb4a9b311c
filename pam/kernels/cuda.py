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

from .. import bits

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


def _signatures():
    """Kernel name -> tuple of numba argument types (what the launchers pass)."""
    if not _HAVE_NUMBA_CUDA:
        return {}
    from numba import types as nt
    i1, i3, f3, off = nt.int32[::1], nt.int32[:, :, ::1], nt.float32[:, :, ::1], nt.int64
    sigs = {name: (i1, i1, off, i1) for name in
            ("mul", "div", "mul_slope", "div_slope_num", "div_slope_den")}
    sigs.update({name: (i1, i1) for name in ("exp2", "log2", "exp2_slope", "log2_slope")})
    sigs["matmul"] = (i3, i3, off, f3)
    sigs["matmul_exact_grad_left"] = (i3, i3, i3, off, f3)
    sigs["matmul_exact_grad_right"] = (i3, i3, i3, off, f3)
    return sigs


# Kernel name -> numba argument types: every kernel can be compiled ahead of time
# (cuda.compile_ptx(KERNEL_FUNCTIONS[name], SIGNATURES[name], cc=...)) by tools and tests.
SIGNATURES = _signatures()
# Kernel name -> threads per block it is launched with (ELEMENTWISE_THREADS if absent).
THREADS_PER_BLOCK = {"matmul": TILE * TILE, "matmul_exact_grad_left": TILE * TILE,
                     "matmul_exact_grad_right": TILE * TILE}

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
