"""Serial ``nogil`` kernels shared between the calling thread and worker threads.

The row, matmul, GELU and optimizer kernels of :mod:`pam.kernels.cpu`,
:mod:`pam.kernels.cpu_rows`, :mod:`pam.kernels.cpu_xent` and :mod:`pam.kernels.cpu_attn`
are compiled without ``parallel=True`` (Numba's parfor lowering roughly doubles their
compile time, see validation/README.md section 9c). Each is written as a *body*
``body(*args, lo, hi)`` over the items ``lo <= item < hi`` (rows, row blocks, chunks) and
declared with :func:`splittable`, which compiles it into a kernel that claims chunks of
its items from a shared counter until none is left. :func:`run` hands a job to the worker
threads and runs the same kernel in the calling thread: every thread takes the next
unclaimed chunk, so the calling thread does all of them when the workers come late, and
the work is shared when they come in time. Every item is computed the same way whichever
thread holds it, so the bits do not depend on the thread count or on timing.

Why chunks claimed at run time instead of one fixed part per thread: waking a sleeping
thread and handing it the GIL costs tens of microseconds (about 50 us for the first
instruction of a fixed part on a 2-core virtual machine, where a futex wake is a
hypervisor exit), so a fixed split of a 200 us kernel was slower than one thread. Here the
calling thread never waits for a worker to start, only for the chunks a worker has
claimed; and a worker that finished a job spins (without the GIL, in compiled code, with
the processor's pause hint) for about :data:`SPIN_US` microseconds watching for the next
job, so that one starts within a microsecond or two; then it blocks on its queue until a
job wakes it. The job is published by the calling thread from compiled code, after it
released the GIL, so a spinning worker takes the GIL without waiting for it.

The thread count is ``numba.get_num_threads()`` in the calling thread (so
``numba.set_num_threads`` and ``NUMBA_NUM_THREADS`` apply as they did to ``prange``).
Work below ``parallel_min`` (the caller's measure of size) runs in the calling thread
alone. A job is cut into ``min(items, CHUNKS_PER_THREAD * threads)`` chunks.

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
import ast
import inspect
import itertools
import os
import queue
import sys
import textwrap
import threading
import time
import warnings

import numba
import numpy as np
from numba import njit

from ..bits import jitable
from . import atomics

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


# ----------------------------------------------------------------------------- jobs
# A job's shared state: an int64 array that the threads update with atomics.
_NEXT, _DONE, _FAILED, _CHUNKS, _ITEMS, _ACTIVE, _SEQ = range(7)
_WORK_SIZE = 8
# The process-wide control array: the sequence number of the latest published job, the
# spin budget of a waiting worker (pause iterations), a request to stop spinning (park),
# then one state per worker (0 running or spinning, 1 parked: blocked on its queue until
# a job wakes it).
_PUBLISHED, _SPINS, _PARK, _STATE0 = 0, 1, 2, 3
# The role of the thread that calls a kernel (its ``me`` argument; >= 0: a worker's index).
_ALONE, _CALLER = -2, -1

CHUNKS_PER_THREAD = 4        # chunks per thread of a split job (granularity of the sharing)
# How long a worker watches for the next job before it blocks (microseconds; the
# environment variable PAM_SPIN_US sets it, 0 for no spinning). Between the kernels of a
# training step the calling thread runs Python for a few hundred microseconds at a time,
# so a worker that spins for 2 ms is there for nearly every job (OpenMP runtimes spin for
# 0.2-200 ms after a parallel region for the same reason).
SPIN_US = float(os.environ.get("PAM_SPIN_US", 2000))
# A blocked worker is woken only for jobs of at least WAKE_FACTOR * parallel_min: waking
# it costs the caller a system call and the worker comes tens of microseconds later.
WAKE_FACTOR = 8


@jitable
def _bound(work, c):
    return c * work[_ITEMS] // work[_CHUNKS]


@jitable
def _claim(work):
    """The next unclaimed chunk of the job, or -1 (none left, or a thread failed)."""
    if atomics.load(work, _FAILED) != 0:
        return -1
    c = atomics.fetch_add(work, _NEXT, 1)
    return c if c < work[_CHUNKS] else -1


@jitable
def _watch(ctl, seen, me):
    """A worker between jobs: spin until a job other than ``seen`` is published (1) or the
    spin budget is spent; then mark itself parked (0), unless a job came meanwhile (1)."""
    for _ in range(ctl[_SPINS]):
        if atomics.load(ctl, _PUBLISHED) != seen:
            return 1
        if atomics.load(ctl, _PARK) != 0:
            break
        atomics.pause()
    atomics.store(ctl, _STATE0 + me, 1)
    if atomics.load(ctl, _PUBLISHED) != seen:
        atomics.store(ctl, _STATE0 + me, 0)
        return 1
    return 0


@jitable
def _enter(work, ctl, me):
    if me == _CALLER:
        atomics.store(ctl, _PUBLISHED, work[_SEQ])      # spinning workers pick it up now


@jitable
def _leave(work, ctl, me):
    """After the last claimed chunk: the caller waits for the chunks others claimed (1); a
    worker leaves the job (see _arrive) and watches for the next (1: published, 0:
    parked)."""
    if me == _CALLER:
        while atomics.load(work, _DONE) < work[_CHUNKS] and atomics.load(work, _FAILED) == 0:
            atomics.pause()
    elif me >= 0:
        atomics.fetch_add(work, _ACTIVE, -1)
        return _watch(ctl, work[_SEQ], me)
    return 1


def splittable(fn=None, *, name=None):
    """Decorator: the kernel that :func:`run` launches, from ``fn(*args, lo, hi)`` (a body
    over the items ``lo <= item < hi``).

    The kernel, named ``name`` (default ``fn.__name__``: factories give each variant its
    own name, which names its cache files and warm-up manifest entry), is a serial nogil
    cached Numba function ``kernel(work, ctl, me, *args)`` that runs ``fn``'s statements
    over the chunks of the job ``work`` it claims. ``fn`` itself is registered with
    ``jitable`` (other kernels may call it directly, e.g. per chunk of a tensor table) and
    bound in its module as ``<name>_body``.

    The kernel is ``fn``'s own code inside the claiming loop (:func:`_claiming_kernel`),
    not a loop calling ``fn``: Numba compiles a called function on its own and then, linked
    into the caller, optimizes it once more, which cost about a quarter of the cold start's
    compile time (validation/README.md section 9c). ``fn`` must not ``return`` and must not
    use names starting with ``_pam_``."""
    if fn is None:
        return lambda f: splittable(f, name=name)
    name = name or fn.__name__
    module = sys.modules[fn.__module__]
    kernel = _claiming_kernel(fn, name)
    fn.__name__ = fn.__qualname__ = f"{name}_body"
    if getattr(module, fn.__name__, None) is not fn:
        setattr(module, fn.__name__, fn)
    jitable(fn)
    return njit(cache=True, nogil=True, no_cfunc_wrapper=True)(kernel)


# The claiming loop around a body's statements (the names a body must not use start with
# _pam_; the helpers are set in the body's module under these names).
_CLAIMING = """
_pam_enter(_pam_work, _pam_ctl, _pam_me)
_pam_chunk = _pam_claim(_pam_work)
while _pam_chunk >= 0:
    lo = _pam_bound(_pam_work, _pam_chunk)
    hi = _pam_bound(_pam_work, _pam_chunk + 1)
    _pam_fetch_add(_pam_work, _PAM_DONE, 1)
    _pam_chunk = _pam_claim(_pam_work)
