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


def limit_length(starts: Tensor, max_len: int) -> Tensor:
    """BLT's ``max_patch_len``: a patch that reaches ``max_len`` bytes is cut (every ``max_len``-th byte after the
    latest start opens a new patch). 0: no limit. Incremental: it looks back to the latest start only."""
    if max_len <= 0:
        return starts
    t = torch.arange(starts.shape[-1], device=starts.device)
    return starts | ((t - latest_start(starts)) % max_len == 0)


def _per_row(theta: Tensor | float, h: Tensor) -> Tensor:
    theta = torch.as_tensor(theta, dtype=h.dtype, device=h.device)
    return theta[:, None] if theta.dim() == 1 else theta


def entropy_starts(h: Tensor, theta: Tensor | float, max_len: int = 0) -> Tensor:
    """BLT's global threshold (Pagnoni et al., 2024, section 2.3): byte t starts a patch when the entropy ``h[t]`` of
    the entropy model's next-byte distribution at t (computed from bytes < t) exceeds ``theta`` (a number, or one per
    row (B,)). h: (B, T) nats."""
    starts = h > _per_row(theta, h)
    starts[..., 0] = True
    return limit_length(starts, max_len)


def monotonic_starts(h: Tensor, theta: Tensor | float, max_len: int = 0) -> Tensor:
    """BLT's approximate monotonic rule: byte t starts a patch when the entropy rises by more than ``theta`` over
    the previous position's, h[t] - h[t-1] > theta."""
    rise = h - torch.nn.functional.pad(h[..., :-1], (1, 0))
    starts = rise > _per_row(theta, h)
    starts[..., 0] = True
    return limit_length(starts, max_len)


ENTROPY_RULES = {"entropy": entropy_starts, "monotonic": monotonic_starts}


def calibrate_threshold(entropies: list[Tensor], target: float, rule: str = "entropy", max_len: int = 0,
                        iters: int = 60) -> tuple[float, float]:
    """The threshold at which ``rule`` cuts the given entropy rows (each (T,) nats, e.g. windows of one modality)
    into patches of ``target`` bytes on average (bytes / patch starts), by bisection (more threshold, fewer starts).
    Returns (threshold, the mean patch size it gives). A target below what the rule can reach gives its extreme."""
    fn = ENTROPY_RULES[rule]
    total = sum(int(h.numel()) for h in entropies)

    def mean_size(theta: float) -> float:
        return total / sum(int(fn(h[None], theta, max_len).sum()) for h in entropies)

    values = torch.cat([h.flatten() for h in entropies]).double()
    bound = 2 * float(values.abs().max()) + 1.0
    lo, hi = -bound, bound  # below every entropy and every rise, above every one (both rules)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_size(mid) < target else (lo, mid)
    return hi, mean_size(hi)
