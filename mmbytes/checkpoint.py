"""Checkpoints: load a plain-torch model without unpickling code, refuse another architecture by name, and write
atomically (a crash while saving leaves the previous file whole)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from mmbytes.errors import CheckpointError, MmbytesError
from mmbytes.model.registry import build, config_from_dict, config_from_name, config_to_dict


class ConfigMismatchError(MmbytesError, ValueError):
    """A checkpoint's model configuration differs from the one this run asks for."""


def checkpoint_config(ckpt: dict[str, Any]) -> Any | None:
    """The model configuration a ``ByteLM`` checkpoint was trained with (None if it is not one)."""
    stored = (ckpt.get("mmbytes") or {}).get("config")
    if stored is not None:  # the resolved config, saved since named sizes may change between versions
        return config_from_dict(stored)
    hp = ckpt.get("hyper_parameters") or {}
    if "size" not in hp:
        return None
    return config_from_name(hp["size"], **(hp.get("overrides") or {}))


RUNTIME_FIELDS = ("checkpointing", "dropout", "context")
"""Free to change on resume: the weights mean the same either way (``context``: the training window a cap on global
positions is set for, which ``prepare`` sets from the data)."""


def config_difference(theirs: Any, ours: Any) -> list[str]:
    """The fields, runtime options aside, in which two configs differ (``arch`` alone for two architectures)."""
    if type(theirs) is not type(ours):
        return ["arch"]
    return [f.name for f in fields(ours)
            if f.name not in RUNTIME_FIELDS and getattr(theirs, f.name) != getattr(ours, f.name)]


def check_config(theirs: Any | None, ours: Any, where: str | Path = "") -> None:
    """Raise ``ConfigMismatchError`` naming every field in which the checkpoint's config differs from this run's."""
    diff = config_difference(theirs, ours) if theirs is not None else []
    if diff:
        def show(cfg: Any) -> str:
            return ", ".join(f"{name}={getattr(cfg, name)}" for name in diff)

        raise ConfigMismatchError(f"{where}{': ' if where else ''}checkpoint has {show(theirs)}; "
                                  f"this run has {show(ours)}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and primitive containers only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, or one that would need arbitrary code to load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint ({first})") from e


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a file that is not a torch checkpoint (a zip archive) before torch reads it: torch's own message for
    random bytes is about mmap or pickle, not about the file."""
    import zipfile

    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e.strerror or e})") from e
    if not is_zip:
        raise CheckpointError(f"{path}: not a checkpoint (a torch checkpoint is a zip archive); give a .ckpt file "
                              "written by `mmbytes fit`")
    try:
        with zipfile.ZipFile(path) as z:
            pickled = any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e
    if not pickled:
        raise CheckpointError(f"{path}: a zip archive, but not a torch checkpoint (no data.pkl); give a .ckpt file "
                              "written by `mmbytes fit`")


def load_model(path: str | Path, map_location: str | torch.device = "cpu", expect: Any | None = None,
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a ``mmbytes.lit.ByteLM`` checkpoint (any architecture), in eval mode, built on ``map_location``
    (its parameters in ``dtype`` if given, else as stored), and the checkpoint's hyperparameters. With ``expect``, a
    checkpoint of another configuration is refused with the differing fields named."""
    ckpt = load_checkpoint(path, map_location)
    hp = ckpt.get("hyper_parameters", {})
    config = checkpoint_config(ckpt)
    if config is None:
        raise CheckpointError(f"{path}: not a mmbytes ByteLM checkpoint (no model size in its hyperparameters)")
    if expect is not None:
        check_config(config, expect, path)
    with torch.device(map_location):  # built where it will run: no CPU copy on the way to a GPU
        model = build(config)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    if dtype is not None:  # parameters only: rotary frequency buffers stay float32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model.eval(), hp


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` with ``write_atomically``."""
    write_atomically(path, lambda f: torch.save(obj, f))


def write_atomically(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over it: readers and a crash
    at any moment see the old file or the new one, never half of one. The temporary file goes if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with ``atomic_save`` for local paths (the ``mmbytes`` CLI's default). Lightning's
    own writer stages the file in the system temp folder and moves it without fsync; remote URLs still use it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def load_entropy_model(path: str | Path) -> dict[str, Any]:
    """A byte model's checkpoint as BLT's entropy model: its stored ``config`` (a dict), its ``state`` dict and the
    thresholds ``mmbytes calibrate`` stored with it (``calibration``, None if it was not calibrated)."""
    ckpt = load_checkpoint(path)
    config = checkpoint_config(ckpt)
    if config is None:
        raise CheckpointError(f"{path}: not a mmbytes ByteLM checkpoint (no model size in its hyperparameters)")
    with torch.device("meta"):  # its capabilities only: no weights made
        caps = build(config).capabilities
    if caps.per_modality or not caps.byte_logits:
        raise CheckpointError(f"{path}: an entropy model gives byte logits whatever the modality; this checkpoint's "
                              f"model ({type(config).__name__}) does not: give a byte model's trained without a "
                              "start state per modality (a blt-entropy-* size, or modality_start: false)")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return {"config": config_to_dict(config), "state": state,
            "calibration": (ckpt.get("mmbytes") or {}).get("calibration")}
