"""The training loop: data order, optimizer, schedule, logging, checkpoints, resume, DDP.

:func:`train` runs one training run into an output directory that the caller has already
validated. Everything that makes a step's result depend on the past -- the epoch
permutation, gamma draws of the reversible stack, dropout -- comes either from pure
functions of (seed, step) or from RNG states saved in the checkpoint, so a resumed run
reproduces the losses of an uninterrupted one bit for bit (CPU).

Distributed data parallel: under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set) each process
takes its own slice of every global batch; after ``backward`` the gradients are averaged by
one explicit ``all_reduce`` of a flat buffer (rather than DDP's hooks, which do not compose
with the reversible stack's custom backward), so all ranks apply identical updates. Only
rank 0 writes output.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from . import checkpoint as ckpt
from .data import DataError, TaskData, steps_per_epoch, text_batch, text_eval_windows, vision_batch
from .model import BDIAConfig, BDIATransformer
from .quant import GridRangeError


MAX_STEPS = 10 ** 9
MAX_LR = 1.0  # AdamW steps of more than 1 per unit of gradient scale leave the grid at once
MAX_SEED = 2 ** 32 - 1  # numpy seeds are 32-bit; the derived seeds stay below 2^63


class Interrupted(Exception):
    """Training stopped by a signal. ``signum``: SIGINT/SIGTERM; ``step``: the step of the
    checkpoint that holds the run now (None: nothing was saved); ``saved``: whether this
    stop wrote it."""

    def __init__(self, signum: int, step, saved: bool):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.step, self.saved = signum, step, saved


class _StopFlag:
    """SIGINT/SIGTERM handlers that only record the signal, so the loop stops at a step boundary.

    A second signal outside a checkpoint save stops at once (KeyboardInterrupt; the previous
    checkpoint is complete); during a save it is only recorded, so the save finishes. The old
    handlers are restored by :meth:`restore`. Outside the main thread nothing is installed."""

    def __init__(self):
        self.signum = None
        self.saving = False
        self._old = {}

    def install(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None or self.saving:
            self.signum = self.signum or signum
            return
        raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


@dataclass
class TrainConfig:
    """Options of the training loop (saved in config.json next to the model config)."""

    task: str = "digits"
    data: str | None = None
    steps: int = 0  # total optimizer steps; 0 means derive from epochs
    epochs: float = 0.0
    batch_size: int = 32  # per process
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine decay to 0) | "constant"
    warmup_steps: int = -1  # -1: 5% of the steps
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0  # 0: once per epoch
    checkpoint_every: int = 0  # 0: at every evaluation
    keep: int = ckpt.DEFAULT_KEEP  # checkpoints kept in the run directory

    def validate(self) -> "TrainConfig":
        """Check every field's type and range (ValueError naming the option); return self."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        def integer(name, lo, hi):
            v = getattr(self, name)
            opt = "--" + name.replace("_", "-")
            need(isinstance(v, int) and not isinstance(v, bool), f"{opt} must be an integer, got {v!r}")
            need(lo <= v <= hi, f"{opt} must be in {lo}..{hi}, got {v}")

        def number(name, lo, hi):
            v = getattr(self, name)
            opt = "--" + name.replace("_", "-")
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f"{opt} must be a finite number, got {v!r}")
            need(lo <= v <= hi, f"{opt} must be in [{lo:g}, {hi:g}], got {v}")
        integer("steps", 0, MAX_STEPS)
        number("epochs", 0.0, 1e6)
        integer("batch_size", 1, 1 << 20)
        number("lr", 0.0, MAX_LR)
        need(self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        integer("warmup_steps", -1, MAX_STEPS)
        number("weight_decay", 0.0, 1e3)
        integer("seed", 0, MAX_SEED)
        integer("eval_every", 0, MAX_STEPS)
        integer("checkpoint_every", 0, MAX_STEPS)
        integer("keep", 1, 1000)
        need(self.schedule in ("cosine", "constant"),
             f"--schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        need(isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.device in ("cpu", "cuda"), f"--device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda":
            need(torch.cuda.is_available(), "--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}")
        return cls(**d)


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``."""
    if tc.schedule == "constant":
        return tc.lr
    warm = tc.warmup_steps if tc.warmup_steps >= 0 else max(int(0.05 * total), 0)
    if step < warm:
        return tc.lr * (step + 1) / (warm + 1)
    t = (step - warm) / max(total - warm, 1)
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def total_steps(tc: TrainConfig, data: TaskData, mc: BDIAConfig, world: int = 1) -> int:
    if tc.steps > 0:
        return tc.steps
    spe = steps_per_epoch(data, tc.batch_size, mc.context, world)
    return max(int(round((tc.epochs or 1.0) * spe)), 1)


def make_optimizer(model: BDIATransformer, tc: TrainConfig):
    """AdamW; in PAM arithmetic ``pam.optim.AdamW`` (no float multiply on the tensors)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [dict(params=decay, weight_decay=tc.weight_decay), dict(params=other, weight_decay=0.0)]
    if model.config.arithmetic == "pam":
        try:
            from pam.optim import AdamW
        except ImportError as e:
            raise RuntimeError(f"arithmetic='pam' needs pam.optim.AdamW ({e}); use --arithmetic pam_matmul") from None
        return AdamW(groups, lr=tc.lr, betas=(0.9, 0.98))
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.98))


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """RANK/WORLD_SIZE/LOCAL_RANK as set by torchrun (single process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(d: Dist, device: str) -> None:
    import torch.distributed as dist
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend=backend, rank=d.rank, world_size=d.world)


def _allreduce_grads(model, world: int) -> None:
    import torch.distributed as dist
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    with model.arithmetic():
        flat = flat * (1.0 / world)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def _broadcast_params(model) -> None:
    import torch.distributed as dist
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


def _mean_across(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if not d.enabled:
        return value
    import torch.distributed as dist
    v = value.detach().clone().reshape(1)
    dist.all_reduce(v)
    return v / d.world


def _gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    import torch.distributed as dist
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: BDIATransformer, data: TaskData, device: str = "cpu", batch_size: int = 256) -> dict:
    """Held-out metrics: ``test_loss`` (nats) and ``test_acc`` (vision) or ``test_bpc`` (text).

    Every held-out sample (text: every window of :func:`text_eval_windows`) is evaluated once,
    ``batch_size`` samples (text: windows) at a time. The metric is computed in float from the
    model's logits (the logits come from the model's arithmetic): per-sample (per-token) losses
    summed exactly with ``math.fsum``, so the batch size changes the result only if the model's
    logits of a sample depend on the other samples of its batch. An empty held-out split
    raises DataError."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was = model.training
    model.eval()
    try:
        if data.kind == "vit":
            n = data.test_x.shape[0]
            if n < 1:
                raise DataError("the held-out split is empty; nothing to evaluate")
            losses, correct = [], 0
            for i in range(0, n, batch_size):
                x = data.test_x[i:i + batch_size].to(device)
                y = data.test_y[i:i + batch_size].to(device)
                logits = model(x).float()
                losses += torch.nn.functional.cross_entropy(logits, y, reduction="none").tolist()
                correct += int((logits.argmax(-1) == y).sum())
            return {"test_loss": math.fsum(losses) / n, "test_acc": correct / n}
        x, y = text_eval_windows(data, model.config.context)
        losses = []
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i:i + batch_size].to(device)).float()
            tgt = y[i:i + batch_size].to(device)
            losses += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        tgt.reshape(-1), reduction="none").tolist()
        nats = math.fsum(losses) / len(losses)
        bpc = nats / math.log(2) * data.info.get("bytes_per_char", 1.0)
        return {"test_loss": nats, "test_bpc": bpc}
    finally:
        model.train(was)


