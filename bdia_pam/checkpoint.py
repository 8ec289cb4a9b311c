"""Checkpoints of a training run: complete-or-absent directories of safetensors and JSON.

Layout of a run directory::

    checkpoints/step-000000120/      one checkpoint (a second save of the same step: step-000000120.1)
        model.safetensors            weights, the model config in the metadata
        state.safetensors            every tensor of the trainer state (optimizer moments, RNG states)
        manifest.json                step, config, the rest of the trainer state as JSON, and the
                                     size and sha256 of both files above; written last
    checkpoints/latest               name of the newest checkpoint (a convenience for people)
    run.lock                         held (flock) by the trainer writing into the directory

:func:`save` writes a checkpoint into a hidden temporary directory, fsyncs each file and the
directory, then renames the directory into place (the commit point: one atomic rename), fsyncs
``checkpoints/``, switches ``latest`` (temp file + ``os.replace``) and only then deletes the
oldest checkpoints beyond ``keep``. A kill at any moment therefore leaves the previous
checkpoints intact, and at most a ``.tmp-*`` directory that the next save removes.

:func:`load` takes the newest checkpoint whose manifest and file hashes check out, printing a
warning line for each newer one it had to skip. Nothing is ever unpickled: a trainer state is
JSON plus tensors, and a ``trainer.pt`` of the old layout is refused, never opened.

:func:`_fault` is called at every write point with the point's name; it does nothing, and
exists so that tests can crash or signal the process there (tests/test_fault_injection.py).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch

FORMAT = "bdia_pam.checkpoint"
VERSION = 2
CKPT_DIR = "checkpoints"
POINTER = "latest"
WEIGHTS = "model.safetensors"
STATE = "state.safetensors"
MANIFEST = "manifest.json"
LOCK = "run.lock"
OLD_STATE = "trainer.pt"  # the pickle file of checkpoint version 1: never loaded
DEFAULT_KEEP = 2
_NAME = re.compile(r"^step-(\d{9,})(?:\.(\d+))?$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible (one-line message)."""


def _fault(point: str) -> None:
    """Test hook, called at each write point (no-op in normal use)."""


# --------------------------------------------------------------------------- file helpers
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, fsync, then ``os.replace(tmp_path, path)`` and fsync the directory.

    The temporary file is removed on error, so ``path`` holds either its old or its new content."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def atomic_write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, w)


