"""Fused attention core against the composite it restates (forward, forward + backward).

``pam.nn.functional.scaled_dot_product_attention`` runs the fused attention core (one
kernel launch per pass, :mod:`pam.kernels.cpu_attn`) where it covers the call when
``pam.functional.FUSED_ATTENTION`` is set (off by default while it is slower); the
composite (``pam.functional._attention_composite``: scale, PAM matmul, ``torch.where``
mask, fused softmax, PAM matmul, each its own launch) is the definition it restates, with
the same bits. Both run interleaved (composite, fused, composite, ...) on the small GPT's
attention shape (batch 16, 4 heads, L = S = 64, head dim 32, causal bool mask) and at
L = S = 256, with ``backward`` exact and approx; the table gives the median time of the
forward (no grad) and of forward + backward (making the output gradient is not timed) and
the ratio composite / fused (> 1: fused is faster). Each case first checks that both give
the same bits (output and the three input gradients).

    python validation/bench_attention.py [--reps 20] [--threads 2]

prints a table and writes validation/results/bench_attention.json.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba  # noqa: E402
import torch  # noqa: E402

from pam import functional as PF  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = ((16, 4, 64, 32), (16, 4, 256, 32))


def _sdpa(fused, q, k, v, mask, backward):
    saved, PF.FUSED_ATTENTION = PF.FUSED_ATTENTION, fused
    try:
        return PF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backward=backward)
    finally:
        PF.FUSED_ATTENTION = saved


def _forward(fused, q, k, v, mask, backward, go):
    with torch.no_grad():
        _sdpa(fused, q, k, v, mask, backward)


def _step(fused, q, k, v, mask, backward, go):
    for t in (q, k, v):
        t.grad = None
    _sdpa(fused, q, k, v, mask, backward).backward(go)


def _bits(fused, q, k, v, mask, backward, go):
    _step(fused, q, k, v, mask, backward, go)
    out = _sdpa(fused, q, k, v, mask, backward).detach()
    return [t.view(torch.int32).clone() for t in (out, q.grad, k.grad, v.grad)]


def _time_pair(fn, reps, *args):
    """Median seconds of fn(False, ...) and fn(True, ...), alternated."""
    times = {False: [], True: []}
    for fused in (False, True):
        fn(fused, *args)                          # warm up (compile)
    for _ in range(reps):
        for fused in (False, True):
            t = time.perf_counter()
            fn(fused, *args)
            times[fused].append(time.perf_counter() - t)
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(RESULTS, "bench_attention.json"))
    args = ap.parse_args(argv)
    numba.set_num_threads(args.threads)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch, heads, n, d in SHAPES:
        q, k, v = (torch.randn(batch, heads, n, d, generator=g).requires_grad_(True)
                   for _ in range(3))
        go = torch.randn(batch, heads, n, d, generator=g)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        for backward in ("exact", "approx"):
            a = (q, k, v, mask, backward, go)
            same = all(torch.equal(x, y) for x, y in zip(_bits(False, *a), _bits(True, *a)))
            fc, ff = _time_pair(_forward, args.reps, *a)
            sc, sf = _time_pair(_step, args.reps, *a)
            row = {"shape": [batch, heads, n, n, d], "backward": backward, "same_bits": same,
                   "forward_composite_ms": fc * 1e3, "forward_fused_ms": ff * 1e3,
                   "forward_ratio": fc / ff, "step_composite_ms": sc * 1e3,
                   "step_fused_ms": sf * 1e3, "step_ratio": sc / sf}
            rows.append(row)
    head = (f"{'shape (B, H, L, S, E)':24} {'backward':8} {'bits':5} {'fwd comp':>9} "
            f"{'fwd fused':>9} {'ratio':>6} {'f+b comp':>9} {'f+b fused':>9} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{str(tuple(r['shape'])):24} {r['backward']:8} "
              f"{'same' if r['same_bits'] else 'DIFF':5} "
              f"{r['forward_composite_ms']:8.2f}m {r['forward_fused_ms']:8.2f}m "
              f"{r['forward_ratio']:6.2f} {r['step_composite_ms']:8.2f}m "
              f"{r['step_fused_ms']:8.2f}m {r['step_ratio']:6.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"threads": args.threads, "reps": args.reps, "rows": rows,
                   "machine": platform.machine(), "python": sys.version.split()[0],
                   "torch": torch.__version__, "numba": numba.__version__,
                   "cpu_count": os.cpu_count()}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
