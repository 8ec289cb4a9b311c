"""Fault injection: kills during checkpoint writes, signals at each phase of a step, planted
pickles, torn metrics and two trainers on one directory. A run directory must always hold a
complete checkpoint that resumes to the same losses and weights, bit for bit, as a run that
was never disturbed.

Kills are emulated in-process where that is exact: at each write point of a save the test
copies the run directory as it is at that moment -- what a SIGKILL there would leave on disk
-- and later loads and resumes the copy. One test SIGKILLs a real subprocess.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from bdia_pam import checkpoint as ckpt
from bdia_pam import cli
from bdia_pam import train as train_mod
from bdia_pam.model import BDIATransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arithmetic", "float", "--depth", "2", "--width", "16", "--heads", "2", "--batch-size", "8",
        "--no-progress", "--seed", "3", "--lr", "1e-2"]
STEPS = ["--steps", "4", "--eval-every", "2", "--checkpoint-every", "4"]
POINTS = ["mkdir", "model.safetensors:begin", "model.safetensors:written", "state.safetensors:begin",
          "state.safetensors:written", "manifest.json:begin", "manifest.json:written", "rename", "pointer",
          "prune"]


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def rows(d, kind="train"):
    return [r for r in train_mod.read_metrics(str(d)) if r["type"] == kind]


def weights(d):
    w, state, _ = ckpt.load(str(d), warn=lambda line: None)
    return w, state["step"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed 4-step run (checkpoints at every step) and its loss bits."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(["train", *TINY, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "1",
                     "--keep", "10", "--out", str(out)]) == 0
    per_step = {}
    for name in ckpt.list_checkpoints(str(out)):
        w, st, _ = ckpt._load_one(str(out / "checkpoints" / name))
        per_step[st["step"]] = w
    return {"out": out, "bits": [r["loss_bits"] for r in rows(out)], "weights": per_step,
            "evals": [r["test_loss"] for r in rows(out, "eval")]}


def assert_resumes_like_reference(d, reference, capsys):
    code, _, err = run(["train", "--resume", str(d), "--no-progress"], capsys)
    assert code == 0, err
    assert [r["step"] for r in rows(d)] == [1, 2, 3, 4]
    assert [r["loss_bits"] for r in rows(d)] == reference["bits"]
    w, step = weights(d)
    assert step == 4 and same_weights(w, reference["weights"][4])


# --------------------------------------------------------------------------- no pickle
class _Payload:
    """Unpickling this creates ``path`` -- what a malicious trainer.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_planted_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    assert run(["train", *TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    payload = pickle.dumps({"step": 1, "x": _Payload(str(marker))})
    # a pickle beside the checkpoint files, and a run directory in the old (v1) layout
    for where in (out / "trainer.pt", next((out / "checkpoints").glob("step-*")) / "trainer.pt"):
        where.write_bytes(payload)
    code, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["step"] == 1
    old = tmp_path / "old"
    old.mkdir()
    (old / "trainer.pt").write_bytes(payload)
    shutil.copy(next((out / "checkpoints").glob("step-*")) / "model.safetensors", old / "model.safetensors")
    for argv in (["evaluate", str(old)], ["train", "--resume", str(old), "--no-progress"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "pickle" in err and len(err.strip().splitlines()) == 1, err
    # a pickle in place of a state file, with a matching hash in the manifest: parsed as
    # safetensors (which it is not), never unpickled
    mdir = next((out / "checkpoints").glob("step-*"))
    man = json.loads((mdir / "manifest.json").read_text())
    shutil.copy(mdir / "trainer.pt", mdir / "state.safetensors")
    man["files"]["state.safetensors"] = {"bytes": len(payload), "sha256": ckpt._sha256(str(mdir / "trainer.pt"))}
    (mdir / "manifest.json").write_text(json.dumps(man))
    code, _, err = run(["evaluate", str(out)], capsys)
    assert code == 2 and "corrupt" in err, err
    assert not marker.exists()


def test_cifar_pickle_payload_is_refused(tmp_path, capsys):
    from bdia_pam.data import write_fake_cifar10
    marker = tmp_path / "pwned"
    root = write_fake_cifar10(str(tmp_path / "cifar"), 4, 4)
    with open(os.path.join(root, "test_batch"), "wb") as f:
        pickle.dump({b"data": _Payload(str(marker)), b"labels": [0]}, f)
    code, _, err = run(["train", "--task", "cifar10", "--data", root, *TINY, "--patch-size", "8", "--steps", "1",
                        "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "refusing" in err and not marker.exists()
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- kills during a save
def test_kill_at_every_write_point_leaves_a_complete_checkpoint(tmp_path, capsys, monkeypatch, reference):
    """Copy the run directory at each write point of the second save (what a SIGKILL there leaves),
    with the file being written complete or torn; every copy loads the newest checkpoint that
    was committed and resumes bit-exactly."""
    out = tmp_path / "run"
    images, saves = {}, []

    def fault(point):
        if point == "mkdir":
            saves.append(point)
        if len(saves) == 2:
            images[point] = tmp_path / f"kill-{point.replace(':', '-')}"
            shutil.copytree(out, images[point])
            if point.endswith(":written"):  # the same moment with the file half on disk
                torn = tmp_path / f"torn-{point.replace(':', '-')}"
                shutil.copytree(out, torn)
                f = next(torn.glob(f"checkpoints/.tmp-*/{point.split(':')[0]}"))
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
                images["torn " + point] = torn

    monkeypatch.setattr(ckpt, "_fault", fault)
    assert run(["train", *TINY, *STEPS, "--checkpoint-every", "1", "--stop-after", "2", "--out", str(out)],
               capsys)[0] == 0
    monkeypatch.setattr(ckpt, "_fault", lambda point: None)
    assert set(POINTS) <= set(images)
    for point, d in images.items():
        committed = POINTS.index(point) > POINTS.index("rename") if point in POINTS else False
        w, step = weights(d)
        assert step == (2 if committed else 1), point
        assert same_weights(w, reference["weights"][step]), point
        code, stdout, err = run(["evaluate", str(d), "--json"], capsys)
        assert code == 0 and json.loads(stdout)["step"] == step, (point, err)
    for point in ("manifest.json:written", "pointer"):
        assert_resumes_like_reference(images[point], reference, capsys)
        assert not list((images[point] / "checkpoints").glob(".tmp-*")), "leftovers are removed"


def test_real_sigkill_during_save(tmp_path, reference, capsys):
    """SIGKILL a real trainer after the manifest of its second checkpoint was written, before the
    rename: the first checkpoint stands and the run resumes bit-exactly."""
    out = tmp_path / "run"
    script = ("import os, signal, sys\n"
              "from bdia_pam import checkpoint, cli\n"
              "n = [0]\n"
              "def fault(point):\n"
              "    n[0] += point == 'manifest.json:written'\n"
              "    if n[0] == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
              "checkpoint._fault = fault\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "train", *TINY, *STEPS, "--checkpoint-every", "1",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert weights(out)[1] == 1
    assert_resumes_like_reference(out, reference, capsys)


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, reference):
    out = tmp_path / "run"
    assert run(["train", *TINY, *STEPS, "--checkpoint-every", "1", "--stop-after", "2", "--out", str(out)],
               capsys)[0] == 0
    names = ckpt.list_checkpoints(str(out))
    assert names == ["step-000000002", "step-000000001"]  # --keep 2
    f = out / "checkpoints" / names[0] / "state.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    code, stdout, err = run(["evaluate", str(out), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["step"] == 1
    assert "warning: skipped damaged checkpoint step-000000002" in err and "using step-000000001" in err
    assert_resumes_like_reference(out, reference, capsys)
    assert (out / "checkpoints" / "damaged-step-000000002").is_dir()  # set aside, not reused


def test_manifest_without_a_step_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    man_path = next((out / "checkpoints").glob("step-*")) / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["step"]
    man_path.write_text(json.dumps(man))
    for argv in (["evaluate", str(out)], ["train", "--resume", str(out), "--no-progress"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "no valid 'step'" in err and len(err.strip().splitlines()) == 1, err


def test_keep_limits_the_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *TINY, "--steps", "3", "--checkpoint-every", "1", "--keep", "1", "--out", str(out)],
               capsys)[0] == 0
    assert ckpt.list_checkpoints(str(out)) == ["step-000000003"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000000003"


# --------------------------------------------------------------------------- signals
def _sender(sig, at_call, calls=None):
    """A hook that sends ``sig`` to this process on its ``at_call``-th call (1-based)."""
    calls = calls if calls is not None else [0]

    def fire():
        calls[0] += 1
        if calls[0] == at_call:
            os.kill(os.getpid(), sig)
    return fire


def _patch_phase(monkeypatch, phase, fire):
    if phase == "forward":
        orig = BDIATransformer.forward

        def forward(self, *a, **k):
            if self.training:
                fire()
            return orig(self, *a, **k)
        monkeypatch.setattr(BDIATransformer, "forward", forward)
    elif phase == "loss":
        orig_loss = BDIATransformer.loss
        monkeypatch.setattr(BDIATransformer, "loss", lambda self, *a, **k: (fire(), orig_loss(self, *a, **k))[1])
    elif phase == "backward":
        orig_bw = torch.Tensor.backward
        monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (fire(), orig_bw(self, *a, **k))[1])
    elif phase == "opt.step":
        orig_make = train_mod.make_optimizer

        def make(model, tc):
            opt = orig_make(model, tc)
            opt.register_step_pre_hook(lambda *a: fire())  # runs inside opt.step()
            return opt
        monkeypatch.setattr(train_mod, "make_optimizer", make)
    elif phase == "evaluate":
        orig_eval = train_mod.evaluate
        monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: (fire(), orig_eval(*a, **k))[1])


@pytest.mark.parametrize("phase, sig", [("forward", signal.SIGINT), ("loss", signal.SIGTERM),
                                        ("backward", signal.SIGINT), ("opt.step", signal.SIGINT),
                                        ("evaluate", signal.SIGTERM)])
def test_signal_at_each_phase_stops_at_the_step_boundary(tmp_path, capsys, monkeypatch, reference, phase, sig):
    out = tmp_path / "run"
    _patch_phase(monkeypatch, phase, _sender(sig, 1 if phase == "evaluate" else 2))
    code, _, err = run(["train", *TINY, *STEPS, "--out", str(out)], capsys)
    assert code == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}: saved a checkpoint at step 2" in err
    assert [r["step"] for r in rows(out)] == [1, 2]
    w, step = weights(out)
    assert step == 2 and same_weights(w, reference["weights"][2])
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is not None  # handlers were restored
    assert_resumes_like_reference(out, reference, capsys)
    assert [r["step"] for r in rows(out, "eval")] == [2, 4]


def test_second_signal_during_the_save_is_deferred(tmp_path, capsys, monkeypatch, reference):
    out = tmp_path / "run"
    _patch_phase(monkeypatch, "loss", _sender(signal.SIGINT, 2))
    monkeypatch.setattr(ckpt, "_fault", lambda point: point == "model.safetensors:written"
                        and os.kill(os.getpid(), signal.SIGINT))
    code, _, err = run(["train", *TINY, *STEPS, "--out", str(out)], capsys)
    assert code == 130 and "saved a checkpoint at step 2" in err
    monkeypatch.undo()
    assert weights(out)[1] == 2
    assert_resumes_like_reference(out, reference, capsys)


def test_second_signal_outside_a_save_stops_at_once(tmp_path, capsys, monkeypatch, reference):
    out = tmp_path / "run"
    calls = [0]
    fire = _sender(signal.SIGINT, 2, calls)

    def twice():
        fire()
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
    _patch_phase(monkeypatch, "loss", twice)
    code, _, err = run(["train", *TINY, *STEPS, "--checkpoint-every", "1", "--out", str(out)], capsys)
    assert code == 130 and "the last checkpoint is step 1" in err
    monkeypatch.undo()
    assert weights(out)[1] == 1
    assert_resumes_like_reference(out, reference, capsys)


# --------------------------------------------------------------------------- metrics, locks
def test_torn_metrics_line_is_tolerated(tmp_path, capsys, reference):
    out = tmp_path / "run"
    assert run(["train", *TINY, *STEPS, "--stop-after", "2", "--out", str(out)], capsys)[0] == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "train", "step": 3, "lo')  # a kill mid-append
    assert_resumes_like_reference(out, reference, capsys)
    assert all(line.startswith("{") and line.endswith("}") for line in
               (out / "metrics.jsonl").read_text().splitlines())


def test_two_trainers_cannot_share_one_directory(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = ckpt.RunLock(str(out)).acquire()  # another trainer, started a moment earlier
    try:
        code, _, err = run(["train", *TINY, "--steps", "1", "--out", str(out)], capsys)
        assert code == 2 and "in use by another trainer" in err
        assert os.listdir(out) == ["run.lock"]
    finally:
        other.release()
    assert run(["train", *TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    r = subprocess.run([sys.executable, "-m", "bdia_pam", "train", *TINY, "--steps", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds another run" in r.stderr


def test_resume_into_new_out_with_no_steps_left_holds_a_checkpoint(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["train", *TINY, "--steps", "2", "--out", str(a)], capsys)[0] == 0
    code, _, err = run(["train", "--resume", str(a), "--out", str(b), "--no-progress"], capsys)
    assert code == 0, err
    wa, sa = weights(a)
    wb, sb = weights(b)
    assert sa == sb == 2 and same_weights(wa, wb)
    code, stdout, err = run(["evaluate", str(b), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["step"] == 2