# --------------------------------------------------------------------------- state encoding
def encode_state(obj, tensors: dict, prefix: str = "t"):
    """``obj`` (nested dict/list/tuple of numbers, strings, None, tensors, numpy arrays) as JSON.

    Tensors go into ``tensors`` (name -> CPU tensor) and are replaced by ``{"__tensor__": name}``;
    numpy arrays are stored as uint8 tensors with their dtype and shape; tuples and dicts with
    non-string keys are tagged so that :func:`decode_state` rebuilds them exactly. Floats keep
    every bit (JSON floats round-trip in Python)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"{prefix}{len(tensors)}"
        raw = np.ascontiguousarray(obj)
        tensors[name] = torch.from_numpy(np.frombuffer(raw.tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": name, "dtype": raw.dtype.str, "shape": list(raw.shape)}
    if isinstance(obj, np.generic):
        return encode_state(obj.item(), tensors, prefix)
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__dict__": [[encode_state(k, tensors, prefix), encode_state(v, tensors, prefix)]
                             for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode_state(obj, tensors: dict):
    """Inverse of :func:`encode_state`; a reference to a missing tensor raises CheckpointError."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"state refers to a missing tensor {obj['__tensor__']!r}")
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        if obj["__ndarray__"] not in tensors:
            raise CheckpointError(f"state refers to a missing array {obj['__ndarray__']!r}")
        dt = np.dtype(str(obj["dtype"]))
        if dt.kind not in "biuf":
            raise CheckpointError(f"state holds an array of unsupported dtype {dt}")
        raw = tensors[obj["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=dt).reshape([int(s) for s in obj["shape"]]).copy()
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def _hashable(k):
    if isinstance(k, list):
        raise CheckpointError("state holds a dict with a list key")
    return k


# --------------------------------------------------------------------------- save
def _ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def _parse(name: str):
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def list_checkpoints(run_dir: str) -> list[str]:
    """Names of the checkpoint directories of ``run_dir``, newest first (complete or not)."""
    root = _ckpt_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _parse(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=_parse, reverse=True)


def _write(path: str, write, point: str) -> dict:
    _fault(point + ":begin")
    write(path)
    _fault(point + ":written")
    _fsync_file(path)
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def save(run_dir: str, model: torch.nn.Module, config: dict, state: dict, keep: int = DEFAULT_KEEP) -> str:
    """Write a checkpoint of ``model`` and ``state`` (``step`` and ``total_steps`` ints, plus any
    encodable trainer state) under ``run_dir/checkpoints``; return its directory.

    Complete-or-absent (see the module doc); keeps the newest ``keep`` >= 1 checkpoints."""
    from safetensors.torch import save_file

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = _ckpt_root(run_dir)
    os.makedirs(root, exist_ok=True)
    for n in os.listdir(root):  # leftovers of a save that was killed (one trainer per run: locked)
        if n.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    step = int(state["step"])
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tensors: dict = {}
    encoded = encode_state({k: v for k, v in state.items() if k not in ("step", "total_steps")}, tensors)
    tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step:09d}-", dir=root)
    _fault("mkdir")
    try:
        meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config, sort_keys=True)}
        files = {WEIGHTS: _write(os.path.join(tmp, WEIGHTS),
                                 lambda p: save_file(weights, p, metadata=meta), WEIGHTS),
                 STATE: _write(os.path.join(tmp, STATE),
                               lambda p: save_file(tensors, p, metadata={"format": FORMAT}), STATE)}
        manifest = {"format": FORMAT, "version": VERSION, "step": step,
                    "total_steps": int(state["total_steps"]), "config": config, "state": encoded,
                    "files": files}
        text = json.dumps(manifest, sort_keys=True)

        def write_manifest(p):
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
        _write(os.path.join(tmp, MANIFEST), write_manifest, MANIFEST)
        _fsync_dir(tmp)
        name, seq = f"step-{step:09d}", 0
        while os.path.exists(os.path.join(root, name)):
            seq += 1
            name = f"step-{step:09d}.{seq}"
        final = os.path.join(root, name)
        _fault("rename")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _fault("pointer")
    atomic_write_text(os.path.join(root, POINTER), name + "\n")
    _fault("prune")
    complete = [n for n in list_checkpoints(run_dir) if os.path.isfile(os.path.join(root, n, MANIFEST))]
    for old in complete[keep:]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _fsync_dir(root)
    return final


# --------------------------------------------------------------------------- load
def _load_one(path: str) -> tuple[dict, dict, dict]:
    """(weights, state, config) of one checkpoint directory; CheckpointError(reason) if damaged."""
    from safetensors.torch import load_file

    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError("no manifest.json (the save did not finish)")
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"manifest.json is unreadable ({type(e).__name__})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError("manifest.json is not a bdia_pam checkpoint manifest")
    if man.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {man.get('version')!r}, this bdia_pam reads {VERSION}")
    for key, typ in (("step", int), ("total_steps", int), ("config", dict), ("state", dict), ("files", dict)):
        if not isinstance(man.get(key), typ) or isinstance(man.get(key), bool):
            raise CheckpointError(f"manifest.json has no valid {key!r}")
    files = man["files"]
    out = {}
    for name in (WEIGHTS, STATE):
        p = os.path.join(path, name)
        want = files.get(name)
        if not isinstance(want, dict) or not os.path.isfile(p):
            raise CheckpointError(f"{name} is missing")
        if os.path.getsize(p) != want.get("bytes") or _sha256(p) != want.get("sha256"):
            raise CheckpointError(f"{name} does not match its hash in manifest.json")
        try:
            out[name] = load_file(p)
        except Exception as e:  # noqa: BLE001 - any safetensors failure is a damaged file
            raise CheckpointError(f"{name} is corrupt ({type(e).__name__})") from None
    try:
        state = decode_state(man["state"], out[STATE])
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"manifest.json state is malformed ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError("manifest.json state is not a mapping")
    state.update(step=man["step"], total_steps=man["total_steps"], path=path)
    return out[WEIGHTS], state, man["config"]


