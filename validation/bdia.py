"""BDIA on digits: does random gamma = +-0.5 regularize? Stored vs BDIA vs no-gamma, float and PAM.

Task: scikit-learn digits through ``bdia_pam.data.load_digits`` (80/20 stratified split,
seed 0; accuracy on the held-out 20% = 360 images). Model: ``bdia_pam.BDIATransformer``
ViT (depth 4, width 32, 2 heads, MLP ratio 2, 4x4-pixel patches = 4 tokens + class
token, GELU, no dropout). Training: ``bdia_pam.train.train`` (AdamW 0.9/0.98, weight decay
0.01, cosine schedule with 5% warmup, batch 128, lr 5e-3, 15 epochs = 165 steps).

Variants (each trained with each arithmetic, ``--seeds`` seeds):

  stored    reversible=False: ``PlainStack``, x_{k+1} = x_k + h_k(x_k). No gamma and no
            activation quantization (the model's non-reversible path turns both off);
            ordinary autograd with stored activations.
  bdia      reversible=True (the default training): gamma = +-0.5 per sample per block,
            2^-l activation grid, activations recomputed in the backward pass.
  nogamma   the same quantized network trained with gamma = 0 throughout:
            x_{k+1} = x_k + Q_l[h_k(x_k)]. Not invertible, so activations are stored. The
            model has no switch for this; the script trains with the ReversibleStack in its
            eval-mode forward (straight-through gradients, ``ReversibleStack(...).eval()``
            semantics) while the blocks stay in train mode -- see :class:`NoGammaTransformer`.

All three evaluate identically (eval mode: gamma = 0; stored has no quantization).

Arithmetic: ``float`` (torch) and ``pam`` (fully multiplication-free: PAM matmuls, PAM
softmax / layer norm / GELU / cross entropy, ``pam.optim.AdamW``). ``--arithmetics`` can
add ``pam_matmul``.

Ablation: BDIA with frac_bits l in {4, 6, 8, 9, 10, 12} (``--ablation-arith``, float by
default, --seeds seeds; l = 9 reuses the main bdia runs).

Completed runs are cached in the output JSON (keyed by variant/arithmetic/l/seed and the
training config), so an interrupted run continues where it stopped.

Writes validation/results/bdia.json and bdia.png. ``--quick``: 1 seed, 2 epochs.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch: numba/torch OpenMP pools

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import pam  # noqa: E402,F401  (imported before torch on purpose)
import torch  # noqa: E402

import bdia_pam.train as bt  # noqa: E402
from bdia_pam.data import load_digits  # noqa: E402
from bdia_pam.model import BDIAConfig, BDIATransformer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("stored", "bdia", "nogamma")
ABLATION_BITS = (4, 6, 8, 9, 10, 12)
MODEL = dict(depth=4, width=32, heads=2, mlp_ratio=2, patch_size=4, dropout=0.0, activation="gelu")


class NoGammaTransformer(BDIATransformer):
    """BDIATransformer whose quantized stack trains with gamma = 0 (x_{k+1} = x_k + Q_l[h_k(x_k)]).

    The ReversibleStack's eval-mode forward is exactly this update, with straight-through
    gradients through Q_l and ordinary (stored) autograd. Only the stack's own ``training``
    flag is cleared around the call (not recursively), so the blocks keep their train mode
    (relevant only with dropout > 0)."""

    def _stack(self, x, generator):
        st = self.stack
        was = st.training
        st.training = False
        try:
            return st(x)
        finally:
            st.training = was


def train_one(variant, arith, frac_bits, seed, epochs, batch, lr, data):
    """One training run through bdia_pam.train.train; returns a JSON-able summary."""
    mc = BDIAConfig(arithmetic=arith, reversible=variant != "stored", frac_bits=frac_bits,
                    **MODEL, **data.model_fields())
    # evaluate only at the end (eval_every larger than the run)
    tc = bt.TrainConfig(task="digits", epochs=float(epochs), batch_size=batch, lr=lr, seed=seed,
                        eval_every=10 ** 9)
    saved = bt.BDIATransformer
    if variant == "nogamma":
        bt.BDIATransformer = NoGammaTransformer  # the trainer builds its model from this name
    t0 = time.perf_counter()
    try:
        r = bt.train(mc, tc, data, None, progress=False, desc=f"{variant}/{arith}")
        err = None
    except (FloatingPointError, RuntimeError, ValueError) as e:  # divergence / grid overflow
        r, err = None, f"{type(e).__name__}: {e}"
    finally:
        bt.BDIATransformer = saved
    wall = time.perf_counter() - t0
    if r is None:
        return {"error": err, "wall_s": wall}
    model = r["model"]
    if variant == "nogamma":
        assert isinstance(model, NoGammaTransformer)
    spe = max(data.num_train // batch, 1)
    losses = r["losses"]
    return {"test_acc": r["test_acc"], "test_loss": r["test_loss"],
            "train_loss_last_epoch": float(np.mean(losses[-spe:])), "steps": r["steps"],
            "wall_s": wall, "s_per_step": wall / max(r["steps"], 1),
            "parameters": r["parameters"], "stack": type(model.stack).__name__,
            "losses_per_epoch": [float(np.mean(losses[i:i + spe])) for i in range(0, len(losses), spe)]}


def key(variant, arith, frac_bits, seed):
    return f"{variant}/{arith}/l{frac_bits}/s{seed}"


def stats(vals):
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per main cell (default 3)")
    ap.add_argument("--ablation-seeds", type=int, default=None, help="seeds per ablation point (default: --seeds)")
    ap.add_argument("--epochs", type=float, default=None, help="default 15 (--quick: 2)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--arithmetics", nargs="+", default=["float", "pam"],
                    choices=["float", "pam_matmul", "pam"])
    ap.add_argument("--ablation-arith", default="float", choices=["float", "pam_matmul", "pam"])
    ap.add_argument("--frac-bits", type=int, nargs="+", default=list(ABLATION_BITS),
                    help="ablation grid (empty: no ablation); 9 is the main runs' grid")
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    ap.add_argument("--fresh", action="store_true", help="ignore cached runs in the output JSON")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    epochs = args.epochs or (2 if args.quick else 15)
    seeds = args.seeds or (1 if args.quick else 3)
    ab_seeds = args.ablation_seeds or seeds
    torch.set_num_threads(args.threads)
    try:
        import numba
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    data = load_digits()
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bdia.json")
    train_cfg = {"epochs": epochs, "batch": args.batch, "lr": args.lr, "optimizer": "AdamW(0.9, 0.98) wd 0.01",
                 "schedule": "cosine, 5% warmup", "model": MODEL}
    runs = {}
    if not args.fresh and os.path.exists(jpath):
        with open(jpath) as f:
            old = json.load(f)
        if old.get("train_config") == train_cfg:
            runs = {k: v for k, v in old.get("runs", {}).items() if "error" not in v}
            print(f"reusing {len(runs)} cached runs from {jpath}", flush=True)

    jobs = []  # cheap float runs first, then the PAM ones seed by seed
    order = sorted(args.arithmetics, key=lambda a: a != "float")
    for arith in order:
        for seed in range(seeds):
            for v in VARIANTS:
                jobs.append((v, arith, 9, seed))
        if arith == args.ablation_arith:
            for seed in range(ab_seeds):
                for l in args.frac_bits:
                    if not (l == 9 and seed < seeds):
                        jobs.append(("bdia", arith, l, seed))
    if args.ablation_arith not in order:
        jobs += [("bdia", args.ablation_arith, l, s) for s in range(ab_seeds) for l in args.frac_bits]

    def write(done):
        table, ablation = table_of(runs, args, seeds, ab_seeds)
        out = {"task": "sklearn digits (bdia_pam.data.load_digits, held-out 20% = 360 images)",
               "n_test": int(data.test_y.numel()), "train_config": train_cfg, "seeds": seeds, "ablation_seeds": ab_seeds,
               "ablation_arith": args.ablation_arith, "threads": args.threads,
               "complete": done, "table": table, "ablation": ablation,
               "table_markdown": markdown(table, ablation, args), "runs": runs}
        with open(jpath + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(jpath + ".tmp", jpath)
        return out

    t_all = time.perf_counter()
    for v, arith, l, seed in jobs:
        k = key(v, arith, l, seed)
        if k in runs:
            continue
        r = train_one(v, arith, l, seed, epochs, args.batch, args.lr, data)
        runs[k] = r
        msg = (f"acc {r['test_acc']:.4f} test loss {r['test_loss']:.4f} train loss "
               f"{r['train_loss_last_epoch']:.4f}") if "error" not in r else r["error"]
        print(f"{k:28s} {msg} ({r['wall_s']:.0f}s; total {time.perf_counter() - t_all:.0f}s)", flush=True)
        write(False)
    out = write(True)
    print("\n".join(out["table_markdown"]))
    plot(out, os.path.join(args.out, "bdia.png"), args)


def table_of(runs, args, seeds, ab_seeds):
    table = {}
    for arith in args.arithmetics:
        for v in VARIANTS:
            rs = [runs[key(v, arith, 9, s)] for s in range(seeds) if key(v, arith, 9, s) in runs]
            ok = [r for r in rs if "error" not in r]
            table[f"{v}/{arith}"] = {
                "n": len(ok), "failed": len(rs) - len(ok),
                "test_acc": stats([r["test_acc"] for r in ok]),
                "test_loss": stats([r["test_loss"] for r in ok]),
                "train_loss": stats([r["train_loss_last_epoch"] for r in ok]),
                "s_per_run": stats([r["wall_s"] for r in ok])[0]}
    ablation = {}
    for l in args.frac_bits:
        rs = [runs[key("bdia", args.ablation_arith, l, s)] for s in range(ab_seeds)
              if key("bdia", args.ablation_arith, l, s) in runs]
        ok = [r for r in rs if "error" not in r]
        ablation[str(l)] = {"n": len(ok), "failed": len(rs) - len(ok),
                            "errors": [r["error"] for r in rs if "error" in r],
                            "test_acc": stats([r["test_acc"] for r in ok]),
                            "test_loss": stats([r["test_loss"] for r in ok]),
                            "train_loss": stats([r["train_loss_last_epoch"] for r in ok])}
    return table, ablation


def markdown(table, ablation, args):
    f = lambda ms, d=4: "n/a" if math.isnan(ms[0]) else f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    lines = ["| variant | arithmetic | runs | test acc | test loss | final train loss | s/run |",
             "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        v, a = name.split("/")
        fail = f" ({t['failed']} failed)" if t["failed"] else ""
        lines.append(f"| {v} | {a} | {t['n']}{fail} | {f(t['test_acc'])} | {f(t['test_loss'])} | "
                     f"{f(t['train_loss'])} | {t['s_per_run']:.0f} |")
    if ablation:
        lines += ["", f"BDIA frac_bits ablation ({args.ablation_arith} arithmetic)", "",
                  "| frac_bits l | runs | test acc | test loss | final train loss |", "|---|---|---|---|---|"]
        for l, t in ablation.items():
            fail = f" ({t['failed']} failed)" if t["failed"] else ""
            lines.append(f"| {l} | {t['n']}{fail} | {f(t['test_acc'])} | {f(t['test_loss'])} | "
                         f"{f(t['train_loss'])} |")
    return lines


def plot(out, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    table, runs = out["table"], out["runs"]
    ax = axes[0]
    width = 0.8 / max(len(args.arithmetics), 1)
    for j, arith in enumerate(args.arithmetics):
        xs = np.arange(len(VARIANTS)) + (j - (len(args.arithmetics) - 1) / 2) * width
        m = [table[f"{v}/{arith}"]["test_acc"][0] for v in VARIANTS]
        s = [table[f"{v}/{arith}"]["test_acc"][1] for v in VARIANTS]
        ax.bar(xs, m, width, yerr=s, capsize=3, label=arith)
        for v_i, v in enumerate(VARIANTS):  # individual seeds
            accs = [r["test_acc"] for k, r in runs.items() if k.startswith(f"{v}/{arith}/l9/") and "error" not in r]
            ax.plot([xs[v_i]] * len(accs), accs, "k.", ms=4)
    lo = min([r["test_acc"] for r in runs.values() if "error" not in r] + [0.9])
    ax.set(xticks=range(len(VARIANTS)), xticklabels=VARIANTS, ylabel="test accuracy",
           ylim=(max(lo - 0.03, 0), 1.0), title=f"digits, {out['seeds']} seeds")
    ax.legend()
    ax = axes[1]
    ab = out["ablation"]
    if ab:
        ls = [int(l) for l in ab]
        ax.errorbar(ls, [ab[str(l)]["test_acc"][0] for l in ls], [ab[str(l)]["test_acc"][1] for l in ls],
                    marker="o", capsize=3, label="BDIA")
        ref = table.get(f"stored/{args.ablation_arith}")
        if ref:
            ax.axhline(ref["test_acc"][0], color="gray", ls="--", label="stored (no quantization)")
        accs = [ab[str(l)]["test_acc"][0] for l in ls if ab[str(l)]["n"]]
        ax.set(xlabel="frac_bits l (grid 2^-l)", ylabel="test accuracy",
               ylim=(min(accs + [0.95]) - 0.02, 1.0),
               title=f"BDIA grid ablation ({args.ablation_arith}, {out['ablation_seeds']} seed(s); "
                     f"1 test image = {1 / out.get('n_test', 360):.2%})")
        ax.legend()
    ax = axes[2]
    for j, arith in enumerate(args.arithmetics):
        for v_i, v in enumerate(VARIANTS):
            curves = [r["losses_per_epoch"] for k, r in runs.items()
                      if k.startswith(f"{v}/{arith}/l9/") and "error" not in r]
            if curves:
                n = min(len(c) for c in curves)
                ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], 0), color=f"C{v_i}",
                        ls="-" if j == 0 else "--", label=f"{v}/{arith}")
    ax.set(xlabel="epoch", ylabel="training loss (mean over seeds)", yscale="log",
           title="training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
