"""torch.optim.AdamW under ``pam.arithmetic()``: op-by-op vs the fused PAM step.

For the parameters of the GPTs of validation/bench_step.py (``gpt_small``: 6 layers,
width 128; ``gpt_wide``: 8 layers, width 256), one optimizer step (fixed random gradients,
weight decay 0.01) is timed on these sides, interleaved round by round after warm-up steps
(JIT compilation), median over the measured rounds:

* ``float``: ``torch.optim.AdamW`` outside the mode (torch's own float step, default flags);
* ``ops_single`` / ``ops_foreach``: ``torch.optim.AdamW(foreach=False / True)`` under
  ``pam.arithmetic(optimizers="ops")`` (the op-by-op PAM step: ~20 launches per tensor,
  or one launch per ``_foreach_`` op over concatenated tensors);
* ``fused``: ``torch.optim.AdamW`` (default flags) under ``pam.arithmetic()`` (one fused
  PAM kernel per group, :mod:`pam.mode.optimizers`);
* ``pam_optim``: ``pam.optim.AdamW(moments="unbiased")`` (the same kernel, no mode).

Also reported: kernel launches per step (``pam.dispatch.recording_launches``) and whether the
fused side's parameters and moments have the bits of ``pam.optim.AdamW`` after all steps.

    python validation/bench_optim_mode.py [--steps 10] [--warmup 2] [--threads 2]

prints a table and writes validation/results/bench_optim_mode.json.
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

import pam  # noqa: E402
import pam.dispatch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import GPT  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODELS = {"gpt_small": dict(width=128, depth=6), "gpt_wide": dict(width=256, depth=8)}
SIDES = ("float", "ops_single", "ops_foreach", "fused", "pam_optim")
LR, WD = 1e-3, 0.01
MOMENTS = "unbiased"       # pam.arithmetic()'s default for torch.optim's fused AdamW step


def _side(name, params):
    """(step callable, optimizer) of one side, over its own copy of ``params``."""
    if name == "pam_optim":
        opt = pam.optim.AdamW(params, lr=LR, weight_decay=WD, moments=MOMENTS)
        return opt.step, opt
    foreach = {"ops_single": False, "ops_foreach": True}.get(name)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=foreach)
    if name == "float":
        return opt.step, opt
    mode = dict(optimizers="ops") if name.startswith("ops") else {}

    def step():
        with pam.arithmetic(**mode):
            opt.step()
    return step, opt


def bench_model(name, steps, warmup):
    torch.manual_seed(0)
    model = GPT(**MODELS[name])
    base = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in base]
    sides = {}
    for s in SIDES:
        params = [p.clone().requires_grad_() for p in base]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        step, opt = _side(s, params)
        sides[s] = dict(step=step, opt=opt, params=params, times=[])
    launches = {}
    for r in range(warmup + steps):
        for s in SIDES:
            side = sides[s]
            with pam.dispatch.recording_launches() as launched:
                t0 = time.perf_counter()
                side["step"]()
                dt = time.perf_counter() - t0
            if r >= warmup:
                side["times"].append(dt)
            launches[s] = len(launched)
    fused, ref = sides["fused"], sides["pam_optim"]
    same = all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(fused["params"], ref["params"]))
    for a, b in zip(fused["params"], ref["params"]):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            same = same and torch.equal(fused["opt"].state[a][k].view(torch.int32),
                                        ref["opt"].state[b][k].view(torch.int32))
    row = dict(model=name, tensors=len(base), elements=sum(p.numel() for p in base),
               fused_same_bits_as_pam_optim=bool(same))
    for s in SIDES:
        row[s + "_ms"] = 1e3 * statistics.median(sides[s]["times"])
        row[s + "_launches"] = launches[s]
    return row


def print_table(rows):
    head = (f"{'model':<10} {'tensors':>7} {'elements':>9} " +
            " ".join(f"{s + ' ms':>14}" for s in SIDES) +
            f" {'ops/fused':>9} {'fused/float':>11} {'same bits':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<10} {r['tensors']:>7} {r['elements']:>9} " +
              " ".join(f"{r[s + '_ms']:>14.2f}" for s in SIDES) +
              f" {r['ops_single_ms'] / r['fused_ms']:>9.1f}"
              f" {r['fused_ms'] / r['float_ms']:>11.2f}"
              f" {str(r['fused_same_bits_as_pam_optim']):>9}")
    print("launches per step: " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{s} {r[s + '_launches']}" for s in SIDES)
        for r in rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="measured rounds [10]")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds [2]")
    ap.add_argument("--threads", type=int, default=2, help="torch and Numba threads [2]")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--out", default=os.path.join(RESULTS, "bench_optim_mode.json"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")
    import numba
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    t0 = time.perf_counter()
    rows = [bench_model(m, args.steps, args.warmup) for m in args.models]
    print_table(rows)
    result = dict(rows=rows, steps=args.steps, warmup=args.warmup, threads=args.threads,
                  wall_s=time.perf_counter() - t0,
                  machine=dict(platform=platform.platform(), processor=platform.processor(),
                               cpus=os.cpu_count(), torch=torch.__version__,
                               numba=numba.__version__))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
