"""Smoke test of validation/bdia_paper_memory.py on tiny shapes: the JSON rows (variant keys, the
paper's numbers), and the memory shape the paper claims: held activations of the stored network
grow with depth, BDIA's and the RevViT coupling's do not."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, os.path.join(ROOT, "validation"))
    spec = importlib.util.spec_from_file_location("validation_bdia_paper_memory",
                                                  os.path.join(ROOT, "validation", "bdia_paper_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run(script, tmp_path):
    script.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bdia_paper_memory_quick.json").read_text())
    rows = res["rows"]
    paper = {r["variant"]: r for r in rows if r["setting"] == "paper"}
    assert set(paper) == {"stored", "bdia", "revvit"}
    assert {v: r["paper_peak_mb"] for v, r in paper.items()} == {"bdia": 693.4, "stored": 1570.6, "revvit": 572.7}
    assert all(r["depth"] == 6 and r["batch"] == 4 for r in paper.values())
    # the same ViT parameters in all three
    assert len({r["parameters"] for r in paper.values()}) == 1
    sweep = {(r["variant"], r["depth"]): r for r in rows if r["setting"] == "sweep"}
    assert set(sweep) == {(v, d) for v in ("stored", "bdia", "revvit") for d in (2, 8)}
    held = {k: r["held_mib"] for k, r in sweep.items()}
    assert held[("stored", 8)] > 2.5 * held[("stored", 2)]  # stored: grows with depth
    for v in ("bdia", "revvit"):
        assert held[(v, 8)] < 1.1 * held[(v, 2)], v  # reversible: flat
        assert held[(v, 8)] < 0.25 * held[("stored", 8)], v
    assert res["ratios"]["paper_stored_over_bdia"] == pytest.approx(1570.6 / 693.4)
    assert any(line.startswith("| revvit |") for line in res["table_markdown"])
    assert os.path.getsize(tmp_path / "bdia_paper_memory_quick.png") > 1000


def test_allocation_trace_counts_from_its_own_start(script):
    keep = []
    peak, end = script.allocation_trace(lambda: keep.append(torch.ones(1000)))
    assert end >= 4000 and peak >= end
    keep.clear()  # freed outside a profile: the next trace must not see it
    peak2, end2 = script.allocation_trace(lambda: keep.append(torch.ones(10)))
    assert 40 <= end2 < 4000 and peak2 < 4000
