"""Smoke test of validation/bdia.py: a tiny float-only run, its JSON/PNG, the run cache, and the
gamma = 0 ("nogamma") model it trains."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bdia_script():
    spec = importlib.util.spec_from_file_location("validation_bdia",
                                                  os.path.join(ROOT, "validation", "bdia.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, monkeypatch, out, *extra):
    monkeypatch.setattr(sys, "argv", ["bdia.py", "--quick", "--epochs", "1", "--arithmetics", "float",
                                      "--frac-bits", "6", "9", "--out", str(out), *extra])
    mod.main()
    with open(os.path.join(out, "bdia.json")) as f:
        return json.load(f)


def test_quick_run_writes_table_json_png_and_reuses_cache(bdia_script, tmp_path, monkeypatch, capsys):
    res = _run(bdia_script, monkeypatch, tmp_path)
    assert res["complete"] is True
    assert set(res["table"]) == {"stored/float", "bdia/float", "nogamma/float"}
    for name, row in res["table"].items():
        assert row["n"] == 1 and row["failed"] == 0, name
        assert 0.0 <= row["test_acc"][0] <= 1.0
    assert set(res["ablation"]) == {"6", "9"}
    runs = res["runs"]
    assert sorted(runs) == sorted(["stored/float/l9/s0", "bdia/float/l9/s0", "nogamma/float/l9/s0",
                                   "bdia/float/l6/s0"])
    assert runs["stored/float/l9/s0"]["stack"] == "PlainStack"
    assert runs["bdia/float/l9/s0"]["stack"] == "ReversibleStack"
    assert runs["nogamma/float/l9/s0"]["stack"] == "ReversibleStack"
    # the three variants are genuinely different trainings
    accs = {k: (r["test_loss"], r["train_loss_last_epoch"]) for k, r in runs.items()}
    assert len(set(accs.values())) == 4
    assert os.path.getsize(tmp_path / "bdia.png") > 1000
    assert any(line.startswith("| bdia | float | 1 |") for line in res["table_markdown"])
    capsys.readouterr()
    again = _run(bdia_script, monkeypatch, tmp_path)  # everything cached: no retraining
    assert "reusing 4 cached runs" in capsys.readouterr().out
    assert again["runs"] == runs


def test_nogamma_model_trains_the_eval_mode_update(bdia_script):
    from bdia_pam.model import BDIAConfig, BDIATransformer
    cfg = BDIAConfig(arithmetic="float", depth=3, width=16, heads=2, patch_size=4)
    torch.manual_seed(0)
    m = bdia_script.NoGammaTransformer(cfg)
    x = torch.rand(4, 1, 8, 8)
    m.train()
    y_train = m(x, generator=torch.Generator().manual_seed(1))
    assert m.stack.training and all(b.training for b in m.stack.blocks)  # flags restored
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
    # gamma = 0 in training == the eval-mode (E[gamma] = 0) forward, bit for bit
    assert torch.equal(y_train.detach().view(torch.int32), y_eval.view(torch.int32))
    # ... and differs from the BDIA training forward (random gamma) of the same weights
    bdia = BDIATransformer(cfg)
    bdia.load_state_dict(m.state_dict())
    bdia.train()
    with torch.no_grad():
        y_bdia = bdia(x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(y_bdia, y_eval)
    # gradients reach every block (straight-through through Q_l)
    y_train.sum().backward()
    for k, blk in enumerate(m.stack.blocks):
        assert blk.mlp.fc2.weight.grad is not None and blk.mlp.fc2.weight.grad.abs().sum() > 0, k
