"""The BDIA paper's memory setting: ViT on 32x32x3 inputs, 4x4 patches, K = 6, batch 128.

Compares, for one training step, three ways of training the same ViT (same blocks, same
parameters):

  stored   ``BDIATransformer(reversible=False)``: plain residual stack, autograd keeps every
           block's activations.
  bdia     ``BDIATransformer(reversible=True)``: BDIA with gamma = +-0.5, 2^-9 grid; keeps
           x_K, x_{K-1}, one side bit per element per block and gamma, recomputes the rest.
  revvit   ``validation/revvit.RevViTTransformer``: RevViT-style two-stream coupling; keeps
           the two final streams and recomputes the rest.

Measures (float arithmetic, CPU; the paper measured GPU memory):

* ``held``: bytes allocated by the forward pass and loss that are still alive when the
  backward pass starts -- what the method keeps for the backward pass.
* ``peak``: the peak of live bytes allocated during one whole training step (forward, loss,
  backward, AdamW step) above what existed before it.
  Both come from torch's CPU memory profiler (allocation events with the running total,
  as validation/memory_depth.py measures); parameters, gradients (kept allocated,
  ``zero_grad(set_to_none=False)``), the AdamW state and the input batch exist before the
  step and are excluded; ``static`` reports them (parameters + gradients + 2 AdamW moments),
  so ``static + peak`` is the step's total tensor memory.
* step time: median wall-clock and process CPU time of ``--repeats`` unprofiled steps after
  a warm-up step (the machine is shared: CPU time is the steadier number).

Rows: the paper's setting at ``--depth`` (default 6) for each variant, with the paper's
three numbers (693.4 MB BDIA, 1570.6 MB ViT, 572.7 MB RevViT; GPU peak training memory,
ICLR 2025 submission) beside them; then a depth sweep (``--depths``, default 2 4 6 8 16 32)
at batch ``--sweep-batch`` (default 32, to stay within a few GB on a shared machine).
Writes validation/results/bdia_paper_memory.json (a ``rows`` list, each with a ``variant``
key) and bdia_paper_memory.png. ``--quick``: tiny shapes for tests.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch: numba/torch OpenMP pools

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):  # run as a script from a source checkout; sibling modules
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from bdia_pam.model import BDIAConfig, BDIATransformer  # noqa: E402

from revvit import RevViTTransformer  # noqa: E402  (validation/revvit.py)

VARIANTS = ("stored", "bdia", "revvit")
PAPER_MB = {"bdia": 693.4, "stored": 1570.6, "revvit": 572.7}  # K = 6, batch 128, GPU
MIB = 2 ** 20


def allocation_trace(fn) -> tuple[int, int]:
    """(peak, end): the peak and the final value of live CPU tensor bytes allocated while ``fn()``
    runs, counted from zero at its start (torch.profiler memory events, in time order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append(e)
    if not events:
        return 0, 0
    events.sort(key=lambda e: e.start_time_ns)
    # The reporter's running total is process-wide and does not drop when a tensor allocated
    # under an earlier profile is freed outside one, so count from the total before the first event.
    first = events[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return (int(max(max(e.extra_fields.total_allocated for e in events) - base, 0)),
            int(events[-1].extra_fields.total_allocated - base))


def build(variant: str, depth: int, args) -> torch.nn.Module:
    """The ViT of ``variant`` at ``depth`` blocks (float arithmetic, paper's patch 4 on 32x32x3)."""
    cfg = BDIAConfig(kind="vit", arithmetic="float", reversible=variant == "bdia", depth=depth,
                     width=args.width, heads=args.heads, mlp_ratio=args.mlp_ratio, frac_bits=9,
                     image_size=args.image_size, patch_size=4, channels=3, num_classes=10, pool="cls")
    return (RevViTTransformer if variant == "revvit" else BDIATransformer)(cfg)


def measure(variant: str, depth: int, batch: int, args) -> dict:
    """Memory and time of one training step of ``variant`` at ``depth`` blocks on ``batch`` images."""
    torch.manual_seed(0)
    model = build(variant, depth, args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (batch,))
    gen = torch.Generator().manual_seed(0)

    def forward():
        return model.loss(model(x, generator=gen), y)

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: not activation memory
        forward().backward()
        opt.step()

    step()  # warm-up: gradients and AdamW state allocated
    gc.collect()
    held = []
    _, held_bytes = allocation_trace(lambda: held.append(forward()))
    held.pop().backward()  # release the graph / record the same way a step does
    opt.zero_grad(set_to_none=False)
    gc.collect()
    peak_bytes, _ = allocation_trace(step)
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch * ((args.image_size // 4) ** 2 + 1)
    return {"variant": variant, "depth": depth, "batch": batch, "parameters": n_params,
            "static_mib": 4 * 4 * n_params / MIB,  # params + grads + 2 AdamW moments, float32
            "held_mib": held_bytes / MIB, "peak_mib": peak_bytes / MIB,
            "total_mib": 4 * 4 * n_params / MIB + peak_bytes / MIB,
            "one_activation_mib": tokens * args.width * 4 / MIB,
            "step_s": statistics.median(times), "step_cpu_s": statistics.median(cpu),
            "step_s_all": times, "step_cpu_s_all": cpu}


def markdown(rows, args) -> list[str]:
    at = {r["variant"]: r for r in rows if r["depth"] == args.depth and r.get("setting") == "paper"}
    lines = [f"Paper setting: ViT, {args.image_size}x{args.image_size}x3, patch 4, K = {args.depth}, batch {args.batch}, width {args.width}, "
             f"{args.heads} heads, MLP ratio {args.mlp_ratio}, float, CPU", "",
             "| variant | held for backward MiB | step peak MiB | static MiB | static + peak MiB | "
             "step s (wall) | step s (CPU) | paper peak MB | ours / bdia (peak) | paper / bdia |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        if v not in at:
            continue
        r, b = at[v], at.get("bdia")
        ours = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else "n/a"
        lines.append(f"| {v} | {r['held_mib']:.1f} | {r['peak_mib']:.1f} | {r['static_mib']:.1f} | "
                     f"{r['total_mib']:.1f} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {PAPER_MB[v]} | "
                     f"{ours} | {PAPER_MB[v] / PAPER_MB['bdia']:.2f} |")
    sweep = sorted({r["depth"] for r in rows if r.get("setting") == "sweep"})
    if sweep:
        lines += ["", f"Depth sweep (width {args.width}, batch {args.sweep_batch}): held-for-backward / "
                  "step-peak MiB, CPU s per step", "",
                  "| K | " + " | ".join(f"{v} held | {v} peak | {v} CPU s" for v in VARIANTS) + " |",
                  "|---|" + "---|---|---|" * len(VARIANTS)]
        by = {(r["variant"], r["depth"]): r for r in rows if r.get("setting") == "sweep"}
        for d in sweep:
            cells = []
            for v in VARIANTS:
                r = by.get((v, d))
                cells.append("n/a | n/a | n/a" if r is None else
                             f"{r['held_mib']:.1f} | {r['peak_mib']:.1f} | {r['step_cpu_s']:.2f}")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r.get("setting") == "sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, v in enumerate(VARIANTS):
        rs = sorted((r for r in sweep if r["variant"] == v), key=lambda r: r["depth"])
        if not rs:
            continue
        d = [r["depth"] for r in rs]
        axes[0].plot(d, [r["held_mib"] for r in rs], "o-", color=f"C{i}", label=v)
        axes[1].plot(d, [r["peak_mib"] for r in rs], "o-", color=f"C{i}", label=v)
        axes[2].plot(d, [r["step_cpu_s"] for r in rs], "o-", color=f"C{i}", label=v)
    axes[0].set(xlabel="blocks K", ylabel="MiB", title="held for the backward pass")
    axes[1].set(xlabel="blocks K", ylabel="MiB", title="peak of one training step (above static)")
    axes[2].set(xlabel="blocks K", ylabel="CPU s per training step", title="step time (all threads)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (tests)")
    ap.add_argument("--depth", type=int, default=6, help="the paper-setting depth K")
    ap.add_argument("--depths", type=int, nargs="*", default=None, help="depth sweep (default 2 4 6 8 16 32)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (the paper's)")
    ap.add_argument("--width", type=int, default=None, help="default 192 (ViT-Tiny width)")
    ap.add_argument("--heads", type=int, default=None, help="default 3")
    ap.add_argument("--sweep-batch", type=int, default=None,
                    help="batch of the depth sweep (default 32: stored K = 32 at batch 128 would "
                         "need ~7 GB on this shared machine)")
    ap.add_argument("--mlp-ratio", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    full = dict(depths=[2, 4, 6, 8, 16, 32], batch=128, sweep_batch=32, width=192, heads=3, image_size=32)
    quick = dict(depths=[2, 8], batch=4, sweep_batch=2, width=16, heads=2, image_size=8)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)

    rows, t0 = [], time.time()
    configs = [("paper", v, args.depth, args.batch) for v in VARIANTS]
    configs += [("sweep", v, d, args.sweep_batch) for d in sorted(set(args.depths)) for v in VARIANTS]
    done = {}
    for setting, v, d, b in configs:
        if (v, d, b) not in done:
            done[(v, d, b)] = measure(v, d, b, args)
            r = done[(v, d, b)]
            print(f"K={d:>3} B={b:>3} {v:<7} held {r['held_mib']:8.1f} MiB  peak {r['peak_mib']:8.1f} MiB  "
                  f"step {r['step_s']:.2f} s (cpu {r['step_cpu_s']:.2f})  [{time.time() - t0:.0f}s]",
                  file=sys.stderr, flush=True)
        row = dict(done[(v, d, b)], setting=setting)
        if setting == "paper":
            row["paper_peak_mb"] = PAPER_MB[v]
        rows.append(row)

    paper = {r["variant"]: r for r in rows if r["setting"] == "paper"}
    ratios = {"ours_peak_stored_over_bdia": paper["stored"]["peak_mib"] / paper["bdia"]["peak_mib"],
              "ours_peak_revvit_over_bdia": paper["revvit"]["peak_mib"] / paper["bdia"]["peak_mib"],
              "ours_held_stored_over_bdia": paper["stored"]["held_mib"] / paper["bdia"]["held_mib"],
              "ours_held_revvit_over_bdia": paper["revvit"]["held_mib"] / paper["bdia"]["held_mib"],
              "paper_stored_over_bdia": PAPER_MB["stored"] / PAPER_MB["bdia"],
              "paper_revvit_over_bdia": PAPER_MB["revvit"] / PAPER_MB["bdia"]}
    lines = markdown(rows, args)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bdia_paper_memory" + ("_quick" if args.quick else "")
    result = {"benchmark": "bdia_paper_memory", "argv": sys.argv[1:] if argv is None else list(argv),
              "config": {"image": f"{args.image_size}x{args.image_size}x3", "patch_size": 4, "depth": args.depth,
                         "batch": args.batch, "sweep_batch": args.sweep_batch, "width": args.width, "heads": args.heads,
                         "mlp_ratio": args.mlp_ratio, "frac_bits": 9, "arithmetic": "float",
                         "optimizer": "AdamW", "threads": args.threads, "repeats": args.repeats,
                         "measure": "torch.profiler CPU allocation events: held = bytes allocated by "
                                    "forward + loss still alive before backward; peak = peak live bytes "
                                    "during forward + backward + AdamW step; params, grads, AdamW state and "
                                    "input excluded (static)"},
              "paper_peak_mb": PAPER_MB, "ratios": ratios, "rows": rows, "table_markdown": lines,
              "elapsed_s": time.time() - t0}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and .png")
    return result


if __name__ == "__main__":
    main()
