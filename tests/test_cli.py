"""The bdia-pam command: outputs, resume bit-exactness, one-line errors that write nothing."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bdia_pam import cli
from bdia_pam.data import write_fake_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--width", "16", "--heads", "2", "--batch-size", "8", "--no-progress"]


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def newest(d):
    """The newest checkpoint directory of run directory ``d``."""
    return d / "checkpoints" / (d / "checkpoints" / "latest").read_text().strip()


def train_rows(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--task", "--data", "--arithmetic", "--reversible", "--no-reversible", "--depth",
                "--width", "--heads", "--frac-bits", "--steps", "--epochs", "--batch-size", "--lr",
                "--schedule", "--seed", "--out", "--device", "--resume", "--compare-float"):
        assert opt in out, opt


def test_train_writes_outputs_and_evaluate_reads_them(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(["train", "--arithmetic", "float", *TINY, "--steps", "3", "--out", str(out)], capsys)
    assert code == 0, err
    for f in ("config.json", "metrics.jsonl", "metrics.png"):
        assert (out / f).is_file(), f
    for f in ("model.safetensors", "state.safetensors", "manifest.json"):
        assert (newest(out) / f).is_file(), f
    assert not list(out.rglob("*.pt")), "no pickle files in a run directory"
    assert "test accuracy" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["width"] == 16 and cfg["model"]["arithmetic"] == "float"
    assert len(train_rows(out)) == 3
    code, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert code == 0, err
    m = json.loads(stdout)
    assert m["step"] == 3 and 0.0 <= m["test_acc"] <= 1.0


@pytest.mark.parametrize("arithmetic", ["float", "pam"])
def test_resume_reproduces_losses_bit_for_bit(tmp_path, capsys, arithmetic):
    if arithmetic == "pam":
        pytest.importorskip("pam.optim")
    common = ["train", "--arithmetic", arithmetic, *TINY, "--steps", "4", "--seed", "5", "--lr", "1e-2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([*common, "--out", str(a)], capsys)[0] == 0
    assert run([*common, "--out", str(b), "--stop-after", "2"], capsys)[0] == 0
    assert len(train_rows(b)) == 2
    code, _, err = run(["train", "--resume", str(b), "--no-progress"], capsys)
    assert code == 0, err
    ra, rb = train_rows(a), train_rows(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["loss_bits"] for r in ra] == [r["loss_bits"] for r in rb]
    from safetensors.torch import load_file
    wa, wb = load_file(str(newest(a) / "model.safetensors")), load_file(str(newest(b) / "model.safetensors"))
    assert all(torch.equal(wa[k].view(torch.int32), wb[k].view(torch.int32)) for k in wa)


@pytest.mark.parametrize("argv, word", [
    (["--width", "16", "--heads", "3"], "heads"),
    (["--frac-bits", "99"], "frac_bits"),
    (["--task", "text", "--data", "/does/not/exist.txt"], "does not exist"),
    (["--task", "cifar10", "--data", "/does/not/exist"], "does not exist"),
    (["--lr", "-1"], "--lr"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, word):
    out = tmp_path / "run"
    code, stdout, err = run(["train", "--arithmetic", "float", *argv, "--out", str(out)], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("bdia-pam: error:") and word in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--arithmetic", "float", *TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}
    code, _, err = run(["train", "--arithmetic", "float", *TINY, "--steps", "1", "--out", str(out)], capsys)
    assert code == 2 and "--resume" in err
    assert before == {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}


def test_corrupt_or_incompatible_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", "--arithmetic", "float", *TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    # a changed model option on resume
    code, _, err = run(["train", "--resume", str(out), "--width", "32"], capsys)
    assert code == 2 and "--width" in err
    # weights that no longer match the manifest (the only checkpoint is damaged)
    w = newest(out) / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    for argv in (["evaluate", str(out)], ["train", "--resume", str(out)]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "does not match" in err and len(err.strip().splitlines()) == 1
    (newest(out) / "manifest.json").write_bytes(b"garbage")
    code, _, err = run(["evaluate", str(out)], capsys)
    assert code == 2 and "unreadable" in err
    code, _, err = run(["evaluate", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err


def test_text_and_cifar10_tasks(tmp_path, capsys):
    txt = tmp_path / "t.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    code, stdout, err = run(["train", "--task", "text", "--data", str(txt), "--arithmetic", "float", *TINY,
                             "--context", "16", "--steps", "2", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    assert "bits/char" in stdout
    root = write_fake_cifar10(str(tmp_path / "cifar"), 4, 4)
    code, stdout, err = run(["train", "--task", "cifar10", "--data", root, "--arithmetic", "float", *TINY,
                             "--patch-size", "8", "--steps", "1", "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err


def test_compare_float_prints_both(tmp_path, capsys):
    pytest.importorskip("pam.optim")
    code, stdout, err = run(["train", "--arithmetic", "pam_matmul", *TINY, "--steps", "2", "--compare-float",
                             "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "pam_matmul" in stdout and "float" in stdout and stdout.count("%") >= 2
    assert newest(tmp_path / "r" / "compare_float").joinpath("model.safetensors").is_file()


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "bdia_pam", "train", "--heads", "5", "--out", "/nonexistent/x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "heads" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_batch_size_does_not_change_the_metric(tmp_path, capsys):
    pytest.importorskip("pam.optim")
    txt = tmp_path / "t.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out = tmp_path / "t"
    code, _, err = run(["train", "--task", "text", "--data", str(txt), "--arithmetic", "pam_matmul", *TINY,
                        "--context", "8", "--steps", "1", "--out", str(out)], capsys)
    assert code == 0, err
    seen = set()
    for bs in ("1", "3", "1024"):
        code, stdout, err = run(["evaluate", str(out), "--json", "--batch-size", bs], capsys)
        assert code == 0, err
        m = json.loads(stdout)
        seen.add((m["test_bpc"], m["test_loss"]))
    assert len(seen) == 1, seen


@pytest.mark.parametrize("argv, word", [
    (["--seed", str(2 ** 70)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--epochs", "inf"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--lr", "1e6"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--checkpoint-every", "-5"], "--checkpoint-every"),
    (["--keep", "0"], "--keep"),
    (["--steps", "10", "--warmup-steps", "10"], "--warmup-steps"),
    (["--batch-size", "5000"], "--batch-size"),
    (["--steps", str(10 ** 12)], "--steps"),
    (["--task", "text", "--context", "20000"], "GiB"),
    (["--task", "text", "--data", "/dev/zero"], "not a regular file"),
])
def test_values_are_checked_before_training(tmp_path, capsys, argv, word):
    out = tmp_path / "run"
    code, stdout, err = run(["train", "--arithmetic", "float", *argv, "--out", str(out)], capsys)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("bdia-pam: error:") and word in lines[0], err
    assert not out.exists()


def test_fifo_and_short_held_out_data_are_refused_before_training(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    short = tmp_path / "short.txt"
    short.write_text("x" * 300, encoding="utf-8")  # 30 held-out bytes < context + 1
    root = write_fake_cifar10(str(tmp_path / "cifar"), 4, 0)  # an empty test_batch
    for argv, word in ((["--task", "text", "--data", str(fifo)], "not a regular file"),
                       (["--task", "text", "--data", str(short), "--context", "64"], "held-out"),
                       (["--task", "cifar10", "--data", root], "no images")):
        code, _, err = run(["train", "--arithmetic", "float", *argv, "--out", str(tmp_path / "run")], capsys)
        assert code == 2 and word in err and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


def test_unwritable_out_is_one_line(tmp_path, capsys):
    for out in ("/proc/bdia-pam-run", "/proc/self/status/run"):
        code, _, err = run(["train", "--arithmetic", "float", *TINY, "--steps", "1", "--out", out], capsys)
        assert code == 2 and err.startswith("bdia-pam: error:") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_divergence_is_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from bdia_pam.model import BDIATransformer
    out = tmp_path / "run"
    orig = BDIATransformer.loss
    calls = [0]

    def loss(self, *a, **k):
        calls[0] += 1
        value = orig(self, *a, **k)
        return value * float("inf") if calls[0] == 3 else value
    monkeypatch.setattr(BDIATransformer, "loss", loss)
    code, _, err = run(["train", *TINY, "--arithmetic", "float", "--steps", "4", "--checkpoint-every", "1",
                        "--out", str(out)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err, err
    assert last.startswith("bdia-pam: error: training diverged") and "checkpoint (step 2) is kept" in last
    monkeypatch.undo()
    code, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["step"] == 2


@pytest.mark.parametrize("arithmetic,during", [("pam", 1), ("float", 2)])
def test_pam_training_on_cpu_runs_torch_on_one_thread(arithmetic, during, tmp_path,
                                                       monkeypatch):
    """Fully PAM CPU training runs torch's glue on one thread (pam's kernels have their
    own threads) and restores the count afterwards; float training keeps torch's."""
    seen = []
    monkeypatch.setattr(cli, "_run_train",
                        lambda *a: (seen.append(torch.get_num_threads()), 0)[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["train", "--arithmetic", arithmetic, *TINY, "--steps", "1",
                         "--out", str(tmp_path / "run")]) == 0
        assert seen == [during] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
