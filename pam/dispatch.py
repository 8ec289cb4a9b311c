"""From torch tensors to kernels: argument checks, broadcasting, zero-copy launch.

Kernels see int32 views of float32 data (the bit patterns). On CPU the views are NumPy
arrays sharing the tensors' memory (``tensor.numpy()``); on CUDA the tensors are handed to
:mod:`pam.kernels.cuda`, which wraps them with ``__cuda_array_interface__`` and launches on
torch's current stream. Both backends expose kernels with the same names and signatures.

These functions write kernel results into buffers they allocate, behind torch's back: they
are the implementations, not traceable by ``torch.compile``. PAM ops call them through
:mod:`pam.library`, whose custom ops wrap them for tracing.
"""
import numpy as np
import torch

from . import bits

__all__ = ["check_float32", "check_same_device", "offset_constant", "launch",
           "binary_map", "unary_map", "as_bits", "KINDS", "kernel_suffix", "check_format",
           "quantize", "launch_in", "recording_launches"]


def check_float32(x, name):
    """Raise a clear error unless ``x`` is a float32 torch tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype torch.float32, "
                        f"got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype torch.float32, got {x.dtype} "
                        f"(convert explicitly with .float() if that is intended)")
    if not (x.is_cpu or x.is_cuda):         # (device.type costs ~1 us per call)
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {x.device}")
    return x


def check_same_device(**tensors):
    """Raise if the named tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")


_SCALAR_CACHE = {}
_SCALAR_CACHE_MAX = 1024


def as_operand(x, name, like):
    """A Python number becomes a float32 scalar tensor on ``like``'s device.

    The tensors made for numbers are cached per (value, device) and shared: callers must
    not modify them in place (no PAM op does). Under ``torch.compile`` a fresh constant is
    made instead (no global cache for Dynamo to trace and guard on).
    """
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if torch.compiler.is_compiling():
            return torch.full((), float(x), dtype=torch.float32, device=like.device)
        key = (float(x).hex(), like.device)          # tells -0.0 from 0.0; NaN hits
        t = _SCALAR_CACHE.get(key)
        if t is None:
            if len(_SCALAR_CACHE) >= _SCALAR_CACHE_MAX:
                _SCALAR_CACHE.clear()
            t = torch.tensor(float(x), dtype=torch.float32, device=like.device)
            _SCALAR_CACHE[key] = t
        return t
    return check_float32(x, name)


@torch._dynamo.assume_constant_result
def offset_constant(offset):
    """The integer folded into PAM/PAD for ``offset`` (None means no offset).

    A function of a Python number: under ``torch.compile`` Dynamo evaluates it while
    tracing (a constant, no graph break on its NumPy calls)."""
    if offset is None:
        return 0
    if isinstance(offset, (bool, np.bool_)) or not isinstance(offset, (int, float, np.integer, np.floating)):
        raise TypeError(f"offset must be a real number or None, got {type(offset).__name__} {offset!r}")
    value = float(offset)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"offset must be a positive finite number or None, got {offset!r}")
    with np.errstate(over="ignore"):
        v32 = np.float32(value)
    if not np.isfinite(v32) or v32 < np.finfo(np.float32).tiny:
        raise ValueError(f"offset must be a normal finite float32 (about 1.2e-38 .. 3.4e38), got {offset!r}")
    return int(np.float32(value).view(np.int32)) - bits.ONE


def as_bits(x):
    """A contiguous int32 view of float32 tensor ``x`` (its bit patterns), detached."""
    x = x.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    return x.view(torch.int32)


_MODULES = {}
_KERNELS = {}
_INT32 = np.dtype(np.int32)


def _module(device_type, module):
    """The kernel module ``pam.kernels.cpu[_<module>]`` or ``cuda[_<module>]`` for a
    device type, imported once (``module`` "" is the main backend)."""
    kind = "cpu" if device_type == "cpu" else "cuda"
    mod = _MODULES.get((kind, module))
    if mod is None:
        import importlib
        name = f"pam.kernels.{kind}" + (f"_{module}" if module else "")
        mod = _MODULES[(kind, module)] = importlib.import_module(name)
    return mod


def _kernel(device, name, module=""):
    """(kernel ``name`` of ``module`` for ``device``, whether it runs on CPU), looked up
    once per (device, module, name): keyed on the device object, whose hash is cheaper
    than its ``.type`` (~0.8 us per call)."""
    key = (device, module, name)
    entry = _KERNELS.get(key)
    if entry is None:
        entry = _KERNELS[key] = (getattr(_module(device.type, module), name),
                                 device.type == "cpu")
    return entry


def _run(entry, args):
    """Call the kernel of a :func:`_kernel` entry; on CPU tensor arguments become NumPy
    views of their memory (NumPy arrays and scalars pass as they are)."""
    kernel, cpu = entry
    if cpu:
        args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in args]
    return kernel(*args)


def launch(name, device, *args):
    """Run kernel ``name`` of the main backend (``pam.kernels.cpu`` / ``cuda``) on
    ``device``; tensor arguments are passed zero-copy (on CPU as NumPy views; NumPy arrays
    are passed as they are)."""
    return _run(_KERNELS.get((device, "", name)) or _kernel(device, name), args)


def launch_in(module, name, device, *args):
    """Run kernel ``name`` of the kernel module ``module`` for ``device``
    (``pam.kernels.cpu_<module>`` or ``cuda_<module>``), arguments passed as
    :func:`launch` passes them."""
    return _run(_KERNELS.get((device, module, name)) or _kernel(device, name, module), args)


