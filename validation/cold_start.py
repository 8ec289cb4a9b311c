"""Cold start: JIT compilation time of the first ``bdia-pam train`` on an empty Numba cache.

Runs ``bdia-pam train --steps 1`` (the default digits model, PAM arithmetic) in a fresh
process whose ``NUMBA_CACHE_DIR`` is a new empty directory, so every cached kernel is
compiled as on a fresh install, and records every Numba compilation through Numba's event
API (``numba:compile`` events): per dispatcher, the inclusive time (with the callees it
compiled) and the exclusive time (its own typing, lowering and LLVM work), both as process
CPU time (the compiler runs in the calling thread while the others idle, so the figures
hold on a loaded machine); each run's wall and CPU time are reported beside them. A second
run on the now-filled cache shows the warm start.

    python validation/cold_start.py [--top 25] [--args ...]
    python validation/cold_start.py --kernel-times

prints a table (wall time of each run, compile total, the top dispatchers by exclusive
time with their number of compilations ``n`` and of distinct argument types ``sigs``) and
writes validation/results/cold_start.json. ``--kernel-times`` instead compiles each entry of
the warm-up manifest (pam/kernels/warm_manifest.json) in one fresh process on an empty
cache, in manifest order, in the environment of a warm-up worker, and prints the process
CPU time of each compilation (the first one also pays Numba's start-up and the typing of
the shared scalar helpers); it writes
validation/results/cold_start_kernels.json.

What compiles: every CPU kernel is lazy (compiled on its first call) and ``cache=True``,
which does nothing for the first run on a fresh install (the cache is empty: that run is
what this script measures) and makes later runs load the machine code instead (the warm
row). Numba invalidates a cached kernel when its own source file changes (timestamp and
size); the matmul kernels choose their path in Python, so paths a run never takes (general
inf/NaN paths, the other product family, masked inner loops for operands without zeros)
are never compiled, and the row, cross-entropy and AdamW kernels are one kernel per flag
variant (``_<kernel>_<variant>``: exact or approximate backward, layer-norm weight and bias,
amsgrad), so a run compiles only the variants it uses.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(out_json, train_args):
    """Run the training command in this process with a compile-event listener."""
    t0 = time.perf_counter()
    from numba.core import event

    records = []
    stack = []

    class Listener(event.Listener):
        def on_start(self, ev):
            stack.append([time.process_time(), 0.0])

        def on_end(self, ev):
            start, child = stack.pop()
            incl = time.process_time() - start
            if stack:
                stack[-1][1] += incl
            disp = ev.data.get("dispatcher")
            name = getattr(getattr(disp, "py_func", None), "__qualname__", str(disp))
            module = getattr(getattr(disp, "py_func", None), "__module__", "")
            records.append(dict(name=f"{module}.{name}", inclusive_s=incl,
                                exclusive_s=incl - child,
                                args=str(ev.data.get("args"))))

    event.register("numba:compile", Listener())
    t_import = time.perf_counter()
    from bdia_pam._entry import main          # the installed command's entry point
    from pam.kernels import warmup
    import_s = time.perf_counter() - t_import
    with warmup.Recorder() as recorded, tempfile.TemporaryDirectory() as out:
        rc = main(["train", "--steps", "1", "--no-progress", "--out",
                   os.path.join(out, "run")] + train_args)
    wall = time.perf_counter() - t0
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_json, "w") as fh:
        json.dump(dict(wall_s=wall, import_s=import_s, rc=rc, compiles=records,
                       cpu_s=time.process_time(),
                       workers_cpu_s=workers.ru_utime + workers.ru_stime,
                       outermost=recorded.entries), fh)


def _record_gpt_step():
    """The outermost kernel compilations of one training step of bench_step's small GPT
    (pam.convert + pam.nn.functional.cross_entropy + pam.optim.AdamW)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_step import _gpt_pair, _timed_step
    from pam.kernels import warmup
    _, (model, loss_fn, opt) = _gpt_pair(width=64, depth=2, batch=4, context=16)
    with warmup.Recorder() as recorded:
        _timed_step(model, loss_fn, opt)
    return recorded.entries


def record_manifest(path):
    """Write the warm-up manifest (pam/kernels/warm_manifest.json): the kernels that one
    cold ``bdia-pam train`` step and one small-GPT step compile."""
    from pam.kernels import warmup
    with tempfile.TemporaryDirectory() as cache:
        train = _run(cache, [], warm=False)["outermost"]
    with tempfile.TemporaryDirectory() as cache:
        gpt = _run(cache, [], warm=False, gpt=True)["outermost"]
    kernels = warmup.merge_entries({"bdia-pam train": train, "small GPT": gpt})
    with open(path, "w") as fh:
        json.dump(dict(note="generated by python validation/cold_start.py --record-manifest",
                       kernels=kernels), fh, indent=0)
    print(f"{len(kernels)} kernels ({sum(e['seconds'] for e in kernels):.1f} s of recorded "
          f"compilation) written to {path}")


def _kernel_times_child(out_json):
    """Compile the manifest's entries one after the other in this process; CPU seconds
    of each."""
    from pam.kernels import warmup
    rows = []
    for e in warmup.load_manifest():
        disp = getattr(warmup.MODULES[e["module"]], e["name"])
        t0 = time.process_time()
        disp.compile(tuple(warmup.decode_type(a) for a in e["args"]))
        rows.append(dict(kernel=f"{e['module']}.{e['name']}", cpu_s=time.process_time() - t0,
                         workloads=e["workloads"]))
    with open(out_json, "w") as fh:
        json.dump(rows, fh)


