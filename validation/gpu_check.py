"""PAM on a real GPU: bit identity with the CPU, and matmul speed against float references.

Needs a CUDA GPU, a CUDA build of torch and numba-cuda (``pip install 'bdia-pam[cuda]'``,
with the numba-cuda extra matching the driver, e.g. ``numba-cuda[cu12]``). It cannot run
under the CUDA simulator.

1. Bit identity (CPU vs CUDA, bit patterns, any NaN matching any NaN), through the public
   API: ``pam.mul`` / ``pam.div`` / ``pam.exp2`` / ``pam.log2`` on random data with special
   values (zeros of both signs, subnormals, inf, NaN, huge and tiny values), with and
   without offset; ``pam.matmul`` on odd sizes, a batched case, 1024^2 and the transformer
   shape 4096x256 @ 256x1024, each with three kinds of data: normals (the fast kernel),
   ReLU-like normals with zeros (the fast "_zeros" kernel) and a sprinkle of specials (the
   general kernel); the exact backward of ``pam.matmul`` (both gradients) on the same kinds.
   Each check names the CUDA kernel the range check picked.
2. Timing (CUDA events, median of ``--repeats`` after warm-up) of ``pam.matmul`` on CUDA
   (fast path) against ``torch.matmul`` (cuBLAS float32, TF32 off), against pam's general
   kernel (the kernel before the fast path, forced), against a plain float32 numba-cuda GEMM
   with the fast kernel's tiling (``acc += a * b``; a float reference, so it multiplies; it
   lives here, not in pam) and a plain 32x32-tile one; and the exact backward.

Prints a table and writes validation/results/gpu_check.json.

Usage:
  python validation/gpu_check.py [--repeats 20] [--tile 16|32] [--quick]
  python validation/gpu_check.py --cpu-selftest   # no GPU: the checking code, CPU vs CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pam  # noqa: E402

RESULTS = ROOT / "validation" / "results"

# (batch, n, k, m); batch None means plain 2-D operands.
IDENTITY_MATMUL_SHAPES = [
    (None, 1, 1, 1), (None, 17, 33, 5), (None, 37, 53, 29), (None, 100, 300, 70),
    (3, 65, 31, 47), (None, 1024, 1024, 1024), (None, 4096, 256, 1024),
]
QUICK_MATMUL_SHAPES = IDENTITY_MATMUL_SHAPES[:5]
TIMING_SHAPES = [
    (None, 256, 256, 256), (None, 1024, 1024, 1024), (None, 2048, 2048, 2048),
    (None, 4096, 256, 1024), (None, 4096, 1024, 256), (48, 128, 64, 128),
]
QUICK_TIMING_SHAPES = [(None, 256, 256, 256), (None, 1024, 1024, 1024)]
GRAD_SHAPES = [(None, 33, 65, 17), (None, 256, 192, 128), (2, 40, 24, 56)]

F32 = np.finfo(np.float32)
SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, -1.5, F32.tiny, -F32.tiny, 1e-45, -1e-45,
                    5.9e-39, F32.max, -F32.max, 3e38, 1e-37, 2.0 ** 64, 127.99, 128.0, -149.0,
                    -200.0, 1e20, np.inf, -np.inf, np.nan], dtype=np.float32)


# --------------------------------------------------------------------------- data
def mixed(gen, shape, special_fraction=0.02, scale_exp=20):
    """Normals times random powers of two, with a sprinkle of special values."""
    x = gen.standard_normal(shape).astype(np.float32)
    x *= np.exp2(gen.integers(-scale_exp, scale_exp, shape)).astype(np.float32)
    mask = gen.random(shape) < special_fraction
    x[mask] = gen.choice(SPECIAL, size=int(mask.sum()))
    return torch.from_numpy(x)


def random_bit_patterns(gen, size):
    """Uniformly random int32 bit patterns as float32: every class of float appears."""
    raw = gen.integers(-2 ** 31, 2 ** 31, size=size, dtype=np.int64).astype(np.int32)
    return torch.from_numpy(raw.view(np.float32).copy())


def with_batch(batch, *shape):
    return shape if batch is None else (batch, *shape)


def shape_name(shape):
    batch, n, k, m = shape
    s = f"{n}x{k} @ {k}x{m}"
    return s if batch is None else f"{batch} x ({s})"


# --------------------------------------------------------------------------- identity
def compare_bits(got, want):
    """(number of differing entries, total): bit patterns, any NaN matching any NaN."""
    got = got.detach().cpu().contiguous()
    want = want.detach().cpu().contiguous()
    assert got.shape == want.shape, (got.shape, want.shape)
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    return int((~same).sum()), same.numel()


def record(results, what, got, want):
    bad, total = compare_bits(got, want)
    results.append({"check": what, "differing": bad, "total": total, "ok": bad == 0})
    print(f"  {'OK  ' if bad == 0 else 'FAIL'} {what}: {bad} of {total} differ", flush=True)


class PathSpy:
    """Records the kernels pam.kernels.cuda's range check picks (fast kernel name or None)."""

    def __init__(self, active):
        self.paths = []
        self.active = active

    def __enter__(self):
        if self.active:
            from pam.kernels import cuda as pam_cuda
            self.module, self.real = pam_cuda, pam_cuda._fast_path

            def spy(*args):
                self.paths.append(self.real(*args) or "general")
                return None if self.paths[-1] == "general" else self.paths[-1]
            pam_cuda._fast_path = spy
        return self

    def __exit__(self, *exc):
        if self.active:
            self.module._fast_path = self.real

    def take(self):
        paths, self.paths = self.paths, []
        return "/".join(dict.fromkeys(paths)) or "-"


