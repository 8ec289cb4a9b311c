"""Cold start: JIT compilation time of the first ``bdia-pam train`` on an empty Numba cache.

Runs ``bdia-pam train --steps 1`` (the default digits model, PAM arithmetic) in a fresh
process whose ``NUMBA_CACHE_DIR`` is a new empty directory, so every cached kernel is
compiled as on a fresh install, and records every Numba compilation through Numba's event
API (``numba:compile`` events): per dispatcher, the inclusive time (with the callees it
compiled) and the exclusive time (its own typing, lowering and LLVM work). A second run on
the now-filled cache shows the warm start.

    python validation/cold_start.py [--top 25] [--args ...]

prints a table (wall time of each run, compile total, the top dispatchers by exclusive
time with their number of compilations ``n`` and of distinct argument types ``sigs``) and
writes validation/results/cold_start.json.

What compiles: every CPU kernel is lazy (compiled on its first call) and ``cache=True``,
which does nothing for the first run on a fresh install (the cache is empty: that run is
what this script measures) and makes later runs load the machine code instead (the warm
row). Numba invalidates a cached kernel when its own source file changes (timestamp and
size); the matmul kernels choose their path in Python, so paths a run never takes (general
inf/NaN paths, the other product family, masked inner loops for operands without zeros)
are never compiled.
"""
import argparse
import json
import os
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
            stack.append([time.perf_counter(), 0.0])

        def on_end(self, ev):
            start, child = stack.pop()
            incl = time.perf_counter() - start
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
    from bdia_pam.cli import main
    import_s = time.perf_counter() - t_import
    with tempfile.TemporaryDirectory() as out:
        rc = main(["train", "--steps", "1", "--no-progress", "--out",
                   os.path.join(out, "run")] + train_args)
    wall = time.perf_counter() - t0
    with open(out_json, "w") as fh:
        json.dump(dict(wall_s=wall, import_s=import_s, rc=rc, compiles=records), fh)


def _run(cache_dir, train_args):
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", path, "--args", *train_args],
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
    return dict(process_s=res["process_s"], wall_s=res["wall_s"],
                compile_s=sum(r["exclusive_s"] for r in res["compiles"]),
                compilations=len(res["compiles"]), top=rows[:top])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments of 'bdia-pam train'")
    ap.add_argument("--out", default=os.path.join(RESULTS, "cold_start.json"))
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, args.args)
    with tempfile.TemporaryDirectory() as cache:
        cold = _summary(_run(cache, args.args), args.top)
        warm = _summary(_run(cache, args.args), args.top)
    print(f"cold (empty NUMBA_CACHE_DIR): process {cold['process_s']:.1f} s, Numba compile "
          f"{cold['compile_s']:.1f} s in {cold['compilations']} compilations")
    print(f"warm (filled cache):          process {warm['process_s']:.1f} s, Numba compile "
          f"{warm['compile_s']:.1f} s in {warm['compilations']} compilations")
    print(f"{'dispatcher (cold)':<60} {'n':>3} {'sigs':>4} {'excl s':>7}")
    for e in cold["top"]:
        print(f"{e['name'][-60:]:<60} {e['count']:3d} {e['signatures']:4d} "
              f"{e['exclusive_s']:7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(cold=cold, warm=warm, train_args=args.args), fh, indent=1)
    print(f"wrote {args.out}")
    return cold, warm


if __name__ == "__main__":
    main()
