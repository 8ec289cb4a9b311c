"""pam.kernels.threads: serial nogil kernels shared between the calling thread and
workers that claim chunks of a job."""
import time

import numba
import numpy as np
import pytest
from numba.core.dispatcher import Dispatcher

from pam.kernels import atomics, cpu, cpu_attn, cpu_rows, cpu_xent, threads


# --------------------------------------------------------------------------- test kernels
@threads.splittable
def _mark(out, lo, hi):
    """out[i] += 1 for the items of the chunk (each item once: the sum shows it)."""
    for i in range(lo, hi):
        out[i] += 1


@threads.splittable
def _mark_sliced(out, lo, hi):
    """_mark with the chunk taken as a slice of the rebound parameter (the kernel must
    start every chunk from the argument, not from the previous chunk's slice)."""
    out = out[lo:hi]
    for i in range(out.size):
        out[i] += 1


@threads.splittable
def _meet(flag, spins, out, lo, hi):
    """Chunk 0 waits (at most ``spins`` pause iterations) until a later chunk set flag[0]:
    only another thread can, since the thread in chunk 0 is busy waiting. out[0] = 1 when
    it saw the flag."""
    if lo == 0:
        for _ in range(spins):
            if atomics.load(flag, 0) != 0:
                out[0] = 1
                break
            atomics.pause()
    else:
        atomics.store(flag, 0, 1)


@threads.splittable
def _fail_late(out, lo, hi):
    """Chunk 1 raises; chunk 0 runs a while, then writes."""
    if lo == 1:
        raise ValueError("chunk 1 failed")
    s = 0
    for i in range(2000000):
        s += i & 3
    out[lo] = 1 + s % 2


def _with_threads(n):
    class _Threads:
        def __enter__(self):
            if numba.config.NUMBA_NUM_THREADS < n:
                pytest.skip(f"needs {n} Numba threads")
            self.old = numba.get_num_threads()
            numba.set_num_threads(n)

        def __exit__(self, *exc):
            numba.set_num_threads(self.old)
    return _Threads()


MEET_SPINS = 1 << 27          # seconds of waiting: a failure, not a slow machine


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("items,count", [(0, 3), (1, 4), (5, 1), (7, 3), (100, 2)])
def test_a_job_is_cut_into_at_most_items_chunks(items, count):
    chunks = threads.chunk_count(items, count)
    assert 1 <= chunks <= max(items, 1)
    assert chunks == min(max(items, 1), threads.CHUNKS_PER_THREAD * count)


@pytest.mark.parametrize("items,size,parallel_min,count", [
    (1, 100, 0, 2), (17, 100, 0, 2), (17, 5, 10, 2), (64, 100, 0, 1), (3, 100, 0, 2),
    (0, 100, 0, 2)])
def test_every_item_runs_once(items, size, parallel_min, count):
    for kernel in (_mark, _mark_sliced):
        out = np.zeros(max(items, 1), np.int64)
        with _with_threads(count):
            threads.run(kernel, items, size, parallel_min, out)
        assert out[:items].tolist() == [1] * items


def test_small_work_and_one_thread_never_use_a_worker(monkeypatch):
    def no_workers(*a):
        raise AssertionError("a worker was asked for")
    monkeypatch.setattr(threads._POOL, "workers", no_workers)
    out = np.zeros(40, np.int64)
    with _with_threads(2):
        threads.run(_mark, 40, 99, 100, out)           # below parallel_min
    with _with_threads(1):
        threads.run(_mark, 40, 100, 10, out)           # numba.set_num_threads(1)
    assert out.tolist() == [2] * 40


def test_large_work_is_shared_between_threads():
    """Chunk 0 can only finish when another thread ran a later chunk at the same time."""
    flag, out = np.zeros(1, np.int64), np.zeros(1, np.int64)
    with _with_threads(2):
        threads.run(_meet, 8, 100, 10, flag, MEET_SPINS, out)
    assert out[0] == 1


