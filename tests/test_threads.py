"""pam.kernels.threads: serial nogil kernels split over Python threads."""
import threading

import numba
import numpy as np
import pytest
from numba.core.dispatcher import Dispatcher

from pam.kernels import cpu, cpu_rows, threads


@pytest.mark.parametrize("items,count", [(0, 3), (1, 4), (5, 1), (7, 3), (8, 2), (2, 5)])
def test_parts_cover_the_items_in_order(items, count):
    ranges = threads.parts(items, count)
    assert len(ranges) == max(1, min(count, items))
    assert ranges[0][0] == 0 and ranges[-1][1] == items
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def test_small_work_runs_once_in_the_calling_thread():
    calls = []
    threads.run(lambda tag, lo, hi: calls.append((tag, lo, hi, threading.get_ident())),
                10, 99, 100, "t")
    assert calls == [("t", 0, 10, threading.get_ident())]


def test_large_work_runs_its_parts_at_the_same_time():
    """Two parts on two threads: each waits at a barrier that only both together pass."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        barrier = threading.Barrier(2, timeout=20)
        seen = []

        def kernel(lo, hi):
            seen.append((lo, hi, threading.get_ident()))
            barrier.wait()
        threads.run(kernel, 9, 100, 100)
    finally:
        numba.set_num_threads(old)
    assert sorted(s[:2] for s in seen) == [(0, 5), (5, 9)]
    assert len({s[2] for s in seen}) == 2


def test_set_num_threads_is_respected():
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        calls = []
        threads.run(lambda lo, hi: calls.append((lo, hi)), 9, 100, 100)
    finally:
        numba.set_num_threads(old)
    assert calls == [(0, 9)]


def test_a_failing_part_raises_after_all_parts_finished():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    done = []

    def kernel(lo, hi):
        if lo > 0:
            raise ValueError(f"part {lo}")
        done.append(lo)
    try:
        with pytest.raises(ValueError, match="part 2"):
            threads.run(kernel, 4, 100, 100)
    finally:
        numba.set_num_threads(old)
    assert done == [0]


def test_every_cpu_kernel_releases_the_gil():
    """The kernels threads.run splits must be nogil to run concurrently; all CPU kernels
    are."""
    for module in (cpu, cpu_rows):
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                assert obj.targetoptions.get("nogil"), f"{module.__name__}.{name}"


def test_bad_offset_is_refused_on_every_path():
    x = np.zeros(cpu.FUSED_PARALLEL_MIN + 8, np.int32)
    for size in (8, x.size):
        with pytest.raises(ValueError, match="offset"):
            cpu_rows.log_softmax_forward(x[:size], np.empty(size, np.int32), 8, 1 << 30)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers():
    """Worker threads do not survive fork: a child (e.g. a DataLoader worker) must not
    queue parts to the parent's threads and wait forever."""
    import multiprocessing
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        threads.run(lambda lo, hi: None, 4, 100, 100)         # workers started here
        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=threads.run, args=(_noop, 4, 100, 100))
        child.start()
        child.join(30)
        alive = child.is_alive()
        if alive:
            child.kill()
    finally:
        numba.set_num_threads(old)
    assert not alive and child.exitcode == 0


def _noop(lo, hi):
    pass


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
            threads.run(lambda lo, hi: None, 8, 10, 100)        # one part: no warning
        with pytest.warns(threads.SpinWaitWarning, match="OMP_WAIT_POLICY=passive"):
            threads.run(lambda lo, hi: None, 8, 100, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads.run(lambda lo, hi: None, 8, 100, 10)        # shown once
        threads._SPIN_RISK = True
        torch.set_num_threads(1)                               # no torch threads to spin
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads.run(lambda lo, hi: None, 8, 100, 10)
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
