"""Benchmark: PAM matmul (forward, exact and approximate backward) against torch float32.

CPU: pam.matmul through torch (and a direct call of the Numba kernel) vs torch.matmul on the
same number of threads (torch.set_num_threads = numba's thread count), in the same run;
square sizes 256, 512, 1024 and a transformer-like shape 4096x256 @ 256x1024. At 256 also
a naive broadcast implementation (an n x k x m int32 intermediate, like the public
reference's CPU path) to show the speedup of the kernels over it. Then the two batched
matmuls of causal attention in a small GPT (batch 16 x 4 heads, sequence 64, head width
32): probs @ v (probs: causal softmax probabilities, zero above the diagonal) and
q @ k^T (k^T the transposed view of a contiguous k, its output gradient zero above the
diagonal), forward and both gradients. Every timing is the median of several repeats
after a warm-up call (which also compiles).

CUDA (separate section, only when torch.cuda.is_available() and pam.kernels.cuda imports):
pam.matmul on CUDA tensors vs torch.matmul with TF32 disabled (true float32 cuBLAS).

Writes validation/results/bench_matmul.json; ``--quick`` runs fewer sizes and repeats.
OMP_WAIT_POLICY defaults to passive (as ``import pam`` sets it when pam loads before torch):
with spinning waits, torch's and Numba's OpenMP pools starve each other on small calls.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import pam  # noqa: E402
from pam.kernels import cpu  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "bench_matmul.json"
SHAPES = [("256^3", 256, 256, 256), ("512^3", 512, 512, 512), ("1024^3", 1024, 1024, 1024),
          ("4096x256@256x1024", 4096, 256, 1024)]
QUICK_SHAPES = [SHAPES[0], SHAPES[3]]
# Causal attention of a small GPT: (batch x heads, sequence, head width).
ATTENTION = (64, 64, 32)


def timed(fn, repeats, sync=None):
    """Wall time (median, min) and process CPU time (median, all threads) of ``fn()``.

    One warm-up call first. On a machine shared with other jobs the wall time of a
    parallel region includes waits for descheduled threads; the CPU time does not.
    """
    fn()
    if sync:
        sync()
    times, cpu_times = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "cpu_median_s": statistics.median(cpu_times), "repeats": repeats}


def machine_info():
    model = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": model, "logical_cpus": os.cpu_count(),
            "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
            "numba": numba.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def naive_broadcast_pam_matmul(a, b):
    """PAM matmul through an n x k x m int32 intermediate (the slow, memory-hungry way)."""
    ia, ib = a.view(torch.int32), b.view(torch.int32)
    ua, ub = ia & 0x7FFFFFFF, ib & 0x7FFFFFFF
    r = ua[:, :, None] + (ub[None] - 0x3F800000)
    r = torch.where(r < 0x00800000, 0, torch.where(r >= 0x7F800000, 0x7F800000, r))
    zero = (ua < 0x00800000)[:, :, None] | (ub < 0x00800000)[None]
    r = torch.where(zero, 0, r) | ((ia[:, :, None] ^ ib[None]) & -2147483648)
    return r.view(torch.float32).sum(1)


def bench_cpu(shapes, repeats):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, n, k, m in shapes:
        a = torch.randn(n, k, generator=gen)
        b = torch.randn(k, m, generator=gen)
        g = torch.randn(n, m, generator=gen)
        row = {"shape": label, "n": n, "k": k, "m": m}
        time_pair(row, a, b, g, repeats)
        if n * k * m <= 256 ** 3:
            row["naive_fwd"] = timed(lambda: naive_broadcast_pam_matmul(a, b), max(2, repeats // 2))
        rows.append(row)
        print_row(row)
    return rows


def time_pair(row, a, b, g, repeats):
    """Time into ``row``: the kernel forward on int32 views of a and b (2-D operands as a
    batch of one; a transposed view is read in place), pam's and torch's forward, and both
    gradients for output gradient ``g`` (pam exact and approximate, torch)."""
    a3, b3 = (t if t.dim() == 3 else t[None] for t in (a, b))
    a_bits, b_bits = a3.view(torch.int32).numpy(), b3.view(torch.int32).numpy()
    out = np.empty((a3.shape[0], a3.shape[1], b3.shape[2]), np.float32)
    row["pam_kernel_fwd"] = timed(lambda: cpu.matmul(a_bits, b_bits, 0, out), repeats)
    row["pam_fwd"] = timed(lambda: pam.matmul(a, b), repeats)
    row["torch_fwd"] = timed(lambda: torch.matmul(a, b), repeats)
    for mode in ("exact", "approx"):
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        c = pam.matmul(ar, br, backward=mode)
        row[f"pam_bwd_{mode}"] = timed(
            lambda: torch.autograd.grad(c, (ar, br), g, retain_graph=True), repeats)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    c = torch.matmul(ar, br)
    row["torch_bwd"] = timed(lambda: torch.autograd.grad(c, (ar, br), g, retain_graph=True),
                             repeats)


def attention_operands(gen):
    """{label: (a, b, grad)} for the two matmuls of causal attention (see the docstring)."""
    bh, seq, head = ATTENTION
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = torch.randn(bh, seq, seq, generator=gen).masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, -1)
    v, q, k = (torch.randn(bh, seq, head, generator=gen) for _ in range(3))
    d_out = torch.randn(bh, seq, head, generator=gen) * 1e-2
    d_scores = torch.randn(bh, seq, seq, generator=gen) * 1e-2 * causal
    return {f"attn probs@v {bh}x{seq}x{seq}@{seq}x{head}": (probs, v, d_out),
            f"attn q@k^T {bh}x{seq}x{head}@{head}x{seq}": (q, k.transpose(1, 2), d_scores)}


def bench_attention(repeats):
    """The rows of ``bench_cpu`` for the attention matmuls (no naive column)."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    for label, (a, b, g) in attention_operands(gen).items():
        row = {"shape": label, "batch": a.shape[0], "n": a.shape[1], "k": a.shape[2],
               "m": b.shape[2]}
        time_pair(row, a, b, g, repeats)
        rows.append(row)
        print_row(row)
    return rows


