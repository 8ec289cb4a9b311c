"""Benchmark: PAM conv2d (forward, exact and approximate backward) against torch float32, CPU.

Two shapes: a ViT patch embedding (x 64x3x32x32, w 192x3x4x4, stride 4) and a 3x3
convolution (x 16x32x32x32, w 64x32x3x3, padding 1). For each: ``pam.conv2d`` forward on
normal inputs (the int32 fast path) and with one inf in the input (the general path, every
product through bits.mul_bits), its exact and approximate backward (input and weight
gradients), and torch.nn.functional.conv2d forward and backward on the same number of
threads (torch.set_num_threads = numba's thread count), in the same run. Every timing is the
median of several repeats after a warm-up call (which also compiles).

Writes validation/results/bench_conv.json; ``--quick`` uses fewer repeats.
OMP_WAIT_POLICY defaults to passive (as ``import pam`` sets it when pam loads before torch).
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
import torch  # noqa: E402

import pam  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "bench_conv.json"
SHAPES = [
    ("vit_patch_embed", (64, 3, 32, 32), (192, 3, 4, 4), dict(stride=4)),
    ("conv3x3", (16, 32, 32, 32), (64, 32, 3, 3), dict(padding=1)),
]
ROWS = [("pam_fwd", "pam.conv2d forward (fast path)"),
        ("pam_fwd_general", "pam.conv2d forward (general path, one inf)"),
        ("pam_bwd_exact", "pam backward exact (input + weight)"),
        ("pam_bwd_approx", "pam backward approx (input + weight)"),
        ("torch_fwd", "torch conv2d forward"),
        ("torch_bwd", "torch conv2d backward (input + weight)")]


def timed(fn, repeats):
    """Wall time (median, min) and process CPU time (median) of ``fn()`` after a warm-up."""
    fn()
    times, cpu_times = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "cpu_median_s": statistics.median(cpu_times), "repeats": repeats}


def bench_shape(xs, ws, kw, repeats):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=gen)
    w = torch.randn(ws, generator=gen) * 0.1
    x_inf = x.clone()
    x_inf[0, 0, 0, 0] = float("inf")
    y = torch.nn.functional.conv2d(x, w, **kw)
    g = torch.randn(y.shape, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def pam_bwd(mode):
        out = pam.conv2d(xr, wr, backward=mode, **kw)
        return lambda: torch.autograd.grad(out, (xr, wr), g, retain_graph=True)

    yt = torch.nn.functional.conv2d(xr, wr, **kw)
    slow = max(1, repeats // 3)
    return {
        "pam_fwd": timed(lambda: pam.conv2d(x, w, **kw), repeats),
        "pam_fwd_general": timed(lambda: pam.conv2d(x_inf, w, **kw), slow),
        "pam_bwd_exact": timed(pam_bwd("exact"), slow),
        "pam_bwd_approx": timed(pam_bwd("approx"), slow),
        "torch_fwd": timed(lambda: torch.nn.functional.conv2d(x, w, **kw), repeats),
        "torch_bwd": timed(lambda: torch.autograd.grad(yt, (xr, wr), g, retain_graph=True),
                           repeats),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 9
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    result = {"machine": {"cpu_model": platform.processor() or platform.machine(),
                          "logical_cpus": os.cpu_count(), "numba_threads": threads,
                          "torch_threads": torch.get_num_threads(),
                          "numba": numba.__version__, "torch": torch.__version__,
                          "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                          "loadavg_at_start": list(os.getloadavg())},
              "repeats": repeats, "shapes": {}}
    for name, xs, ws, kw in SHAPES:
        result["shapes"][name] = {"x": xs, "w": ws, "conv_args": kw,
                                  "timings": bench_shape(xs, ws, kw, repeats)}
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    names = [n for n, *_ in SHAPES]
    load = result["machine"]["loadavg_at_start"][0]
    for metric, what in (("median_s", "wall"), ("cpu_median_s", "process CPU (all threads)")):
        print(f"CPU, {threads} threads, load {load:.1f}: median {what} ms (ratio to torch)")
        print(f"{'':44s}" + "".join(f"{n:>24s}" for n in names))
        for key, label in ROWS:
            cells = []
            for n in names:
                t = result["shapes"][n]["timings"]
                ref = t["torch_bwd" if "bwd" in key else "torch_fwd"][metric]
                cells.append(f"{t[key][metric] * 1e3:12.1f} ({t[key][metric] / ref:6.1f}x)")
            print(f"{label:44s}" + "".join(f"{c:>24s}" for c in cells))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