def load(run_dir: str, warn=None) -> tuple[dict, dict, dict]:
    """Return (weights, state, config) of the newest complete checkpoint of ``run_dir``.

    ``state`` holds ``step``, ``total_steps``, ``path`` and the saved trainer state. Each newer
    checkpoint that had to be skipped is reported by ``warn(line)`` (default: a
    ``bdia-pam: warning:`` line on stderr). CheckpointError if there is none."""
    if warn is None:
        def warn(line):
            print(f"bdia-pam: warning: {line}", file=sys.stderr)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"checkpoint directory {run_dir!r} does not exist; pass a run directory "
                              "written by 'bdia-pam train'")
    names = list_checkpoints(run_dir)
    if not names:
        if os.path.exists(os.path.join(run_dir, OLD_STATE)):
            raise CheckpointError(f"{run_dir!r} holds a version-1 checkpoint ({OLD_STATE}, a pickle); "
                                  "it is not loaded because unpickling can run code: retrain with this "
                                  "bdia_pam")
        raise CheckpointError(f"{run_dir!r} has no checkpoint ({CKPT_DIR}/step-*); it is not a run "
                              "directory of 'bdia-pam train', or no checkpoint finished")
    reasons = []
    for name in names:
        path = os.path.join(_ckpt_root(run_dir), name)
        try:
            result = _load_one(path)
        except CheckpointError as e:
            reasons.append(f"{name}: {e}")
            continue
        for r in reasons:
            warn(f"skipped damaged checkpoint {r}; using {name}")
        return result
    raise CheckpointError(f"no complete checkpoint in {run_dir!r} ({'; '.join(reasons[:3])}); "
                          "restore a copy or start a new run")


def latest_step(run_dir: str) -> int | None:
    """Step of the newest checkpoint with a readable manifest (no hash check), or None."""
    for name in list_checkpoints(run_dir):
        try:
            with open(os.path.join(_ckpt_root(run_dir), name, MANIFEST), encoding="utf-8") as f:
                return int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def load_weights_into(model: torch.nn.Module, weights: dict, where: str) -> None:
    """load_state_dict with a one-line CheckpointError on missing/unexpected/mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or extra or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape mismatch for {shapes[:3]}")
        raise CheckpointError(f"checkpoint {where!r} does not fit this model ({detail})")
    model.load_state_dict(weights)


# --------------------------------------------------------------------------- run lock
class RunLock:
    """An exclusive ``flock`` on ``run_dir/run.lock``, held while a trainer writes the run.

    :meth:`acquire` raises CheckpointError (one line) when another process holds it or the
    directory is not writable. The lock is released by :meth:`release` or when the process
    dies (the kernel drops it), so a killed trainer never leaves a stale lock."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd = None

    def acquire(self) -> "RunLock":
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot write to {os.path.dirname(self.path)!r} "
                                  f"({e.strerror or e}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"{os.path.dirname(self.path)!r} is in use by another trainer "
                                      f"(locked {LOCK}); choose another --out") from None
            raise CheckpointError(f"cannot lock {self.path!r} ({e.strerror or e})") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise CheckpointError(f"cannot write to {os.path.dirname(self.path)!r} "
                                  f"({e.strerror or e}); choose a writable --out") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
