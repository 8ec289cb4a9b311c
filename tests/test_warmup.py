"""pam.kernels.warmup: the first-run parallel compilation of the CPU kernels."""
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
from numba import njit, types

from pam.kernels import warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("t", [
    types.int64, types.boolean, types.float32,
    types.Array(types.int32, 3, "C"), types.Array(types.float32, 1, "A", readonly=True),
    types.Array(types.int64, 2, "F"),
    types.Tuple([types.Array(types.int32, 1, "C"), types.boolean, types.int64]),
    types.UniTuple(types.int64, 2),
])
def test_types_round_trip(t):
    assert warmup.decode_type(json.loads(json.dumps(warmup.encode_type(t)))) == t


def test_unknown_types_are_refused_by_name():
    with pytest.raises(ValueError, match="unicode"):
        warmup.encode_type(types.unicode_type)
    with pytest.raises(ValueError, match="unicode"):
        warmup.encode_type(types.Tuple([types.int64, types.unicode_type]))


def test_manifest_names_existing_kernels_with_decodable_types():
    """Drift check: every entry is a dispatcher of pam.kernels.cpu / cpu_conv whose recorded
    arguments decode, and the manifest covers the slow kernels of a training step."""
    entries = warmup.load_manifest()
    assert entries
    for e in entries:
        disp = getattr(warmup.MODULES[e["module"]], e["name"])
        assert hasattr(disp, "compile"), e["name"]
        sig = tuple(warmup.decode_type(a) for a in e["args"])
        code = disp.py_func.__code__
        star = 1 if code.co_flags & inspect.CO_VARARGS else 0    # splittable kernels
        assert len(sig) == code.co_argcount + star, e["name"]
    train = {e["name"] for e in warmup.load_manifest(workload="bdia-pam train")}
    assert {"_mm_range", "_pack_range", "_grad_range", "_adamw_table_rows"} <= train
    assert train < {e["name"] for e in entries}          # the GPT's GELU kernels besides


def test_partition_balances_recorded_time():
    entries = [dict(name=str(i), seconds=s) for i, s in enumerate([5, 4, 3, 3, 2, 1, 1, 1])]
    bins = warmup.partition(entries, 3)
    assert sorted(e["name"] for b in bins for e in b) == sorted(e["name"] for e in entries)
    loads = [sum(e["seconds"] for e in b) for b in bins]
    assert max(loads) - min(loads) <= 1


def test_recorder_sees_outermost_compilations_only():
    @njit
    def fresh(a):                     # not a pam kernel: ignored
        return a + 1
    with warmup.Recorder() as rec:
        fresh(1)
    assert rec.entries == []


def _tiny_warm_run(tmp_path):
    """run(mode) in a fresh process on a fresh cache, with a two-kernel manifest: "warm"
    (warm() with 2 processes), "early" (the two workers started first, loaded by file path
    as bdia-pam's launcher does, then handed to warm()), "call" (call both kernels: their
    [cache hits, compilations])."""
    manifest = tmp_path / "manifest.json"
    i32 = ["array", "int32", 1, "C", False]
    manifest.write_text(json.dumps(dict(kernels=[
        dict(module="cpu", name=name, args=[i32, i32, "int64", i32], seconds=1.0,
             workloads=["test"]) for name in ("mul", "div")])))
    pam_dir = os.path.join(ROOT, "pam")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys, types
        if sys.argv[1] == "early":      # the launcher's way: pam not imported yet
            spec = importlib.util.spec_from_file_location(
                "ww", {os.path.join(pam_dir, "kernels", "warm_worker.py")!r})
            ww = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ww)
            workers = ww.spawn({pam_dir!r}, {str(manifest)!r}, "test", 2, range(2))
            assert "pam" not in sys.modules and "numba" not in sys.modules
        pkg = types.ModuleType("pam"); pkg.__path__ = [{pam_dir!r}]
        sys.modules["pam"] = pkg
        import numpy as np
        from pam.kernels import cpu, warmup
        if sys.argv[1] == "warm":
            print(json.dumps(warmup.warm(processes=2, manifest={str(manifest)!r})))
        elif sys.argv[1] == "early":
            print(json.dumps(warmup.warm(manifest={str(manifest)!r}, workload="test",
                                         workers=workers)))
        else:
            a = np.arange(4, dtype=np.int32)
            stats = {{}}
            for k in (cpu.mul, cpu.div):
                k(a, a, 0, np.empty(4, np.int32))
                stats[k.__name__] = [sum(k.stats.cache_hits.values()),
                                     sum(k.stats.cache_misses.values())]
            print(json.dumps(stats))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run(mode):
        out = subprocess.run([sys.executable, "-c", script, mode], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.split("\n")[-2])
    return run


