"""Patch boundary rules, in one place: functions of the bytes that say which bytes start a patch.

Every rule returns a boolean (B, T) tensor, True where byte t starts a patch (byte 0 always does), and every rule is
incremental: whether byte t starts a patch depends only on bytes <= t, so the rule on a prefix equals the rule on
the whole sequence cut to that prefix (tested on random and real bytes). That is what lets a model place its
patches causally in training and know the boundary of the next byte while generating.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fixed_starts(x: Tensor, patch_size: int, offset: int = 0) -> Tensor:
    """Every ``patch_size`` bytes (MEGABYTE; SpaceByte's fixed-patch ablation). ``offset``: index of x's first byte."""
    t = torch.arange(offset, offset + x.shape[-1], device=x.device)
    return (t % patch_size == 0).expand(x.shape)


def spacelike(x: Tensor) -> Tensor:
    """SpaceByte's spacelike bytes (Slagle, 2024, section 2): not an ASCII letter, not an ASCII digit and not a UTF-8
    continuation byte (0x80-0xBF)."""
    letter = ((x >= 0x41) & (x <= 0x5A)) | ((x >= 0x61) & (x <= 0x7A))
    digit = (x >= 0x30) & (x <= 0x39)
    continuation = (x >= 0x80) & (x <= 0xBF)
    return ~(letter | digit | continuation)


def spacelike_starts(x: Tensor) -> Tensor:
    """SpaceByte's word boundaries: the global blocks run at each spacelike byte that does not follow another
    spacelike byte, and their output predicts the byte after it. So byte t starts a patch when byte t-1 is spacelike
    and byte t-2 is not (or t-1 is the first byte); byte 0 starts the first patch."""
    s = spacelike(x)
    trigger = s & ~torch.nn.functional.pad(s[..., :-1], (1, 0), value=False)  # spacelike, not after a spacelike
    return torch.nn.functional.pad(trigger[..., :-1], (1, 0), value=True)


def cap_starts(starts: Tensor, max_count: int) -> Tensor:
    """Keep the first ``max_count`` starts of each row; later boundaries are not patch starts (the patch goes on).
    Incremental too: the count only looks back."""
    return starts & (starts.long().cumsum(-1) <= max_count)


def latest_start(starts: Tensor) -> Tensor:
    """Index of the patch each byte is in (its most recent start at or before it), (B, T)."""
    t = torch.arange(starts.shape[-1], device=starts.device)
    return torch.where(starts, t, -1).cummax(-1).values


def overflow_share(starts: Tensor, kept: Tensor) -> Tensor:
    """Share of bytes whose patch start was dropped by a cap (``kept``: the starts left)."""
    return (latest_start(starts) != latest_start(kept)).float().mean()
