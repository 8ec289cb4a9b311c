"""Training-step cost: PAM vs float on the same model, same machine, one process.

Models (each run in float with ``torch.optim.AdamW`` and in PAM):

* ``bdia_default``: the default ``bdia-pam train`` model (digits ViT, reversible, depth 4,
  width 64, relu, batch 128; ``arithmetic="pam"`` with ``pam.optim.AdamW``).
* ``gpt_small``: a plain torch GPT (6 layers, width 128, 4 heads, sequence 64, batch 16,
  GELU MLP of width 4x, tied head off), made PAM with ``pam.convert`` +
  ``pam.nn.functional.cross_entropy`` + ``pam.optim.AdamW``.
* ``gpt_wide``: the same GPT with width 256 and depth 8.
* ``gpt_small_mode``: the small GPT left as it is (``torch.nn`` layers,
  ``F.cross_entropy``, ``torch.optim.AdamW``) with every phase of its step run under
  ``pam.arithmetic()``: the op-level path a Hugging Face model takes.

Float and PAM steps are interleaved (float, PAM, float, PAM, ...) after warm-up steps that
absorb JIT compilation, so both see the same machine state; each phase (forward with the
loss, backward, optimizer step with zero_grad) is timed separately and the median over the
measured steps is reported. Kernel launches per PAM step count the calls to
``pam.dispatch``'s launch functions (every PAM kernel goes through them). The launch overhead is the
median time of one ``pam.mul`` of two 1-element tensors (forward only, no autograd), the
raw ``pam.dispatch.launch`` of the 1-element ``mul`` kernel, and ``torch.mul`` for scale;
then ``pam.mul`` of 16 elements (no grad, and with an input that requires grad: through
autograd) and ``pam.matmul`` of two 8x8 matrices (no grad).

Threads. Each side runs in its best configuration, under OpenMP's default wait policy
(this script does not set ``OMP_WAIT_POLICY``): the float step with ``--threads`` torch
threads; the PAM step with ``--threads`` kernel threads (``numba.set_num_threads``, see
pam.kernels.threads) and ``--pam-torch-threads`` torch threads (default 1) for its glue
ops, so that torch's OpenMP threads, which spin-wait after each parallel op under the
default policy, never compete with the kernel threads. (Under ``OMP_WAIT_POLICY=passive``,
which ``import pam`` sets when it loads before torch, the PAM step is as fast with 2 torch
threads, but torch's own ops wake their threads for every parallel op and the float step is
slower: 50.7 instead of 32.5 ms for bdia_default, 96 instead of 89 ms for gpt_small;
tables before 2026-11-25 compared with that slower float step. ``--passive`` reproduces
that configuration.) pam's worker threads spin for a while after each kernel, waiting for
the next; before each float step ``pam.kernels.threads.park()`` stops them, so the float
step has both cores.

The GPT models' PAM side is also run compiled (``pam.compile(model, backend="inductor",
fullgraph=True)``: a copy with the same weights and its own optimizer, interleaved with the
others); reported: its step time against the eager PAM and the float step, the first
compiled step (compilation included) and whether that step's loss has the eager bits.

    python validation/bench_step.py [--steps 4] [--warmup 2] [--threads 2] [--models ...]
                                    [--no-compile] [--cpu-time]

prints a table and writes validation/results/bench_step.json. ``--cpu-time`` runs both
sides on one thread and times each phase by the process's CPU time: the work of a step,
which a busy shared machine changes far less than the 2-thread wall time (whose float
side, OpenMP threads spinning, suffers most when the host is loaded); it writes
validation/results/bench_step_cpu.json.
"""
import argparse
import contextlib
import copy
import inspect
import json
import os
import platform
import statistics
import sys
import time

if "--passive" in sys.argv[1:]:          # read by OpenMP when torch loads: set it first
    os.environ["OMP_WAIT_POLICY"] = "passive"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pam  # noqa: E402
