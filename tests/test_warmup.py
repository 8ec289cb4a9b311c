"""pam.kernels.warmup: the first-run parallel compilation of the CPU kernels."""
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
])
def test_types_round_trip(t):
    assert warmup.decode_type(json.loads(json.dumps(warmup.encode_type(t)))) == t


def test_unknown_types_are_refused_by_name():
    with pytest.raises(ValueError, match="UniTuple"):
        warmup.encode_type(types.UniTuple(types.int64, 2))


def test_manifest_names_existing_kernels_with_decodable_types():
    """Drift check: every entry is a dispatcher of pam.kernels.cpu / cpu_conv whose recorded
    arguments decode, and the manifest covers the slow kernels of a training step."""
    entries = warmup.load_manifest()
    assert entries
    for e in entries:
        disp = getattr(warmup.MODULES[e["module"]], e["name"])
        assert hasattr(disp, "compile"), e["name"]
        sig = tuple(warmup.decode_type(a) for a in e["args"])
        assert len(sig) == disp.py_func.__code__.co_argcount, e["name"]
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


def test_warm_fills_the_cache_then_skips(tmp_path):
    """In a fresh cache: warm() compiles two kernels, one in its own process and one in a
    worker; a new process then loads both from the cache (no compilation) and a second
    warm() is skipped."""
    manifest = tmp_path / "manifest.json"
    i32 = ["array", "int32", 1, "C", False]
    manifest.write_text(json.dumps(dict(kernels=[
        dict(module="cpu", name=name, args=[i32, i32, "int64", i32], seconds=1.0,
             workloads=["test"]) for name in ("mul", "div")])))
    script = textwrap.dedent(f"""
        import json, sys, types
        pkg = types.ModuleType("pam"); pkg.__path__ = [{os.path.join(ROOT, "pam")!r}]
        sys.modules["pam"] = pkg
        import numpy as np
        from pam.kernels import cpu, warmup
        if sys.argv[1] == "warm":
            print(json.dumps(warmup.warm(processes=2, manifest={str(manifest)!r})))
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

    first = run("warm")
    assert not first["skipped"] and first["processes"] == 2 and first["kernels"] == 2
    assert run("call") == dict(mul=[1, 0], div=[1, 0])      # [cache hits, compilations]
    assert run("warm")["skipped"]


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
