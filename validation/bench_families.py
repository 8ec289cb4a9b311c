"""Benchmark: the L-Mul matmul and the operand rounding against the PAM matmul, on CPU.

For each shape (1024^3 and a transformer-like 1024x128 @ 128x512) and operand format
(float32, bfloat16, e4m3: operands rounded with ``quantize`` first, the L-Mul constant of
the format), times the Numba kernels directly on int32 bit patterns:

* ``matmul`` (PAM, off = 0) and ``matmul_lmul`` on the same operands, both on their int32
  fast paths (normal operands, no specials: the range check passes); the ratio
  lmul / pam is what a different family costs;
* ``quantize`` of both operands into the format (the cost of a narrow operand format per
  matmul call), as time and as a fraction of the PAM matmul.

Every timing is the median of several repeats after a warm-up call (which also compiles).
Prints a table and writes validation/results/bench_families.json; ``--quick`` uses fewer
repeats. OMP_WAIT_POLICY defaults to passive (see bench_matmul.py).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_matmul import machine_info, timed  # noqa: E402

from pam import bits  # noqa: E402
from pam.kernels import cpu  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "bench_families.json"
SHAPES = [("1024^3", 1024, 1024, 1024), ("1024x128@128x512", 1024, 128, 512)]
FORMATS = [("float32", bits.FMT_FLOAT32), ("bfloat16", bits.FMT_BFLOAT16),
           ("e4m3", bits.FMT_E4M3)]


def operands(n, k, m, fmt, seed=0):
    """Normal float32 operands (as int32 patterns) rounded to ``fmt``; no zeros or specials,
    so both matmuls take their fast paths."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, (1, n, k)) * rng.choice([-1.0, 1.0], (1, n, k))
    b = rng.uniform(0.5, 2.0, (1, k, m)) * rng.choice([-1.0, 1.0], (1, k, m))
    out = []
    for x in (a, b):
        x = np.ascontiguousarray(x.astype(np.float32)).view(np.int32)
        q = np.empty(x.size, np.int32)
        cpu.quantize(x.reshape(-1), fmt, 0, q)
        out.append(q.reshape(x.shape))
    return out


def bench(repeats):
    rows = []
    for label, n, k, m in SHAPES:
        for fname, fmt in FORMATS:
            a, b = operands(n, k, m, fmt)
            c = int(bits.lmul_constant(bits.FORMAT_MANT_BITS[fmt]))
            out = np.empty((1, n, m), np.float32)
            pam_t = timed(lambda: cpu.matmul(a, b, 0, out), repeats)
            lmul_t = timed(lambda: cpu.matmul_lmul(a, b, c, out), repeats)
            qa, qb = np.empty(a.size, np.int32), np.empty(b.size, np.int32)
            fa, fb = a.reshape(-1), b.reshape(-1)

            def quantize_both():
                cpu.quantize(fa, fmt, 0, qa)
                cpu.quantize(fb, fmt, 0, qb)
            q_t = timed(quantize_both, repeats)
            rows.append({
                "shape": label, "format": fname, "lmul_constant": c,
                "pam_matmul": pam_t, "lmul_matmul": lmul_t, "quantize_operands": q_t,
                "lmul_over_pam": lmul_t["median_s"] / pam_t["median_s"],
                "quantize_over_pam": q_t["median_s"] / pam_t["median_s"],
                "quantize_ns_per_element": q_t["median_s"] / (a.size + b.size) * 1e9,
                "pam_gproducts_per_s": n * k * m / pam_t["median_s"] / 1e9,
                "lmul_gproducts_per_s": n * k * m / lmul_t["median_s"] / 1e9})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    rows = bench(3 if args.quick else 7)
    print(f"{'shape':<18} {'format':<9} {'PAM ms':>8} {'L-Mul ms':>9} {'ratio':>6} "
          f"{'quantize ms':>12} {'q/PAM':>6} {'q ns/elem':>10}")
    for r in rows:
        print(f"{r['shape']:<18} {r['format']:<9} {r['pam_matmul']['median_s'] * 1e3:8.2f} "
              f"{r['lmul_matmul']['median_s'] * 1e3:9.2f} {r['lmul_over_pam']:6.2f} "
              f"{r['quantize_operands']['median_s'] * 1e3:12.3f} "
              f"{r['quantize_over_pam']:6.3f} {r['quantize_ns_per_element']:10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine_info(), "quick": args.quick,
                                   "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