import pam.dispatch  # noqa: E402
import pam.kernels.threads  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- models
class GPTBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small pre-norm GPT written with plain torch.nn layers (what pam.convert takes)."""

    def __init__(self, vocab=256, context=64, width=128, depth=6, heads=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, context, width))
        self.blocks = nn.ModuleList(GPTBlock(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos[:, :T]
        for b in self.blocks:
            x = b(x, self.mask[:T, :T])
        return self.head(self.ln(x))


def _gpt_pair(width, depth, batch=16, context=64, heads=4, seed=0):
    torch.manual_seed(seed)
    fmodel = GPT(context=context, width=width, depth=depth, heads=heads)
    pmodel = GPT(context=context, width=width, depth=depth, heads=heads)
    pmodel.load_state_dict(fmodel.state_dict())
    pam.convert(pmodel)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, context), generator=g)
    y = torch.randint(0, 256, (batch, context), generator=g)

    def floss(m):
        return F.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1))

    def ploss(m):
        return pam.nn.functional.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1))

    fopt = torch.optim.AdamW(fmodel.parameters(), lr=1e-3)
    popt = pam.optim.AdamW(pmodel.parameters(), lr=1e-3)
    return (fmodel, floss, fopt), (pmodel, ploss, popt)


def _gpt_mode_pair(width=128, depth=6, batch=16, context=64, heads=4, seed=0):
    """The small GPT twice, unconverted: float, and the same model whose step phases run
    under ``pam.arithmetic()`` (the fourth element of a side: the context of its phases)."""
    torch.manual_seed(seed)
    fmodel = GPT(context=context, width=width, depth=depth, heads=heads)
    pmodel = GPT(context=context, width=width, depth=depth, heads=heads)
    pmodel.load_state_dict(fmodel.state_dict())
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, context), generator=g)
    y = torch.randint(0, 256, (batch, context), generator=g)

    def loss(m):
        return F.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1))

    return ((fmodel, loss, torch.optim.AdamW(fmodel.parameters(), lr=1e-3)),
            (pmodel, loss, torch.optim.AdamW(pmodel.parameters(), lr=1e-3), pam.arithmetic))


def _bdia_pair(seed=0):
    from bdia_pam.cli import MODEL_DEFAULTS, TASK_MODEL_DEFAULTS
    from bdia_pam.model import BDIAConfig, BDIATransformer
    from bdia_pam.train import TrainConfig, make_optimizer

    cfg = dict(MODEL_DEFAULTS, **TASK_MODEL_DEFAULTS["digits"])
    tc = TrainConfig()
    sides = []
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(seed + 1))
    state = None
    for arith in ("float", "pam"):
        torch.manual_seed(seed)
        model = BDIATransformer(BDIAConfig(kind="vit", **dict(cfg, arithmetic=arith)))
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        gen = torch.Generator().manual_seed(seed)

        def loss_fn(m, gen=gen):
            return m.loss(m(x, generator=gen), y)

        sides.append((model, loss_fn, make_optimizer(model, tc)))
    return sides[0], sides[1]


MODELS = {
    "bdia_default": ("bdia-pam train default (ViT digits, d4 w64, batch 128)", _bdia_pair),
    "gpt_small": ("GPT 6 layers, width 128, 4 heads, seq 64, batch 16",
                  lambda: _gpt_pair(128, 6)),
    "gpt_wide": ("GPT 8 layers, width 256, 4 heads, seq 64, batch 16",
                 lambda: _gpt_pair(256, 8)),
    "gpt_small_mode": ("the small GPT unconverted, its step under pam.arithmetic()",
                       _gpt_mode_pair),
}


# Models whose PAM side is also timed compiled. The default bdia model is not: its
# reversible stack recomputes activations in a custom autograd Function that draws its
# gamma signs and dropout from a generator in Python, which Dynamo does not trace.
COMPILED = ("gpt_small", "gpt_wide")


# --------------------------------------------------------------------------- timing
class LaunchCounter:
    """Counts kernel launches while entered (``pam.dispatch.recording_launches``: every
    launch path of pam.dispatch)."""

    def __enter__(self):
        self._rec = pam.dispatch.recording_launches()
        self._names = self._rec.__enter__()
        return self

    @property
    def count(self):
        return len(self._names)

    def __exit__(self, *exc):
        self._rec.__exit__(*exc)


# The clock of the step phases: wall time, or with --cpu-time the process's CPU time
# (on one thread: the work of a step, which other jobs on a shared machine barely move).
CLOCK = time.perf_counter


def _timed_step(model, loss_fn, opt, context=contextlib.nullcontext, last_loss=None):
    t0 = CLOCK()
    with context():
        loss = loss_fn(model)
    t1 = CLOCK()
    with context():
        loss.backward()
    t2 = CLOCK()
    with context():
        opt.step()
        opt.zero_grad(set_to_none=True)
    t3 = CLOCK()
    if last_loss is not None:
        last_loss[:] = [loss.detach()]
    return t1 - t0, t2 - t1, t3 - t2


def _compiled_side(pside):
    """A copy of the PAM side (same weights, a fresh optimizer with the same settings) whose
    model is ``pam.compile(..., backend="inductor", fullgraph=True)``: Inductor with ATen's
    float32 sums, the eager bits."""
    model, loss_fn, opt = pside
    twin = copy.deepcopy(model)
    accepted = inspect.signature(type(opt)).parameters
    settings = {k: v for k, v in opt.defaults.items() if k in accepted}
    return twin, pam.compile(twin, backend="inductor", fullgraph=True), loss_fn, \
        type(opt)(twin.parameters(), **settings)


def _same_bits(a, b):
    return bool(torch.equal(a.view(torch.int32), b.view(torch.int32)))


def bench_model(name, steps, warmup, compiled=True, threads=2, pam_torch_threads=1):
    """One model's row: float steps on ``threads`` torch threads, PAM (and compiled PAM)
    steps on ``pam_torch_threads`` torch threads, interleaved."""
    label, make = MODELS[name]
    fside, pside = make()
    compiled = compiled and name in COMPILED
    cside = None
    if compiled:
        _, cmodel, closs, copt = _compiled_side(pside)
        cside = (cmodel, closs, copt)

    def run(side, **kw):
        if side is fside:
            pam.kernels.threads.park()     # pam's workers stop spinning: both cores free
        torch.set_num_threads(threads if side is fside else pam_torch_threads)
        return _timed_step(*side, **kw)
    first = {}
    for i in range(warmup):
        run(fside)
        pl, cl = [], []
        run(pside, last_loss=pl)
        if cside is not None:
            t0 = time.perf_counter()
            run(cside, last_loss=cl)
            if i == 0:
                first = dict(compiled_first_step_s=time.perf_counter() - t0,
                             compiled_same_loss_bits=_same_bits(pl[0], cl[0]))
    ftimes, ptimes, ctimes = [], [], []
    for _ in range(steps):
        ftimes.append(run(fside))
        ptimes.append(run(pside))
        if cside is not None:
            ctimes.append(run(cside))
    with LaunchCounter() as lc:
        run(pside)
    f = [statistics.median(t[i] for t in ftimes) for i in range(3)]
    p = [statistics.median(t[i] for t in ptimes) for i in range(3)]
    fstep = statistics.median(sum(t) for t in ftimes)
    pstep = statistics.median(sum(t) for t in ptimes)
    if ctimes:
        cstep = statistics.median(sum(t) for t in ctimes)
        first.update(compiled_step_s=cstep, compiled_ratio=cstep / fstep,
                     compiled_vs_eager=cstep / pstep)
    return dict(model=name, label=label, **first,
                parameters=sum(q.numel() for q in fside[0].parameters()),
                param_tensors=sum(1 for _ in fside[0].parameters()),
                float_step_s=fstep, pam_step_s=pstep, ratio=pstep / fstep,
                float_fwd_s=f[0], float_bwd_s=f[1], float_opt_s=f[2],
                pam_fwd_s=p[0], pam_bwd_s=p[1], pam_opt_s=p[2],
                fwd_ratio=p[0] / f[0], bwd_ratio=p[1] / f[1], opt_ratio=p[2] / f[2],
                launches_per_step=lc.count)


def _median_call(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_launch(n=2000):
    a = torch.tensor([1.5])
    b = torch.tensor([2.5])
    ab, bb = a.view(torch.int32).numpy(), b.view(torch.int32).numpy()
    out = torch.empty(1, dtype=torch.int32).numpy()
    a16, b16 = torch.randn(16), torch.randn(16)
    m8, n8 = torch.randn(8, 8), torch.randn(8, 8)
    a16g = a16.clone().requires_grad_()
    pam.matmul(m8, n8)
    extra = dict(pam_mul16_grad_us=1e6 * _median_call(lambda: pam.mul(a16g, b16), n))
    with torch.no_grad():
        pam.mul(a, b)
        pam.mul(a, 3.0)
        return dict(pam_mul_us=1e6 * _median_call(lambda: pam.mul(a, b), n),
                    pam_mul16_us=1e6 * _median_call(lambda: pam.mul(a16, b16), n),
                    pam_matmul8_us=1e6 * _median_call(lambda: pam.matmul(m8, n8), n),
                    **extra,
                    pam_mul_scalar_us=1e6 * _median_call(lambda: pam.mul(a, 3.0), n),
                    raw_launch_us=1e6 * _median_call(
                        lambda: pam.dispatch.launch("mul", a.device, ab, bb, 0, out), n),
                    torch_mul_us=1e6 * _median_call(lambda: torch.mul(a, b), n))


# --------------------------------------------------------------------------- report
def _ms(x):
    return f"{1e3 * x:8.1f}"


def print_compiled(rows):
    rows = [r for r in rows if "compiled_step_s" in r]
    if not rows:
        return
    print("PAM model compiled (pam.compile, inductor, fullgraph) vs eager PAM:")
    for r in rows:
        print(f"  {r['model']:<15} eager {_ms(r['pam_step_s']).strip()} ms, compiled "
              f"{_ms(r['compiled_step_s']).strip()} ms ({r['compiled_vs_eager']:.2f}x eager, "
              f"{r['compiled_ratio']:.2f}x float), first compiled step "
              f"{r['compiled_first_step_s']:.1f} s, same loss bits as eager: "
              f"{r['compiled_same_loss_bits']}")


def print_table(rows, launch):
    head = (f"{'model':<15} {'float ms':>8} {'PAM ms':>8} {'ratio':>6} | "
            f"{'fwd f/P ms':>15} {'bwd f/P ms':>15} {'opt f/P ms':>15} | "
            f"{'fwd x':>5} {'bwd x':>5} {'opt x':>5} | {'launch/step':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<15} {_ms(r['float_step_s'])} {_ms(r['pam_step_s'])} "
              f"{r['ratio']:6.2f} | {_ms(r['float_fwd_s'])}/{_ms(r['pam_fwd_s']).strip():<6} "
              f"{_ms(r['float_bwd_s'])}/{_ms(r['pam_bwd_s']).strip():<6} "
              f"{_ms(r['float_opt_s'])}/{_ms(r['pam_opt_s']).strip():<6} | "
              f"{r['fwd_ratio']:5.1f} {r['bwd_ratio']:5.1f} {r['opt_ratio']:5.1f} | "
              f"{r['launches_per_step']:11d}")
    print(f"launch overhead (1-element operands, median): pam.mul {launch['pam_mul_us']:.1f} us, "
          f"pam.mul(x, 3.0) {launch['pam_mul_scalar_us']:.1f} us, raw dispatch.launch "
          f"{launch['raw_launch_us']:.1f} us, torch.mul {launch['torch_mul_us']:.1f} us")
    if "pam_matmul8_us" in launch:
        print(f"small ops (median): pam.mul of 16 elements {launch['pam_mul16_us']:.1f} us "
              f"(no grad) / {launch['pam_mul16_grad_us']:.1f} us (input requires grad), "
              f"pam.matmul 8x8 {launch['pam_matmul8_us']:.1f} us")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="measured steps per side [4]")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side [2]")
    ap.add_argument("--threads", type=int, default=2, help="torch and Numba threads [2]")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled PAM column (models: " + ", ".join(COMPILED) + ")")
    ap.add_argument("--pam-torch-threads", type=int, default=1,
                    help="torch threads of the PAM steps (their glue ops) [1]")
    ap.add_argument("--passive", action="store_true",
                    help="run under OMP_WAIT_POLICY=passive (the earlier tables' setting)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread everywhere, steps timed by the process's CPU time: the "
                         "work per step, steady on a shared machine (writes "
                         "results/bench_step_cpu.json unless --out is given)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
        args.threads = args.pam_torch_threads = 1
    if args.out is None:
        args.out = os.path.join(RESULTS, "bench_step_cpu.json" if args.cpu_time
                                else "bench_step.json")
    if args.warmup < 1 and not args.no_compile:
        ap.error("--warmup must be at least 1 (the first compiled step compiles); or "
                 "pass --no-compile")
    import numba
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    pam_torch = args.threads if args.passive else args.pam_torch_threads
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args.steps, args.warmup, not args.no_compile,
                                args.threads, pam_torch))
        print(f"  {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    torch.set_num_threads(pam_torch)
    launch = bench_launch()
    print(f"OpenMP wait policy: {os.environ.get('OMP_WAIT_POLICY', 'default')}; float steps on "
          f"{args.threads} torch threads; PAM steps on {args.threads} kernel threads and "
          f"{pam_torch} torch thread(s); "
          + ("process CPU time per step" if args.cpu_time else "wall time per step"))
    print_table(rows, launch)
    print_compiled(rows)
    result = dict(rows=rows, launch=launch, steps=args.steps, warmup=args.warmup,
                  threads=args.threads, pam_torch_threads=pam_torch,
                  clock="process CPU time" if args.cpu_time else "wall time",
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
                  wall_s=time.perf_counter() - t0,
                  machine=dict(platform=platform.platform(), processor=platform.processor(),
                               cpus=os.cpu_count(), torch=torch.__version__,
                               numba=numba.__version__,
                               threading_layer=numba.config.THREADING_LAYER))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
