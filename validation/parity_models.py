"""Parity on real model families: float vs ``pam.arithmetic()``, models unmodified.

Each family is built the way its library's users build it and trained on a small
synthetic task in float32, then the same (same seed, same batches) inside
``pam.arithmetic()`` (approximate backward, the paper's choice, unless --backward exact)
with ``torch.optim.AdamW``. The first PAM step of every run is checked with
``pam.audit.no_float_multiply()`` ("audit" column).

Families and tasks:
  encoder_post / encoder_pre  nn.TransformerEncoder (post-/pre-norm), mean-pooled linear
                              head; classify x ~ N(0, 1) (B, 8, 32) by the argmax of a fixed
                              random linear teacher of the mean token (4 classes)
  hf_gpt2 / nanogpt_sdpa      causal LM (Hugging Face GPT-2; a nanoGPT-style model calling
                              F.scaled_dot_product_attention) on arithmetic sequences
                              t_{i+1} = t_i + s mod 16, random start and stride s in {1,2,3}
  hf_bert                     BertForSequenceClassification: label = first token mod 3
  vit_conv                    a ViT with a Conv2d patch embedding (4x4 patches of 3x16x16
                              images): which quadrant is brightest

Writes validation/results/parity_models.json and .png. Default 3 seeds x 60 steps
(about 10 minutes on an idle 2-core machine); --quick: 1 seed, 4 steps, two families;
--families F... --merge reruns some families and keeps the others' saved runs.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pam  # noqa: E402
from pam.audit import FloatMultiplyError, no_float_multiply  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB, CTX = 16, 16


# ----------------------------------------------------------------------------- tasks
def seq_task(g, n):
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(CTX)) % VOCAB


def vec_task(g, n, teacher):
    x = torch.randn(n, 8, 32, generator=g)
    return x, (x.mean(dim=1) @ teacher).argmax(dim=1)


def image_task(g, n):
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 0.5
    return x, y


# ----------------------------------------------------------------------------- models
class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    def __init__(self, d=32, h=4, layers=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(CTX, d)
        self.blocks = nn.Sequential(*[NanoBlock(d, h) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.blocks(x)))


class ViT(nn.Module):
    def __init__(self, d=32, classes=4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.enc(x).mean(dim=1))


class Pooled(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def family(name, seed):
    """(model, batch(g, n) -> inputs, loss(model, inputs) -> (loss, accuracy))."""
    torch.manual_seed(seed)
    if name.startswith("encoder"):
        model = Pooled(name == "encoder_pre")
        teacher = torch.randn(32, 4, generator=torch.Generator().manual_seed(99))

        def loss(m, b):
            logits = m(b[0])
            return F.cross_entropy(logits, b[1]), (logits.argmax(1) == b[1]).float().mean()
        return model, lambda g, n: vec_task(g, n, teacher), loss
    if name == "vit_conv":
        def loss(m, b):
            logits = m(b[0])
            return F.cross_entropy(logits, b[1]), (logits.argmax(1) == b[1]).float().mean()
        return ViT(), image_task, loss
    if name == "hf_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                           n_positions=CTX, bos_token_id=0, eos_token_id=0))

        def loss(m, ids):
            logits = m(ids).logits
            acc = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
            return lm_loss(logits, ids), acc
        return model, seq_task, loss
    if name == "nanogpt_sdpa":
        def loss(m, ids):
            logits = m(ids)
            acc = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
            return lm_loss(logits, ids), acc
        return NanoGPT(), seq_task, loss
    if name == "hf_bert":
        from transformers import BertConfig, BertForSequenceClassification
        model = BertForSequenceClassification(BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=CTX, num_labels=3))

        def loss(m, ids):
            labels = ids[:, 0] % 3
            logits = m(ids).logits
            return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()
        return model, seq_task, loss
    raise ValueError(name)


FAMILIES = ("encoder_post", "encoder_pre", "hf_gpt2", "hf_bert", "nanogpt_sdpa", "vit_conv")


# ----------------------------------------------------------------------------- runs
def run(name, seed, arithmetic, steps, batch, backward):
    model, make, loss_fn = family(name, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1000 + seed)
    held = make(torch.Generator().manual_seed(7), 256)
    curve, audit = [], None
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        b = make(g, batch)
        if arithmetic == "float":
            loss, _ = loss_fn(model, b)
            loss.backward()
            opt.step()
        else:
            ctx = no_float_multiply() if step == 0 else _Null()
            try:
                with ctx, pam.arithmetic(**_mode(arithmetic, backward)):
                    loss, _ = loss_fn(model, b)
                    loss.backward()
                    opt.step()
                audit = audit or ("pass" if step == 0 else audit)
            except FloatMultiplyError as e:
                audit = f"FAIL: {e}"
                raise
        opt.zero_grad()
        curve.append(loss.item())
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        if arithmetic == "float":
            hl, ha = loss_fn(model, held)
        else:
            with pam.arithmetic(**_mode(arithmetic, backward)):
                hl, ha = loss_fn(model, held)
    return {"family": name, "arithmetic": arithmetic, "seed": seed, "steps": steps,
            "train_loss_first": curve[0], "train_loss_final": statistics.fmean(curve[-5:]),
            "heldout_loss": hl.item(), "heldout_accuracy": ha.item(), "wall_s": wall,
            "audit": audit if arithmetic != "float" else None, "curve": curve}


ARITHMETICS = ("float", "pam", "pam_paper")


def _mode(arithmetic, backward):
    """pam.arithmetic's arguments for "pam" (the default: torch.optim.AdamW's fused step
    with moments unbiased in expectation) and "pam_paper" (``moments="paper"``)."""
    return {"backward": backward,
            "moments": "paper" if arithmetic == "pam_paper" else "unbiased"}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def summarize(runs):
    rows = []
    keys = sorted({(r["family"], r["arithmetic"]) for r in runs},
                  key=lambda k: (FAMILIES.index(k[0]), k[1]))
    for fam, ar in keys:
        rs = [r for r in runs if r["family"] == fam and r["arithmetic"] == ar]

        def ms(key):
            v = [r[key] for r in rs]
            return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
        rows.append({"family": fam, "arithmetic": ar, "seeds": len(rs),
                     "train_loss_first": ms("train_loss_first"),
                     "train_loss_final": ms("train_loss_final"),
                     "heldout_loss": ms("heldout_loss"),
                     "heldout_accuracy": ms("heldout_accuracy"),
                     "wall_s": ms("wall_s"),
                     "audit": ("pass" if all(r["audit"] == "pass" for r in rs) else "FAIL")
                     if ar != "float" else "-"})
    return rows


def table(rows):
    lines = ["| family | arithmetic | first loss | final train loss | held-out loss | "
             "held-out acc | s/run | audit |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, p=3: f"{r[k][0]:.{p}f} +- {r[k][1]:.{p}f}"  # noqa: E731
        lines.append(f"| {r['family']} | {r['arithmetic']} | {f('train_loss_first')} | "
                     f"{f('train_loss_final')} | {f('heldout_loss')} | "
                     f"{100 * r['heldout_accuracy'][0]:.1f} +- "
                     f"{100 * r['heldout_accuracy'][1]:.1f} % | {r['wall_s'][0]:.1f} | "
                     f"{r['audit']} |")
    return "\n".join(lines)


def plot(runs, path):
    fams = [f for f in FAMILIES if any(r["family"] == f for r in runs)]
    fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams), 3), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for r in runs:
            if r["family"] == fam:
                ax.plot(r["curve"], color={"float": "C0", "pam": "C3"}.get(r["arithmetic"], "C2"),
                        alpha=0.6, label=r["arithmetic"] if r["seed"] == 0 else None)
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("train loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 steps, two families")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--backward", choices=pam.BACKWARD_MODES, default="approx")
    ap.add_argument("--arithmetics", nargs="+", choices=ARITHMETICS, default=list(ARITHMETICS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs of other families already in OUT/parity_models.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.seeds, a.families = 4, 1, ["encoder_pre", "nanogpt_sdpa"]
    torch.set_num_threads(2)
    runs = []
    for fam in a.families:
        for seed in range(a.seeds):
            for ar in a.arithmetics:
                r = run(fam, seed, ar, a.steps, a.batch, a.backward)
                print(f"{fam:13s} {ar:12s} seed {seed}: loss {r['train_loss_first']:.3f} -> "
                      f"{r['train_loss_final']:.3f}, held-out {r['heldout_loss']:.3f} / "
                      f"{100 * r['heldout_accuracy']:.1f} %, {r['wall_s']:.1f} s", flush=True)
                runs.append(r)
    path = os.path.join(a.out, "parity_models.json")
    if a.merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["runs"]
        runs = [r for r in old if r["family"] not in a.families] + runs
    rows = summarize(runs)
    print(table(rows))
    os.makedirs(a.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"steps": a.steps, "batch": a.batch, "backward": a.backward,
                   "rows": rows, "runs": runs}, f, indent=1)
    plot(runs, os.path.join(a.out, "parity_models.png"))
    return rows


if __name__ == "__main__":
    main()