def ratio(row, x, y, key="median_s"):
    return row[x][key] / row[y][key]


HEADER = (f"{'shape':<36}{'kernel fwd':>11}{'pam fwd':>10}{'torch fwd':>11}{'ratio':>7}"
          f"{'exact bwd':>11}{'approx bwd':>11}{'torch bwd':>11}{'ratio ex/ap':>13}"
          f"{'naive fwd':>11}{'naive/pam':>10}   ratios by CPU time: fwd, exact/approx bwd")


def print_row(row):
    ms = lambda key: f"{row[key]['median_s'] * 1e3:9.2f}ms"  # noqa: E731
    naive = (f"{ms('naive_fwd'):>11}{ratio(row, 'naive_fwd', 'pam_fwd'):9.0f}x"
             if "naive_fwd" in row else "")
    print(f"{row['shape']:<36}{ms('pam_kernel_fwd'):>11}{ms('pam_fwd'):>10}{ms('torch_fwd'):>11}"
          f"{ratio(row, 'pam_fwd', 'torch_fwd'):6.1f}x{ms('pam_bwd_exact'):>11}"
          f"{ms('pam_bwd_approx'):>11}{ms('torch_bwd'):>11}"
          f"{ratio(row, 'pam_bwd_exact', 'torch_bwd'):6.1f}x/{ratio(row, 'pam_bwd_approx', 'torch_bwd'):4.1f}x"
          f"{naive:<21}   {ratio(row, 'pam_fwd', 'torch_fwd', 'cpu_median_s'):4.1f}x "
          f"{ratio(row, 'pam_bwd_exact', 'torch_bwd', 'cpu_median_s'):4.1f}x/"
          f"{ratio(row, 'pam_bwd_approx', 'torch_bwd', 'cpu_median_s'):3.1f}x", flush=True)


