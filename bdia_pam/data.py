"""Data sets for the `bdia-pam` command: ``digits``, ``text`` and ``cifar10``. Nothing is downloaded.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images), pixels scaled to
  [0, 1], held-out 20% test split (stratified, fixed seed 0).
* ``text``: a causal byte-level language model on any UTF-8 file (last 10% held out); with no
  file, English help texts shipped with Python (``pydoc_data.topics.topics``, sorted by key and
  joined). Metric: bits per character.
* ``cifar10``: the "CIFAR-10 python version" directory (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``: pickles with ``b"data"`` (N, 3072) uint8 and ``b"labels"``).

Every loader raises :class:`DataError` (a one-line message naming the path and what is
wrong) for a missing or unreadable input.
"""
from __future__ import annotations

import os
import pickle
import stat
from dataclasses import dataclass, field

import numpy as np
import torch

TASKS = ("digits", "text", "cifar10")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(ValueError):
    """A data path is missing, unreadable or not in the expected format."""


@dataclass
class TaskData:
    """Tensors of one task. Vision: x (N, C, H, W) float32, y (N,) int64. Text: 1-D uint8 tokens."""

    task: str
    kind: str  # "vit" | "lm"
    train_x: torch.Tensor
    test_x: torch.Tensor
    train_y: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    image_size: int = 0
    channels: int = 0
    num_classes: int = 0
    vocab_size: int = 256
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    def model_fields(self) -> dict:
        """The BDIAConfig fields this data fixes."""
        if self.kind == "vit":
            return dict(kind="vit", image_size=self.image_size, channels=self.channels,
                        num_classes=self.num_classes)
        return dict(kind="lm", vocab_size=self.vocab_size)


def load_task(task: str, path: str | None = None) -> TaskData:
    """Load ``task`` (one of TASKS); ``path`` is the data file/directory where the task takes one."""
    if task == "digits":
        if path is not None:
            raise DataError("--data is not used by --task digits (the data set is bundled); drop it")
        return load_digits()
    if task == "text":
        return load_text(path)
    if task == "cifar10":
        if path is None:
            raise DataError("--task cifar10 needs --data DIR (the extracted 'cifar-10-batches-py' directory)")
        return load_cifar10(path)
    raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_digits() -> TaskData:
    """sklearn digits, 8x8 grey images in [0, 1]; 80/20 stratified split with seed 0."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # N, 1, 8, 8
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                          stratify=y)
    return TaskData("digits", "vit", torch.from_numpy(np.ascontiguousarray(xtr)),
                    torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(ytr),
                    torch.from_numpy(yte), image_size=8, channels=1, num_classes=10,
                    source="sklearn.datasets.load_digits")


def default_text() -> str:
    """English help texts shipped with Python, sorted by topic and joined by blank lines."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str | None = None, val_fraction: float = 0.1) -> TaskData:
    """Byte tokens of a UTF-8 file (or :func:`default_text`); the last ``val_fraction`` is held out."""
    if path is None:
        text, source = default_text(), "pydoc_data.topics"
    else:
        if not os.path.exists(path):
            raise DataError(f"text file {path!r} does not exist; pass an existing UTF-8 file to --data")
        if os.path.isdir(path):
            raise DataError(f"{path!r} is a directory; --task text needs a UTF-8 text file")
        _need_regular_file(path, "--task text needs a UTF-8 text file")
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except OSError as e:
            raise DataError(f"cannot read {path!r}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path!r} is not valid UTF-8 (byte {e.start}); convert it to UTF-8") from None
        source = os.path.abspath(path)
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
    if data.size < 100:
        raise DataError(f"text {source!r} has only {data.size} bytes; need at least 100")
    split = int(round(data.size * (1 - val_fraction)))
    n_val_chars = len(text.encode("utf-8")[split:].decode("utf-8", errors="ignore"))
    return TaskData("text", "lm", torch.from_numpy(data[:split]), torch.from_numpy(data[split:]),
                    vocab_size=256, source=source,
                    info=dict(bytes_per_char=(data.size - split) / max(n_val_chars, 1)))


