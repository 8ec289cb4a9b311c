"""BDIA where overfitting can show: does random gamma = +-0.5 reduce it? Stored vs BDIA vs no-gamma.

The digits comparison (validation/bdia.py) cannot answer the paper's regularization claim:
there no variant overfits, so a regularizer has nothing to fix. Here the training set is
made small enough, and the model big enough, that the plain stored-activation network
memorizes it and its held-out loss turns upward long before the end of training; the
question is whether BDIA's random gamma delays or reduces that, and at what cost.

Tasks (``--task``):

  digits   (default) ViT on a small subset of sklearn digits (``--train-images``, default 200
           training images; every other image of the 1797, 1597, held out). 4 blocks of width
           64 over 2x2-pixel patches (17 tokens), ~200k parameters: it memorizes 200 images in
           a couple of hundred steps, and in the default 500-step float run the stored
           baseline's held-out loss is lowest at step 125-150 and 0.2-0.4 nats higher at the
           end. Mirrors the paper's ViT experiments in miniature, cheap enough for 3 seeds per
           variant plus PAM runs on 2 CPU cores.
  text     causal byte-level LM on a slice of Python's bundled English help texts
           (``bdia_pam.data.default_text``, ``pydoc_data.topics``: ships with every Python,
           nothing downloaded). The first ``--train-bytes`` bytes are the training set; the
           next 64 x context + 1 bytes are held out (the 64 windows that
           ``bdia_pam.train.evaluate`` scores). Metric: held-out loss (nats/byte) and bits
           per character. Mirrors the paper's GPT-2-on-a-small-slice experiment, but a byte
           model big enough to memorize 16 KB needs thousands of steps at ~0.1-0.3 s (float)
           and 1.0-1.5 s (PAM) each here: over the budget of this machine, so not the default.
  cifar10  ViT on the user's "CIFAR-10 python version" directory (``--data DIR``; nothing is
           downloaded), the paper's setting: 32x32x3, 4x4 patches, K = 6 blocks, batch 128.
           ``--train-images`` / ``--test-images`` take the first N images (default: all).

Variants (``--variants``), each trained ``--seeds`` times in float arithmetic:

  stored   reversible=False: ``PlainStack``, x_{k+1} = x_k + h_k(x_k), stored activations,
           no quantization.
  bdia     the library's reversible training: gamma = +-0.5 per sample per block, 2^-9 grid,
           activations recomputed in the backward pass.
  nogamma  the same quantized network trained with gamma = 0 (validation/bdia.py's
           ``NoGammaTransformer``), separating the effect of gamma from that of the grid.
  revvit   (optional) RevViT-style two-stream reversible coupling network of the same
           blocks (validation/revvit.py), the paper's second baseline.

plus ``--pam-variants`` (default stored and bdia) on fully multiplication-free PAM
arithmetic for ``--pam-seeds`` seeds (default 1), with ``--pam-steps`` steps (default: the
float runs' count). All variants evaluate in eval mode (gamma = 0).

Training: ``bdia_pam.train.train`` (AdamW 0.9/0.98, weight decay 0.01 on matrices, cosine
schedule with 5% warmup), evaluated every ``--eval-every`` steps. For every run the JSON
holds the held-out curve, its best and final loss, the step of the best, the mean training
loss over the last evaluation interval (the noisy, gamma-perturbed training objective), the
eval-mode loss on the training set at the end, accuracy or bits per character, wall time.

Completed runs are cached in the output JSON (keyed by variant/arithmetic/seed, reused when
the task and training config match), so an interrupted run continues where it stopped.

Writes validation/results/bdia_overfit.json and bdia_overfit.png (``--task text`` /
``cifar10``: bdia_overfit_text.* / bdia_overfit_cifar10.*). ``--arithmetics float`` or ``pam``
(and ``--run-seeds``) run only that part of the job list, so parallel processes can share the
work (e.g. one per seed, one per PAM run): each write merges the runs another process has
stored in the same JSON. ``--quick``: a tiny configuration for tests.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch: numba/torch OpenMP pools

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import pam  # noqa: E402,F401  (imported before torch on purpose)
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):  # run as a script from a source checkout; sibling validation modules
    if p not in sys.path:
        sys.path.insert(0, p)

import bdia_pam.train as bt  # noqa: E402
from bdia_pam.data import TaskData, default_text, load_cifar10, load_digits  # noqa: E402
from bdia_pam.model import BDIAConfig  # noqa: E402

from bdia import NoGammaTransformer  # noqa: E402  (validation/bdia.py)

VARIANTS = ("stored", "bdia", "nogamma", "revvit")
MODELS = {
    "text": dict(depth=4, width=96, heads=4, mlp_ratio=4, context=64, dropout=0.0,
                 activation="gelu", tie_weights=True),
    "digits": dict(depth=4, width=64, heads=4, mlp_ratio=4, patch_size=2, dropout=0.0,
                   activation="gelu", pool="cls"),
    "cifar10": dict(depth=6, width=192, heads=6, mlp_ratio=2, patch_size=4, dropout=0.0,
                    activation="gelu", pool="cls"),
}
TRAIN = {  # steps, batch, lr, eval_every
    "text": dict(steps=1200, batch=32, lr=2e-3, eval_every=50),
    "digits": dict(steps=500, batch=64, lr=2e-3, eval_every=25),
    "cifar10": dict(steps=39000, batch=128, lr=1e-3, eval_every=390),  # 100 epochs of 50k
}
QUICK = {
    "model": dict(depth=2, width=16, heads=2, mlp_ratio=2, context=16),
    "train": dict(steps=12, batch=8, lr=3e-3, eval_every=4),
}


# --------------------------------------------------------------------------- data
def text_slice(train_bytes: int, context: int) -> TaskData:
    """First ``train_bytes`` bytes of the default corpus for training, the next 64 windows held out."""
    raw = np.frombuffer(default_text().encode("utf-8"), dtype=np.uint8)
    n_val = 64 * context + 1
    if train_bytes + n_val > raw.size:
        raise ValueError(f"--train-bytes {train_bytes} + {n_val} held-out bytes exceed the corpus "
                         f"({raw.size} bytes); use fewer")
    if train_bytes <= context + 1:
        raise ValueError(f"--train-bytes must exceed context + 1 = {context + 1}, got {train_bytes}")
    tr = torch.from_numpy(raw[:train_bytes].copy())
    te = torch.from_numpy(raw[train_bytes:train_bytes + n_val].copy())
    n_chars = len(bytes(te.numpy()).decode("utf-8", errors="ignore"))
    return TaskData("text", "lm", tr, te, vocab_size=256, source=f"pydoc_data.topics[:{train_bytes}]",
                    info=dict(bytes_per_char=te.numel() / max(n_chars, 1)))


def digits_subset(n_train: int) -> TaskData:
    """``n_train`` images of the digits training split; every other image (test split included) held out."""
    d = load_digits()
    if not 10 <= n_train < d.num_train:
        raise ValueError(f"--train-images must be in [10, {d.num_train}), got {n_train}")
    return TaskData("digits", "vit", d.train_x[:n_train].contiguous(),
                    torch.cat([d.train_x[n_train:], d.test_x]).contiguous(), d.train_y[:n_train].contiguous(),
                    torch.cat([d.train_y[n_train:], d.test_y]).contiguous(), image_size=8, channels=1,
                    num_classes=10, source=f"sklearn digits, {n_train} training images")


def cifar_subset(root: str, n_train: int | None, n_test: int | None) -> TaskData:
    """CIFAR-10 from ``root`` (bdia_pam.data.load_cifar10), optionally its first n_train / n_test images."""
    d = load_cifar10(root)
    for name, n, have in (("--train-images", n_train, d.num_train), ("--test-images", n_test, d.test_x.shape[0])):
        if n is not None and not 1 <= n <= have:
            raise ValueError(f"{name} must be in [1, {have}] for {root!r}, got {n}")
    ntr = n_train or d.num_train
    nte = n_test or d.test_x.shape[0]
    return TaskData("cifar10", "vit", d.train_x[:ntr], d.test_x[:nte], d.train_y[:ntr], d.test_y[:nte],
                    image_size=32, channels=3, num_classes=10, source=d.source)


def train_as_test(data: TaskData) -> TaskData:
    """The training set in the held-out slot, to score it with ``bdia_pam.train.evaluate``."""
    if data.kind == "lm":
        return TaskData(data.task, "lm", data.train_x, data.train_x, vocab_size=data.vocab_size,
                        info=data.info)
    n = min(data.num_train, 10000)
    return TaskData(data.task, "vit", data.train_x, data.train_x[:n], data.train_y, data.train_y[:n],
                    image_size=data.image_size, channels=data.channels, num_classes=data.num_classes)


# --------------------------------------------------------------------------- one run
def model_class(variant):
    """The model class bdia_pam.train builds for ``variant``."""
    if variant == "nogamma":
        return NoGammaTransformer
    if variant == "revvit":
        from revvit import RevViTTransformer  # validation/revvit.py
        return RevViTTransformer
    return bt.BDIATransformer


def train_one(variant, arith, seed, data, model_cfg, tr, device="cpu"):
    """One training run through bdia_pam.train.train; returns a JSON-able summary with curves."""
    mc = BDIAConfig(arithmetic=arith, reversible=variant in ("bdia", "nogamma"), frac_bits=9,
                    **model_cfg, **data.model_fields())
    tc = bt.TrainConfig(task=data.task, steps=tr["steps"], batch_size=tr["batch"], lr=tr["lr"], seed=seed,
                        eval_every=tr["eval_every"], checkpoint_every=10 ** 9, device=device)
    saved = bt.BDIATransformer
    bt.BDIATransformer = model_class(variant)  # the trainer builds its model from this name
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bdia_overfit_") as out:
            try:
                r = bt.train(mc, tc, data, out, progress=False, desc=f"{variant}/{arith}")
                err = None
            except (FloatingPointError, RuntimeError, ValueError) as e:  # divergence / grid overflow
                r, err = None, f"{type(e).__name__}: {e}"
            rows = bt.read_metrics(out)
    finally:
        bt.BDIATransformer = saved
    wall = time.perf_counter() - t0
    if r is None:
        return {"error": err, "wall_s": wall}
    model = r["model"]
    assert type(model) is model_class(variant), type(model)
    ev = [row for row in rows if row.get("type") == "eval"]
    train_rows = [row for row in rows if row.get("type") == "train"]
    metric = "test_acc" if data.kind == "vit" else "test_bpc"
    steps = [row["step"] for row in ev]
    val = [row["test_loss"] for row in ev]
    # mean training loss (as trained: gamma noise, quantization) over each evaluation interval
    tl = [float(np.mean([t["loss"] for t in train_rows if s - tr["eval_every"] < t["step"] <= s]))
          for s in steps]
    b = int(np.argmin(val))
    fit = bt.evaluate(model, train_as_test(data), device)
    return {"variant": variant, "arithmetic": arith, "seed": seed,
            "val_loss_best": val[b], "val_loss_final": val[-1], "best_step": steps[b],
            f"val_{metric[5:]}_at_best": ev[b][metric], f"val_{metric[5:]}_final": ev[-1][metric],
            "train_loss_final": tl[-1], "train_eval_loss_final": fit["test_loss"],
            "steps": r["steps"], "wall_s": wall, "s_per_step": wall / max(r["steps"], 1),
            "parameters": r["parameters"], "stack": type(model.stack).__name__,
            "curve": {"step": steps, "val_loss": val, f"val_{metric[5:]}": [row[metric] for row in ev],
                      "train_loss": tl}}


# --------------------------------------------------------------------------- tables and plot
def stats(vals):
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), float("nan"))


def table_of(runs, cells, metric):
    """Per (variant, arithmetic): mean and std over seeds of each summary number."""
    table = {}
    for v, a in cells:
        ok = [r for r in runs.values() if r.get("variant") == v and r.get("arithmetic") == a]
        failed = [k for k, r in runs.items() if "error" in r and k.startswith(f"{v}/{a}/")]
        row = {"variant": v, "arithmetic": a, "n": len(ok), "failed": len(failed)}
        for k in ("val_loss_best", "val_loss_final", "best_step", f"val_{metric}_at_best",
                  f"val_{metric}_final", "train_loss_final", "train_eval_loss_final", "wall_s"):
            row[k] = stats([r[k] for r in ok])
        table[f"{v}/{a}"] = row
    return table


def paired_of(runs, cells):
    """Per seed, variant minus ``stored`` (same arithmetic, same seed = same initial weights and
    batch order): mean and std over seeds of the best and final held-out loss differences."""
    by = {(r["variant"], r["arithmetic"], r["seed"]): r for r in runs.values() if "error" not in r}
    out = []
    for v, a in cells:
        if v == "stored":
            continue
        seeds = sorted(s for (v2, a2, s) in by if v2 == v and a2 == a and ("stored", a, s) in by)
        row = {"variant": v, "arithmetic": a, "vs": "stored", "seeds": seeds}
        for k in ("val_loss_best", "val_loss_final"):
            d = [by[(v, a, s)][k] - by[("stored", a, s)][k] for s in seeds]
            row[k + "_diff"] = stats(d)
            row[k + "_diff_per_seed"] = d
        out.append(row)
    return out


def markdown(table, metric):
    f = lambda ms, d=4: "n/a" if math.isnan(ms[0]) else f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    mname = "bits/char" if metric == "bpc" else "accuracy"
    lines = [f"| variant | arithmetic | runs | best held-out loss | final held-out loss | step of best | "
             f"{mname} at best | final {mname} | final train loss (as trained) | final train loss (eval) | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table.values():
        fail = f" ({t['failed']} failed)" if t["failed"] else ""
        lines.append(f"| {t['variant']} | {t['arithmetic']} | {t['n']}{fail} | {f(t['val_loss_best'])} | "
                     f"{f(t['val_loss_final'])} | {f(t['best_step'], 0)} | {f(t[f'val_{metric}_at_best'])} | "
                     f"{f(t[f'val_{metric}_final'])} | {f(t['train_loss_final'])} | "
                     f"{f(t['train_eval_loss_final'])} | {t['wall_s'][0]:.0f} |")
    return lines


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = out["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    for r in out["runs"]:
        c = r["curve"]
        ls = "-" if r["arithmetic"] == "float" else "--"
        lab = f"{r['variant']}/{r['arithmetic']}" if r["seed"] == min(
            q["seed"] for q in out["runs"] if q["variant"] == r["variant"] and q["arithmetic"] == r["arithmetic"]) else None
        axes[0].plot(c["step"], c["val_loss"], ls, color=colors[r["variant"]], lw=1.2, alpha=0.8, label=lab)
        axes[1].plot(c["step"], c["train_loss"], ls, color=colors[r["variant"]], lw=1, alpha=0.8, label=lab)
        axes[2].plot(c["step"], c[f"val_{metric}"], ls, color=colors[r["variant"]], lw=1, alpha=0.8, label=lab)
    axes[0].set(xlabel="step", ylabel="held-out loss (nats)", title=f"{out['task_description']}: held-out loss")
    axes[1].set(xlabel="step", ylabel="training loss, as trained (nats)", yscale="log",
                title="training loss (mean per eval interval)")
    axes[2].set(xlabel="step", ylabel="held-out bits/char" if metric == "bpc" else "held-out accuracy",
                title="held-out " + ("bits per character" if metric == "bpc" else "accuracy"))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("digits", "text", "cifar10"), default="digits")
    ap.add_argument("--data", default=None, help="cifar10: the 'cifar-10-batches-py' directory")
    ap.add_argument("--quick", action="store_true", help="tiny model and run (tests)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                    help="float variants (default stored bdia nogamma; cifar10 adds revvit)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per float variant")
    ap.add_argument("--pam-variants", nargs="*", choices=VARIANTS, default=None,
                    help="variants also run on PAM arithmetic (default stored bdia; cifar10: none)")
    ap.add_argument("--pam-seeds", type=int, default=1)
    ap.add_argument("--pam-steps", type=int, default=None, help="steps of the PAM runs (default: --steps)")
    ap.add_argument("--pam-eval-every", type=int, default=None,
                    help="evaluation interval of the PAM runs (default: --eval-every)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--train-bytes", type=int, default=16384, help="text: training slice length")
    ap.add_argument("--train-images", type=int, default=None, help="digits (default 200) / cifar10 (default all)")
    ap.add_argument("--test-images", type=int, default=None, help="cifar10: held-out images (default all)")
    ap.add_argument("--arithmetics", nargs="+", choices=("float", "pam"), default=["float", "pam"],
                    help="run only these parts of the job list (the table still lists every cell)")
    ap.add_argument("--run-seeds", type=int, nargs="+", default=None,
                    help="run only these seeds' jobs (for parallel processes; default all)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    ap.add_argument("--fresh", action="store_true", help="delete the output JSON first (no cached runs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.task == "cifar10" and args.data is None:
        ap.error("--task cifar10 needs --data DIR (the extracted 'cifar-10-batches-py' directory; nothing is downloaded)")
    if args.task != "cifar10" and args.data is not None:
        ap.error(f"--data is only used by --task cifar10 (task {args.task} ships with Python/sklearn)")
    torch.set_num_threads(args.threads)
    try:
        import numba
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass

    model_cfg = dict(MODELS[args.task])
    tr = dict(TRAIN[args.task])
    if args.quick:
        model_cfg.update({k: v for k, v in QUICK["model"].items() if k in model_cfg or k == "context"})
        if args.task != "text":
            model_cfg.pop("context", None)
        tr.update(QUICK["train"])
    for k in ("steps", "batch", "lr", "eval_every"):
        if getattr(args, k) is not None:
            tr[k] = getattr(args, k)
    variants = args.variants or (["stored", "bdia", "nogamma"] + (["revvit"] if args.task == "cifar10" else []))
    pam_variants = args.pam_variants if args.pam_variants is not None else (
        [] if args.task == "cifar10" else ["stored", "bdia"])
    pam_tr = dict(tr, steps=args.pam_steps or tr["steps"], eval_every=args.pam_eval_every or tr["eval_every"])

    if args.task == "text":
        data = text_slice(args.train_bytes if not args.quick else min(args.train_bytes, 2048), model_cfg["context"])
        desc = (f"causal byte LM, first {data.num_train} bytes of pydoc_data.topics for training, "
                f"next {data.test_x.numel()} held out")
        metric = "bpc"
    elif args.task == "digits":
        data = digits_subset(args.train_images or 200)
        desc = f"ViT, {data.num_train} sklearn digits for training, {data.test_x.shape[0]} held out"
        metric = "acc"
    else:
        data = cifar_subset(args.data, args.train_images, args.test_images)
        desc = f"ViT, CIFAR-10 ({data.num_train} training, {data.test_x.shape[0]} held-out images)"
        metric = "acc"

    os.makedirs(args.out, exist_ok=True)
    stem = "bdia_overfit" + ("" if args.task == "digits" else f"_{args.task}") + ("_quick" if args.quick else "")
    jpath = os.path.join(args.out, stem + ".json")
    config = {"task": args.task, "data": data.source, "n_train": data.num_train,
              "n_heldout": int(data.test_x.shape[0]), "model": model_cfg, "frac_bits": 9,
              "train": tr, "pam_train": pam_tr, "threads": args.threads, "device": args.device,
              "optimizer": "AdamW(0.9, 0.98) wd 0.01 (matrices)", "schedule": "cosine, 5% warmup"}

    def stored_runs():
        """Successful runs in the output JSON written with this same config (else none)."""
        if not os.path.exists(jpath):
            return {}
        with open(jpath) as f:
            old = json.load(f)
        if old.get("config") != config:
            return {}
        return {f"{r['variant']}/{r['arithmetic']}/s{r['seed']}": r for r in old.get("runs", [])}

    if args.fresh and os.path.exists(jpath):
        os.remove(jpath)
    runs = stored_runs()
    if runs:
        print(f"reusing {len(runs)} cached runs from {jpath}", flush=True)

    all_jobs = [(v, "float", s) for s in range(args.seeds) for v in variants]
    all_jobs += [(v, "pam", s) for s in range(args.pam_seeds) for v in pam_variants]
    cells = list(dict.fromkeys((v, a) for v, a, _ in all_jobs))
    jobs = [j for j in all_jobs if j[1] in args.arithmetics and (args.run_seeds is None or j[2] in args.run_seeds)]

    def write(done):
        for k, r in stored_runs().items():  # runs another process (--arithmetics) finished meanwhile
            runs.setdefault(k, r)
        ok = [r for r in runs.values() if "error" not in r]
        done = done and all(f"{v}/{a}/s{s}" in runs for v, a, s in all_jobs)
        table = table_of(runs, cells, metric)
        paired = paired_of(runs, cells)
        f = lambda ms: "n/a" if math.isnan(ms[0]) else f"{ms[0]:+.4f} ± {ms[1]:.4f}"  # noqa: E731
        lines = markdown(table, metric) + [
            "", "Paired by seed, variant minus stored (negative: lower held-out loss than stored)", "",
            "| variant | arithmetic | seeds | best held-out loss diff | final held-out loss diff | final, per seed |",
            "|---|---|---|---|---|---|"] + [
            f"| {p['variant']} | {p['arithmetic']} | {len(p['seeds'])} | {f(p['val_loss_best_diff'])} | "
            f"{f(p['val_loss_final_diff'])} | {', '.join(f'{d:+.3f}' for d in p['val_loss_final_diff_per_seed'])} |"
            for p in paired]
        out = {"benchmark": "bdia_overfit", "task_description": desc, "config": config, "metric": metric,
               "argv": sys.argv[1:] if argv is None else list(argv), "complete": done,
               "table": list(table.values()), "paired": paired, "table_markdown": lines,
               "runs": ok, "failed_runs": {k: r for k, r in runs.items() if "error" in r}}
        with open(jpath + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(jpath + ".tmp", jpath)
        return out

    print(f"{desc}; model {model_cfg}; train {tr}; PAM steps {pam_tr['steps']}", flush=True)
    t_all = time.perf_counter()
    for v, a, s in jobs:
        k = f"{v}/{a}/s{s}"
        if k in runs and "error" not in runs[k]:
            continue
        r = train_one(v, a, s, data, model_cfg, pam_tr if a == "pam" else tr, args.device)
        runs[k] = r
        msg = r["error"] if "error" in r else (
            f"val best {r['val_loss_best']:.4f} @ {r['best_step']} final {r['val_loss_final']:.4f} "
            f"train {r['train_loss_final']:.4f} (eval {r['train_eval_loss_final']:.4f})")
        print(f"{k:20s} {msg} ({r['wall_s']:.0f}s; total {time.perf_counter() - t_all:.0f}s)", flush=True)
        write(False)
    out = write(True)
    print("\n".join(out["table_markdown"]))
    plot(out, os.path.join(args.out, stem + ".png"))
    print(f"wrote {jpath} and .png")
    return out


if __name__ == "__main__":
    main()
