"""Fused row kernels against the chains of PAM ops they replace (forward + backward).

For each op at the shapes of a GPT step (rows = batch 16 x sequence 64), the chain of
elementwise PAM kernels and torch sums of earlier versions (``pam.functional``'s
``_layer_norm_chain``, ``_log_softmax_chain``, ``_softmax_chain``) and the fused kernels
(one launch per pass: ``pam.nn.functional.layer_norm``, ``log_softmax``,
``cross_entropy`` against ``_cross_entropy_chain`` on the log_softmax chain, and the
attention softmax with ``safe`` rows) run interleaved
(chain, fused, chain, ...) with ``backward="exact"``; the median time of forward +
backward is reported (for the fused ops also the forward and the backward alone; making
the output gradient is not timed), and the ratio chain / fused (> 1: the fused kernel is
faster).

Second table: how far the fused definition (row sums from +0 in increasing index) is from
the torch-order chain on random rows, as max |fused - chain| / max |chain| for the output
and for the gradients of sum(out * R), R ~ N(0, 1), with ``backward`` exact and approx.

    python validation/bench_rows.py [--reps 30] [--threads 2]

prints a table and writes validation/results/bench_rows.json.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

from pam import functional as PF  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _chain_cross_entropy(x, t, weight=None, ls=0.0, backward="exact"):
    """The cross-entropy chain of earlier versions: the composite
    (``PF._cross_entropy_chain``) on the log_softmax chain (the module global it calls)."""
    fused_ls = PF.log_softmax
    PF.log_softmax = PF._log_softmax_chain
    try:
        return PF._cross_entropy_chain(x, t, weight, -100, "mean", ls, None, backward)
    finally:
        PF.log_softmax = fused_ls


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for width in (128, 256):
        x = torch.randn(1024, width, generator=g) * 2 + 1
        w = torch.randn(width, generator=g)
        b = torch.randn(width, generator=g)
        out.append((f"layer_norm (1024, {width}) affine", (x, w, b),
                    lambda x, w, b, n=width: PF._layer_norm_chain(x, n, w, b),
                    lambda x, w, b, n=width: PF.layer_norm(x, n, w, b)))
    logits = torch.randn(1024, 256, generator=g) * 3
    target = torch.randint(0, 256, (1024,), generator=g)
    out.append(("log_softmax (1024, 256)", (logits,), PF._log_softmax_chain,
                PF.log_softmax))
    out.append(("cross_entropy (1024, 256)", (logits,),
                lambda x: _chain_cross_entropy(x, target),
                lambda x: PF.cross_entropy(x, target)))
    out.append(("cross_entropy (1024, 256) ls 0.1", (logits,),
                lambda x: _chain_cross_entropy(x, target, ls=0.1),
                lambda x: PF.cross_entropy(x, target, label_smoothing=0.1)))
    scores = torch.randn(16, 4, 64, 64, generator=g) * 3
    out.append(("softmax (16, 4, 64, 64)", (scores,),
                lambda x: PF._softmax_chain(x, -1, None, "exact", True),
                lambda x: PF._softmax(x, -1, None, "exact", True)))
    return out


def _step(fn, inputs):
    """(forward + backward, forward, backward) seconds of one step."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    t0 = time.perf_counter()
    y = fn(*leaves)
    t1 = time.perf_counter()
    grad = torch.ones_like(y) if y.dim() == 0 else torch.full_like(y, 0.5)
    t2 = time.perf_counter()
    y.backward(grad)
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2), t1 - t0, t3 - t2


def bench(reps):
    rows = []
    for name, inputs, chain, fusedf in cases():
        for _ in range(2):                          # warm-up: JIT compilation
            _step(chain, inputs)
            _step(fusedf, inputs)
        tc, tf = [], []
        for _ in range(reps):
            tc.append(_step(chain, inputs))
            tf.append(_step(fusedf, inputs))
        c, f, ff, fb = (statistics.median(t[i] for t in ts) * 1e3
                        for ts, i in ((tc, 0), (tf, 0), (tf, 1), (tf, 2)))
        rows.append({"op": name, "chain_ms": round(c, 3), "fused_ms": round(f, 3),
                     "fused_forward_ms": round(ff, 3), "fused_backward_ms": round(fb, 3),
                     "speedup": round(c / f, 2)})
    return rows


