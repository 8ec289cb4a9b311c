"""The ``bdia-pam`` command (also ``python -m bdia_pam``): ``train`` and ``evaluate``.

``bdia-pam train`` with no options trains a BDIA reversible ViT in fully multiplication-free
PAM arithmetic on the bundled digits data set. Every input (options, data path, checkpoint)
is validated before the output directory is created, and a problem exits with status 2 and
a one-line ``bdia-pam: error: ...`` saying what to change.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import replace

from . import checkpoint as ckpt
from ._entry import WORKLOAD as WARMUP_WORKLOAD
from .data import TASKS, DataError, load_task
from .model import ARITHMETICS, FRAC_BITS_RANGE, BDIAConfig, arithmetic_context
from .quant import GridRangeError
from .train import (Dist, Interrupted, TrainConfig, TrainingDiverged, dist_from_env, evaluate, lr_at,
                    total_steps, train)

# The defaults of `bdia-pam train` (no options): tuned to reach >= 95% held-out accuracy on
# digits in PAM arithmetic within a few minutes on 2 CPU cores.
MODEL_DEFAULTS = dict(arithmetic="pam", reversible=True, depth=4, width=64, heads=4, mlp_ratio=2,
                      frac_bits=9, dropout=0.0, activation="gelu", pool="cls")
TASK_MODEL_DEFAULTS = {"digits": dict(patch_size=4, activation="relu"), "cifar10": dict(patch_size=4),
                       "text": dict(context=64, tie_weights=True)}
TRAIN_DEFAULTS = dict(task="digits", epochs=0.0, steps=0, batch_size=128, lr=4e-3, schedule="cosine",
                      warmup_steps=-1, weight_decay=0.01, label_smoothing=0.0, seed=0, device="cpu",
                      eval_every=0, checkpoint_every=0, keep=ckpt.DEFAULT_KEEP)
TASK_EPOCHS = {"digits": 20.0, "cifar10": 1.0, "text": 1.0}

MODEL_OPTS = ("arithmetic", "reversible", "depth", "width", "heads", "mlp_ratio", "frac_bits",
              "dropout", "activation", "patch_size", "pool", "context")
TRAIN_OPTS = ("task", "data", "steps", "epochs", "batch_size", "lr", "schedule", "warmup_steps",
              "weight_decay", "label_smoothing", "seed", "device", "eval_every", "checkpoint_every", "keep")
RESUME_MAY_CHANGE = ("steps", "epochs", "device", "data", "eval_every", "checkpoint_every", "keep")


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bdia-pam",
        description="Train and evaluate BDIA exact bit-level reversible transformers on "
                    "piecewise-affine (multiplication-free) arithmetic.")
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate}", required=True)

    t = sub.add_parser("train", help="train a model (no options: BDIA reversible ViT, PAM arithmetic, digits)",
                       description="Train a BDIA transformer. Without options: a reversible ViT in fully "
                                   "multiplication-free PAM arithmetic on scikit-learn's digits. Options left "
                                   "out take the task's defaults (or, with --resume, the checkpoint's values).")
    g = t.add_argument_group("data")
    g.add_argument("--task", choices=TASKS, default=None,
                   help="digits: bundled 8x8 digits, 20%% held out; text: causal byte LM (bits/char); "
                        "cifar10: CIFAR-10 python batches [default: digits]")
    g.add_argument("--data", metavar="PATH", default=None,
                   help="text: a UTF-8 file (default: Python's bundled pydoc topics); "
                        "cifar10: the 'cifar-10-batches-py' directory; digits: not used")
    g = t.add_argument_group("model")
    g.add_argument("--arithmetic", choices=ARITHMETICS, default=None,
                   help="float: torch; pam_matmul: PAM linear layers and attention products; pam: "
                        "everything multiplication-free (softmax, layer norm, GELU, loss, AdamW) [default: pam]")
    g.add_argument("--reversible", action=argparse.BooleanOptionalAction, default=None,
                   help="BDIA reversible stack (memory-saving, activations on the 2^-frac_bits grid) "
                        "or a standard residual stack [default: --reversible]")
    g.add_argument("--depth", type=int, default=None, help="number of transformer blocks [default: 4]")
    g.add_argument("--width", type=int, default=None, help="embedding width [default: 64]")
    g.add_argument("--heads", type=int, default=None, help="attention heads; must divide --width [default: 4]")
    g.add_argument("--mlp-ratio", type=int, default=None, help="MLP hidden width / width [default: 2]")
    lo, hi = FRAC_BITS_RANGE
    g.add_argument("--frac-bits", type=int, default=None,
                   help=f"l: activations are rounded to multiples of 2^-l, {lo}..{hi} [default: 9]")
    g.add_argument("--dropout", type=float, default=None, help="dropout probability [default: 0]")
    g.add_argument("--activation", choices=("gelu", "relu"), default=None, help="MLP activation (relu costs nothing in PAM) [default: relu for digits, else gelu]")
    g.add_argument("--patch-size", type=int, default=None,
                   help="ViT patch side in pixels; must divide the image side [default: 4]")
    g.add_argument("--pool", choices=("cls", "mean"), default=None, help="ViT pooling [default: cls]")
    g.add_argument("--context", type=int, default=None, help="text: context length in bytes [default: 64]")
    g = t.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None,
                   help="total optimizer steps (overrides --epochs) [default: from --epochs]")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the training data [default: 20 for digits, 1 otherwise]")
    g.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop (and checkpoint) after step N of the planned steps, as if interrupted; "
                        "continue with --resume")
    g.add_argument("--batch-size", type=int, default=None,
                   help="samples (text: windows) per step per process [default: 128]")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW [default: 4e-3]")
    g.add_argument("--schedule", choices=("cosine", "constant"), default=None,
                   help="cosine: linear warmup then cosine decay to 0; constant: --lr throughout [default: cosine]")
    g.add_argument("--warmup-steps", type=int, default=None, help="warmup steps of the cosine schedule "
                                                                 "[default: 5%% of the steps]")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay [default: 0.01]")
    g.add_argument("--label-smoothing", type=float, default=None, help="cross-entropy label smoothing [default: 0]")
    g.add_argument("--seed", type=int, default=None, help="seed of weights, data order, gamma and dropout [default: 0]")
    g = t.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="output directory; must not hold another run [default: runs/<timestamp>, "
                        "with runs/last pointing at it]")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to train [default: cpu]")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its checkpoint (writes into DIR unless --out is given)")
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations [default: one epoch]")
    g.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints [default: at every evaluation]")
    g.add_argument("--keep", type=int, default=None, metavar="N",
                   help=f"checkpoints kept under DIR/checkpoints (older ones are deleted once a newer one "
                        f"is complete) [default: {ckpt.DEFAULT_KEEP}]")
    g.add_argument("--compare-float", action="store_true",
                   help="also train the same configuration in float arithmetic and print both results")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="print held-out metrics of a trained run",
                       description="Load the checkpoint in a run directory and print its held-out metrics.")
    e.add_argument("run_dir", metavar="DIR", help="a run directory written by 'bdia-pam train'")
    e.add_argument("--data", metavar="PATH", default=None,
                   help="data path, if it moved since training (text file or cifar10 directory)")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to evaluate")
    e.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


# --------------------------------------------------------------------------- helpers
def _explicit(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _check_out_dir(out: str, resume_dir: str | None, ignore=(ckpt.LOCK,)) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out!r} exists and is not a directory; choose another --out")
    if os.path.isdir(out) and set(os.listdir(out)) - set(ignore):
        same = resume_dir is not None and os.path.samefile(out, resume_dir)
        if not same:
            what = "holds another run" if os.path.exists(os.path.join(out, "config.json")) else "is not empty"
            raise CLIError(f"--out {out!r} {what}; choose a new directory (or --resume {out} to continue it)")


def _default_out() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = os.path.join("runs", stamp), 1
    while os.path.exists(out):
        out, i = os.path.join("runs", f"{stamp}-{i}"), i + 1
    return out


def _point_last(out: str) -> None:
    """runs/last -> the newest run (a symlink, or a text file where symlinks are unavailable)."""
    parent = os.path.dirname(os.path.abspath(out))
    link = os.path.join(parent, "last")
    tmp = link + ".tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(os.path.abspath(out)), tmp)
        os.replace(tmp, link)
    except OSError:
        ckpt.atomic_write_text(link + ".txt", os.path.abspath(out) + "\n")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    for j, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def _fmt_metrics(s: dict) -> dict:
    m = {}
    if "test_acc" in s:
        m["test accuracy"] = f"{100 * s['test_acc']:.2f}%"
    if "test_bpc" in s:
        m["test bits/char"] = f"{s['test_bpc']:.4f}"
    if s.get("test_loss") is not None:
        m["test loss"] = f"{s['test_loss']:.4f}"
    if s.get("final_loss") is not None:
        m["final train loss"] = f"{s['final_loss']:.4f}"
    if "steps" in s:
        m["steps"] = f"{s['steps']} / {s['total_steps']}"
    if "wall_s" in s:
        m["wall time"] = f"{s['wall_s']:.1f} s"
    return m


def _describe(mc: BDIAConfig) -> str:
    stack = f"BDIA reversible, frac_bits={mc.frac_bits}" if mc.reversible else "standard residual"
    return f"{mc.arithmetic}, {stack}, depth {mc.depth}, width {mc.width}, heads {mc.heads}"


# --------------------------------------------------------------------------- commands
def prepare_train(args, d: Dist):
    """Validate every input; return (model cfg, train cfg, data, resume, out_dir). Writes nothing."""
    resume = None
    m_over, t_over = _explicit(args, MODEL_OPTS), _explicit(args, TRAIN_OPTS)
    if args.resume:
        resume = ckpt.load(args.resume)
        saved = resume[2]
        try:
            mc = BDIAConfig.from_dict(saved["model"])
            tc = TrainConfig.from_dict(saved["train"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"checkpoint {args.resume!r} has an incompatible config ({e})") from None
        changed = [k for k, v in m_over.items() if getattr(mc, k) != v]
        changed += [k for k, v in t_over.items() if k not in RESUME_MAY_CHANGE and getattr(tc, k) != v]
        if changed:
            raise CLIError(f"--{changed[0].replace('_', '-')} differs from the checkpoint's value; drop it "
                           "when resuming (only --steps/--epochs/--device/--data/--eval-every/"
                           "--checkpoint-every/--keep may change)")
        tc = replace(tc, **{k: v for k, v in t_over.items()})
        if "steps" not in t_over and "epochs" not in t_over:
            tc = replace(tc, steps=int(resume[1]["total_steps"]))  # keep the planned length
        if args.compare_float:
            raise CLIError("--compare-float cannot be combined with --resume; run the float comparison "
                           "as its own run")
    else:
        task = t_over.get("task", TRAIN_DEFAULTS["task"])
        tc = TrainConfig(**{**TRAIN_DEFAULTS, "epochs": TASK_EPOCHS.get(task, 1.0), **t_over})
        mc_kw = {**MODEL_DEFAULTS, **TASK_MODEL_DEFAULTS.get(task, {}), **m_over}
        mc = BDIAConfig(**mc_kw)
    if args.stop_after < 0:
        raise CLIError(f"--stop-after must be >= 0, got {args.stop_after}")
    tc.validate()
    data = load_task(tc.task, tc.data)
    mc = replace(mc, **data.model_fields())
    mc.validate()
    check_run_fits(mc, tc, data, d.world)
    arithmetic_context(mc.arithmetic)  # fails early if the PAM pieces are missing
    if mc.arithmetic == "pam":
        try:
            import pam.optim  # noqa: F401
        except ImportError as e:
            raise CLIError(f"arithmetic='pam' needs pam.optim ({e}); use --arithmetic pam_matmul") from None
    if resume is not None:  # check that the weights fit before anything is written
        from .model import BDIATransformer
        ckpt.load_weights_into(BDIATransformer(mc), resume[0], args.resume)
    out = args.out or (args.resume if args.resume else None)
    if out is None:
        out = _default_out()
    if d.main:  # other ranks never write (and rank 0 may already have created `out`)
        _check_out_dir(out, args.resume)
    if args.compare_float and mc.arithmetic == "float":
        raise CLIError("--compare-float compares against float arithmetic; pick --arithmetic pam or pam_matmul")
    return mc, tc, data, resume, out


def _available_memory(device: str) -> int | None:
    """Bytes the run may use: free CUDA memory, or MemAvailable of /proc/meminfo (None: unknown)."""
    if device == "cuda":
        import torch
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: live float32 copies of one block's attention scores in a training step (scores, softmax
#: intermediates and their gradients), for the memory estimate of check_run_fits
ATTENTION_COPIES = 8


def memory_estimate(mc: BDIAConfig, tc: TrainConfig) -> int:
    """Rough bytes of a training step, dominated by attention: batch * heads * tokens^2 floats
    times ATTENTION_COPIES, for one block (reversible) or every block (stored activations)."""
    tokens = mc.context if mc.kind == "lm" else (mc.image_size // mc.patch_size) ** 2 + 1
    blocks = 1 if mc.reversible else mc.depth
    attn = tc.batch_size * mc.heads * tokens * tokens * 4 * ATTENTION_COPIES * blocks
    acts = tc.batch_size * tokens * mc.width * 4 * (mc.mlp_ratio + 6) * mc.depth
    return attn + acts


def check_run_fits(mc: BDIAConfig, tc: TrainConfig, data, world: int = 1) -> None:
    """Checks that need the data: held-out split, batch size, warmup, step count, memory.

    Raises CLIError (or DataError) before anything is written, so a run never fails late."""
    from .data import text_eval_windows
    if data.kind == "vit":
        if data.test_x.shape[0] < 1:
            raise DataError(f"the held-out split of {data.source!r} is empty; nothing to evaluate")
        if tc.batch_size * world > data.num_train:
            raise CLIError(f"--batch-size {tc.batch_size} (x {world} processes) is larger than the "
                           f"{data.num_train} training samples; use --batch-size <= {data.num_train // world}")
    else:
        text_eval_windows(data, mc.context)  # DataError if the held-out text is too short
        windows = data.num_train - mc.context - 1
        if windows < 1:
            raise DataError(f"training text has {data.num_train} bytes, fewer than --context + 2 = "
                            f"{mc.context + 2}; use a smaller --context or a longer file")
        if tc.batch_size > windows:
            raise CLIError(f"--batch-size {tc.batch_size} is larger than the {windows} distinct training "
                           f"windows of --context {mc.context}; use a smaller --batch-size")
    total = total_steps(tc, data, mc, world)
    if total > 10 ** 9:
        raise CLIError(f"the run would take {total} steps (more than 10^9); lower --epochs or --steps")
    if tc.schedule == "cosine" and tc.warmup_steps >= total:
        raise CLIError(f"--warmup-steps {tc.warmup_steps} is not shorter than the run ({total} steps); "
                       f"use --warmup-steps < {total}")
    if not all(math.isfinite(lr_at(s, total, tc)) for s in (0, total - 1)):
        raise CLIError("the learning-rate schedule is not finite; lower --lr")
    need, have = memory_estimate(mc, tc), _available_memory(tc.device)
    if have is not None and need > have:
        what = "--context" if mc.kind == "lm" else "--patch-size"
        raise CLIError(f"a training step needs about {need / 2 ** 30:.1f} GiB (attention: --batch-size "
                       f"{tc.batch_size} x {mc.heads} heads x tokens^2 floats x {ATTENTION_COPIES}), more "
                       f"than the {have / 2 ** 30:.1f} GiB available; lower {what} or --batch-size")


def _open_out(out: str, resume_dir: str | None):
    """Create ``out``, lock it (RunLock) and re-check that it holds no other run; return the lock.

    The re-check under the lock closes the race of two trainers started on one new --out."""
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create --out {out!r} ({e.strerror or e}); choose a writable directory") from None
    try:
        lock = ckpt.RunLock(out).acquire()
    except ckpt.CheckpointError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        _check_out_dir(out, resume_dir)
    except CLIError:
        lock.release()
        raise
    return lock


def cmd_train(args, warmup_workers=None) -> int:
    d = dist_from_env()
    try:
        mc, tc, data, resume, out = prepare_train(args, d)
    except (ValueError, RuntimeError) as e:  # impossible configuration: nothing written yet
        if isinstance(e, (DataError, ckpt.CheckpointError)):
            raise
        raise CLIError(str(e)) from None
    lock = None
    if d.main:
        lock = _open_out(out, args.resume)
    try:
        if mc.arithmetic != "float" and tc.device == "cpu" and d.world == 1:
            _warm_kernels(warmup_workers)
        elif warmup_workers is not None:     # started before the arguments were parsed
            warmup_workers.kill()
        fully_pam_cpu = mc.arithmetic == "pam" and tc.device == "cpu"
        with _one_torch_thread() if fully_pam_cpu else contextlib.nullcontext():
            return _run_train(args, d, mc, tc, data, resume, out)
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _one_torch_thread():
    """Fully PAM training on CPU: torch runs only glue ops, on one thread, while inside
    (the count is restored after). The PAM kernels split their work over their own
    threads (pam.kernels.threads, numba's thread count), and a second torch thread would
    only spin-wait on their cores (default model: 720-800 -> 806-832 samples/s on 2
    cores)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _warm_kernels(workers=None) -> None:
    """Compile the CPU kernels in parallel on the first run after an install or an update
    (pam.kernels.warmup; skipped at once on later runs, or with PAM_WARMUP=0). ``workers``:
    warm-up workers the ``bdia-pam`` command started before it loaded torch
    (bdia_pam._entry), waited for instead of starting new ones."""
    if os.environ.get("PAM_WARMUP", "1") == "0":
        if workers is not None:
            workers.kill()
        return
    from pam.kernels import warmup

    def announce(n):
        print(f"compiling the PAM kernels for the first run ({n} processes; cached for later "
              f"runs)...", file=sys.stderr, flush=True)
    try:
        res = warmup.warm(announce=announce, workload=WARMUP_WORKLOAD, workers=workers)
    except RuntimeError as e:          # a worker failed: the kernels compile lazily instead
        print(f"kernel warm-up failed, compiling on first use instead: {e}", file=sys.stderr,
              flush=True)
        return
    if not res["skipped"]:
        print(f"compiled {res['kernels']} kernels in {res['seconds']:.1f} s", file=sys.stderr,
              flush=True)


def _run_train(args, d, mc, tc, data, resume, out) -> int:
    if d.main:
        if args.resume and not os.path.samefile(out, args.resume):
            src = os.path.join(args.resume, "metrics.jsonl")
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out, "metrics.jsonl"))
        if args.out is None and not args.resume:
            _point_last(out)
        print(f"bdia-pam: training {tc.task} ({_describe(mc)}) -> {out}", file=sys.stderr)
    try:
        summary = train(mc, tc, data, out if d.main else None, resume=resume, stop_after=args.stop_after,
                        d=d, progress=not args.no_progress, desc=mc.arithmetic)
    except Interrupted as e:
        if d.main:
            where = (f"saved a checkpoint at step {e.step}" if e.saved else
                     f"the last checkpoint is step {e.step}" if e.step is not None else "no checkpoint was saved")
            hint = f"; continue with: bdia-pam train --resume {out}" if e.step is not None else ""
            print(f"bdia-pam: interrupted by {signal.Signals(e.signum).name}: {where}{hint}", file=sys.stderr)
        return 128 + int(e.signum)
    except (TrainingDiverged, GridRangeError) as e:
        step = getattr(e, "step", None)
        kept = f"; the last checkpoint (step {step}) is kept" if step is not None else ""
        print(f"bdia-pam: error: training diverged: {e}{kept}", file=sys.stderr)
        return 1
    results = [("", summary)]
    if args.compare_float:
        fout = os.path.join(out, "compare_float") if d.main else None
        if fout:
            os.makedirs(fout, exist_ok=True)
        fsum = train(replace(mc, arithmetic="float"), tc, data, fout, stop_after=args.stop_after, d=d,
                     progress=not args.no_progress, desc="float")
        results = [(mc.arithmetic, summary), ("float", fsum)]
    if d.main:
        _print_summary(mc, tc, out, results)
    if d.enabled:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _print_summary(mc, tc, out, results) -> None:
    metrics = [_fmt_metrics(s) for _, s in results]
    keys = [k for k in metrics[0]]
    if len(results) == 1:
        rows = [("run", out), ("task", tc.task), ("model", _describe(mc)),
                ("parameters", str(results[0][1]["parameters"]))]
        rows += [(k, metrics[0][k]) for k in keys]
        print(_table([("summary", "")] + rows))
    else:
        rows = [("", *[name for name, _ in results])]
        rows += [(k, *[m.get(k, "") for m in metrics]) for k in keys]
        print(f"run {out}: {tc.task}, {_describe(mc)}")
        print(_table(rows))
    print(f"outputs: {os.path.join(out, 'config.json')}, metrics.jsonl, metrics.png, "
          f"{ckpt.CKPT_DIR}/step-*/ ({ckpt.WEIGHTS}, {ckpt.STATE}, {ckpt.MANIFEST})")


