"""Smoke tests of validation/bdia_overfit.py: a tiny float run on the digits subset (JSON, curves,
table, plot, cache), the CIFAR-10 path on a generated stand-in directory in the CIFAR-10 python
format, and its clear errors."""
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, os.path.join(ROOT, "validation"))
    spec = importlib.util.spec_from_file_location("validation_bdia_overfit",
                                                  os.path.join(ROOT, "validation", "bdia_overfit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_cifar_standin(root, n_per_batch=4, n_test=6, seed=0):
    """The 'CIFAR-10 python version' layout: data_batch_1..5, test_batch, batches.meta (pickles)."""
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = {b"label_names": [s.encode() for s in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                  "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def test_quick_digits_run(script, tmp_path, capsys):
    out = script.main(["--quick", "--seeds", "2", "--pam-variants", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bdia_overfit_quick.json").read_text())
    assert res["complete"] is True and res["metric"] == "acc"
    assert res["config"]["n_train"] == 200 and res["config"]["n_heldout"] == 1797 - 200
    runs = res["runs"]
    assert sorted((r["variant"], r["arithmetic"], r["seed"]) for r in runs) == sorted(
        (v, "float", s) for v in ("stored", "bdia", "nogamma") for s in (0, 1))
    stacks = {r["variant"]: r["stack"] for r in runs}
    assert stacks == {"stored": "PlainStack", "bdia": "ReversibleStack", "nogamma": "ReversibleStack"}
    for r in runs:
        c = r["curve"]
        assert c["step"] == [4, 8, 12]  # --quick: 12 steps, evaluated every 4
        assert r["val_loss_best"] == min(c["val_loss"]) and r["val_loss_final"] == c["val_loss"][-1]
        assert r["best_step"] == c["step"][c["val_loss"].index(min(c["val_loss"]))]
        assert 0 <= r["val_acc_final"] <= 1 and r["train_eval_loss_final"] > 0 and r["wall_s"] > 0
    # the three variants are different trainings; seeds differ
    assert len({(r["val_loss_final"], r["train_loss_final"]) for r in runs}) == len(runs)
    assert [t["variant"] for t in res["table"]] == ["stored", "bdia", "nogamma"]
    assert all(t["n"] == 2 for t in res["table"])
    stored = [r["val_loss_best"] for r in runs if r["variant"] == "stored"]
    assert res["table"][0]["val_loss_best"][0] == pytest.approx(np.mean(stored))
    assert any(line.startswith("| bdia | float | 2 |") for line in res["table_markdown"])
    by = {(r["variant"], r["seed"]): r for r in runs}
    paired = {p["variant"]: p for p in res["paired"]}
    assert set(paired) == {"bdia", "nogamma"}
    d = [by[("bdia", s)]["val_loss_final"] - by[("stored", s)]["val_loss_final"] for s in (0, 1)]
    assert paired["bdia"]["val_loss_final_diff_per_seed"] == d
    assert paired["bdia"]["val_loss_final_diff"][0] == pytest.approx(np.mean(d))
    assert os.path.getsize(tmp_path / "bdia_overfit_quick.png") > 1000
    assert out["runs"] == runs
    capsys.readouterr()
    script.main(["--quick", "--seeds", "2", "--pam-variants", "--out", str(tmp_path)])
    assert "reusing 6 cached runs" in capsys.readouterr().out  # nothing retrained


def test_runs_of_a_second_process_are_merged(script, tmp_path):
    """--arithmetics splits the job list; each write keeps the runs the other process stored."""
    common = ["--quick", "--seeds", "1", "--variants", "stored", "--pam-variants", "stored",
              "--pam-steps", "4", "--out", str(tmp_path)]
    first = script.main(common + ["--arithmetics", "pam"])
    assert [(r["variant"], r["arithmetic"]) for r in first["runs"]] == [("stored", "pam")]
    assert first["complete"] is False
    second = script.main(common + ["--arithmetics", "float"])
    assert sorted(r["arithmetic"] for r in second["runs"]) == ["float", "pam"]
    assert second["complete"] is True
    pam_run = [r for r in second["runs"] if r["arithmetic"] == "pam"][0]
    assert pam_run["steps"] == 4 and pam_run["curve"]["step"] == [4]


def test_cifar10_standin(script, tmp_path):
    root = write_cifar_standin(str(tmp_path / "cifar-10-batches-py"))
    out = script.main(["--task", "cifar10", "--data", root, "--quick", "--seeds", "1",
                       "--out", str(tmp_path / "res")])
    res = json.loads((tmp_path / "res" / "bdia_overfit_cifar10_quick.json").read_text())
    assert res["complete"] is True and out["complete"] is True
    assert res["config"]["n_train"] == 20 and res["config"]["n_heldout"] == 6
    assert res["config"]["model"]["patch_size"] == 4  # the paper's patches on 32x32x3
    assert sorted(r["variant"] for r in res["runs"]) == ["bdia", "nogamma", "revvit", "stored"]
    assert all(r["arithmetic"] == "float" for r in res["runs"])  # no PAM runs by default on CIFAR
    assert {r["variant"]: r["stack"] for r in res["runs"]}["revvit"] == "CouplingStack"
    for r in res["runs"]:
        assert len(r["curve"]["val_loss"]) == 3 and np.isfinite(r["val_loss_final"])


def test_cifar10_errors(script, tmp_path):
    with pytest.raises(SystemExit) as e:
        script.main(["--task", "cifar10"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="does not exist"):
        script.main(["--task", "cifar10", "--data", str(tmp_path / "nowhere"), "--quick"])
    root = write_cifar_standin(str(tmp_path / "c"))
    os.remove(os.path.join(root, "data_batch_3"))
    with pytest.raises(ValueError, match="data_batch_3"):
        script.main(["--task", "cifar10", "--data", root, "--quick"])
    root = write_cifar_standin(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="--train-images"):
        script.main(["--task", "cifar10", "--data", root, "--quick", "--train-images", "21"])


def test_quick_text_run(script, tmp_path):
    out = script.main(["--task", "text", "--quick", "--seeds", "1", "--variants", "stored", "bdia",
                       "--pam-variants", "--out", str(tmp_path)])
    assert out["metric"] == "bpc" and out["complete"] is True
    assert out["config"]["n_train"] == 2048 and out["config"]["n_heldout"] == 64 * 16 + 1
    from bdia_pam.data import default_text
    held = default_text().encode("utf-8")[2048:2048 + 64 * 16 + 1]
    bytes_per_char = len(held) / len(held.decode("utf-8", errors="ignore"))
    assert bytes_per_char > 1  # this slice holds a few multi-byte characters
    for r in out["runs"]:  # bits per character = nats / ln 2 * bytes per character
        assert r["val_bpc_final"] == pytest.approx(r["val_loss_final"] / np.log(2) * bytes_per_char, rel=1e-6)
    assert os.path.exists(tmp_path / "bdia_overfit_text_quick.json")
