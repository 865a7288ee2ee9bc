"""Load a plain-torch model from a Lightning checkpoint without Lightning and without unpickling code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmbytes.config import MegabyteConfig
from mmbytes.model import Megabyte


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and primitive containers only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, or one that would need arbitrary code to load
        raise ValueError(f"{path}: cannot load as a weights-only checkpoint: {e}") from e


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Megabyte, dict[str, Any]]:
    """The model of a ``mmbytes.lit.ByteLM`` checkpoint, in eval mode, and the checkpoint's hyperparameters."""
    ckpt = load_checkpoint(path, map_location)
    hp = ckpt.get("hyper_parameters", {})
    if "size" not in hp:
        raise ValueError(f"{path}: not a mmbytes ByteLM checkpoint (no model size in its hyperparameters)")
    model = Megabyte(MegabyteConfig.from_name(hp["size"], **(hp.get("overrides") or {})))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval(), hp
