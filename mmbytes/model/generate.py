"""Patch-by-patch generation with a two-level KV cache (MEGABYTE, Yu et al., 2023, section 2.3 and 6).

The global model advances one patch at a time with its own cache; the local model then decodes the patch's P bytes
one by one with a per-patch cache that is cleared for every patch. A prompt is prefilled in parallel: all its whole
patches in one global call, and the bytes of its last, partial patch in one local call.
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
    ``on_progress(n)`` is called with the number of bytes made after each patch.
    """
    if num_bytes <= 0:
        return prompt.long().clone()
    was_training = model.training
    model.eval()
    c = model.config
    P = c.patch_size
    B, L0 = prompt.shape
    total = L0 + num_bytes
    device = prompt.device
    dtype = model.global_pad.dtype
    out = torch.zeros(B, total, dtype=torch.long, device=device)
    out[:, :L0] = prompt
    gcaches = model.global_model.make_caches(B, -(-total // P), device, dtype)
    lcaches = model.local_model.make_caches(B, P, device, dtype) if model.local_model is not None else None

    # global prefill: the padding patch and every whole patch of the prompt; the last output is the current patch's
    n_full = L0 // P
    h = torch.cat([model.global_pad.expand(B, 1, -1), model.patch_embed(out[:, : n_full * P])], dim=1)
    g = model.global_model(h, gcaches)[:, -1]  # (B, P*D_G)
    t, patch = L0, n_full
    while t < total:
        start = patch * P
        if lcaches is None:  # flat Transformer: P == 1, the global output is the byte's hidden state
            hid = g
        else:
            gl = model.global_to_local(g.view(B, P, c.d_global))  # (B, P, D_L)
            for cache in lcaches:
                cache.reset()
            r = t - start  # bytes of this patch already known (the prompt's partial patch)
            local_in = torch.cat([model.local_pad.expand(B, 1, -1), model.local_embed(out[:, start:t])], dim=1)
            hid = model.local_model(local_in + gl[:, : r + 1], lcaches)[:, -1]  # (B, D_L)
        while True:
            logits = model.head(hid)
            if on_logits is not None:
                on_logits(t, logits)
            out[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
            t += 1
            if t == total or t == start + P:
                break
            j = t - start
            hid = model.local_model(gl[:, j : j + 1] + model.local_embed(out[:, t - 1 : t]), lcaches)[:, -1]
        if on_progress is not None:
            on_progress(t - L0)
        patch += 1
        if t < total:  # the global model advances by the patch just finished
            g = model.global_model(model.patch_embed(out[:, start : start + P]), gcaches)[:, -1]
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