class recording_launches:
    """Context manager for tests and benchmarks: inside it, every kernel launch -- through
    :func:`launch`, :func:`launch_in` or the elementwise maps' direct kernel calls --
    appends the kernel's name to the list it returns (``as names``). Not thread-safe:
    it swaps this module's launch functions while entered."""

    def __enter__(self):
        g = globals()
        self._saved = {k: g[k] for k in ("launch", "launch_in", "_launcher")}
        names, orig = [], dict(self._saved)

        def counted_launch(name, device, *args):
            names.append(name)
            return orig["launch"](name, device, *args)

        def counted_launch_in(module, name, device, *args):
            names.append(name)
            return orig["launch_in"](module, name, device, *args)

        def counted_launcher(device, name):
            kernel = orig["_launcher"](device, name)

            def call(*args):
                names.append(name)
                return kernel(*args)
            return call

        g.update(launch=counted_launch, launch_in=counted_launch_in,
                 _launcher=counted_launcher)
        return names

    def __exit__(self, *exc):
        globals().update(self._saved)
        return False


def _launcher(device, name):
    """Kernel ``name`` for ``device``, to be called with arguments that are already what
    it takes (the bit views of :func:`_flat_bits` / :func:`_new_result`)."""
    return (_KERNELS.get((device, "", name)) or _kernel(device, name))[0]


def _flat_bits(x, cpu):
    """Flat int32 bits of float32 ``x``: a NumPy view on CPU (``cpu`` True; a contiguous
    copy first if needed), an int32 tensor view on CUDA."""
    if x.requires_grad:
        x = x.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    if cpu:
        v = x.numpy().view(_INT32)
        return v if v.ndim == 1 else v.reshape(-1)
    return x.view(torch.int32).view(-1)


def _new_result(like, shape, cpu):
    """(float32 tensor of ``shape`` on ``like``'s device, its flat int32 bits for the
    kernel), uninitialized, contiguous; on CPU the bits are a NumPy view of its memory.
    ``like`` is a float32 tensor (empty_like of it is the cheapest allocation when the
    shapes agree)."""
    if like.shape == shape:
        result = torch.empty_like(like, memory_format=torch.contiguous_format)
    else:
        result = torch.empty(shape, dtype=torch.float32, device=like.device)
    if cpu:
        v = result.numpy().view(_INT32)
        return result, v if v.ndim == 1 else v.reshape(-1)
    return result, result.view(torch.int32).view(-1)


def binary_map(name, a, b, off):
    """Elementwise kernel ``name`` over broadcast a, b (float32 tensors) -> float32 tensor.

    Equal shapes launch directly; a one-element operand with no more dimensions than the
    other is passed as a scalar (kernel ``<name>_bs`` / ``<name>_as``) without expanding
    it; only other broadcasts materialize expanded copies. The per-call work is kept to
    the minimum (no broadcast computation when the shapes match, CPU arrays handed to the
    kernel as NumPy views): a small op costs a few microseconds here.
    """
    sa, sb = a.shape, b.shape
    if sa == sb:
        shape, kind = sa, ""
    elif b.numel() == 1 and b.dim() <= a.dim():
        shape, kind = sa, "_bs"
    elif a.numel() == 1 and a.dim() <= b.dim():
        shape, kind = sb, "_as"
    else:
        shape, kind = torch.broadcast_shapes(sa, sb), None
    device = a.device
    cpu = a.is_cpu
    result, out = _new_result(a, shape, cpu)
    if out.shape[0] == 0:
        return result
    if kind is None:
        a, b, kind = a.expand(shape), b.expand(shape), ""
    kernel = _launcher(device, name + kind)
    kernel(_flat_bits(a, cpu), _flat_bits(b, cpu), off, out)
    return result


def unary_map(name, x):
    """Elementwise kernel ``name`` over float32 tensor x -> float32 tensor."""
    device = x.device
    cpu = x.is_cpu
    result, out = _new_result(x, x.shape, cpu)
    if out.shape[0]:
        _launcher(device, name)(_flat_bits(x, cpu), out)
    return result


# Product families that have their own kernels: kind -> suffix of the kernel names
# (``matmul`` / ``matmul_lmul``, ``conv_forward`` / ``conv_forward_lmul``, ...). The kinds'
# constants (PAM offset, L-Mul c) travel in the kernels' ``off`` slot.
KINDS = {"pam": "", "lmul": "_lmul"}


def kernel_suffix(kind):
    """The kernel-name suffix of product family ``kind`` ("pam" or "lmul")."""
    suffix = KINDS.get(kind) if isinstance(kind, str) else None
    if suffix is None:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return suffix


def check_format(fmt):
    """``fmt`` as an int format code (0 float32, 1 bfloat16, 2 float16, 3 e4m3, 4 e5m2)."""
    if isinstance(fmt, (bool, np.bool_)) or not isinstance(fmt, (int, np.integer)) \
            or not 0 <= int(fmt) < bits.N_FORMATS:
        names = ", ".join(f"{i} {n}" for i, n in enumerate(bits.FORMAT_NAMES))
        raise ValueError(f"fmt must be an operand format code ({names}), got {fmt!r}")
    return int(fmt)


def quantize(x, fmt, flush):
    """float32 tensor ``x`` rounded to operand format ``fmt`` (see bits.quantize_bits), as a
    new float32 tensor; ``flush``: subnormals of the format become signed zeros."""
    fmt = check_format(fmt)
    result = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if result.numel():
        launch("quantize", x.device, as_bits(x).reshape(-1), fmt, int(bool(flush)),
               result.view(torch.int32).view(-1))
    return result
