"""Checkpoints: load a plain-torch model without unpickling code, refuse another architecture by name, and write
atomically with ``mmbytes.io.write_atomically`` (a crash while saving leaves the previous file whole)."""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from mmbytes.errors import CheckpointError, MmbytesError
from mmbytes.io import write_atomically
from mmbytes.model.layers import ModalityStart
from mmbytes.model.registry import build, config_from_dict, config_from_name, config_to_dict, migrate_state


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
    return config_from_name(hp["size"], hp.get("preset"), **(hp.get("overrides") or {}))


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


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (tensors and primitive containers only) of a file whose records all
    match their CRC-32 (``check_checkpoint_file``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated file, or one that would need arbitrary code to load
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint ({first})") from e


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a file that is not a torch checkpoint (a zip archive) before torch reads it: torch's own message for
    random bytes is about mmap or pickle, not about the file."""
    import zipfile
    import zlib

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
            if not pickled:
                raise CheckpointError(f"{path}: a zip archive, but not a torch checkpoint (no data.pkl); give a .ckpt "
                                      "file written by `mmbytes fit`")
            damaged = z.testzip()  # reads every record and checks its CRC-32
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged checkpoint: record {damaged} does not match its CRC-32 (the file "
                              "changed after it was written); use another checkpoint")


def load_model(path: str | Path, map_location: str | torch.device = "cpu", expect: Any | None = None,
               dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a ``mmbytes.lit.ByteLM`` checkpoint (any architecture), in eval mode, built on ``map_location``
    (its parameters in ``dtype`` if given, else as stored), and the checkpoint's hyperparameters. With ``expect``, a
    checkpoint of another configuration is refused with the differing fields named."""
    ckpt = load_checkpoint(path, map_location)
    hp = ckpt.get("hyper_parameters", {})
    config, state = checked_model(ckpt, path)
    if expect is not None:
        check_config(config, expect, path)
    with torch.device(map_location):  # built where it will run: no CPU copy on the way to a GPU
        model = build(config)
    model.load_state_dict(state)
    if dtype is not None:  # parameters only: rotary frequency buffers stay float32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model.eval(), hp


class _Oversized(Exception):
    pass


MAX_DIM = 2**24  # no width, depth, head count or patch size of a model this package builds comes near it


def checked_model(ckpt: dict[str, Any], path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model config and state (``model.`` prefix removed) of a ``ByteLM`` checkpoint, checked before anything
    is allocated: the config's fields are whole numbers in [0, 2^24] and finite floats, and the model it describes,
    built on the meta device (no memory), has exactly the checkpoint's tensor names and shapes. Anything else is a
    ``CheckpointError`` naming the file and the field or tensor."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a mmbytes ByteLM checkpoint (not a dict of weights)")
    try:
        config = checkpoint_config(ckpt)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the model config stored in it is not valid ({e})") from None
    if config is None:
        raise CheckpointError(f"{path}: not a mmbytes ByteLM checkpoint (no model size in its hyperparameters)")
    for f in fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple | list) else [value]
        for v in values:
            if isinstance(v, bool) or v is None or isinstance(v, str | dict):
                continue
            if isinstance(v, int) and not 0 <= v <= MAX_DIM:
                raise CheckpointError(f"{path}: config field {f.name} is {value!r}; a model size is a whole number "
                                      f"from 0 to {MAX_DIM:,}")
            if isinstance(v, float) and not math.isfinite(v):
                raise CheckpointError(f"{path}: config field {f.name} is {value!r}, not a finite number")
    stored = ckpt.get("state_dict")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: no state_dict (the weights) in the checkpoint; give a .ckpt written by "
                              "`mmbytes fit`")
    state = {k.removeprefix("model."): v for k, v in stored.items() if isinstance(k, str) and k.startswith("model.")}
    held = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    budget = {"tensors": 2 * len(state) + 16, "numel": 4 * held + 2**20}

    def spend(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        """Stop building once the config asks for far more parameters than the checkpoint holds (a config edited to
        a huge size would otherwise take minutes to build, even on the meta device); smaller differences are named
        tensor by tensor below."""
        if param is not None:
            budget["tensors"] -= 1
            budget["numel"] -= param.numel()
            if budget["tensors"] < 0 or budget["numel"] < 0:
                raise _Oversized

    from torch.nn.modules.module import register_module_parameter_registration_hook

    handle = register_module_parameter_registration_hook(spend)
    try:
        with torch.device("meta"):
            model = build(config)
            expected = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None  # None: extra state (BPE)
                        for k, v in model.state_dict().items()}
    except _Oversized:
        raise CheckpointError(f"{path}: its model config calls for more weights than its state_dict holds "
                              f"({len(state)} tensors); the config or the weights were changed") from None
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: its model config does not describe a model ({first})") from None
    finally:
        handle.remove()
    state = migrate_state(model, state)  # tensors stored under the names of an earlier layout
    # start-state offsets per modality that a model saved unconditioned lacks: they load as zeros, that very model
    optional = {f"{n}.offset" for n, m in model.named_modules() if isinstance(m, ModalityStart)}
    for name, shape in expected.items():
        have = state.get(name)
        if name in optional and name not in state:
            continue
        if shape is None:
            if name not in state:
                raise CheckpointError(f"{path}: state_dict lacks model.{name}, which its config calls for")
            continue
        if not isinstance(have, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict lacks the tensor model.{name} its config calls for")
        if tuple(have.shape) != shape:
            raise CheckpointError(f"{path}: state_dict tensor model.{name} has shape {tuple(have.shape)}, its config "
                                  f"calls for {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: state_dict holds model.{extra[0]}, which its config has no place for")
    return config, state


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint given to the ``mmbytes`` CLI, loaded weights-only (memory-mapped) and, if it is a ``ByteLM``
    checkpoint (``hyper_parameters`` name a size), checked by ``checked_model``; refusals are one line."""
    ckpt = load_checkpoint(path, "cpu", mmap=True)
    if isinstance(ckpt, dict) and "size" in (ckpt.get("hyper_parameters") or {}):
        checked_model(ckpt, path)
    return ckpt


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` with ``write_atomically``."""
    write_atomically(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with ``atomic_save`` for local paths (the ``mmbytes`` CLI's default). Lightning's
    own writer stages the file in the system temp folder and moves it without fsync; remote URLs still use it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Refuse (``CheckpointError``) a checkpoint whose weights or optimizer state hold NaN or infinite values: the
        file already at ``path`` stays as it was, so the last good state is never replaced by a diverged one."""
        bad = first_nonfinite(checkpoint.get("state_dict")) or first_nonfinite(checkpoint.get("optimizer_states"),
                                                                               "optimizer_states")
        if bad is not None:
            raise CheckpointError(f"{path}: not written: {bad} holds NaN or infinite values at step "
                                  f"{checkpoint.get('global_step', '?')} (training diverged; lower the learning rate). "
                                  "The checkpoint already there, if any, is kept")
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock_folder(Path(path).parent)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Local checkpoints (``--ckpt_path``, ``last`` included) through ``load_checkpoint``: CRC-32s checked,
        weights only whatever the caller asks, one-line refusals."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        if map_location is None:
            map_location = "cpu"
        return load_checkpoint(path, map_location)


_HELD: dict[tuple[int, int], int] = {}  # (device, inode) of each checkpoint folder this process writes -> its fd


def lock_folder(folder: str | Path) -> None:
    """Hold an exclusive ``flock`` on ``folder`` for the rest of this process, or refuse with ``CheckpointError``
    when another process holds it: two runs never write checkpoints into one folder (the second stops before its
    first write). The kernel drops the lock when the process ends, however it ends, so nothing stale is left."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) in _HELD:
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"{folder}: another run is writing checkpoints into this folder; give this run another "
                              "one (--trainer.default_root_dir or the checkpoint callback's dirpath)") from None
    _HELD[(st.st_dev, st.st_ino)] = fd


def first_nonfinite(tree: Any, where: str = "") -> str | None:
    """The name of the first floating-point tensor in a nest of dicts and lists that holds NaN or infinity."""
    stack = [(where, tree)]
    while stack:
        name, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() and node.device.type != "meta" and not bool(torch.isfinite(node).all()):
                return name or "a tensor"
        elif isinstance(node, dict):
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list | tuple):
            stack.extend((f"{name}[{i}]", v) for i, v in reversed(list(enumerate(node))))
    return None


def load_entropy_model(path: str | Path) -> dict[str, Any]:
    """A byte model's checkpoint as BLT's entropy model: its stored ``config`` (a dict), its ``state`` dict and the
    thresholds ``mmbytes calibrate`` stored with it (``calibration``, None if it was not calibrated)."""
    ckpt = load_checkpoint(path)
    config, state = checked_model(ckpt, path)
    with torch.device("meta"):  # its capabilities only: no weights made
        caps = build(config).capabilities
    if caps.per_modality or not caps.byte_logits:
        raise CheckpointError(f"{path}: an entropy model gives byte logits whatever the modality; this checkpoint's "
                              f"model ({type(config).__name__}) does not: give a byte model's trained without a "
                              "start state per modality (a blt-entropy-* size, or modality_start: false)")
    return {"config": config_to_dict(config), "state": state,
            "calibration": (ckpt.get("mmbytes") or {}).get("calibration")}
