"""Helpers every architecture shares: the byte (or token) NLL of a head over hidden states, scored a chunk at a time,
the config check that each attention stack's width splits evenly among its heads, and a named size's config in a
preset with overrides."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def check_heads(*stacks: tuple[int, int, str]) -> None:
    """Each stack (width, heads, name): its width splits evenly among its heads, or a one-line error names it."""
    for width, heads, what in stacks:
        if width % heads:
            raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")


def chunked_nll(weight: Tensor, h: Tensor, x: Tensor, mask: Tensor | None, chunk: int) -> Tensor:
    """Nats (B, T) of bytes x under the head ``weight`` applied to hidden states h (B, T, D), ``chunk`` positions at
    a time (recomputed in the backward pass) so no (B*T, 256) float32 tensor outlives its chunk."""
    B, T, D = h.shape
    h, target = h.reshape(B * T, D), x.reshape(B * T).long()
    if B * T <= chunk:
        out = _ce(weight, h, target)
    else:
        grad = torch.is_grad_enabled()
        out = torch.cat([checkpoint(_ce, weight, h[i : i + chunk], target[i : i + chunk], use_reentrant=False)
                         if grad else _ce(weight, h[i : i + chunk], target[i : i + chunk])
                         for i in range(0, B * T, chunk)])
    out = out.view(B, T)
    return out if mask is None else torch.where(mask, out, 0.0)


def _ce(weight: Tensor, h: Tensor, target: Tensor) -> Tensor:
    logits = F.linear(h, weight)  # bf16/fp16 logits are scored in fp32; fp32 and fp64 as they are
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target, reduction="none")


def named_config(sizes: dict[str, Any], presets: dict[str, dict], name: str, preset: str | None,
                 overrides: dict[str, Any]) -> Any:
    """The config of the named size ``name`` of ``sizes``, with the fields of ``presets[preset]`` (if given) and then
    ``overrides`` replaced; an unknown size, preset or field is refused by name."""
    if name not in sizes:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(sizes)}")
    base = sizes[name]
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} for {name!r}; known: {', '.join(presets)}")
        base = replace(base, **presets[preset])
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown} for {name!r}; known: {sorted(known)}")
    return replace(base, **overrides)


def rename_stored(state: dict[str, Any], prefix: str, renames: dict[str, str]) -> None:
    """Rename, in place, the keys of ``state`` under ``prefix`` that start with an old name of ``renames`` (old name
    prefix -> new): tensors stored under an earlier layout's names."""
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix):]
        old = next((o for o in renames if rest.startswith(o)), None)
        if old is not None:
            state[prefix + renames[old] + rest[len(old):]] = state.pop(key)
