"""One generation loop for every architecture, over each model's own cache.

A model makes its cache (``new_cache``), takes the prompt in parallel (``prefill``) and then one byte at a time
(``step``); each returns the logits of the next byte. MEGABYTE advances its global model one patch at a time and
decodes the bytes of a patch with a cache cleared for every patch (Yu et al., 2023, section 2.3); SpaceByte runs its
global blocks one cached step whenever a byte opens a word. A token model (``generate_bytes``: the BPE baseline)
samples tokens and decodes them to bytes. ``generate_reference`` runs the full model for every
byte; it is the slow decoder the fast one is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
def generate(model: nn.Module, prompt: Tensor, num_bytes: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             on_logits: Callable[[int, Tensor], None] | None = None,
             on_progress: Callable[[int], None] | None = None, modality: Tensor | None = None) -> Tensor:
    """Continue ``prompt`` (B, L0) by ``num_bytes`` bytes with any model of the registry; returns (B, L0 + num_bytes).

    ``on_logits(t, logits)`` sees the (B, 256) logits that chose byte t (tests compare them with the reference);
    ``on_progress(n)`` is called with the number of bytes made so far after each byte; ``modality`` (B,) ids of
    ``mmbytes.codecs.MODALITIES`` reach every model (those whose patching depends on them use them).
    """
    if num_bytes <= 0:
        return prompt.long().clone()
    was_training = model.training
    model.eval()
    try:
        if not model.capabilities.cached:  # a token model (the BPE baseline) samples tokens and decodes them
            if on_logits is not None:
                raise ValueError(f"{type(model).__name__} samples tokens, not bytes: it has no byte logits to show")
            return model.generate_bytes(prompt.long(), num_bytes,
                                        lambda logits: sample_next(logits, temperature, top_k, top_p, generator),
                                        on_progress, modality=modality)
        B, L0 = prompt.shape
        total = L0 + num_bytes
        cache = model.new_cache(B, total, prompt.device, next(model.parameters()).dtype, modality=modality)
        out = torch.zeros(B, total, dtype=torch.long, device=prompt.device)
        out[:, :L0] = prompt
        logits = model.prefill(out[:, :L0], cache)
        for t in range(L0, total):
            if on_logits is not None:
                on_logits(t, logits)
            out[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
            if on_progress is not None:
                on_progress(t + 1 - L0)
            if t + 1 < total:
                logits = model.step(out[:, t], cache)
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def generate_reference(model: nn.Module, prompt: Tensor, num_bytes: int, *, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                       on_logits: Callable[[int, Tensor], None] | None = None,
                       modality: Tensor | None = None) -> Tensor:
    """The slow decoder: a full forward pass over everything so far for every byte."""
    was_training = model.training
    model.eval()
    try:
        out = F.pad(prompt.long(), (0, num_bytes))
        for t in range(prompt.shape[1], out.shape[1]):
            # position t sees bytes < t only; out[:, t] is a placeholder
            logits = model(out[:, : t + 1], modality=modality)[:, t]
            if on_logits is not None:
                on_logits(t, logits)
            out[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
    finally:
        model.train(was_training)
    return out
