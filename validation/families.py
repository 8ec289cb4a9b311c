"""Arithmetic families x operand formats: product errors and training, side by side.

Families (``pam.families``): pam, pam_offset (Kosson & Jaggi's 1.0552), lmul (Luo & Sun's
formula) and float (torch's float32 arithmetic: the baseline); operand formats float32,
bfloat16, float16, e4m3, e5m2. Every combination is one ``pam.arithmetic(family=...,
operands=...)`` context around an unmodified model.

1. Product errors. Operand pairs with random signs, uniform mantissas and exponents
   uniform in [-4, 4] (normal in every format). For each family x format:
   * ``multiplier``: family(q(a), q(b)) / (q(a) q(b)) - 1, the error of the multiplier on
     the rounded operands q(.) (exact float64 reference);
   * ``total``: family(q(a), q(b)) / (a b) - 1, rounding included.
   Also L-Mul's integer-adder variant (PAM with offset 1 + 2^-l, what adding the bit
   patterns plus L-Mul's constant computes) against the paper's formula: the share of
   products where they differ and the largest gap.
2. Training. Two small models trained with ``torch.optim.AdamW`` for ``--steps`` steps,
   approximate backward, in two settings: ``inside`` -- the whole step (forward,
   backward, optimizer) inside the context, as a multiplication-free run does; ``outside``
   -- forward and backward inside, the optimizer step in float32 outside it (the model's
   arithmetic alone). For ``float`` the two settings are the same run.
   * ``digits_cnn``: a 2-layer CNN + linear head on the bundled sklearn digits (8x8);
   * ``text_lm``: a 1-block GPT-style byte LM (F.scaled_dot_product_attention, LayerNorm,
     GELU) on the bundled text (pydoc topics), context 32.
   Held-out loss (digits: the 20 % test split; text: fixed held-out windows) per family x
   format, mean +- std over seeds; float / float32 is the reference.

Usage:  python validation/families.py [--steps 150] [--seeds 3] [--n 1000000] [--quick]
Writes validation/results/families.json and validation/results/families.png.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import pam  # noqa: E402
from pam import families as FAM  # noqa: E402
from bdia_pam import data as D  # noqa: E402
from parity_models import NanoBlock  # noqa: E402  (the nanoGPT block of the parity runs)

FAMILIES = FAM.FAMILIES
FORMATS = tuple(FAM.FORMATS)
MODELS = ("digits_cnn", "text_lm")
EXP_RANGE = (-4, 4)
CTX = 32


# ----------------------------------------------------------------------------- errors
def operands(n, seed):
    """Two float32 tensors of random sign, uniform mantissa, exponent in EXP_RANGE."""
    g = np.random.default_rng(seed)

    def draw():
        e = g.integers(EXP_RANGE[0], EXP_RANGE[1] + 1, n)
        m = g.integers(0, 1 << 23, n)
        s = g.integers(0, 2, n)
        bits = (s << 31) | ((e + 127) << 23) | m
        return torch.from_numpy(bits.astype(np.uint32).view(np.int32).view(np.float32))
    return draw(), draw()


def _stats(err):
    return {"mean": float(err.mean()), "std": float(err.std()), "min": float(err.min()),
            "max": float(err.max()),
            "p1": float(np.percentile(err, 1)), "p99": float(np.percentile(err, 99))}


def product_errors(n, seed):
    a, b = operands(n, seed)
    exact = a.double() * b.double()
    rows = []
    for fmt in FORMATS:
        for fam in FAMILIES:
            m = FAM.resolve(fam, fmt)
            qa = FAM.round_to(a, fmt, m.flush).double() if fmt != "float32" else a.double()
            qb = FAM.round_to(b, fmt, m.flush).double() if fmt != "float32" else b.double()
            c = pam.mul(a, b, family=fam, operands=fmt).double()
            rows.append({"family": fam, "operands": fmt,
                         "multiplier": _stats((c / (qa * qb) - 1).numpy()),
                         "total": _stats((c / exact - 1).numpy())})
    return rows


def lmul_integer_adder(n, seed):
    """L-Mul's formula vs the integer adder (PAM with offset 1 + 2^-l), per format."""
    a, b = operands(n, seed + 1)
    out = []
    for fmt in FORMATS:
        ell = FAM.lmul_l(FAM.FORMATS[fmt].mant_bits)
        paper = pam.mul(a, b, family="lmul", operands=fmt).double()
        adder = pam.mul(a, b, family="pam_offset", offset=1.0 + 2.0 ** -ell,
                        operands=fmt).double()
        qa = FAM.round_to(a, fmt, True).double() if fmt != "float32" else a.double()
        qb = FAM.round_to(b, fmt, True).double() if fmt != "float32" else b.double()
        exact = qa * qb
        gap = (adder / paper - 1).numpy()
        out.append({"operands": fmt, "l": ell,
                    "differ_fraction": float((gap != 0).mean()),
                    "max_gap": float(np.abs(gap).max()),
                    "paper": _stats((paper / exact - 1).numpy()),
                    "integer_adder": _stats((adder / exact - 1).numpy())})
    return out