def test_a_parked_worker_is_woken_by_the_next_job():
    flag, out = np.zeros(1, np.int64), np.zeros(1, np.int64)
    with _with_threads(2):
        threads.run(_mark, 8, 100, 10, np.zeros(8, np.int64))    # workers started
        deadline = time.monotonic() + 10
        while not threads._POOL.ctl[threads._STATE0] and time.monotonic() < deadline:
            time.sleep(0.01)                                    # its spin budget runs out
        assert threads._POOL.ctl[threads._STATE0] == 1          # parked
        threads.run(_meet, 8, 100, 10, flag, MEET_SPINS, out)
    assert out[0] == 1


def test_park_stops_the_spinning_workers_and_the_next_job_wakes_them():
    flag, out = np.zeros(1, np.int64), np.zeros(1, np.int64)
    with _with_threads(2):
        threads.run(_mark, 8, 100, 10, np.zeros(8, np.int64))    # a worker spins now
        assert threads.park()
        count = len(threads._POOL.queues)
        assert count >= 1
        assert threads._POOL.ctl[threads._STATE0:threads._STATE0 + count].all()
        assert threads._POOL.ctl[threads._PARK] == 0
        threads.run(_meet, 8, 100, 10, flag, MEET_SPINS, out)
    assert out[0] == 1


def test_the_caller_does_every_chunk_when_no_worker_comes(monkeypatch):
    """The caller waits only for chunks a worker claimed, never for a worker to start."""
    monkeypatch.setattr(threads._POOL, "workers", lambda count: [])
    out = np.zeros(50, np.int64)
    with _with_threads(2):
        threads.run(_mark, 50, 100, 10, out)
    assert out.tolist() == [1] * 50


def test_chunking_does_not_change_the_bits(monkeypatch):
    """The same row kernel cut into 1 .. 7 chunks per thread, on 1 and 2 threads."""
    rng = np.random.default_rng(0)
    rows, n = 301, 64
    x = rng.standard_normal(rows * n).astype(np.float32).view(np.int32)
    results = []
    for per_thread in (1, 3, 7):
        monkeypatch.setattr(threads, "CHUNKS_PER_THREAD", per_thread)
        for count in (1, 2):
            if count > numba.config.NUMBA_NUM_THREADS:
                continue
            out = np.empty_like(x)
            with _with_threads(count):
                threads.run(cpu_rows._log_softmax_forward_rows, rows, 10 ** 9, 0, x, out, n,
                            0)
            results.append(out)
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_a_failing_chunk_raises_after_every_thread_left_the_job():
    out = np.zeros(4, np.int64)
    with _with_threads(2):
        with pytest.raises(ValueError, match="chunk 1 failed"):
            threads.run(_fail_late, 4, 100, 10, out)
        seen = out.copy()
        time.sleep(0.05)
        assert np.array_equal(out, seen)                        # nothing ran on
        threads.run(_mark, 4, 100, 10, out)                     # the pool still works
    assert np.array_equal(out, seen + 1)


def test_a_kernel_is_its_body_inside_the_claiming_loop():
    """The kernel runs the body's own statements (its code object is the body's, in the
    body's file at the body's lines; a factory's closure flags become constants); the
    body stays callable from other kernels as <name>_body."""
    code = cpu._grad_range.py_func.__code__
    assert code.co_filename == cpu.__file__
    assert code.co_varnames[:3] == ("_pam_work", "_pam_ctl", "_pam_me")
    with open(cpu.__file__) as f:
        assert f.readlines()[code.co_firstlineno - 1].startswith("def _grad_range(")
    assert cpu._grad_range_body.__name__ == "_grad_range_body"
    assert not code.co_freevars
    variant = cpu_rows._layer_norm_forward_rows_wb.py_func
    assert not variant.__code__.co_freevars
    assert any(name.startswith("_pam__layer_norm_forward_rows_wb_")
               for name in variant.__code__.co_names)