def relu_like(gen, shape, scale_exp=4):
    """Normals times powers of two, about half of them +0 (ReLU outputs)."""
    x = mixed(gen, shape, 0.0, scale_exp)
    x[torch.from_numpy(gen.random(shape) < 0.5)] = 0.0
    return x


# Data kinds of the matmul checks: (label, maker(gen, shape)).
MATMUL_KINDS = [
    ("normals", lambda gen, shape: mixed(gen, shape, 0.0, 4)),
    ("relu zeros", relu_like),
    ("specials", lambda gen, shape: mixed(gen, shape, 0.001, 4)),
]


def identity_checks(device, reference, matmul_shapes, seed=0):
    """Run every bit-identity check of ``device`` against ``reference`` (both torch devices)."""
    gen = np.random.default_rng(seed)
    results = []
    spy = PathSpy(device != reference and str(device).startswith("cuda"))
    special_pairs = torch.cartesian_prod(torch.from_numpy(SPECIAL), torch.from_numpy(SPECIAL))
    inputs = {
        "special pairs": (special_pairs[:, 0].contiguous(), special_pairs[:, 1].contiguous()),
        "random bit patterns": (random_bit_patterns(gen, 1 << 20),
                                random_bit_patterns(gen, 1 << 20)),
        "mixed 1000x1000": (mixed(gen, (1000, 1000)), mixed(gen, (1000, 1000))),
        "broadcast (64,1,300)x(1,200,1)": (mixed(gen, (64, 1, 300)), mixed(gen, (1, 200, 1))),
    }
    for label, (a, b) in inputs.items():
        ad, bd = a.to(device), b.to(device)
        ar, br = a.to(reference), b.to(reference)
        for offset in (None, 1.0552):
            record(results, f"mul {label} offset={offset}",
                   pam.mul(ad, bd, offset=offset), pam.mul(ar, br, offset=offset))
        record(results, f"div {label}", pam.div(ad, bd), pam.div(ar, br))
        record(results, f"log2 {label}", pam.log2(ad), pam.log2(ar))
        y = torch.remainder(a, 340.0) - 210.0 if label != "special pairs" else a
        record(results, f"exp2 {label}", pam.exp2(y.to(device)), pam.exp2(y.to(reference)))

    # Exact elementwise backward (the slopes are separate kernels), one op at a time.
    a, b = mixed(gen, (512, 512)), mixed(gen, (512, 512))
    g = mixed(gen, (512, 512))
    ops = {"mul": lambda x, z: pam.mul(x, z), "div": lambda x, z: pam.div(x, z),
           "exp2": lambda x, z: pam.exp2(x), "log2": lambda x, z: pam.log2(x)}
    for name, op in ops.items():
        grads = {}
        for dev in (device, reference):
            x = a.to(dev).requires_grad_()
            z = b.to(dev).requires_grad_()
            x.grad = z.grad = None
            op(x, z).backward(g.to(dev))
            grads[dev] = (x.grad, z.grad)
        record(results, f"{name} exact backward, grad a", grads[device][0], grads[reference][0])
        if grads[device][1] is not None:
            record(results, f"{name} exact backward, grad b", grads[device][1],
                   grads[reference][1])

    for shape in matmul_shapes:
        batch, n, k, m = shape
        for kind, make in MATMUL_KINDS:
            a = make(gen, with_batch(batch, n, k))
            b = make(gen, with_batch(batch, k, m))
            t0 = time.perf_counter()
            want = pam.matmul(a.to(reference), b.to(reference))
            t1 = time.perf_counter()
            with spy:
                got = pam.matmul(a.to(device), b.to(device))
            record(results, f"matmul {shape_name(shape)} {kind} [{spy.take()}] "
                            f"(reference {t1 - t0:.2f} s)", got, want)
    a = mixed(gen, (37, 53), 0.0, 4)
    b = mixed(gen, (53, 29), 0.0, 4)
    with spy:
        got = pam.matmul(a.to(device), b.to(device), offset=1.0552)
    record(results, f"matmul offset=1.0552 [{spy.take()}]", got,
           pam.matmul(a.to(reference), b.to(reference), offset=1.0552))

    for shape in GRAD_SHAPES:
        batch, n, k, m = shape
        for kind, make in MATMUL_KINDS:
            a = make(gen, with_batch(batch, n, k))
            b = make(gen, with_batch(batch, k, m))
            g = make(gen, with_batch(batch, n, m))
            out = {}
            for dev in (device, reference):
                x = a.to(dev).requires_grad_()
                z = b.to(dev).requires_grad_()
                with spy:
                    pam.matmul(x, z, backward="exact").backward(g.to(dev))
                out[dev] = (x.grad, z.grad)
            paths = spy.take()
            record(results, f"matmul exact backward {shape_name(shape)} {kind}, grad a "
                            f"[{paths}]", out[device][0], out[reference][0])
            record(results, f"matmul exact backward {shape_name(shape)} {kind}, grad b",
                   out[device][1], out[reference][1])
    return results


