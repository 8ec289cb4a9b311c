"""Error distributions of the piecewise-affine operations against exact arithmetic.

Measures PAM (mul), PAD (div), pa_exp2, pa_log2 and the ops built from them (exp, log,
sqrt, pow, matmul) against a float64 reference computed from the same float32 inputs,
with and without the offset 1.0552 for PAM and PAD, and compares with the figures of
/work/shared/BRIEF.md section 1. If a PAM functional module exists (``pam.nn.functional``,
or ``pam.functional``), its softmax / log_softmax / layer_norm / gelu / cross_entropy are
compared with torch's float32 versions; otherwise that part is skipped with a note.

Offsets:
* PAM with offset o: ``pam.mul(a, b, offset=o)`` = PAM(PAM(a, b), o), the constant folded
  into the integer addition.
* PAD with offset o: ``pam.div(a, b, offset=o)`` = PAD(PAD(a, b), o), i.e. the quotient is
  divided (piecewise-affinely) by the same constant o = 1.0552, folded into the integer
  subtraction. PAD overestimates (ratio in [1, 9/8]), so dividing by o lowers its mean; the
  script also reports, for both PAM and PAD, the offset that would make the mean exactly 0.

Sampling (seedable): operands are random float32 bit patterns with uniform 23-bit
mantissas, exponents uniform in [-30, 30] and random signs (positive only where the op
needs it). Relative error is ``pam / exact - 1``; for log2 and log (which cross zero) the
absolute error ``pam - exact`` is reported instead. Matmul errors are normalized by
sum_k |a_ik b_kj| (the natural scale of a dot product whose terms cancel).

Usage:  python validation/pam_error.py [--n 2000000] [--seed 0] [--quick] [--no-plot]
Writes validation/results/pam_error.json and validation/results/pam_error.png.
"""
import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pam  # noqa: E402

OFFSET = 1.0552
EXP_RANGE = (-30, 30)
PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
RESULTS = os.path.join(HERE, "results")

# Figures from BRIEF.md section 1 (and the pam.ops docstrings): what each row is checked
# against. ``check`` gets the stats dict and returns True when the measurement agrees.
BRIEF = {
    "mul": ("[8/9,1]: -11.1%..0, mean -3.85%",
            lambda s: s["min"] >= -1 / 9 - 1e-6 and s["max"] <= 0.0
            and abs(s["mean"] + 0.0385) < 0.0005),
    "mul_offset": ("mean ~-0.1%, -7.7%..+5.5%",
                   lambda s: abs(s["mean"] + 0.001) < 0.001 and abs(s["min"] + 0.077) < 0.002
                   and abs(s["max"] - 0.055) < 0.002),
    "div": ("[1,9/8]: 0..+12.5%",
            lambda s: s["min"] >= -1e-6 and s["max"] <= 0.125 + 1e-6),
    "div_offset": ("(not in brief)", None),
    "exp2": ("0..+6.1% (>= 2^y)",
             lambda s: s["min"] >= -1e-6 and abs(s["max"] - 0.061) < 0.001),
    "log2": ("abs -0.0861..0",
             lambda s: s["min"] >= -0.0861 - 1e-5 and s["max"] <= 1e-5),
}


# --------------------------------------------------------------------------- sampling
def random_floats(rng, n, exp_range=EXP_RANGE, signed=True):
    """float32 tensor: uniform mantissa bits, uniform integer exponent, random sign."""
    mant = rng.integers(0, 1 << 23, size=n, dtype=np.int64)
    expo = rng.integers(exp_range[0], exp_range[1] + 1, size=n, dtype=np.int64) + 127
    bits = (expo << 23) | mant
    if signed:
        bits |= rng.integers(0, 2, size=n, dtype=np.int64) << 31
    bits = bits.astype(np.uint32).view(np.int32)
    return torch.from_numpy(bits).view(torch.float32)


def uniform_floats(rng, n, lo, hi):
    return torch.from_numpy(rng.uniform(lo, hi, size=n).astype(np.float32))


def f64(t):
    return t.detach().numpy().astype(np.float64)


def mantissa(t):
    """Fractional mantissa M in [0, 1) of normal float32 values."""
    return (t.view(torch.int32).numpy() & 0x7FFFFF) / float(1 << 23)


