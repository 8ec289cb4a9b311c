"""Checkpoints of a training run: weights in safetensors, everything else in a torch.save file.

A run directory holds ``model.safetensors`` (weights, with the model config in the metadata)
and ``trainer.pt`` (step, optimizer state, RNG states, the sha256 of the weights file). Both
are written to a temporary file in the same directory and ``os.replace``'d, weights first:
a run killed mid-write leaves either the previous pair or a pair whose hash does not match,
which :func:`load` rejects -- never a checkpoint that looks good but is not.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

FORMAT = "bdia_pam.checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
STATE = "trainer.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible (one-line message)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then ``os.replace(tmp_path, path)``; the tmp file is removed on error."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, w)


def save(run_dir: str, model: torch.nn.Module, config: dict, state: dict) -> None:
    """Write the weights of ``model`` and ``state`` (step, optimizer, rng ...) into ``run_dir``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config, sort_keys=True)}
    wpath = os.path.join(run_dir, WEIGHTS)
    atomic_write(wpath, lambda tmp: save_file(tensors, tmp, metadata=meta))
    full = dict(state, format=FORMAT, version=VERSION, weights_sha256=_sha256(wpath), config=config)
    atomic_write(os.path.join(run_dir, STATE), lambda tmp: torch.save(full, tmp))


def load(run_dir: str) -> tuple[dict, dict, dict]:
    """Return (weights, state, config) from ``run_dir``; CheckpointError if anything is off."""
    from safetensors.torch import load_file

    if not os.path.isdir(run_dir):
        raise CheckpointError(f"checkpoint directory {run_dir!r} does not exist; pass a run directory "
                              "written by 'bdia-pam train'")
    wpath, spath = os.path.join(run_dir, WEIGHTS), os.path.join(run_dir, STATE)
    for p in (wpath, spath):
        if not os.path.isfile(p):
            raise CheckpointError(f"{run_dir!r} has no {os.path.basename(p)}; it is not a finished "
                                  "checkpoint of 'bdia-pam train'")
    try:
        state = torch.load(spath, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{spath!r} is corrupt or unreadable ({type(e).__name__}); "
                              "restore it or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{spath!r} is not a bdia_pam checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{spath!r} has checkpoint version {state.get('version')}, this "
                              f"bdia_pam reads version {VERSION}")
    if _sha256(wpath) != state.get("weights_sha256"):
        raise CheckpointError(f"{wpath!r} does not match {STATE} (corrupt, or a run was killed "
                              "while writing); use an older copy or start a new run")
    try:
        weights = load_file(wpath)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{wpath!r} is corrupt ({type(e).__name__}: {e})") from None
    return weights, state, state["config"]


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