def _need_regular_file(path: str, what: str) -> None:
    """DataError unless ``path`` is a regular file (a device such as /dev/zero or a FIFO would
    be read forever or block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path!r} is not a regular file (a device, FIFO or socket); {what}")


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays: any other global (the
    way a pickle runs code) is refused, so a planted data file cannot execute anything."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}   # bytes in protocol-2 pickles written by Python 3

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    if not os.path.exists(path):
        raise DataError(f"CIFAR-10 file {path!r} is missing; --data must be the 'cifar-10-batches-py' "
                        "directory with data_batch_1..5 and test_batch")
    _need_regular_file(path, "--data must be the 'cifar-10-batches-py' directory")
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling/format failure is a data error
        raise DataError(f"{path!r} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if x.ndim != 2 or x.shape[1] != 3072 or y.shape != (x.shape[0],):
        raise DataError(f"{path!r}: expected data (N, 3072) and N labels, got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path!r} holds no images")
    return {"x": x, "y": y}


def load_cifar10(root: str) -> TaskData:
    """CIFAR-10 python batches under ``root``, normalized per channel."""
    if not os.path.isdir(root):
        raise DataError(f"CIFAR-10 directory {root!r} does not exist; pass the extracted "
                        "'cifar-10-batches-py' directory to --data")
    train = [_unpickle(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    test = _unpickle(os.path.join(root, "test_batch"))
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def images(x):
        t = torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        return ((t - mean) / std).contiguous()

    xtr = images(np.concatenate([b["x"] for b in train]))
    ytr = torch.from_numpy(np.concatenate([b["y"] for b in train]))
    bad = [int(v) for v in torch.cat([ytr, torch.from_numpy(test["y"])]) if not 0 <= v < 10][:3]
    if bad:
        raise DataError(f"CIFAR-10 labels must be in 0..9, found {bad} under {root!r}")
    return TaskData("cifar10", "vit", xtr, images(test["x"]), ytr, torch.from_numpy(test["y"]),
                    image_size=32, channels=3, num_classes=10, source=os.path.abspath(root))


def write_fake_cifar10(root: str, n_train_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> str:
    """Write a tiny random stand-in in the CIFAR-10 python format under ``root`` (for tests)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [(f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": name.encode()}, f)
    return root


# --------------------------------------------------------------------------- batching
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919) % (2 ** 63))
    return torch.randperm(n, generator=g)


def vision_batch(data: TaskData, step: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
    """Batch number ``step`` for process ``rank`` of ``world``.

    Every process computes the same epoch permutation and takes its own contiguous slice of
    the global batch (``batch_size`` samples per process), so the global batch is
    ``batch_size * world`` samples; the last partial global batch of an epoch is dropped.
    Returns (x, y, epoch, global_sample_indices).
    """
    n = data.num_train
    g_batch = batch_size * world
    per_epoch = max(n // g_batch, 1)
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    start = i * g_batch + rank * batch_size
    idx = order[start:start + batch_size]
    if idx.numel() < batch_size:  # data smaller than one global batch: wrap around
        idx = order[torch.arange(start, start + batch_size) % n]
    return data.train_x[idx], data.train_y[idx], epoch, idx


def steps_per_epoch(data: TaskData, batch_size: int, context: int, world: int = 1) -> int:
    """Steps in one pass over the training data (images, or tokens for text)."""
    if data.kind == "vit":
        return max(data.num_train // (batch_size * world), 1)
    return max((data.num_train - 1) // (context * batch_size * world), 1)


def text_batch(data: TaskData, step: int, batch_size: int, context: int, seed: int,
               rank: int = 0, world: int = 1):
    """Random windows of ``context + 1`` tokens; offsets depend only on (seed, step, rank)."""
    n = data.num_train
    if n <= context + 1:
        raise DataError(f"training text has {n} bytes, fewer than context+1 = {context + 1}; "
                        "use a smaller --context or a longer file")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63))
    off = torch.randint(0, n - context - 1, (batch_size,), generator=g)
    win = torch.stack([data.train_x[o:o + context + 1] for o in off.tolist()]).long()
    return win[:, :-1].contiguous(), win[:, 1:].contiguous(), step // steps_per_epoch(
        data, batch_size, context, world), off


def text_eval_windows(data: TaskData, context: int, max_windows: int = 64):
    """Non-overlapping held-out windows (x, y) used for the bits-per-character metric."""
    t = data.test_x
    n = min((t.numel() - 1) // context, max_windows)
    if n < 1:
        raise DataError(f"held-out text has {t.numel()} bytes, fewer than context+1 = {context + 1}")
    x = torch.stack([t[i * context:(i + 1) * context] for i in range(n)]).long()
    y = torch.stack([t[i * context + 1:(i + 1) * context + 1] for i in range(n)]).long()
    return x, y
