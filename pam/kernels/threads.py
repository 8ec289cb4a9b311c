"""Serial ``nogil`` kernels run over parts of their work in Python threads.

The row, GELU and optimizer kernels of :mod:`pam.kernels.cpu` and
:mod:`pam.kernels.cpu_rows` are compiled without ``parallel=True`` (Numba's parfor lowering
roughly doubles their compile time, see validation/README.md section 9c). Each takes the
range ``lo, hi`` of items (rows, blocks, chunks) it handles as its last two arguments and
releases the GIL, so :func:`run` splits ``[0, items)`` into one contiguous part per thread
and runs the parts at the same time: the first in the calling thread, the others in
persistent daemon worker threads (one job queue each; about 15 us more per call than a
``prange`` launch, measured on 2 cores). The split is the static one of ``prange``, and
every item is computed the same way whichever part holds it, so the bits do not depend on
the thread count.

The thread count is ``numba.get_num_threads()`` in the calling thread (so
``numba.set_num_threads`` and ``NUMBA_NUM_THREADS`` apply as they did to ``prange``), capped
at the number of items. Work below ``parallel_min`` elements (the caller's measure of size)
runs in the calling thread in one part: waking threads costs more than it saves there.

torch's OpenMP threads. With OpenMP's default wait policy, torch's worker threads keep
spinning for milliseconds after each parallel torch op, on the cores these kernel threads
need: a small GPT's training step (validation/bench_step.py's gpt_small, 2 cores) took
532 ms instead of 261-282 ms. Two ways out: torch on one thread while PAM trains (its glue
ops are small; no OpenMP thread is left to spin: 261 ms), or ``OMP_WAIT_POLICY=passive``
(282 ms; it makes torch's own parallel ops wake their threads every time, so float code in
the same process slows down: a small model's float step 50.7 instead of 32.5 ms).
``import pam`` sets the passive policy when torch is not loaded yet; when torch was
imported first, the first call that splits its work while torch runs more than one thread
warns once (:class:`SpinWaitWarning`) naming the fixes.
"""
import os
import queue
import sys
import threading
import warnings

import numba

_LOCK = threading.Lock()
_WORKERS = []                       # one job queue per started worker thread
_SPIN_RISK = False                  # see note_openmp_wait


class SpinWaitWarning(RuntimeWarning):
    """torch's OpenMP threads spin-wait on the cores pam's kernel threads need."""


def note_openmp_wait(torch_loaded_first, environ=None):
    """Record, at ``import pam``, whether torch's OpenMP threads may spin-wait: torch was
    loaded before pam (so pam could not set the policy) and the environment sets neither
    ``OMP_WAIT_POLICY=passive`` nor a spin limit (``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``).
    Returns that flag."""
    global _SPIN_RISK
    environ = os.environ if environ is None else environ
    passive = environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
    limited = "GOMP_SPINCOUNT" in environ or "KMP_BLOCKTIME" in environ
    _SPIN_RISK = bool(torch_loaded_first) and not passive and not limited
    return _SPIN_RISK


def _warn_spin_wait():
    """Once per process: the SpinWaitWarning, when torch runs more than one thread."""
    global _SPIN_RISK
    _SPIN_RISK = False
    torch = sys.modules.get("torch")
    if torch is None or torch.get_num_threads() <= 1:
        return
    warnings.warn(
        "pam's CPU kernels are splitting their work over threads, but torch was imported "
        "before pam without OMP_WAIT_POLICY=passive: after every parallel torch op, "
        "torch's OpenMP threads spin-wait for milliseconds on the cores pam's threads "
        "need (a small GPT's training step ran 1.9x slower on 2 cores). Run torch on one "
        "thread while training in PAM (torch.set_num_threads(1): pam's kernels have their "
        "own threads, numba.set_num_threads), or start Python with OMP_WAIT_POLICY=passive "
        "(or import pam before torch), which slows torch's own parallel ops a little. "
        "(Shown once.)", SpinWaitWarning, stacklevel=3)


def _work(jobs):
    while True:
        kernel, args, done = jobs.get()
        try:
            kernel(*args)
            done.put(None)
        except BaseException as exc:            # handed to the caller, which raises it
            done.put(exc)


def _forget_workers():
    """In a forked child: the parent's worker threads do not exist there."""
    global _LOCK
    _LOCK = threading.Lock()
    _WORKERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _queues(count):
    """The job queues of ``count`` persistent daemon worker threads (started when needed)."""
    with _LOCK:
        while len(_WORKERS) < count:
            jobs = queue.SimpleQueue()
            threading.Thread(target=_work, args=(jobs,), daemon=True,
                             name=f"pam-kernel-{len(_WORKERS)}").start()
            _WORKERS.append(jobs)
        return _WORKERS[:count]


def parts(items, threads):
    """The ``(lo, hi)`` ranges splitting ``[0, items)`` into ``min(threads, items)``
    contiguous parts whose sizes differ by at most one (larger parts first); ``[(0,
    items)]`` when ``threads <= 1`` or ``items <= 1``."""
    count = max(1, min(threads, items))
    base, extra = divmod(items, count)
    out = []
    lo = 0
    for i in range(count):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def run(kernel, items, size, parallel_min, *args):
    """``kernel(*args, lo, hi)`` over ``[0, items)``: in parts on ``numba.get_num_threads()``
    threads when ``size >= parallel_min``, else once in the calling thread.

    Every part runs to its end before this returns; an exception of any part is raised
    (the calling thread's part first, then the others' in order) after all parts have
    finished.
    """
    if size < parallel_min or items <= 1:
        return kernel(*args, 0, items)
    ranges = parts(items, numba.get_num_threads())
    if len(ranges) == 1:
        return kernel(*args, 0, items)
    if _SPIN_RISK:
        _warn_spin_wait()
    done = queue.SimpleQueue()
    for jobs, (lo, hi) in zip(_queues(len(ranges) - 1), ranges[1:]):
        jobs.put((kernel, (*args, lo, hi), done))
    try:
        kernel(*args, *ranges[0])
    finally:
        errors = [done.get() for _ in ranges[1:]]   # wait for every part, whatever happens
    for exc in errors:
        if exc is not None:
            raise exc
    return None