def _rel(new, old):
    return float((new - old).abs().max() / old.abs().max())


def differences():
    """Rows of the second table (see the module docstring)."""
    torch.manual_seed(0)
    out = []
    for mode in ("exact", "approx"):
        for shape, n in (((256, 128), 128), ((256, 100), 100)):
            x = torch.randn(*shape) * 2 + 1
            ins = (x, torch.randn(n), torch.randn(n))
            r = torch.randn(*shape)
            res = []
            for f in (PF.layer_norm, PF._layer_norm_chain):
                leaves = [t.clone().requires_grad_() for t in ins]
                y = f(leaves[0], n, leaves[1], leaves[2], backward=mode)
                (y * r).sum().backward()
                res.append([y.detach()] + [t.grad for t in leaves])
            out.append({"op": f"layer_norm {shape} affine", "backward": mode,
                        "out": _rel(res[0][0], res[1][0]),
                        "grads": [_rel(a, b) for a, b in zip(res[0][1:], res[1][1:])]})
        for name, shape, fns in (
                ("log_softmax", (256, 256), (PF.log_softmax, PF._log_softmax_chain)),
                ("softmax", (16, 4, 64, 64),
                 (lambda t, m: PF._softmax(t, -1, None, m, True),
                  lambda t, m: PF._softmax_chain(t, -1, None, m, True)))):
            x = torch.randn(*shape) * 3
            r = torch.randn(*shape)
            res = []
            for f in fns:
                leaf = x.clone().requires_grad_()
                y = f(leaf, -1, backward=mode) if name == "log_softmax" else f(leaf, mode)
                (y * r).sum().backward()
                res.append((y.detach(), leaf.grad))
            out.append({"op": f"{name} {shape}", "backward": mode,
                        "out": _rel(res[0][0], res[1][0]),
                        "grads": [_rel(res[0][1], res[1][1])]})
        x = torch.randn(1024, 256) * 3                 # cross entropy, weights, smoothing 0.1
        t = torch.randint(0, 256, (1024,))
        t[::7] = -100
        w = torch.rand(256) + 0.5
        res = []
        for f in (lambda v: PF.cross_entropy(v, t, w, label_smoothing=0.1, backward=mode),
                  lambda v: _chain_cross_entropy(v, t, w, 0.1, mode)):
            leaf = x.clone().requires_grad_()
            y = f(leaf)
            y.backward()
            res.append((y.detach(), leaf.grad))
        out.append({"op": "cross_entropy (1024, 256) weights, ls 0.1", "backward": mode,
                    "out": _rel(res[0][0], res[1][0]),
                    "grads": [_rel(res[0][1], res[1][1])]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    rows = bench(args.reps)
    print(f"{'op (forward + backward, exact)':36s} {'chain ms':>9s} {'fused ms':>9s} "
          f"{'(fwd':>7s} {'bwd)':>7s} {'chain/fused':>11s}")
    for r in rows:
        print(f"{r['op']:36s} {r['chain_ms']:9.3f} {r['fused_ms']:9.3f} "
              f"{r['fused_forward_ms']:7.3f} {r['fused_backward_ms']:7.3f} {r['speedup']:11.2f}")
    diffs = differences()
    print(f"\n{'fused vs torch-order chain':36s} {'backward':>8s} {'out':>9s}  grads (x, w, b)")
    for d in diffs:
        grads = ", ".join(f"{g:.1e}" for g in d["grads"])
        print(f"{d['op']:36s} {d['backward']:>8s} {d['out']:9.1e}  {grads}")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "bench_rows.json")
    with open(path, "w") as fh:
        json.dump({"rows": rows, "differences": diffs, "threads": args.threads, "reps": args.reps,
                   "machine": platform.machine(), "python": sys.version.split()[0],
                   "torch": torch.__version__}, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
