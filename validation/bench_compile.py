"""torch.compile vs eager training step for a PAM GPT (CPU), two ways of making it PAM.

Model: the plain torch GPT of ``validation/bench_step.py`` (pre-norm, MultiheadAttention
with a causal bool mask, GELU MLP of width 4x).

* ``pam.convert``: loss ``pam.nn.functional.cross_entropy`` and ``pam.optim.AdamW`` run
  eagerly, the model is compiled with ``torch.compile(fullgraph=True)``. Variants: eager,
  ``aot_eager``, ``inductor``.
* op-level mode: the unmodified model, ``F.cross_entropy`` and ``torch.optim.AdamW``, the
  whole step inside ``pam.arithmetic()``; the model compiled with
  ``pam.compile(model, backend=..., fullgraph=True)`` (loss and optimizer eager, under the
  mode). Variants: mode_eager, mode_aot_eager, mode_inductor.

Each variant starts from the same weights and data; reported:

* ``first_call_s``: the first training step (compilation included for compiled variants);
* ``ms_per_step`` (and ``ms_per_step_min``): median (minimum) over ``--steps`` steps
  (forward, backward, optimizer) after one more warm-up step, the variants' steps
  interleaved (eager, aot_eager, inductor, eager, ...) so that all see the same load;
* ``same_bits``: the first step's loss and every gradient bit-identical to eager's (the
  same way of making the model PAM);
* ``graph_breaks``: ``torch._dynamo.explain`` of the model on the batch (convert), the
  graph breaks Dynamo counted in the first step (mode; fullgraph=True allows none).

    python validation/bench_compile.py [--steps 15] [--width 64] [--depth 2] [--threads 2]

prints a table and writes validation/results/bench_compile.json.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pam  # noqa: E402
from bench_step import GPT  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ("eager", "aot_eager", "inductor", "mode_eager", "mode_aot_eager", "mode_inductor")


def _setup(args, convert=True):
    torch.manual_seed(0)
    model = GPT(context=args.context, width=args.width, depth=args.depth, heads=args.heads)
    if convert:
        pam.convert(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.context), generator=g)
    y = torch.randint(0, 256, (args.batch, args.context), generator=g)
    return model, x, y


def _step(model, fn, opt, x, y):
    loss = pam.nn.functional.cross_entropy(fn(x).reshape(-1, 256), y.reshape(-1))
    loss.backward()
    grads = [loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def _mode_step(model, fn, opt, x, y):
    with pam.arithmetic():
        loss = torch.nn.functional.cross_entropy(fn(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        grads = [loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads


def _prepare_mode(variant, args):
    model, x, y = _setup(args, convert=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inner = variant[len("mode_"):]
    fn = model if inner == "eager" else pam.compile(model, backend=inner, fullgraph=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    grads = _mode_step(model, fn, opt, x, y)
    first = time.perf_counter() - t0
    breaks = (None if inner == "eager"
              else sum(torch._dynamo.utils.counters["graph_break"].values()))
    return dict(variant=variant, first_call_s=first, graph_breaks=breaks), grads, \
        (lambda: _mode_step(model, fn, opt, x, y))


def _same(a, b):
    return all(torch.equal(u.view(torch.int32), v.view(torch.int32)) for u, v in zip(a, b))


def prepare(variant, args):
    """Model, step callable and optimizer of one variant, after its first (timed) step."""
    if variant.startswith("mode_"):
        return _prepare_mode(variant, args)
    model, x, y = _setup(args)
    opt = pam.optim.AdamW(model.parameters(), lr=1e-3)
    breaks = None
    if variant == "eager":
        fn = model
    else:
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(model)(x).graph_break_count
        torch._dynamo.reset()
        fn = torch.compile(model, backend=variant, fullgraph=True)
    t0 = time.perf_counter()
    grads = _step(model, fn, opt, x, y)
    first = time.perf_counter() - t0
    return dict(variant=variant, first_call_s=first, graph_breaks=breaks), grads, \
        (lambda: _step(model, fn, opt, x, y))


def bench(args):
    """Prepare every variant, then time their steps interleaved (one step of each per
    round), so that all see the same machine load; median per variant."""
    rows, steps, refs = [], [], {}
    for v in args.variants:
        row, grads, step = prepare(v, args)
        group = "mode" if v.startswith("mode_") else "convert"
        if v in ("eager", "mode_eager"):
            refs[group] = grads
        ref = refs.get(group)
        row["same_bits"] = (None if ref is None or v in ("eager", "mode_eager")
                            else _same(ref, grads))
        rows.append(row)
        steps.append(step)
    for s in steps:
        s()                                       # one more warm-up step each
    times = [[] for _ in steps]
    for _ in range(args.steps):
        for i, s in enumerate(steps):
            t0 = time.perf_counter()
            s()
            times[i].append(time.perf_counter() - t0)
    for row, t in zip(rows, times):
        row["ms_per_step"] = 1e3 * statistics.median(t)
        row["ms_per_step_min"] = 1e3 * min(t)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench(args)
    eager = {g: next((r["ms_per_step"] for r in rows if r["variant"] == g), None)
             for g in ("eager", "mode_eager")}
    print(f"GPT width {args.width}, depth {args.depth}, heads {args.heads}, seq "
          f"{args.context}, batch {args.batch}, {args.threads} threads, "
          f"{args.steps} steps")
    print(f"{'variant':<14} {'first call s':>12} {'ms/step':>9} {'min ms':>8} {'vs eager':>9} "
          f"{'same bits':>9} {'breaks':>6}")
    for r in rows:
        base = eager["mode_eager" if r["variant"].startswith("mode_") else "eager"]
        ratio = f"{r['ms_per_step'] / base:.2f}x" if base else "-"
        print(f"{r['variant']:<14} {r['first_call_s']:>12.2f} {r['ms_per_step']:>9.1f} "
              f"{r['ms_per_step_min']:>8.1f} "
              f"{ratio:>9} {str(r['same_bits']):>9} {str(r['graph_breaks']):>6}")
    print("vs eager: against eager of the same way (convert: eager; mode: mode_eager)")
    out = dict(config=vars(args), torch=torch.__version__, machine=platform.machine(),
               processor=platform.processor(), rows=rows)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_compile.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
