"""Peak training-step memory and time vs depth: BDIA reversible stack vs stored activations.

The blocks are PAM MLPs (pam.linear -> tanh -> pam.linear) of width W and hidden width
H; batch x seq is fixed. For each depth and mode (``reversible``: bdia_pam.ReversibleStack;
``stored``: the same quantized forward with ordinary autograd, ``reversible=False``) one
training step (forward, MSE loss, backward, SGD-momentum step) is measured:

* memory: torch's CPU memory profiler (``torch.profiler.profile(profile_memory=True)``)
  reports every tensor allocation and free with the running total of live bytes allocated
  since profiling started; the peak of that total over the step is the step's activation
  memory. Parameters, gradients (kept allocated, ``zero_grad(set_to_none=False)``), the
  optimizer state and the input exist before the step starts and are not counted. This is
  exact tensor accounting, independent of allocator caching, so configurations can share
  one process; ``--isolate`` still runs each in a fresh subprocess.
* time: the median wall-clock and the median process CPU time (all threads) of
  ``--repeats`` unprofiled steps after one warm-up step. On a shared machine wall-clock is
  noisy; CPU time is steadier, and its reversible/stored ratio is the number to read.

Usage: python validation/memory_depth.py [--quick] [--isolate] [--depths 2 4 8 16 32 64]
Writes validation/results/memory_depth.json and memory_depth.png (``--quick``:
memory_depth_quick.*).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "validation" / "results"
if str(ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))


def peak_allocated_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn()`` runs (profiler memory events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            peak = max(peak, e.extra_fields.total_allocated)
    return int(peak)


def measure(depth, mode, args) -> dict:
    """Build the model for one configuration and measure one training step."""
    import torch
    from torch import nn

    import pam
    from bdia_pam import ReversibleStack

    torch.manual_seed(0)
    W, H = args.width, args.hidden

    class PamMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter((torch.rand(H, W) * 2 - 1) * W ** -0.5)
            self.b1 = nn.Parameter(torch.zeros(H))
            self.w2 = nn.Parameter((torch.rand(W, H) * 2 - 1) * H ** -0.5)

        def forward(self, x):
            return pam.linear(torch.tanh(pam.linear(x, self.w1, self.b1)), self.w2)

    blocks = [PamMLP() for _ in range(depth)]
    stack = ReversibleStack(blocks, frac_bits=9, reversible=mode == "reversible", seed=0)
    opt = torch.optim.SGD(stack.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, args.seq, W)
    target = torch.randn(args.batch, args.seq, W)

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: not activation memory
        y = stack(x)
        loss = nn.functional.mse_loss(y, target)
        loss.backward()
        opt.step()

    step()  # warm-up: kernels loaded, optimizer state and grads allocated
    gc.collect()
    mem = peak_allocated_bytes(step)
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    n_params = sum(p.numel() for p in stack.parameters())
    act = args.batch * args.seq * W * 4
    return {"depth": depth, "mode": mode, "activation_bytes": mem,
            "activation_bytes_over_one_x": mem / act,
            "step_seconds": statistics.median(times), "step_seconds_all": times,
            "step_cpu_seconds": statistics.median(cpu), "step_cpu_seconds_all": cpu,
            "param_bytes": 4 * n_params}


def run_config(depth, mode, args) -> dict:
    if not args.isolate:
        return measure(depth, mode, args)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--depth", str(depth),
           "--mode", mode, "--width", str(args.width), "--hidden", str(args.hidden),
           "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker depth={depth} mode={mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows, stored_by, rev_by, depths):
    head = (f"{'depth':>5} | {'stored MiB':>10} | {'reversible MiB':>14} | {'stored/rev':>10} | "
            f"{'stored ms':>9} | {'rev ms':>8} | {'stored cpu ms':>13} | {'rev cpu ms':>10} | "
            f"{'rev/stored cpu':>14}")
    print(head)
    print("-" * len(head))
    for d in depths:
        s, r = stored_by[d], rev_by[d]
        print(f"{d:>5} | {s['activation_bytes'] / 2**20:>10.2f} | {r['activation_bytes'] / 2**20:>14.2f} | "
              f"{s['activation_bytes'] / max(r['activation_bytes'], 1):>10.2f} | "
              f"{s['step_seconds'] * 1e3:>9.1f} | {r['step_seconds'] * 1e3:>8.1f} | "
              f"{s['step_cpu_seconds'] * 1e3:>13.1f} | {r['step_cpu_seconds'] * 1e3:>10.1f} | "
              f"{r['step_cpu_seconds'] / s['step_cpu_seconds']:>14.2f}")


def plot(path, depths, stored_by, rev_by):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for by, label in ((stored_by, "stored activations"), (rev_by, "BDIA reversible")):
        a.plot(depths, [by[d]["activation_bytes"] / 2**20 for d in depths], "o-", label=label)
        b.plot(depths, [by[d]["step_cpu_seconds"] * 1e3 for d in depths], "o-", label=label)
    a.set(xscale="log", xlabel="depth (blocks)", ylabel="peak activation memory (MiB)",
          title="training-step memory")
    b.set(xscale="log", yscale="log", xlabel="depth (blocks)",
          ylabel="CPU ms per training step (all threads)", title="training-step time")
    for ax in (a, b):
        ax.minorticks_off()
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="depths 2 4 8, small tensors (tests)")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--isolate", action="store_true", help="one fresh subprocess per configuration")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["reversible", "stored"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = dict(depths=[2, 4, 8], width=16, hidden=64, batch=4, seq=16)
    full = dict(depths=[2, 4, 8, 16, 32], width=64, hidden=256, batch=8, seq=32)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        print(json.dumps(measure(args.depth, args.mode, args)))
        return None

    depths = sorted(set(args.depths))
    rows = []
    t0 = time.time()
    for d in depths:
        for mode in ("stored", "reversible"):
            rows.append(run_config(d, mode, args))
            print(f"  measured depth {d:>3} {mode:<10} ({time.time() - t0:.0f}s)", file=sys.stderr)
    stored_by = {r["depth"]: r for r in rows if r["mode"] == "stored"}
    rev_by = {r["depth"]: r for r in rows if r["mode"] == "reversible"}
    print(f"PAM MLP blocks, width {args.width}, hidden {args.hidden}, batch {args.batch} x seq "
          f"{args.seq}; activation memory = peak tensor bytes allocated during one training step")
    print_table(rows, stored_by, rev_by, depths)

    checks = {}
    if 4 in rev_by and 32 in rev_by:
        v = rev_by[32]["activation_bytes"] / rev_by[4]["activation_bytes"]
        checks["reversible_depth32_over_depth4"] = {"value": v, "target": "<= 1.5", "ok": v <= 1.5}
    if 16 in rev_by:
        v = stored_by[16]["activation_bytes"] / rev_by[16]["activation_bytes"]
        checks["stored_over_reversible_depth16"] = {"value": v, "target": ">= 4", "ok": v >= 4}
    for name, c in checks.items():
        print(f"{name} = {c['value']:.2f} (target {c['target']}): {'OK' if c['ok'] else 'MISSED'}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory_depth_quick" if args.quick else "memory_depth"
    result = {
        "benchmark": "memory_depth",
        "config": {"width": args.width, "hidden": args.hidden, "batch": args.batch,
                   "seq": args.seq, "frac_bits": 9, "repeats": args.repeats,
                   "blocks": "pam.linear -> tanh -> pam.linear", "optimizer": "SGD momentum",
                   "measure": "peak of live CPU tensor bytes allocated during one training step "
                              "(torch.profiler profile_memory events); params, grads, optimizer "
                              "state and input allocated before the step are excluded",
                   "isolated_subprocesses": args.isolate},
        "rows": rows,
        "checks": checks,
        "elapsed_seconds": time.time() - t0,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(args.out / f"{stem}.png", depths, stored_by, rev_by)
    print(f"wrote {args.out / (stem + '.json')} and .png")
    return result


if __name__ == "__main__":
    main()