# --------------------------------------------------------------------------- CUDA (separate)
def bench_cuda(shapes, repeats):
    """pam.matmul on CUDA vs cuBLAS float32 (TF32 off). None when no GPU or no CUDA kernels."""
    if not torch.cuda.is_available():
        return None
    try:
        import pam.kernels.cuda  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (report why the section is skipped)
        return {"skipped": f"pam.kernels.cuda does not import: {exc!r}"}
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"\nCUDA: {torch.cuda.get_device_name()} (torch.matmul float32, allow_tf32=False)")
    print(f"{'shape':<19}{'pam fwd':>11}{'cuBLAS':>11}{'ratio':>8}{'exact bwd':>11}"
          f"{'approx bwd':>11}{'cuBLAS bwd':>11}")
    for label, n, k, m in shapes:
        a = torch.randn(n, k, device="cuda", generator=gen)
        b = torch.randn(k, m, device="cuda", generator=gen)
        g = torch.randn(n, m, device="cuda", generator=gen)
        row = {"shape": label, "n": n, "k": k, "m": m,
               "pam_fwd": timed(lambda: pam.matmul(a, b), repeats, sync),
               "torch_fwd": timed(lambda: torch.matmul(a, b), repeats, sync)}
        for mode in ("exact", "approx"):
            ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
            c = pam.matmul(ar, br, backward=mode)
            row[f"pam_bwd_{mode}"] = timed(
                lambda: torch.autograd.grad(c, (ar, br), g, retain_graph=True), repeats, sync)
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        c = torch.matmul(ar, br)
        row["torch_bwd"] = timed(lambda: torch.autograd.grad(c, (ar, br), g, retain_graph=True),
                                 repeats, sync)
        ms = lambda key: f"{row[key]['median_s'] * 1e3:9.3f}ms"  # noqa: E731
        print(f"{label:<19}{ms('pam_fwd'):>11}{ms('torch_fwd'):>11}"
              f"{ratio(row, 'pam_fwd', 'torch_fwd'):7.1f}x{ms('pam_bwd_exact'):>11}"
              f"{ms('pam_bwd_approx'):>11}{ms('torch_bwd'):>11}", flush=True)
        rows.append(row)
    return {"device": torch.cuda.get_device_name(), "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256^3 and the transformer shape, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per entry (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to run the CPU table with (default: numba's)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    info = machine_info()
    cpu_tables = {}
    attention_tables = {}
    for threads in args.threads or [numba.config.NUMBA_NUM_THREADS]:
        numba.set_num_threads(threads)
        torch.set_num_threads(threads)
        print(f"CPU: {info['cpu_model']}, {threads} numba threads = torch threads; "
              f"numba {info['numba']}, torch {info['torch']}; median of {repeats}; times are wall")
        print(HEADER)
        cpu_tables[str(threads)] = bench_cpu(shapes, repeats)
        attention_tables[str(threads)] = bench_attention(repeats * 4)
        print()
    result = {"machine": info, "repeats": repeats, "quick": args.quick,
              "cpu_by_threads": cpu_tables,
              "attention_by_threads": attention_tables,
              "notes": "times in seconds (wall median and min, process CPU-time median, of repeats "
                       "after a warm-up call); "
                       "bwd = torch.autograd.grad for both operands given a fixed output "
                       "gradient; pam_kernel_fwd calls pam.kernels.cpu.matmul directly on int32 "
                       "views; naive_fwd builds an n x k x m int32 intermediate; "
                       "attention_by_threads: the batched matmuls of causal attention "
                       "(probs @ v, q @ k^T), four times the repeats"}
    result["cuda"] = bench_cuda(shapes, repeats)
    result["machine"]["loadavg_at_end"] = loadavg()
    result["machine"]["numba_threading_layer"] = numba.threading_layer()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