return _pam_leave(_pam_work, _pam_ctl, _pam_me)
"""
_CLAIMING_HELPERS = {"_pam_enter": _enter, "_pam_claim": _claim, "_pam_bound": _bound,
                     "_pam_leave": _leave, "_pam_fetch_add": atomics.fetch_add,
                     "_PAM_DONE": _DONE}


def _claiming_kernel(fn, name):
    """The Python function ``name(_pam_work, _pam_ctl, _pam_me, *args)`` whose code is
    ``fn``'s statements (docstring dropped) inside the loop of :data:`_CLAIMING`, after
    the two bound assignments.

    It is compiled from ``fn``'s source with ``fn``'s file name and line numbers (Numba's
    errors and cache files point at ``fn``; pam's kernel files are stamped with the
    definitions digest, pam.kernels._cache) and runs in ``fn``'s module globals. ``fn``'s
    closure variables (a factory's flags) become module globals named
    ``_pam_<name>_<variable>``: constants to Numba, as closure variables are. A parameter
    that ``fn`` rebinds (``p = p[lo:hi]``) is passed as ``_pam_arg_<parameter>`` and reset
    from it at the start of every chunk, as a call to ``fn`` per chunk would see it."""
    padding = "\n" * (fn.__code__.co_firstlineno - 1)         # fn's line numbers
    tree = ast.parse(padding + textwrap.dedent(inspect.getsource(fn)))
    fdef = tree.body[0]
    params = [a.arg for a in fdef.args.args]
    nodes = list(ast.walk(fdef))
    names = [n for n in nodes if isinstance(n, ast.Name)]
    if params[-2:] != ["lo", "hi"] \
            or any(v.lower().startswith("_pam_") for v in params + [n.id for n in names]) \
            or any(isinstance(n, ast.Return) for n in nodes):
        raise ValueError(f"{name}: a splittable body takes (*args, lo, hi), has no return "
                         f"and no name starting with _pam_")
    scope = fn.__globals__
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        scope[f"_pam_{name}_{var}"] = cell.cell_contents
        for node in names:
            if node.id == var:
                node.id = f"_pam_{name}_{var}"
    scope.update(_CLAIMING_HELPERS)
    args = params[:-2]
    stored = {n.id for n in names if isinstance(n.ctx, ast.Store)}
    rebound = [a for a in args if a in stored]
    statements = fdef.body
    if isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant):
        statements = statements[1:]                                  # the docstring
    claiming = _located(ast.parse(_CLAIMING).body, fdef)
    resets = _located([ast.parse(f"{a} = _pam_arg_{a}").body[0] for a in rebound], fdef)
    claiming[2].body[2:2] = resets + statements
    fdef.body = claiming
    fdef.decorator_list = []
    fdef.name = name
    fdef.args.args = _located(
        [ast.arg(arg=a) for a in ("_pam_work", "_pam_ctl", "_pam_me")]
        + [ast.arg(arg=f"_pam_arg_{a}" if a in rebound else a) for a in args], fdef)
    had, saved = name in scope, scope.get(name)
    exec(compile(tree, inspect.getsourcefile(fn), "exec"), scope)
    kernel = scope.pop(name)
    if had:
        scope[name] = saved
    return kernel


def _located(statements, where):
    """``statements`` (AST nodes), every node in them given the source location of
    ``where``."""
    for statement in statements:
        for node in ast.walk(statement):
            ast.copy_location(node, where)
    return statements


@njit(cache=True, nogil=True, no_cfunc_wrapper=True)
def _watch_for_job(ctl, seen, me):
    return _watch(ctl, seen, me)


@njit(cache=True, nogil=True, no_cfunc_wrapper=True)
def _arrive(work):
    """A worker joins the job (the caller waits for the active workers after a failure)."""
    atomics.fetch_add(work, _ACTIVE, 1)


@njit(cache=True, nogil=True, no_cfunc_wrapper=True)
def _fail(work, active):
    """A thread's chunk raised: stop the others claiming chunks (a worker, ``active``, is
    no longer in the job)."""
    atomics.store(work, _FAILED, 1)
    if active:
        atomics.fetch_add(work, _ACTIVE, -1)


@njit(cache=True, nogil=True, no_cfunc_wrapper=True)
def _quiesce(work):
    """Wait until no thread runs a chunk of the job."""
    while atomics.load(work, _ACTIVE) > 0:
        atomics.pause()


@njit(cache=True, nogil=True, no_cfunc_wrapper=True)
def _spin(ctl, n):
    """n iterations of the waiting loop of _watch (the spin-budget calibration)."""
    s = 0
    for _ in range(n):
        s += atomics.load(ctl, _PUBLISHED)
        atomics.pause()
    return s


class _Pool:
    """The worker threads of this process, their control array and the current job."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queues = []             # one wake-up queue per worker
        self.ctl = np.zeros(_STATE0 + max(numba.config.NUMBA_NUM_THREADS, 1), np.int64)
        self.job = None              # (seq, kernel, work, args, errors) or None
        self.seq = itertools.count(1)
        self.calibrated = False

    def calibrate(self):
        """Set the spin budget to about SPIN_US microseconds of this machine's loop."""
        n = 1 << 14
        _spin(self.ctl, 64)
        t0 = time.perf_counter()
        _spin(self.ctl, n)
        per_us = n / max((time.perf_counter() - t0) * 1e6, 1e-3)
        self.ctl[_SPINS] = max(0, int(SPIN_US * per_us))
        self.calibrated = True

    def workers(self, count):
        """The wake-up queues of ``count`` worker threads (started when needed)."""
        with self.lock:
            if not self.calibrated:
                self.calibrate()
            while len(self.queues) < count:
                wake = queue.SimpleQueue()
                threading.Thread(target=self.serve, args=(len(self.queues), wake),
                                 daemon=True, name=f"pam-kernel-{len(self.queues)}").start()
                self.queues.append(wake)
            return self.queues[:count]

    def serve(self, me, wake):
        """A worker's loop: run the current job's kernel if it has not run it yet, else
        watch for the next job; block on ``wake`` when parked.

        No job is missed: :func:`run` sets the job, then wakes the workers marked parked,
        holding the GIL; a worker marks itself parked (compiled code), then looks for a
        job before it blocks, holding the GIL. Whichever comes first, the other sees it."""
        seen = 0
        ctl = self.ctl
        while True:
            job = self.job
            if job is not None and job[0] != seen:
                seen, kernel, work, args, errors = job
                _arrive(work)
                try:
                    active = kernel(work, ctl, me, *args)
                except BaseException as exc:        # handed to the caller, which raises it
                    errors.append(exc)
                    _fail(work, True)
                    active = 1
            else:
                if job is None:        # none, or finished: the caller published it already
                    seen = int(ctl[_PUBLISHED])
                active = _watch_for_job(ctl, seen, me)
            if not active:
                job = self.job
                if job is not None and job[0] != seen:
                    # A job came while it stopped spinning: the caller set it before it
                    # looked for parked workers, so it saw this one spinning (and will
                    # not wake it), or it saw it parked (a wake-up is queued: harmless).
                    ctl[_STATE0 + me] = 0
                    continue
                wake.get()
                ctl[_STATE0 + me] = 0