# --------------------------------------------------------------------------- statistics
def stats(err, kind):
    err = np.asarray(err, dtype=np.float64)
    finite = np.isfinite(err)
    e = err[finite]
    out = {"kind": kind, "count": int(e.size), "nonfinite": int((~finite).sum()),
           "min": float(e.min()), "max": float(e.max()), "mean": float(e.mean()),
           "std": float(e.std()), "mean_abs": float(np.abs(e).mean())}
    out["percentiles"] = {str(p): float(v) for p, v in zip(PERCENTILES,
                                                           np.percentile(e, PERCENTILES))}
    return out


def zero_mean_offset(op, a, b, exact, lo=0.85, hi=1.2, iters=24):
    """Offset o for which mean(op(a, b, offset=o) / exact - 1) = 0 (bisection; the mean is
    increasing for PAM and decreasing for PAD in o)."""
    def mean(o):
        return float((f64(op(a, b, offset=o)) / exact - 1.0).mean())
    sign = 1.0 if mean(hi) > mean(lo) else -1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if sign * mean(mid) > 0:
            hi = mid
        else:
            lo = mid
    o = float(np.float32(0.5 * (lo + hi)))
    return {"offset": o, "mean_rel_err": mean(o)}


# --------------------------------------------------------------------------- measurements
def measure_core(n, rng):
    """Rows for the elementwise ops; returns (rows, raw errors for the plot, extras)."""
    rows, raw, extra = {}, {}, {}
    a = random_floats(rng, n)
    b = random_floats(rng, n)
    ab = f64(a) * f64(b)                       # exact: 24 + 24 bits < 53
    q = f64(a) / f64(b)

    for name, op, exact, off in (("mul", pam.mul, ab, None),
                                 ("mul_offset", pam.mul, ab, OFFSET),
                                 ("div", pam.div, q, None),
                                 ("div_offset", pam.div, q, OFFSET)):
        got = op(a, b, offset=off)
        err = f64(got) / exact - 1.0
        rows[name] = stats(err, "rel")
        rows[name]["domain"] = (f"a, b: uniform mantissa, exponent {list(EXP_RANGE)}, "
                                f"both signs" + (f"; offset {OFFSET}" if off else ""))
        raw[name] = err
        if name == "mul":
            i = int(np.argmin(err))
            extra["mul_worst_case"] = {"a": float(a[i]), "b": float(b[i]),
                                       "Ma": float(mantissa(a[i:i + 1])[0]),
                                       "Mb": float(mantissa(b[i:i + 1])[0]),
                                       "rel_err": float(err[i])}
            # the sign of the result: sign(a) xor sign(b), never wrong
            extra["mul_sign_errors"] = int((np.sign(f64(got)) != np.sign(ab)).sum())

    m = min(n, 200_000)
    extra["zero_mean_offset"] = {
        "mul": zero_mean_offset(pam.mul, a[:m], b[:m], ab[:m]),
        "div": zero_mean_offset(pam.div, a[:m], b[:m], q[:m]),
        "note": f"bisection on the first {m} pairs; offset rounded to float32",
    }

    y = uniform_floats(rng, n, -30.0, 30.0)
    err = f64(pam.exp2(y)) / np.exp2(f64(y)) - 1.0
    rows["exp2"] = stats(err, "rel")
    rows["exp2"]["domain"] = "y uniform in [-30, 30]"
    raw["exp2"] = err

    x = random_floats(rng, n, signed=False)
    err = f64(pam.log2(x)) - np.log2(f64(x))
    rows["log2"] = stats(err, "abs")
    rows["log2"]["domain"] = f"x > 0: uniform mantissa, exponent {list(EXP_RANGE)}"
    raw["log2"] = err

    err = f64(pam.log(x)) - np.log(f64(x))
    rows["log"] = stats(err, "abs")
    rows["log"]["domain"] = rows["log2"]["domain"]

    x = random_floats(rng, n, signed=False)
    err = f64(pam.sqrt(x)) / np.sqrt(f64(x)) - 1.0
    rows["sqrt"] = stats(err, "rel")
    rows["sqrt"]["domain"] = f"x > 0: uniform mantissa, exponent {list(EXP_RANGE)}"

    for lo, hi in ((-1.0, 1.0), (-10.0, 10.0)):
        x = uniform_floats(rng, n, lo, hi)
        err = f64(pam.exp(x)) / np.exp(f64(x)) - 1.0
        key = f"exp[{lo:g},{hi:g}]"
        rows[key] = stats(err, "rel")
        rows[key]["domain"] = f"x uniform in [{lo:g}, {hi:g}] (error grows with |x|)"

    a = random_floats(rng, n, exp_range=(-8, 8), signed=False)
    p = uniform_floats(rng, n, -3.0, 3.0)
    err = f64(pam.pow(a, p)) / np.power(f64(a), f64(p)) - 1.0
    rows["pow"] = stats(err, "rel")
    rows["pow"]["domain"] = "a > 0: uniform mantissa, exponent [-8, 8]; b uniform in [-3, 3]"
    return rows, raw, extra