def test_a_body_that_returns_or_uses_reserved_names_is_refused():
    """A return would end the whole kernel, not the chunk; _pam_ names are the loop's."""
    def early(out, lo, hi):
        if lo == 0:
            return
        out[lo] = 1

    def reserved(out, lo, hi):
        _pam_chunk = lo
        out[_pam_chunk] = 1

    for body in (early, reserved):
        with pytest.raises(ValueError, match=body.__name__):
            threads.splittable(body)


def test_the_spin_budget_is_calibrated():
    threads._POOL.workers(0)
    assert threads._POOL.ctl[threads._SPINS] >= 1


def test_every_cpu_kernel_releases_the_gil():
    """The kernels threads.run shares between threads must be nogil to run concurrently;
    all CPU kernels are."""
    seen = 0
    for module in (cpu, cpu_rows, cpu_xent, cpu_attn):
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                assert obj.targetoptions.get("nogil"), f"{module.__name__}.{name}"
                seen += 1
    assert seen > 20


def test_bad_offset_is_refused_on_every_path():
    x = np.zeros(cpu.FUSED_PARALLEL_MIN + 8, np.int32)
    for size in (8, x.size):
        with pytest.raises(ValueError, match="offset"):
            cpu_rows.log_softmax_forward(x[:size], np.empty(size, np.int32), 8, 1 << 30)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers():
    """Worker threads do not survive fork: a child (e.g. a DataLoader worker) must not
    hand jobs to the parent's threads and wait forever."""
    import multiprocessing
    with _with_threads(2):
        threads.run(_mark, 8, 100, 10, np.zeros(8, np.int64))     # workers started here
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_share_in_child)
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
    assert not alive and child.exitcode == 0


def _share_in_child():
    flag, out = np.zeros(1, np.int64), np.zeros(1, np.int64)
    threads.run(_meet, 8, 100, 10, flag, MEET_SPINS, out)
    assert out[0] == 1


@pytest.mark.parametrize("first,environ,risk", [
    (True, {}, True),
    (True, {"OMP_WAIT_POLICY": "ACTIVE"}, True),
    (True, {"OMP_WAIT_POLICY": " Passive "}, False),
    (True, {"GOMP_SPINCOUNT": "1000"}, False),
    (True, {"KMP_BLOCKTIME": "0"}, False),
    (False, {}, False),
])
def test_spin_wait_risk_needs_torch_first_and_no_wait_setting(first, environ, risk):
    saved = threads._SPIN_RISK
    try:
        assert threads.note_openmp_wait(first, environ) is risk
        assert threads._SPIN_RISK is risk
    finally:
        threads._SPIN_RISK = saved


def test_the_spin_wait_warning_is_shown_once_and_only_for_split_work(monkeypatch):
    import torch
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    monkeypatch.setattr(threads, "_SPIN_RISK", True)
    old = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(2)
    torch.set_num_threads(2)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads.run(_mark, 8, 10, 100, np.zeros(8, np.int64))   # alone: no warning
        with pytest.warns(threads.SpinWaitWarning, match="OMP_WAIT_POLICY=passive"):
            threads.run(_mark, 8, 100, 10, np.zeros(8, np.int64))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads.run(_mark, 8, 100, 10, np.zeros(8, np.int64))        # shown once
        threads._SPIN_RISK = True
        torch.set_num_threads(1)                               # no torch threads to spin
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads.run(_mark, 8, 100, 10, np.zeros(8, np.int64))
    finally:
        numba.set_num_threads(old[0])
        torch.set_num_threads(old[1])


@pytest.mark.parametrize("order,risk", [("torch, pam", True), ("pam, torch", False)])
def test_import_order_sets_the_spin_wait_flag(order, risk):
    """A fresh interpreter without OMP_WAIT_POLICY: pam imported first sets it (passive);
    torch imported first leaves the risk flagged for the warning."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    code = (f"import {order}, os, pam.kernels.threads as t; "
            "print(t._SPIN_RISK, os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == [str(risk), "None" if risk else "passive"]