def kernel_times(out):
    """Print and write the per-entry compile CPU times of :func:`_kernel_times_child`."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    from pam.kernels import warm_worker
    with tempfile.TemporaryDirectory() as cache:
        env = dict(warm_worker.worker_environ(), NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, __file__, "--child-kernels", path], env=env,
                       check=True)
    with open(path) as fh:
        rows = json.load(fh)
    os.unlink(path)
    print(f"{'kernel (manifest order)':<40} {'CPU s':>6}  workloads")
    for r in rows:
        print(f"{r['kernel']:<40} {r['cpu_s']:6.2f}  {', '.join(r['workloads'])}")
    print(f"{'total':<40} {sum(r['cpu_s'] for r in rows):6.2f}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(dict(kernels=rows, total_cpu_s=sum(r["cpu_s"] for r in rows)), fh, indent=1)
    print(f"wrote {out}")
    return rows


def _run(cache_dir, train_args, warm=True, gpt=False):
    """One child process on ``cache_dir``; ``warm`` False runs the training with
    PAM_WARMUP=0 (kernels compile lazily in the process, as before the warm-up existed);
    ``gpt`` records a small-GPT step instead of the training command."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not warm:
        env["PAM_WARMUP"] = "0"
    t0 = time.perf_counter()
    child = ["--child-gpt", path] if gpt else ["--child", path, "--args", *train_args]
    subprocess.run([sys.executable, __file__, *child],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    process_s = time.perf_counter() - t0
    with open(path) as fh:
        res = json.load(fh)
    os.unlink(path)
    res["process_s"] = process_s
    return res


def _summary(res, top):
    by = {}
    for r in res["compiles"]:
        e = by.setdefault(r["name"], dict(name=r["name"], exclusive_s=0.0, count=0, args=set()))
        e["exclusive_s"] += r["exclusive_s"]
        e["count"] += 1
        e["args"].add(r["args"])
    for e in by.values():
        e["signatures"] = len(e.pop("args"))
    rows = sorted(by.values(), key=lambda e: -e["exclusive_s"])
    return dict(process_s=res["process_s"], wall_s=res["wall_s"], cpu_s=res["cpu_s"],
                workers_cpu_s=res["workers_cpu_s"],
                compile_s=sum(r["exclusive_s"] for r in res["compiles"]),
                compilations=len(res["compiles"]), top=rows[:top])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-gpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-kernels", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kernel-times", action="store_true",
                    help="compile CPU time of each manifest entry in a fresh process")
    ap.add_argument("--record-manifest", action="store_true",
                    help="write pam/kernels/warm_manifest.json instead of timing")
    ap.add_argument("--args", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments of 'bdia-pam train'")
    ap.add_argument("--out", default=os.path.join(RESULTS, "cold_start.json"))
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, args.args)
    if args.child_gpt:
        t0 = time.perf_counter()
        entries = _record_gpt_step()
        with open(args.child_gpt, "w") as fh:
            json.dump(dict(wall_s=time.perf_counter() - t0, compiles=[], outermost=entries), fh)
        return None
    if args.child_kernels:
        return _kernel_times_child(args.child_kernels)
    if args.kernel_times:
        return kernel_times(os.path.join(RESULTS, "cold_start_kernels.json"))
    if args.record_manifest:
        from pam.kernels import warmup
        return record_manifest(warmup.MANIFEST)
    with tempfile.TemporaryDirectory() as cache:
        cold = _summary(_run(cache, args.args, warm=False), args.top)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        parallel = _summary(_run(cache, args.args), args.top)
        warm = _summary(_run(cache, args.args), args.top)
    for label, r in (("cold, lazy compilation (PAM_WARMUP=0)", cold),
                     ("cold, parallel warm-up (default)", parallel),
                     ("warm (filled cache)", warm)):
        print(f"{label:<40} process {r['process_s']:5.1f} s wall, {r['cpu_s']:5.1f} s CPU "
              f"(+ {r['workers_cpu_s']:4.1f} s in warm-up workers), Numba compile in the "
              f"process {r['compile_s']:5.1f} s CPU in {r['compilations']} compilations")
    print(f"time to the first step beyond a warm start: lazy "
          f"{cold['process_s'] - warm['process_s']:.1f} s wall "
          f"({cold['cpu_s'] - warm['cpu_s']:.1f} s CPU), parallel warm-up "
          f"{parallel['process_s'] - warm['process_s']:.1f} s wall "
          f"({parallel['cpu_s'] - warm['cpu_s']:.1f} s CPU in the process, "
          f"{parallel['workers_cpu_s']:.1f} s in its workers)")
    print(f"{'dispatcher (cold)':<60} {'n':>3} {'sigs':>4} {'excl s':>7}")
    for e in cold["top"]:
        print(f"{e['name'][-60:]:<60} {e['count']:3d} {e['signatures']:4d} "
              f"{e['exclusive_s']:7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(cold=cold, parallel_warmup=parallel, warm=warm, train_args=args.args,
                       cores=len(os.sched_getaffinity(0))), fh, indent=1)
    print(f"wrote {args.out}")
    return cold, parallel, warm


if __name__ == "__main__":
    main()