def cmd_evaluate(args) -> int:
    try:
        return _evaluate(args)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, (DataError, ckpt.CheckpointError)):
            raise
        raise CLIError(str(e)) from None


def _evaluate(args) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    weights, state, saved = ckpt.load(args.run_dir)
    try:
        mc = BDIAConfig.from_dict(saved["model"])
        tc = TrainConfig.from_dict(saved["train"])
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"checkpoint {args.run_dir!r} has an incompatible config ({e})") from None
    tc = replace(tc, device=args.device, data=args.data or tc.data).validate()
    data = load_task(tc.task, tc.data)
    from .model import BDIATransformer
    model = BDIATransformer(mc)
    ckpt.load_weights_into(model, weights, args.run_dir)
    model.to(args.device)
    metrics = evaluate(model, data, args.device, args.batch_size)
    if args.json:
        print(json.dumps({"run": args.run_dir, "step": state["step"], **metrics}))
    else:
        rows = [("evaluate", args.run_dir), ("task", tc.task), ("model", _describe(mc)),
                ("step", f"{state['step']} / {state['total_steps']}")]
        rows += list(_fmt_metrics(metrics).items())
        print(_table(rows))
    return 0


def main(argv=None, warmup_workers=None) -> int:
    """The ``bdia-pam`` command on ``argv``; ``warmup_workers``: kernel warm-up workers
    already started for it (bdia_pam._entry, the installed command's entry point)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, warmup_workers)
        return cmd_evaluate(args)
    except (CLIError, DataError, ckpt.CheckpointError) as e:
        print(f"bdia-pam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