# --------------------------------------------------------------------------- output
def _rng_state(gamma_gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(), "gamma": gamma_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict, gamma_gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    gamma_gen.set_state(s["gamma"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def read_metrics(run_dir: str, warn=None) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (empty if absent).

    A line that is not a JSON object -- typically a last line torn by a kill during an
    append -- is skipped; a damaged line other than the last is reported by ``warn(line)``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if i != len(lines) - 1 and warn is not None:
                warn(f"{path}: skipped damaged line {i + 1}")
            continue
        rows.append(row)
    return rows


def plot_metrics(run_dir: str) -> str | None:
    """metrics.png: training/test loss and test accuracy (or bpc) against the step."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("type") == "train"]
    ev = [r for r in rows if r.get("type") == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if ev:
        a1.plot([r["step"] for r in ev], [r["test_loss"] for r in ev], "o-", label="test loss")
        key = "test_acc" if "test_acc" in ev[0] else "test_bpc"
        a2.plot([r["step"] for r in ev], [r[key] for r in ev], "o-", color="C2")
        a2.set_ylabel("test accuracy" if key == "test_acc" else "test bits per character")
    a1.set_xlabel("step"), a1.set_ylabel("loss (nats)"), a1.legend(), a1.grid(alpha=0.3)
    a2.set_xlabel("step"), a2.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    path = os.path.join(run_dir, "metrics.png")
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def _bits(x: float) -> str:
    return f"{int(torch.tensor(x, dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF:08x}"


# --------------------------------------------------------------------------- the loop
class TrainingDiverged(FloatingPointError):
    """The loss or an activation left the representable range; ``step``: the last checkpoint."""

    def __init__(self, msg: str, step):
        super().__init__(msg)
        self.step = step


def _warn(line: str) -> None:
    print(f"bdia-pam: warning: {line}", file=sys.stderr)


def _agreed_signal(signum, d: Dist):
    """The signal number if any rank received one (all ranks stop at the same step)."""
    if not d.enabled:
        return signum
    import torch.distributed as dist
    t = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) or None


def _set_aside_newer(run_dir: str, start: int) -> None:
    """Rename checkpoints newer than ``start`` (damaged ones that load skipped) to ``damaged-*``,
    so that they are never taken for newer than what the resumed run writes."""
    root = os.path.join(run_dir, ckpt.CKPT_DIR)
    for name in ckpt.list_checkpoints(run_dir):
        if ckpt._parse(name)[0] > start:
            target, i = os.path.join(root, "damaged-" + name), 1
            while os.path.exists(target):
                target, i = os.path.join(root, f"damaged-{name}-{i}"), i + 1
            os.rename(os.path.join(root, name), target)


def train(mc: BDIAConfig, tc: TrainConfig, data: TaskData, out_dir: str | None, *,
          resume: tuple | None = None, stop_after: int = 0, d: Dist | None = None,
          progress: bool = True, desc: str = "train") -> dict:
    """Train; return a summary dict. ``resume`` is ``checkpoint.load()``'s result.

    ``stop_after`` > 0 stops (and checkpoints) after that many total steps, as if the run had
    been interrupted there. ``out_dir`` None: write nothing (rank != 0, or in-memory use).

    SIGINT/SIGTERM (main thread) stop the loop at the next step boundary: a checkpoint of that
    step is saved and :class:`Interrupted` raised; a second signal before that stops at once
    (the previous checkpoint stands). A loss or activation out of range raises
    :class:`TrainingDiverged`. A resume into a directory without a checkpoint of the resumed
    step (``--out NEW``) first saves that checkpoint there.
    """
    d = d or Dist()
    init_distributed(d, tc.device)
    dev = tc.device if tc.device == "cpu" else f"cuda:{d.local_rank}"
    torch.manual_seed(tc.seed + d.rank)
    np.random.seed((tc.seed + d.rank) % 2 ** 32)
    random.seed(tc.seed + d.rank)
    gamma_gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + 17 + 104_729 * d.rank)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = BDIATransformer(mc).to(dev)
    torch.manual_seed(tc.seed + d.rank)
    opt = make_optimizer(model, tc)
    total = total_steps(tc, data, mc, d.world)
    start = 0
    config = {"model": mc.to_dict(), "train": asdict(tc)}
    if resume is not None:
        weights, state, _ = resume
        ckpt.load_weights_into(model, weights, out_dir or "checkpoint")
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ckpt.CheckpointError(f"optimizer state does not fit this model ({e})") from None
        start = int(state["step"])
        rng = state.get("rng")
        if not isinstance(rng, list) or len(rng) != d.world:
            n = len(rng) if isinstance(rng, list) else "?"
            raise ckpt.CheckpointError(f"checkpoint was written by {n} processes; resume it with "
                                       f"the same number (now {d.world})")
        try:
            _set_rng_state(rng[d.rank], gamma_gen)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint RNG state is malformed ({type(e).__name__}: {e})") from None
    if d.enabled and resume is None:
        _broadcast_params(model)

    write = out_dir is not None and d.main
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if write else None
    if write:
        kept = [r for r in read_metrics(out_dir, _warn) if r.get("step", 0) <= start]
        ckpt.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        ckpt.atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2) + "\n")

    spe = steps_per_epoch(data, tc.batch_size, mc.context, d.world)
    eval_every = tc.eval_every or spe
    ckpt_every = tc.checkpoint_every or eval_every
    end = min(total, stop_after) if stop_after > 0 else total
    unit = "samples" if data.kind == "vit" else "tokens"
    per_step = tc.batch_size * d.world * (1 if data.kind == "vit" else mc.context)
    stop = _StopFlag()
    saved_step = [start if resume is not None else None]

    def save(step):
        rng = _gather(_rng_state(gamma_gen), d)
        if write:
            stop.saving = True
            try:
                ckpt.save(out_dir, model, config, {"step": step, "total_steps": total,
                                                   "optimizer": opt.state_dict(), "rng": rng}, keep=tc.keep)
            finally:
                stop.saving = False
        saved_step[0] = step

    def log(row):
        if write:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    if write and resume is not None:
        _set_aside_newer(out_dir, start)
        if ckpt.latest_step(out_dir) != start:  # a new --out: it holds the run from the start
            save(start)

    from tqdm import tqdm
    bar = tqdm(total=end, initial=start, desc=desc, unit="step", disable=not (progress and d.main),
               dynamic_ncols=True, file=sys.stderr)
    last_eval: dict = {}
    losses: list[float] = []
    t0 = time.perf_counter()
    t_last, step = t0, start
    model.train()
    stop.install()
    try:
        for step in range(start, end):
            lr = lr_at(step, total, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            if data.kind == "vit":
                x, y, epoch, _ = vision_batch(data, step, tc.batch_size, tc.seed, d.rank, d.world)
            else:
                x, y, epoch, _ = text_batch(data, step, tc.batch_size, mc.context, tc.seed, d.rank, d.world)
            x, y = x.to(dev), y.to(dev)
            try:
                with model.arithmetic():      # backward formulas and the optimizer too
                    logits = model(x, generator=gamma_gen)
                    loss = model.loss(logits, y, tc.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if d.enabled:
                        _allreduce_grads(model, d.world)
                    opt.step()
            except GridRangeError as e:
                raise TrainingDiverged(f"step {step + 1}: {e}; lower --lr", saved_step[0]) from None
            lval = float(_mean_across(loss.detach(), d))
            if not math.isfinite(lval):
                raise TrainingDiverged(f"loss became {lval} at step {step + 1}; lower --lr", saved_step[0])
            losses.append(lval)
            now = time.perf_counter()
            rate = per_step / max(now - t_last, 1e-9)
            t_last = now
            log({"type": "train", "step": step + 1, "epoch": epoch, "loss": lval, "loss_bits": _bits(lval),
                 "lr": lr, f"{unit}_per_s": rate, "time": now - t0})
            bar.set_postfix(loss=f"{lval:.4f}", **{f"{unit}/s": f"{rate:.0f}"}, refresh=False)
            bar.update(1)
            done = step + 1
            if done % eval_every == 0 or done == end:
                if d.main:
                    last_eval = evaluate(model, data, dev)
                    log({"type": "eval", "step": done, **last_eval})
                    bar.set_postfix(loss=f"{lval:.4f}", **{k: f"{v:.4f}" for k, v in last_eval.items()
                                                          if k != "test_loss"})
            if done % ckpt_every == 0 or done == end:
                save(done)
            step = done
            signum = _agreed_signal(stop.signum, d)
            if signum and done < end:
                if saved_step[0] != done:
                    save(done)
                raise Interrupted(signum, done, True)
    except KeyboardInterrupt:  # a second signal (or no handler installed): stop without saving
        raise Interrupted(stop.signum or signal.SIGINT, saved_step[0], False) from None
    except Interrupted as e:
        if write:
            bar.close()
            plot_metrics(out_dir)
        raise e
    finally:
        stop.restore()
        bar.close()
    wall = time.perf_counter() - t0
    if write:
        plot_metrics(out_dir)
    return {"out": out_dir, "task": tc.task, "arithmetic": mc.arithmetic, "reversible": mc.reversible,
            "steps": step, "total_steps": total, "wall_s": wall, "final_loss": losses[-1] if losses else None,
            "losses": losses, "parameters": model.num_parameters(), **last_eval, "model": model}