def measure_matmul(n, rng):
    """PAM matmul of random normal matrices; error / sum_k |a_ik b_kj|."""
    rows = {}
    k = 256
    side = int(np.clip(np.sqrt(n / 64), 16, 256))    # about n/64 outputs
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    A = torch.randn(side, k, generator=g)
    B = torch.randn(k, side, generator=g)
    A64, B64 = A.double(), B.double()
    exact = (A64 @ B64).numpy()
    scale = (A64.abs() @ B64.abs()).numpy()
    for name, off in (("matmul", None), ("matmul_offset", OFFSET)):
        got = pam.matmul(A, B, offset=off).double().numpy()
        rows[name] = stats(((got - exact) / scale).ravel(), "rel|.|")
        rows[name]["domain"] = (f"({side} x {k}) @ ({k} x {side}) randn; error / sum|a b|"
                                + (f"; offset {OFFSET}" if off else ""))
    return rows


def find_functional():
    """The PAM functional module, or (None, reason)."""
    reasons = []
    for name in ("pam.nn.functional", "pam.functional"):
        try:
            return importlib.import_module(name), name
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
    return None, "; ".join(reasons)


def measure_functional(n, rng):
    """Composite ops of the PAM functional module against torch float32."""
    mod, name = find_functional()
    if mod is None:
        return {}, {"module": None, "skipped": f"not importable ({name})"}
    F = torch.nn.functional
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    rows_n = max(16, min(n // 8, 1 << 18) // 256)
    x = torch.randn(rows_n, 256, generator=g) * 3.0
    w = torch.randn(256, generator=g)
    bias = torch.randn(256, generator=g)
    target = torch.randint(0, 256, (rows_n,), generator=g)
    # (row name, function name, call on module, torch reference, error kind)
    cases = [
        ("softmax", "softmax", lambda f: f(x, dim=-1), F.softmax(x, dim=-1), "rel"),
        ("log_softmax", "log_softmax", lambda f: f(x, dim=-1), F.log_softmax(x, dim=-1),
         "abs"),
        ("layer_norm", "layer_norm", lambda f: f(x, (256,), w, bias, 1e-5),
         F.layer_norm(x, (256,), w, bias, 1e-5), "abs"),
        ("gelu", "gelu", lambda f: f(x), F.gelu(x), "abs"),
        ("silu", "silu", lambda f: f(x), F.silu(x), "abs"),
        ("cross_entropy", "cross_entropy", lambda f: f(x, target, reduction="none"),
         F.cross_entropy(x, target, reduction="none"), "rel"),
        ("cross_entropy_ls0.1", "cross_entropy",
         lambda f: f(x, target, reduction="none", label_smoothing=0.1),
         F.cross_entropy(x, target, reduction="none", label_smoothing=0.1), "rel"),
    ]
    rows, info = {}, {"module": name, "skipped": {}}
    for row, fname, call, ref, kind in cases:
        fn = getattr(mod, fname, None)
        if fn is None:
            info["skipped"][row] = f"{name}.{fname} not defined"
            continue
        try:
            with torch.no_grad():
                got = call(fn)
        except Exception as exc:  # unknown signature while the module is being written
            info["skipped"][row] = f"call failed: {type(exc).__name__}: {exc}"[:300]
            continue
        got = f64(got.reshape(ref.shape))
        ref64 = f64(ref)
        err = got / ref64 - 1.0 if kind == "rel" else got - ref64
        rows[row] = stats(err, kind)
        rows[row]["domain"] = (f"x = 3 randn({rows_n}, 256), vs torch.nn.functional float32"
                               f" ({name}.{fname})")
    return rows, info


# --------------------------------------------------------------------------- output
def fmt(v, kind):
    return f"{100 * v:+9.4f}%" if kind.startswith("rel") else f"{v:+10.5f}"


def table(rows):
    """Aligned text table; also stores each row's brief figure and agreement in ``rows``."""
    head = (f"{'op':<22}{'err':<7}{'min':>11}{'p1':>11}{'mean':>11}{'std':>11}"
            f"{'p99':>11}{'max':>11}   {'brief':<34}{'agrees':<6}")
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        k = s["kind"]
        ref, check = BRIEF.get(name, ("", None))
        agrees = "" if check is None else ("yes" if check(s) else "NO")
        lines.append(f"{name:<22}{k:<7}{fmt(s['min'], k):>11}"
                     f"{fmt(s['percentiles']['1'], k):>11}{fmt(s['mean'], k):>11}"
                     f"{fmt(s['std'], k).replace('+', ' '):>11}"
                     f"{fmt(s['percentiles']['99'], k):>11}{fmt(s['max'], k):>11}   "
                     f"{ref:<34}{agrees:<6}")
        s["brief"] = ref or None
        s["agrees_with_brief"] = None if check is None else bool(check(s))
    return "\n".join(lines)


def plot(raw, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("mul", "PAM  rel. error (%)", 100), ("mul_offset", f"PAM, offset {OFFSET}  (%)", 100),
              ("div", "PAD  rel. error (%)", 100), ("div_offset", f"PAD, offset {OFFSET}  (%)", 100),
              ("exp2", "pa_exp2  rel. error (%)", 100), ("log2", "pa_log2  abs. error", 1)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, title, scale) in zip(axes.ravel(), panels):
        e = raw[key][np.isfinite(raw[key])] * scale
        ax.hist(e, bins=200, color="tab:blue", alpha=0.85)
        ax.axvline(e.mean(), color="tab:red", lw=1, label=f"mean {e.mean():+.3f}")
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_yticks([])
    fig.suptitle(f"piecewise-affine float32 ops vs float64 ({raw['mul'].size:,} samples each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2_000_000, help="samples per op (default 2M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="200k samples (overrides --n)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=RESULTS, help="output folder")
    args = p.parse_args(argv)
    n = 200_000 if args.quick else args.n
    if n < 1000:
        p.error(f"--n must be at least 1000, got {n}")
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    rows, raw, extra = measure_core(n, rng)
    rows.update(measure_matmul(n, rng))
    frows, finfo = measure_functional(n, rng)
    rows.update(frows)

    print(f"pam error vs float64 reference: n = {n:,} per op, seed {args.seed}; "
          f"rel = pam/exact - 1 (in %), abs = pam - exact")
    print(table(rows))
    w = extra["mul_worst_case"]
    print(f"\nPAM worst case: Ma = {w['Ma']:.4f}, Mb = {w['Mb']:.4f}, "
          f"error {100 * w['rel_err']:+.4f}% (8/9 - 1 = {100 * (8 / 9 - 1):+.4f}%); "
          f"sign errors: {extra['mul_sign_errors']}")
    z = extra["zero_mean_offset"]
    print(f"zero-mean offset: PAM {z['mul']['offset']:.5f}, PAD {z['div']['offset']:.5f} "
          f"(used: {OFFSET} for both; PAD divides by it)")
    if finfo["module"] is None:
        print(f"composite functional ops: skipped ({finfo['skipped']})")
    else:
        print(f"composite functional ops from {finfo['module']}"
              + (f"; skipped: {finfo['skipped']}" if finfo["skipped"] else ""))

    os.makedirs(args.out, exist_ok=True)
    result = {
        "description": "error of piecewise-affine float32 ops vs float64 exact arithmetic",
        "n": n, "seed": args.seed, "offset": OFFSET,
        "offset_note": ("PAM offset: PAM(PAM(a,b), o); PAD offset: PAD(PAD(a,b), o), i.e. "
                        "divided by the same constant; both folded into the integer constant"),
        "error_definitions": {"rel": "pam / exact - 1", "abs": "pam - exact",
                              "rel|.|": "(pam - exact) / sum_k |a_ik b_kj|"},
        "percentiles": list(PERCENTILES),
        "ops": rows, **extra, "functional": finfo,
        "environment": {"torch": torch.__version__, "numpy": np.__version__,
                        "python": platform.python_version(), "git_commit": git_commit()},
    }
    path = os.path.join(args.out, "pam_error.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {path}")
    if not args.no_plot:
        png = os.path.join(args.out, "pam_error.png")
        plot(raw, png)
        print(f"wrote {png}")
    print(f"elapsed {time.time() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
