"""Attention core: the composite, the composite as one autograd node, the fused kernels.

``pam.nn.functional.scaled_dot_product_attention`` computes the composite definition
(``pam.functional._attention_composite``: scale, PAM matmul, ``torch.where`` mask, fused
softmax, PAM matmul, each its own op and autograd node) in one of three ways, all with
the same bits: the composite itself (calls the other two do not cover), the composite's
kernels as one autograd node (``_attention_node``, the default where it covers the call)
and the fused attention core (one kernel launch per pass, :mod:`pam.kernels.cpu_attn`,
when ``pam.functional.FUSED_ATTENTION`` is set; off by default while it is slower). All
three run interleaved on the default ``bdia-pam train`` model's attention (batch 128, 4
heads, L = S = 5, head dim 16, no mask), the small GPT's (batch 16, 4 heads, L = S = 64,
head dim 32, causal bool mask) and at L = S = 256, with ``backward`` exact and approx; the
table gives the median time of the forward (no grad) and of forward + backward (making
the output gradient is not timed), and the ratios composite / node and composite / fused
(> 1: faster than the composite). Each case first checks that all three give the same
bits (output and the three input gradients).

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
# (batch, heads, L = S, head dim, causal mask)
SHAPES = ((128, 4, 5, 16, False), (16, 4, 64, 32, True), (16, 4, 256, 32, True))
ROUTES = ("composite", "node", "fused")


def _sdpa(route, q, k, v, mask, backward):
    if route == "composite":
        sc = PF.attention_scale(q.shape[-1])
        return PF._attention_composite(q, k, v, mask, 0.0, False, sc, None, backward,
                                       False)[0]
    saved, PF.FUSED_ATTENTION = PF.FUSED_ATTENTION, route == "fused"
    try:
        return PF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backward=backward)
    finally:
        PF.FUSED_ATTENTION = saved


def _forward(route, q, k, v, mask, backward, go):
    with torch.no_grad():
        _sdpa(route, q, k, v, mask, backward)


def _step(route, q, k, v, mask, backward, go):
    for t in (q, k, v):
        t.grad = None
    _sdpa(route, q, k, v, mask, backward).backward(go)


def _bits(route, q, k, v, mask, backward, go):
    _step(route, q, k, v, mask, backward, go)
    out = _sdpa(route, q, k, v, mask, backward).detach()
    return [t.view(torch.int32).clone() for t in (out, q.grad, k.grad, v.grad)]


def _time_routes(fn, reps, *args):
    """Median seconds of fn(route, ...) per route, the routes alternated."""
    times = {route: [] for route in ROUTES}
    for route in ROUTES:
        fn(route, *args)                          # warm up (compile)
    for _ in range(reps):
        for route in ROUTES:
            t = time.perf_counter()
            fn(route, *args)
            times[route].append(time.perf_counter() - t)
    return {route: statistics.median(ts) for route, ts in times.items()}


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
    for batch, heads, n, d, causal in SHAPES:
        q, k, v = (torch.randn(batch, heads, n, d, generator=g).requires_grad_(True)
                   for _ in range(3))
        go = torch.randn(batch, heads, n, d, generator=g)
        mask = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
        for backward in ("exact", "approx"):
            a = (q, k, v, mask, backward, go)
            want = _bits("composite", *a)
            same = all(all(torch.equal(x, y) for x, y in zip(_bits(route, *a), want))
                       for route in ROUTES[1:])
            fwd = _time_routes(_forward, args.reps, *a)
            step = _time_routes(_step, args.reps, *a)
            row = {"shape": [batch, heads, n, n, d], "causal": causal, "backward": backward,
                   "same_bits": same}
            for route in ROUTES:
                row[f"forward_{route}_ms"] = fwd[route] * 1e3
                row[f"step_{route}_ms"] = step[route] * 1e3
            for route in ROUTES[1:]:
                row[f"forward_ratio_{route}"] = fwd["composite"] / fwd[route]
                row[f"step_ratio_{route}"] = step["composite"] / step[route]
            rows.append(row)
    head = (f"{'shape (B, H, L, S, E)':24} {'backward':8} {'bits':5} "
            f"{'fwd comp / node / fused ms':>28} {'x node':>6} {'x fused':>7} "
            f"{'f+b comp / node / fused ms':>28} {'x node':>6} {'x fused':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        fwd = " / ".join(f"{r[f'forward_{route}_ms']:.2f}" for route in ROUTES)
        step = " / ".join(f"{r[f'step_{route}_ms']:.2f}" for route in ROUTES)
        print(f"{str(tuple(r['shape'])):24} {r['backward']:8} "
              f"{'same' if r['same_bits'] else 'DIFF':5} {fwd:>28} "
              f"{r['forward_ratio_node']:6.2f} {r['forward_ratio_fused']:7.2f} {step:>28} "
              f"{r['step_ratio_node']:6.2f} {r['step_ratio_fused']:7.2f}")
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