_POOL = _Pool()


def _forget_workers():
    """In a forked child: the parent's worker threads do not exist there."""
    global _POOL
    _POOL = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def park(timeout=1.0):
    """Make the worker threads stop spinning now: each blocks until a job wakes it.

    A worker spins for up to :data:`SPIN_US` after each job, on a core that float work
    started right after PAM kernels (or another process) may want: call this first
    (``validation/bench_step.py`` does before each float step). Returns whether every
    worker was parked within ``timeout`` seconds."""
    pool = _POOL
    count = len(pool.queues)
    if count == 0:
        return True
    ctl = pool.ctl
    ctl[_PARK] = 1
    try:
        deadline = time.monotonic() + timeout
        while not ctl[_STATE0:_STATE0 + count].all():
            if time.monotonic() > deadline:
                return False
            time.sleep(20e-6)
        return True
    finally:
        ctl[_PARK] = 0


def chunk_count(items, threads):
    """The number of chunks a job of ``items`` items is cut into on ``threads`` threads."""
    return max(1, min(items, CHUNKS_PER_THREAD * threads))


def _job(chunks, items, seq=0):
    work = np.zeros(_WORK_SIZE, np.int64)
    work[_CHUNKS] = chunks
    work[_ITEMS] = items
    work[_SEQ] = seq
    return work


