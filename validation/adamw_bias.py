"""PAM AdamW update size against torch.optim.AdamW from identical gradients.

N independent parameters receive the same gradient sequence in both optimizers
(g_t = mu + noise, mu and the noise scale drawn per parameter, so gradients span several
binades and have a consistent sign for some parameters); weight decay 0. For each step t
the update ratio is sum |u_pam| / sum |u_torch| with u the parameter change of that step.
Reported: the ratio at steps 1, 10 and 100, the mean over steps 1-100, and the ratio of the
total displacement |p_100 - p_0|, for the paper-faithful variant (``moments="paper"``,
with and without offset 1.0552) and ``moments="unbiased"``, at betas (0.9, 0.999) and
(0.9, 0.98) (the bdia-pam default).

    python validation/adamw_bias.py [--n 4096] [--steps 100]

prints a table and writes validation/results/adamw_bias.json.
"""
import argparse
import json
import os

import torch

import pam

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = [("paper", None), ("paper", 1.0552), ("unbiased", None)]


def update_ratios(moments, offset, betas, n=4096, steps=100, lr=1e-3, seed=0):
    """Per-step ratios sum|u_pam| / sum|u_torch| and the displacement ratio."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g) * torch.exp2(torch.randint(-6, 2, (n,), generator=g).float())
    scale = torch.exp2(torch.randint(-8, 0, (n,), generator=g).float())
    p0 = torch.randn(n, generator=g)
    pp = p0.clone().requires_grad_()
    pt = p0.clone().requires_grad_()
    opp = pam.optim.AdamW([pp], lr=lr, betas=betas, weight_decay=0.0, offset=offset,
                          moments=moments)
    opt = torch.optim.AdamW([pt], lr=lr, betas=betas, weight_decay=0.0)
    ratios = []
    for _ in range(steps):
        grad = mu + scale * torch.randn(n, generator=g)
        before_p, before_t = pp.detach().clone(), pt.detach().clone()
        pp.grad, pt.grad = grad.clone(), grad.clone()
        opp.step()
        opt.step()
        up = (pp.detach() - before_p).abs().double().sum()
        ut = (pt.detach() - before_t).abs().double().sum()
        ratios.append(float(up / ut))
    disp = float((pp.detach() - p0).abs().double().sum() / (pt.detach() - p0).abs().double().sum())
    return ratios, disp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(RESULTS, "adamw_bias.json"))
    args = ap.parse_args(argv)
    rows = []
    for betas in ((0.9, 0.999), (0.9, 0.98)):
        for moments, offset in VARIANTS:
            r, disp = update_ratios(moments, offset, betas, args.n, args.steps)
            rows.append(dict(betas=betas, moments=moments, offset=offset, step1=r[0],
                             step10=r[9], step_last=r[-1], mean=sum(r) / len(r),
                             displacement=disp))
    print(f"{'betas':<12} {'moments':<9} {'offset':<7} {'t=1':>6} {'t=10':>6} "
          f"{'t=' + str(args.steps):>6} {'mean':>6} {'displ.':>6}")
    for r in rows:
        print(f"{str(r['betas']):<12} {r['moments']:<9} {str(r['offset']):<7} "
              f"{r['step1']:6.3f} {r['step10']:6.3f} {r['step_last']:6.3f} {r['mean']:6.3f} "
              f"{r['displacement']:6.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(rows=rows, n=args.n, steps=args.steps), fh, indent=1)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
