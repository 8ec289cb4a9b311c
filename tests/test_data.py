"""Data sets: digits split, text (default and file), CIFAR-10 format, batching/sharding."""
import os
import pickle

import pytest
import torch

from bdia_pam import data as D


def test_digits_split_is_fixed_and_scaled():
    a, b = D.load_digits(), D.load_digits()
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert 0.0 <= float(a.train_x.min()) and float(a.train_x.max()) <= 1.0
    assert set(a.test_y.tolist()) == set(range(10))


def test_digits_rejects_data_path():
    with pytest.raises(D.DataError, match="--data"):
        D.load_task("digits", "/some/path")


def test_default_text_is_deterministic_english():
    t = D.load_text()
    assert t.kind == "lm" and t.num_train > 100_000
    assert torch.equal(t.test_x, D.load_text().test_x)
    assert b"the" in bytes(t.train_x[:5000].tolist())


def test_text_file_and_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld " * 50, encoding="utf-8")
    t = D.load_task("text", str(p))
    assert t.num_train + t.test_x.numel() == len(("héllo wörld " * 50).encode())
    assert t.info["bytes_per_char"] > 1.0
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_task("text", str(tmp_path / "nope.txt"))
    with pytest.raises(D.DataError, match="directory"):
        D.load_task("text", str(tmp_path))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(D.DataError, match="UTF-8"):
        D.load_task("text", str(bad))


def test_cifar10_format(tmp_path):
    root = D.write_fake_cifar10(str(tmp_path / "c"), n_train_per_batch=6, n_test=4)
    t = D.load_task("cifar10", root)
    assert t.train_x.shape == (30, 3, 32, 32) and t.test_x.shape == (4, 3, 32, 32)
    assert t.train_y.dtype == torch.int64 and t.channels == 3
    with open(os.path.join(root, "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    px = raw[b"data"][0].reshape(3, 32, 32)[1, 2, 3] / 255.0  # green, row 2, column 3
    want = (px - D.CIFAR_MEAN[1]) / D.CIFAR_STD[1]
    assert abs(float(t.train_x[0, 1, 2, 3]) - want) < 1e-5


def test_cifar10_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_task("cifar10", str(tmp_path / "missing"))
    with pytest.raises(D.DataError, match="needs --data"):
        D.load_task("cifar10", None)
    root = D.write_fake_cifar10(str(tmp_path / "c"), 2, 2)
    os.remove(os.path.join(root, "data_batch_3"))
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.load_task("cifar10", root)
    D.write_fake_cifar10(root, 2, 2)
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match="not a CIFAR-10"):
        D.load_task("cifar10", root)


def test_vision_batches_shard_the_global_batch():
    t = D.load_digits()
    _, _, e0, i0 = D.vision_batch(t, 3, 8, seed=1, rank=0, world=2)
    _, _, e1, i1 = D.vision_batch(t, 3, 8, seed=1, rank=1, world=2)
    _, _, _, single = D.vision_batch(t, 3, 16, seed=1)
    assert e0 == e1 == 0
    assert not set(i0.tolist()) & set(i1.tolist())
    assert torch.equal(torch.cat([i0, i1]), single)
    # a new epoch reshuffles
    spe = D.steps_per_epoch(t, 16, 0)
    _, _, e, nxt = D.vision_batch(t, 3 + spe, 16, seed=1)
    assert e == 1 and not torch.equal(nxt, single)


def test_text_batches_are_shifted_windows():
    t = D.load_text()
    x, y, _, _ = D.text_batch(t, 0, 4, 16, seed=0)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
