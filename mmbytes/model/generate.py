"""Patch-by-patch generation with a KV cache per stage (MEGABYTE, Yu et al., 2023, section 2.3 and 6).

The global model advances one patch at a time with its own cache; the local model then decodes the patch's P bytes
one by one with a per-patch cache that is cleared for every patch. With middle stages the same step recurses: a
middle model advances one sub-patch at a time inside the current patch, and the local model decodes each sub-patch.
A prompt is prefilled in parallel at every stage: all its whole patches in one global call, the whole sub-patches of
its last, partial patch in one call of the stage below, and so on down to its last bytes in one local call.
``generate_reference`` runs the full model for every byte; it is the slow decoder the fast one is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbytes.model.megabyte import Megabyte


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Logits (B, V) -> bytes (B,). Temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Megabyte, prompt: Tensor, num_bytes: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             on_logits: Callable[[int, Tensor], None] | None = None,
             on_progress: Callable[[int], None] | None = None) -> Tensor:
    """Continue ``prompt`` (B, L0) by ``num_bytes`` bytes; returns (B, L0 + num_bytes).

    ``on_logits(t, logits)`` sees the (B, 256) logits that chose byte t (tests compare them with the reference);
    ``on_progress(n)`` is called with the number of bytes made after each global patch.
    """
    if num_bytes <= 0:
        return prompt.long().clone()
    was_training = model.training
    model.eval()
    B, L0 = prompt.shape
    total = L0 + num_bytes
    device, dtype = prompt.device, model.global_pad.dtype
    out = torch.zeros(B, total, dtype=torch.long, device=device)
    out[:, :L0] = prompt
    stages = model.stages()
    sizes = [s.patch for s in stages]
    # one cache per stage: the global one holds every patch; below it, a stage holds the units of one parent unit
    # and is cleared whenever its parent advances
    caches = [stages[0].model.make_caches(B, -(-total // sizes[0]), device, dtype)]
    for s, above in zip(stages[1:], sizes, strict=False):
        caches.append(s.model.make_caches(B, above // s.patch, device, dtype))
    t = L0  # bytes known so far

    def decode(i: int, up: Tensor | None, start: int) -> None:
        """Decode the bytes of one parent unit, starting at byte ``start``, through stage i and those below it.
        ``up``: the projected parent output, one slice per unit (B, n, width); None for the global stage."""
        nonlocal t
        s, cache = stages[i], caches[i]
        for c in cache:
            c.reset()
        known = (t - start) // s.patch  # whole units already known (from the prompt): prefilled in one call
        inputs = torch.cat([s.pad.expand(B, 1, -1), s.embed(out[:, start : start + known * s.patch])], dim=1)
        if up is not None:
            inputs = inputs + up[:, : known + 1]
        h = s.model(inputs, cache)[:, -1]  # output for unit `known`
        for j in range(known, up.shape[1] if up is not None else -(-total // s.patch)):
            unit = start + j * s.patch
            if i + 1 == len(stages):  # the last stage predicts a byte
                logits = model.head(h)
                if on_logits is not None:
                    on_logits(t, logits)
                out[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
                t += 1
            else:
                below = stages[i + 1]
                decode(i + 1, below.up(h, s.patch), unit)
            if i == 0 and on_progress is not None:
                on_progress(t - L0)
            if t == total or (up is not None and j + 1 == up.shape[1]):
                return
            nxt = s.embed(out[:, unit : unit + s.patch])  # the stage advances by the unit just finished
            h = s.model(nxt if up is None else nxt + up[:, j + 1 : j + 2], cache)[:, -1]

    decode(0, None, 0)
    model.train(was_training)
    return out


@torch.no_grad()
def generate_reference(model: Megabyte, prompt: Tensor, num_bytes: int, *, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                       on_logits: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """The slow decoder: a full forward pass over everything so far for every byte."""
    was_training = model.training
    model.eval()
    B, L0 = prompt.shape
    out = F.pad(prompt.long(), (0, num_bytes))
    for t in range(L0, L0 + num_bytes):
        logits = model(out[:, : t + 1])[:, t]  # position t sees bytes < t only; out[:, t] is a placeholder
        if on_logits is not None:
            on_logits(t, logits)
        out[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
    model.train(was_training)
    return out
