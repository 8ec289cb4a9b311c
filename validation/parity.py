"""Parity: one small transformer trained three ways on the same data.

Task: scikit-learn's digits (1797 8x8 images, 10 classes), each image cut into 16 tokens
of 2x2 pixels; a 2-block pre-LN transformer classifier (d=32, 2 heads, MLP 64, GELU,
dropout 0.1, learned positions, mean pooling). Fixed 80/20 split, same batches per seed.

Arithmetic modes:
  float       torch layers, F.cross_entropy, torch.optim.AdamW
  pam_matmul  PAM linear layers and attention matmuls (QK^T, AV); softmax, LayerNorm,
              GELU, dropout, loss and AdamW in float
  pam_full    fully multiplication-free: pam.convert(model), PF.cross_entropy,
              pam.optim.AdamW, PF.mean pooling (the step is checked with
              pam.audit.no_float_multiply on the first batch)
Each mode x 3 seeds; AdamW(0.9, 0.98), lr 5e-3 cosine, wd 1e-4, label smoothing 0.1,
approximate backward (as the paper) unless --backward exact.

Writes validation/results/parity.json and parity.png. Default 25 epochs x 3 seeds (~10 min on
the shared 2-core box; float reaches ~95%). ``--quick``: 1 seed, 2 epochs.
"""
import argparse
import json
import math
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")   # numba's and torch's OpenMP threads

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import pam  # noqa: E402
import pam.nn.functional as PF  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("float", "pam_matmul", "pam_full")
LR = 5e-3


def data():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0           # prep outside the run
    x = x.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_tr = int(0.8 * len(y))
    return (x[perm[:n_tr]], y[perm[:n_tr]]), (x[perm[n_tr:]], y[perm[n_tr:]])


class Block(nn.Module):
    def __init__(self, d, heads, hidden, p):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d),
                                 nn.Dropout(p))
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self.mlp(self.ln2(x))


class Classifier(nn.Module):
    def __init__(self, d=32, heads=2, hidden=64, blocks=2, p=0.1, mean=torch.mean):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.randn(16, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, heads, hidden, p) for _ in range(blocks)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)
        self.mean = mean

    def forward(self, x):
        x = self.embed(x) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.mean(self.ln(x), dim=1))


class MatmulOnlyMHA(pam.nn.MultiheadAttention):
    """PAM QK^T and AV, float scaling and softmax (the 'PAM matmuls only' mode)."""

    def _attend(self, q, k, v, mask, dropout_p, is_causal, need_weights):
        s = pam.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-2, -1), backward=self.backward)
        return pam.matmul(torch.softmax(s, -1), v, backward=self.backward), None


def build(mode, seed, backward):
    torch.manual_seed(seed)
    if mode != "pam_full":
        model = Classifier()
    else:
        model = Classifier(mean=lambda x, dim: PF.mean(x, dim=dim, backward=backward))
    if mode == "pam_matmul":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, pam.convert(child, backward=backward))
                elif type(child) is nn.MultiheadAttention:
                    new = pam.convert(child, backward=backward)
                    new.__class__ = MatmulOnlyMHA
                    setattr(parent, name, new)
    if mode == "pam_full":
        model = pam.convert(model, backward=backward)
        opt = pam.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98),
                              weight_decay=1e-4)
        loss_fn = lambda out, y: PF.cross_entropy(out, y, label_smoothing=0.1,  # noqa: E731
                                                  backward=backward)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98),
                                weight_decay=1e-4)
        loss_fn = lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1)  # noqa: E731
    return model, opt, loss_fn


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    model.train()
    loss = float(F.cross_entropy(out, y))          # reporting metric, outside the run
    return loss, float((out.argmax(-1) == y).float().mean())


def run(mode, seed, epochs, batch, backward, train, test):
    model, opt, loss_fn = build(mode, seed, backward)
    xtr, ytr = train
    steps_per_epoch = math.ceil(len(ytr) / batch)
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    curve, t0, step = [], time.time(), 0
    audited = None
    for ep in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        run_loss = 0.0
        for i in range(steps_per_epoch):
            # cosine schedule, computed outside the arithmetic under test (a Python float)
            for grp in opt.param_groups:
                grp["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i * batch:(i + 1) * batch]
            if mode == "pam_full" and audited is None:
                with pam.audit.no_float_multiply():
                    loss = loss_fn(model(xtr[idx]), ytr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                audited = True
            else:
                loss = loss_fn(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            run_loss += float(loss)
            step += 1
        te_loss, te_acc = evaluate(model, *test)
        curve.append({"epoch": ep + 1, "train_loss": run_loss / steps_per_epoch,
                      "test_loss": te_loss, "test_acc": te_acc})
        print(f"{mode:10s} seed {seed} epoch {ep + 1}: train {run_loss / steps_per_epoch:.4f}"
              f" test loss {te_loss:.4f} acc {te_acc:.4f} ({time.time() - t0:.0f}s)",
              flush=True)
    return {"curve": curve, "seconds": time.time() - t0, "audited_step": bool(audited)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backward", choices=pam.BACKWARD_MODES, default="approx")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    epochs = args.epochs or (2 if args.quick else 25)
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(2)
    train, test = data()
    results = {m: {} for m in MODES}
    for mode in MODES:
        for seed in range(seeds):
            results[mode][seed] = run(mode, seed, epochs, args.batch, args.backward, train,
                                      test)
    table = {}
    for mode in MODES:
        fin = [r["curve"][-1] for r in results[mode].values()]
        table[mode] = {k: (float(np.mean([f[k] for f in fin])), float(np.std([f[k] for f in fin])))
                       for k in ("train_loss", "test_loss", "test_acc")}
        table[mode]["seconds_per_run"] = float(np.mean([r["seconds"] for r in
                                                        results[mode].values()]))
    lines = ["| mode | final train loss | test loss | test acc | s/run |", "|---|---|---|---|---|"]
    for mode in MODES:
        t = table[mode]
        lines.append(f"| {mode} | {t['train_loss'][0]:.4f} ± {t['train_loss'][1]:.4f} | "
                     f"{t['test_loss'][0]:.4f} ± {t['test_loss'][1]:.4f} | "
                     f"{t['test_acc'][0]:.4f} ± {t['test_acc'][1]:.4f} | "
                     f"{t['seconds_per_run']:.0f} |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "parity.json"), "w") as f:
        json.dump({"task": "sklearn digits, 16 tokens of 2x2 pixels, 2-block transformer "
                           "d=32 h=2 mlp=64", "epochs": epochs, "seeds": seeds,
                   "batch": args.batch, "backward": args.backward,
                   "threads": torch.get_num_threads(), "table": table,
                   "table_markdown": lines, "runs": results}, f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(MODES, ("C0", "C1", "C2")))
    for mode in MODES:
        for seed, r in results[mode].items():
            ep = [c["epoch"] for c in r["curve"]]
            kw = dict(color=colors[mode], alpha=0.8, label=mode if seed == 0 else None)
            axes[0].plot(ep, [c["train_loss"] for c in r["curve"]], **kw)
            axes[1].plot(ep, [c["test_acc"] for c in r["curve"]], **kw)
    axes[0].set(xlabel="epoch", ylabel="train loss (label smoothing 0.1)")
    axes[1].set(xlabel="epoch", ylabel="test accuracy")
    axes[0].legend()
    fig.suptitle(f"digits transformer: float vs PAM matmuls vs multiplication-free "
                 f"({seeds} seeds, backward={args.backward})")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "parity.png"), dpi=110)


if __name__ == "__main__":
    main()