def run(kernel, items, size, parallel_min, *args):
    """``kernel`` (a :func:`splittable` kernel) over the items ``[0, items)`` with
    ``args``: shared between the calling thread and ``numba.get_num_threads() - 1``
    workers when ``size >= parallel_min``, else in the calling thread alone (also for no
    items: the body then runs once over ``[0, 0)``, so its argument checks still apply).

    Every claimed chunk has finished when this returns; an exception of any chunk is
    raised (the calling thread's own first) after every thread left the job.
    """
    count = numba.get_num_threads()
    if size < parallel_min or items <= 1 or count <= 1:
        kernel(_job(1, items), _POOL.ctl, _ALONE, *args)
        return
    if _SPIN_RISK:
        _warn_spin_wait()
    pool = _POOL
    seq = next(pool.seq)
    work = _job(chunk_count(items, count), items, seq)
    errors = []
    pool.job = (seq, kernel, work, args, errors)      # before starting workers: they see it
    wakes = pool.workers(count - 1)
    ctl = pool.ctl
    if size >= WAKE_FACTOR * parallel_min:
        for me, wake in enumerate(wakes):
            if ctl[_STATE0 + me]:                  # parked: wake it (it will see the job)
                ctl[_STATE0 + me] = 0
                wake.put(None)
    try:
        kernel(work, ctl, _CALLER, *args)
    except BaseException:
        _fail(work, False)
        _quiesce(work)
        raise
    finally:
        if pool.job is not None and pool.job[0] == seq:
            pool.job = None                       # do not keep the job's arrays alive
    if errors:
        _quiesce(work)
        raise errors[0]