# ----------------------------------------------------------------------------- models
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.gelu(self.c1(x))
        x = F.gelu(self.c2(x))
        return self.head(x.flatten(1))


class TextLM(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(CTX, d)
        self.block = NanoBlock(d, h)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.block(x)))


def _digits_task(seed):
    data = D.load_digits()
    model = DigitsCNN()

    def batch(step, size):
        return D.vision_batch(data, step, size, seed)[:2]

    def loss(out, y):
        return F.cross_entropy(out, y)
    held = (data.test_x, data.test_y)
    return model, batch, loss, held


def _text_task(seed):
    data = D.load_text()
    model = TextLM()

    def batch(step, size):
        return D.text_batch(data, step, size, CTX, seed)[:2]

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    x, y = D.text_eval_windows(data, CTX, max_windows=64)
    return model, batch, loss, (x, y)


TASKS = {"digits_cnn": _digits_task, "text_lm": _text_task}


def train(model_name, family, fmt, seed, steps, batch, optimizer="inside"):
    torch.manual_seed(seed)
    model, make, loss_fn, held = TASKS[model_name](seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctx = pam.arithmetic(family=family, operands=fmt, backward="approx")
    curve = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = make(step, batch)
        with ctx:
            loss = loss_fn(model(x), y)
            loss.backward()
            if optimizer == "inside":
                opt.step()
        if optimizer == "outside":
            opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    wall = time.perf_counter() - t0
    with torch.no_grad(), ctx:
        hl = loss_fn(model(held[0]), held[1]).item()
    return {"model": model_name, "family": family, "operands": fmt, "seed": seed,
            "optimizer": optimizer, "steps": steps, "train_loss_final": statistics.fmean(curve[-10:]),
            "heldout_loss": hl, "wall_s": wall, "curve": curve[::5]}


def _settings(runs):
    return [o for o in ("inside", "outside") if any(r["optimizer"] == o for r in runs)]


def _matching(runs, model, fam, fmt, opt):
    """Runs of one cell; the float family's runs serve both optimizer settings."""
    return [r for r in runs if (r["model"], r["family"], r["operands"]) == (model, fam, fmt)
            and (r["optimizer"] == opt or fam == "float")]


def summarize(runs):
    rows = []
    for model, opt, fmt, fam in ((m, o, f, a) for m in MODELS for o in _settings(runs)
                                 for f in FORMATS for a in FAMILIES):
        rs = _matching(runs, model, fam, fmt, opt)
        if not rs:
            continue
        v = [r["heldout_loss"] for r in rs]
        t = [r["train_loss_final"] for r in rs]
        finite = all(np.isfinite(v))
        rows.append({"model": model, "family": fam, "operands": fmt, "optimizer": opt,
                     "seeds": len(rs),
                     "heldout_loss": [statistics.fmean(v),
                                      statistics.stdev(v) if len(v) > 1 and finite else 0.0],
                     "train_loss_final": statistics.fmean(t),
                     "wall_s": statistics.fmean(r["wall_s"] for r in rs)})
    return rows


# ----------------------------------------------------------------------------- output
def error_table(rows):
    lines = ["| operands | family | multiplier error mean | range | total error mean | range |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        m, t = r["multiplier"], r["total"]
        lines.append(f"| {r['operands']} | {r['family']} | {100 * m['mean']:+.3f} % | "
                     f"[{100 * m['min']:+.2f}, {100 * m['max']:+.2f}] % | "
                     f"{100 * t['mean']:+.3f} % | [{100 * t['min']:+.2f}, {100 * t['max']:+.2f}] % |")
    return "\n".join(lines)


def adder_table(rows):
    lines = ["| operands | l | paper mean | paper range | integer adder mean | adder range | "
             "products differing | largest gap |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, a = r["paper"], r["integer_adder"]
        lines.append(f"| {r['operands']} | {r['l']} | {100 * p['mean']:+.3f} % | "
                     f"[{100 * p['min']:+.2f}, {100 * p['max']:+.2f}] % | "
                     f"{100 * a['mean']:+.3f} % | [{100 * a['min']:+.2f}, {100 * a['max']:+.2f}] % | "
                     f"{100 * r['differ_fraction']:.1f} % | {100 * r['max_gap']:.2f} % |")
    return "\n".join(lines)


def training_table(rows):
    out = []
    for model, opt in ((m, o) for m in MODELS for o in ("inside", "outside")):
        mrows = [r for r in rows if r["model"] == model and r["optimizer"] == opt]
        if not mrows:
            continue
        out.append(f"\n{model}, optimizer {opt} the context: held-out loss, mean +- std "
                   f"over seeds\n")
        out.append("| operands | " + " | ".join(FAMILIES) + " |")
        out.append("|---|" + "---|" * len(FAMILIES))
        for fmt in FORMATS:
            cells = []
            for fam in FAMILIES:
                r = next((r for r in mrows if (r["family"], r["operands"]) == (fam, fmt)), None)
                cells.append("-" if r is None else
                             f"{r['heldout_loss'][0]:.3f} +- {r['heldout_loss'][1]:.3f}")
            out.append(f"| {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(errors, rows, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    width = 0.2
    for i, fam in enumerate(FAMILIES):
        rs = [r for r in errors if r["family"] == fam]
        x = np.arange(len(rs)) + (i - 1.5) * width
        mean = [100 * r["multiplier"]["mean"] for r in rs]
        lo = [100 * (r["multiplier"]["mean"] - r["multiplier"]["min"]) for r in rs]
        hi = [100 * (r["multiplier"]["max"] - r["multiplier"]["mean"]) for r in rs]
        ax.errorbar(x, mean, yerr=[lo, hi], fmt="o", capsize=3, label=fam)
    ax.set_xticks(range(len(FORMATS)), FORMATS)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("multiplier error, % (mean, range)")
    ax.legend(fontsize=8)
    for ax, model in zip(axes[1:], MODELS):
        for i, fam in enumerate(FAMILIES):
            rs = [r for r in rows if r["model"] == model and r["family"] == fam
                  and r["optimizer"] == "inside"]
            if not rs:
                continue
            x = np.arange(len(rs)) + (i - 1.5) * width
            ax.bar(x, [min(r["heldout_loss"][0], 10.0) for r in rs], width,
                   yerr=[r["heldout_loss"][1] for r in rs], label=fam)
        ax.set_xticks(range(len(FORMATS)), FORMATS)
        ax.set_title(f"{model}: held-out loss, optimizer inside (capped at 10)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="operand pairs for the errors")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--optimizer", choices=("inside", "outside", "both"), default="both")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="10k pairs, 3 steps, 1 seed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.steps, a.seeds = 10_000, 3, 1
    torch.set_num_threads(2)
    errors = product_errors(a.n, 0)
    adder = lmul_integer_adder(a.n, 0)
    print(error_table(errors))
    print()
    print(adder_table(adder))
    settings = ("inside", "outside") if a.optimizer == "both" else (a.optimizer,)
    runs = []
    for model in a.models:
        for seed in range(a.seeds):
            for fmt in FORMATS:
                for fam in FAMILIES:
                    for opt in settings if fam != "float" else settings[:1]:
                        r = train(model, fam, fmt, seed, a.steps, a.batch, opt)
                        print(f"{model:10s} {fam:10s} {fmt:8s} opt {opt:7s} seed {seed}: "
                              f"held-out {r['heldout_loss']:.3f}, train "
                              f"{r['train_loss_final']:.3f}, {r['wall_s']:.1f} s", flush=True)
                        runs.append(r)
    rows = summarize(runs)
    print(training_table(rows))
    os.makedirs(a.out, exist_ok=True)
    result = {"n": a.n, "exp_range": EXP_RANGE, "steps": a.steps, "seeds": a.seeds,
              "batch": a.batch, "optimizer": list(settings), "errors": errors, "lmul_integer_adder": adder,
              "training": rows, "runs": runs}
    with open(os.path.join(a.out, "families.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(errors, rows, os.path.join(a.out, "families.png"))
    return result


if __name__ == "__main__":
    main()