def test_warm_fills_the_cache_then_skips(tmp_path):
    """In a fresh cache: warm() compiles two kernels, one in its own process and one in a
    worker; a new process then loads both from the cache (no compilation) and a second
    warm() is skipped."""
    run = _tiny_warm_run(tmp_path)
    first = run("warm")
    assert not first["skipped"] and first["processes"] == 2 and first["kernels"] == 2
    assert run("call") == dict(mul=[1, 0], div=[1, 0])      # [cache hits, compilations]
    assert run("warm")["skipped"]


def test_workers_started_before_pam_loads_fill_the_cache(tmp_path):
    """The launcher's order: both workers start from the standard library alone, then
    warm() only waits for them and writes the marker; the kernels load from the cache."""
    run = _tiny_warm_run(tmp_path)
    first = run("early")
    assert not first["skipped"] and first["processes"] == 2 and first["kernels"] == 2
    assert run("call") == dict(mul=[1, 0], div=[1, 0])
    assert run("early")["skipped"]


def test_train_goes_on_when_the_warm_up_fails(monkeypatch, capsys):
    """bdia-pam train's warm-up step: a failed worker is reported and training starts
    anyway (kernels compile on first use)."""
    from bdia_pam import cli

    def broken(**kw):
        raise RuntimeError("kernel warm-up worker failed:\nboom")
    monkeypatch.setenv("PAM_WARMUP", "1")
    monkeypatch.setattr(warmup, "warm", broken)
    cli._warm_kernels()
    assert "warm-up failed" in capsys.readouterr().err


def test_partition_keeps_code_groups_together():
    """Kernels sharing compiled helpers (one code_group) land in one process's list, and
    the lists stay within the heaviest group of each other."""
    entries = warmup.load_manifest()
    bins = warmup.partition(entries, 2)
    assert sorted(e["name"] for b in bins for e in b) == sorted(e["name"] for e in entries)
    where = {}
    for i, b in enumerate(bins):
        for e in b:
            assert where.setdefault(warmup.code_group(e), i) == i, e["name"]
    groups = {}
    for e in entries:
        groups[warmup.code_group(e)] = groups.get(warmup.code_group(e), 0.0) + e["seconds"]
    loads = [sum(e["seconds"] for e in b) for b in bins]
    assert max(loads) - min(loads) <= max(groups.values())
    assert warmup.code_group({"module": "cpu_rows", "name": "_layer_norm_forward_rows_wb"}) \
        == warmup.code_group({"module": "cpu_rows", "name": "_column_sums"})
    assert warmup.code_group({"module": "cpu", "name": "_mm_range"}) \
        != warmup.code_group({"module": "cpu", "name": "_softmax_forward_rows"})


@pytest.mark.parametrize("argv,environ,wanted", [
    (["train"], {}, True),
    (["train", "--steps", "3", "--arithmetic", "pam_matmul"], {}, True),
    (["train", "--arithmetic", "float"], {}, False),
    (["train", "--arithmetic=float"], {}, False),
    (["train", "--device", "cuda"], {}, False),
    (["train", "--help"], {}, False),
    (["evaluate", "run"], {}, False),
    ([], {}, False),
    (["train"], {"PAM_WARMUP": "0"}, False),
    (["train"], {"WORLD_SIZE": "2"}, False),
])
def test_the_command_starts_workers_only_for_cpu_pam_training(argv, environ, wanted):
    from bdia_pam import _entry
    assert _entry.wants_warmup(argv, environ) is wanted


def test_the_command_starts_its_workers_before_torch_loads(tmp_path, monkeypatch):
    """bdia_pam._entry starts one worker per core without importing torch or pam; once
    the warm-up's marker exists, it starts none."""
    code = ("import sys, bdia_pam._entry as e; w = e.start_warmup(['train']); "
            "print(w and len(w.procs), 'torch' in sys.modules, 'pam' in sys.modules); "
            "w and w.kill()")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    env = dict(os.environ, PAM_WARMUP="1")
    env.pop("WORLD_SIZE", None)

    def launch():
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=True).stdout.split()
    assert launch() == [str(warmup.warm_worker.cores()), "False", "False"]
    marker = warmup.warm_worker.marker_path(warmup.PAM_DIR, warmup.MANIFEST, "bdia-pam train")
    assert os.path.dirname(marker) == str(tmp_path / "cache")
    assert marker != warmup.warm_worker.marker_path(warmup.PAM_DIR, warmup.MANIFEST)
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").close()
    assert launch() == ["None", "False", "False"]


def test_training_that_needs_no_kernels_stops_the_workers(tmp_path, monkeypatch):
    """Workers started for a run that turns out to train in float are killed at once."""
    from bdia_pam import cli

    class Workers:
        killed = 0

        def kill(self):
            Workers.killed += 1
    monkeypatch.setenv("PAM_WARMUP", "1")
    rc = cli.main(["train", "--arithmetic", "float", "--depth", "1", "--width", "16",
                   "--heads", "2", "--batch-size", "8", "--no-progress", "--steps", "1",
                   "--out", str(tmp_path / "run")], warmup_workers=Workers())
    assert rc == 0 and Workers.killed == 1