# --------------------------------------------------------------------------- timing
_BASELINE = {}


def float_tiled_matmul_kernel():
    """A plain 32x32-tile float32 matmul (multiplies: a float reference, not PAM)."""
    if "kernel" in _BASELINE:
        return _BASELINE["kernel"]
    from numba import cuda, float32

    T = 32

    @cuda.jit
    def kernel(a, b, out):
        sa = cuda.shared.array((T, T), dtype=float32)
        sb = cuda.shared.array((T, T), dtype=float32)
        n, k = a.shape
        m = b.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        i = cuda.blockIdx.y * T + ty
        j = cuda.blockIdx.x * T + tx
        acc = float32(0.0)
        for t0 in range(0, k, T):
            sa[ty, tx] = a[i, t0 + tx] if (i < n and t0 + tx < k) else float32(0.0)
            sb[ty, tx] = b[t0 + ty, j] if (t0 + ty < k and j < m) else float32(0.0)
            cuda.syncthreads()
            for tt in range(T):
                acc += sa[ty, tt] * sb[tt, tx]
            cuda.syncthreads()
        if i < n and j < m:
            out[i, j] = acc

    def run(a, b, out):
        n, m = out.shape
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        grid = ((m + T - 1) // T, (n + T - 1) // T)
        kernel[grid, (T, T), stream](cuda.as_cuda_array(a), cuda.as_cuda_array(b),
                                     cuda.as_cuda_array(out))
        return out

    _BASELINE["kernel"] = run
    return run


def float_fast_tiling_kernel():
    """A plain float32 matmul with the tiling of pam's fast kernels (multiplies: a float
    reference, not PAM): FAST_TY x FAST_TX threads of FAST_TM x FAST_TN outputs, FAST_BK-deep
    shared-memory steps."""
    if "fast_tiling" in _BASELINE:
        return _BASELINE["fast_tiling"]
    from numba import cuda, float32
    from pam.kernels import cuda as K

    TX, TY, TM, TN, BK = K.FAST_TX, K.FAST_TY, K.FAST_TM, K.FAST_TN, K.FAST_BK
    BM, BN, BMP, NT = K.FAST_BM, K.FAST_BN, K.FAST_BM_PADDED, K.FAST_THREADS

    @cuda.jit
    def kernel(a, b, out):
        sa = cuda.shared.array((BK, BMP), dtype=float32)
        sb = cuda.shared.array((BK, BN), dtype=float32)
        acc = cuda.local.array((TM, TN), dtype=float32)
        ra = cuda.local.array(TM, dtype=float32)
        rb = cuda.local.array(TN, dtype=float32)
        n, k = a.shape
        m = b.shape[1]
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        row0 = cuda.blockIdx.y * BM
        col0 = cuda.blockIdx.x * BN
        for r in range(TM):
            for c in range(TN):
                acc[r, c] = float32(0.0)
        for k0 in range(0, k, BK):
            for u in range(BM * BK // NT):
                e = tid + u * NT
                r = e // BK
                q = e % BK
                ok = row0 + r < n and k0 + q < k
                sa[q, r] = a[row0 + r, k0 + q] if ok else float32(0.0)
            for u in range(BK * BN // NT):
                e = tid + u * NT
                q = e // BN
                c = e % BN
                ok = k0 + q < k and col0 + c < m
                sb[q, c] = b[k0 + q, col0 + c] if ok else float32(0.0)
            cuda.syncthreads()
            for qq in range(BK):
                for r in range(TM):
                    ra[r] = sa[qq, ty + r * TY]
                for c in range(TN):
                    rb[c] = sb[qq, tx + c * TX]
                for r in range(TM):
                    for c in range(TN):
                        acc[r, c] += ra[r] * rb[c]
            cuda.syncthreads()
        for r in range(TM):
            for c in range(TN):
                i = row0 + ty + r * TY
                j = col0 + tx + c * TX
                if i < n and j < m:
                    out[i, j] = acc[r, c]

    def run(a, b, out):
        n, m = out.shape
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        grid = ((m + BN - 1) // BN, (n + BM - 1) // BM)
        kernel[grid, NT, stream](cuda.as_cuda_array(a), cuda.as_cuda_array(b),
                                 cuda.as_cuda_array(out))
        return out

    _BASELINE["fast_tiling"] = run
    return run


def general_path_only():
    """Context manager: pam's CUDA reductions run their general kernels (the old ones)."""
    class Force(PathSpy):
        def __enter__(self):
            from pam.kernels import cuda as pam_cuda
            self.module, self.real = pam_cuda, pam_cuda._fast_path
            pam_cuda._fast_path = lambda *args: None
            return self

        def __exit__(self, *exc):
            self.module._fast_path = self.real
    return Force(True)


def cuda_time_ms(fn, repeats, warmup=3):
    """Median milliseconds of ``fn()`` on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timing(shapes, repeats, seed=1):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    baselines = {"numba_float_tiled": float_tiled_matmul_kernel(),
                 "numba_float_fast_tiling": float_fast_tiling_kernel()}
    gen = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        batch, n, k, m = shape
        a = mixed(gen, with_batch(batch, n, k), 0.0, 4).cuda()
        b = mixed(gen, with_batch(batch, k, m), 0.0, 4).cuda()
        flops = 2.0 * (batch or 1) * n * k * m
        row = {"shape": shape_name(shape), "batch": batch, "n": n, "k": k, "m": m}
        with PathSpy(True) as spy:
            pam.matmul(a, b)
        row["pam_path"] = spy.take()
        row["pam_ms"] = cuda_time_ms(lambda: pam.matmul(a, b), repeats)
        with general_path_only():
            row["pam_general_ms"] = cuda_time_ms(lambda: pam.matmul(a, b),
                                                 max(3, repeats // 4), warmup=1)
        row["torch_fp32_ms"] = cuda_time_ms(lambda: torch.matmul(a, b), repeats)
        for key, baseline in baselines.items():
            if batch is None:
                out = torch.empty(n, m, device="cuda")
                row[f"{key}_ms"] = cuda_time_ms(lambda: baseline(a, b, out), repeats)
                want = torch.matmul(a.double(), b.double())
                row[f"{key}_max_rel_err"] = float(
                    ((out.double() - want).abs().max() / want.abs().max()).item())
            else:
                row[f"{key}_ms"] = None
        # Exact backward (both gradients) of pam.matmul, for scale.
        x = a.clone().requires_grad_()
        z = b.clone().requires_grad_()
        y = pam.matmul(x, z, backward="exact")
        g = torch.ones_like(y)
        row["pam_exact_backward_ms"] = cuda_time_ms(
            lambda: torch.autograd.grad(y, (x, z), g, retain_graph=True), max(3, repeats // 4),
            warmup=1)
        for key in ("pam_ms", "pam_general_ms", "torch_fp32_ms", "numba_float_tiled_ms",
                    "numba_float_fast_tiling_ms"):
            if row.get(key):
                row[key.replace("_ms", "_gflops")] = flops / (row[key] * 1e-3) / 1e9
        row["pam_vs_torch"] = row["pam_ms"] / row["torch_fp32_ms"]
        row["general_vs_fast"] = row["pam_general_ms"] / row["pam_ms"]
        if row["numba_float_fast_tiling_ms"]:
            row["pam_vs_numba_float_fast_tiling"] = (row["pam_ms"]
                                                     / row["numba_float_fast_tiling_ms"])
        rows.append(row)
        print(f"  {row['shape']:28s} pam {row['pam_ms']:9.3f} ms [{row['pam_path']}]"
              f"  general {row['pam_general_ms']:9.3f} ms"
              f"  torch {row['torch_fp32_ms']:8.3f} ms"
              f"  numba-float(same tiling) "
              f"{row['numba_float_fast_tiling_ms'] or float('nan'):8.3f} ms"
              f"  backward {row['pam_exact_backward_ms']:9.3f} ms", flush=True)
    return rows


def print_table(rows):
    head = (f"{'shape':28s} {'pam ms':>9s} {'GFLOP/s':>8s} {'general ms':>10s} "
            f"{'torch ms':>9s} {'GFLOP/s':>8s} {'float-same ms':>13s} {'float-32 ms':>11s} "
            f"{'pam/torch':>9s} {'pam/float-same':>14s} {'gen/fast':>8s} {'bwd ms':>9s}")
    print(head)
    print("-" * len(head))
    nan = math.nan
    for r in rows:
        print(f"{r['shape']:28s} {r['pam_ms']:9.3f} {r['pam_gflops']:8.0f} "
              f"{r['pam_general_ms']:10.3f} {r['torch_fp32_ms']:9.3f} "
              f"{r['torch_fp32_gflops']:8.0f} {r['numba_float_fast_tiling_ms'] or nan:13.3f} "
              f"{r['numba_float_tiled_ms'] or nan:11.3f} {r['pam_vs_torch']:9.2f} "
              f"{r.get('pam_vs_numba_float_fast_tiling', nan):14.2f} "
              f"{r['general_vs_fast']:8.1f} {r['pam_exact_backward_ms']:9.3f}")


# --------------------------------------------------------------------------- main
def environment():
    import numba
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numba": numba.__version__, "pam": pam.__version__,
            "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import numba_cuda
        info["numba_cuda"] = getattr(numba_cuda, "__version__", "?")
    except ImportError:
        info["numba_cuda"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_capability"] = list(torch.cuda.get_device_capability())
        info["torch_cuda"] = torch.version.cuda
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tile", type=int, choices=(16, 32), default=None,
                        help="tile size of pam's CUDA matmul kernels (default: the module's)")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--cpu-selftest", action="store_true",
                        help="no GPU: run the identity-check code CPU vs CPU on small shapes")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    if args.cpu_selftest:
        results = identity_checks("cpu", "cpu", QUICK_MATMUL_SHAPES[:3])
        assert all(r["ok"] for r in results)
        out = args.out or RESULTS / "gpu_check_cpu_selftest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": environment(), "identity": results}, indent=1))
        print(f"self-test passed ({len(results)} checks); wrote {out}")
        return 0

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("gpu_check.py needs a real GPU: unset NUMBA_ENABLE_CUDASIM")
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU and a CUDA build of torch "
                 "(use --cpu-selftest to exercise the checking code without one)")
    from pam.kernels import cuda as pam_cuda
    if args.tile is not None:
        if pam_cuda._compiled_cache:
            sys.exit("--tile must be set before the first CUDA kernel is compiled")
        pam_cuda.TILE = args.tile   # read by the kernels when they are compiled (lazily)
    report = {"environment": environment(), "tile": pam_cuda.TILE,
              "fast_tiles": {name: getattr(pam_cuda, name) for name in
                             ("FAST_TX", "FAST_TY", "FAST_TM", "FAST_TN", "FAST_BK")}}
    print(json.dumps(report["environment"]), flush=True)

    print("bit identity, CUDA vs CPU:", flush=True)
    shapes = QUICK_MATMUL_SHAPES if args.quick else IDENTITY_MATMUL_SHAPES
    t0 = time.perf_counter()
    report["identity"] = identity_checks("cuda", "cpu", shapes)
    report["identity_seconds"] = time.perf_counter() - t0
    report["identity_all_ok"] = all(r["ok"] for r in report["identity"])
    print(f"identity: {'ALL OK' if report['identity_all_ok'] else 'FAILURES'} "
          f"({sum(r['ok'] for r in report['identity'])}/{len(report['identity'])})", flush=True)

    if not args.skip_timing:
        print(f"timing (median of {args.repeats}, CUDA events; torch TF32 off; "
              f"pam tile {pam_cuda.TILE}):", flush=True)
        report["timing"] = timing(QUICK_TIMING_SHAPES if args.quick else TIMING_SHAPES,
                                  args.repeats)
        print()
        print_table(report["timing"])

    out = args.out or RESULTS / ("gpu_check.json" if args.tile is None
                                 else f"gpu_check_tile{args.tile}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0 if report["identity_all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
