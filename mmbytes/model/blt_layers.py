"""BLT's parts below the model (Pagnoni et al., 2024): the hash n-gram ids of the byte embeddings (section 3.2.1),
the entropy of a next-byte distribution (section 2.3), the per-patch cross-attention of the local encoder and decoder
(sections 3.2.2 and 3.3.1), the generation cache, the patch statistics that training logs and the FLOPs of the
trainable parts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops

HASH_BASE, HASH_MOD = 1_000_003, 2**31 - 1
"""The rolling hash of the n-gram ids: sum over the n bytes ending at t of (byte + 1) * HASH_BASE^age mod HASH_MOD
(a byte before the start of the sequence counts 0). Integer arithmetic: the same ids in every process and run."""


def mix32(h: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (int64 tensors of values below 2**32): every input bit moves every output
    bit, so a reduction modulo any table size spreads the ids like a random hash."""
    mask = 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    return h ^ (h >> 16)


def ngram_ids(x: Tensor, ngrams: tuple[int, ...], vocab: int, version: int = 2) -> list[Tensor]:
    """Hash ids (B, T) of the n-gram ending at each byte, one tensor per n in ``ngrams``; position t depends on bytes
    t-n+1..t only (fewer near the start, where the missing bytes count 0). ``version``: see
    ``BLTConfig.hash_version``."""
    x = x.long() + 1
    T = x.shape[-1]
    acc = torch.zeros_like(x)
    out = {}
    for age in range(max(ngrams)):
        older = F.pad(x[..., : T - age], (age, 0)) if age < T else torch.zeros_like(x)
        acc = (acc + older * pow(HASH_BASE, age, HASH_MOD)) % HASH_MOD
        if age + 1 in ngrams:
            out[age + 1] = (mix32(acc) if version >= 2 else acc) % vocab
    return [out[n] for n in ngrams]


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy in nats of the distributions given by logits (..., 256), in float32 at least."""
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class PatchCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention in BLT's two forms, both over one patch at a time:

    - ``pool``: each patch's k query vectors attend to the bytes of that patch only (the encoder);
    - ``attend``: each byte attends to the k key vectors of one patch (the decoder).
    """

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, d // n_head
        self.norm_q, self.norm_kv = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(self.norm_kv(x)).view(*x.shape[:-1], 2, self.n_head, self.head_dim).unbind(-3)
        return k, v  # (..., H, hd)

    def pool(self, queries: Tensor, states: Tensor, pid: Tensor) -> Tensor:
        """queries (B, K, k, D) of K patches, byte states (B, T, D), each byte's patch index pid (B, T) -> queries
        plus what they read from their own patch's bytes (B, K, k, D). A softmax over the bytes of each patch (a
        segment softmax); a patch without bytes reads nothing."""
        B, K, k, D = queries.shape
        H, hd = self.n_head, self.head_dim
        q = self.q(self.norm_q(queries)).view(B, K, k, H, hd)
        key, val = self._kv(states)  # (B, T, H, hd)
        idx = pid[:, :, None, None].expand(-1, -1, k, H)  # (B, T, k, H)
        qt = q.gather(1, idx[..., None].expand(-1, -1, -1, -1, hd))  # (B, T, k, H, hd): each byte's patch queries
        score = torch.einsum("btkhd,bthd->btkh", qt, key) / math.sqrt(hd)
        top = torch.full((B, K, k, H), -torch.inf, device=score.device, dtype=score.dtype)
        top = top.scatter_reduce(1, idx, score.detach(), "amax")  # per patch: only for stability, no gradient
        w = (score - top.gather(1, idx)).exp()
        total = torch.zeros_like(top).scatter_add(1, idx, w)
        w = w / total.gather(1, idx)  # softmax weights within each patch; every byte is in a patch with total >= 1
        out = torch.zeros(B, K, k, H, hd, device=val.device, dtype=val.dtype)
        out = out.scatter_add(1, idx[..., None].expand(-1, -1, -1, -1, hd), w[..., None] * val[:, :, None])
        return queries + self.proj(out.reshape(B, K, k, D))

    def keys(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, K, k, H, hd) of k vectors per patch (B, K, k, D)."""
        return self._kv(vectors)

    def attend(self, x: Tensor, key: Tensor, val: Tensor, pid: Tensor) -> Tensor:
        """Bytes x (B, T, D), each reading the k keys and values of patch pid[b, t] (keys from ``keys``); returns
        what they read (B, T, D), to be added to x."""
        B, T, D = x.shape
        H, hd = self.n_head, self.head_dim
        q = self.q(self.norm_q(x)).view(B, T, H, hd)
        idx = pid[:, :, None, None, None].expand(-1, -1, *key.shape[2:])
        key, val = key.gather(1, idx), val.gather(1, idx)  # (B, T, k, H, hd)
        w = (torch.einsum("bthd,btkhd->bthk", q, key) / math.sqrt(hd)).softmax(-1)
        return self.proj(torch.einsum("bthk,btkhd->bthd", w, val).reshape(B, T, D))


@dataclass
class BLTCache:
    """Generation state: the bytes so far (``t`` known), the encoder's and decoder's sliding-window caches, the
    entropy model's cache and its latest entropy, the latent transformer's row caches, every byte's encoder state
    (to pool a patch when it closes), and per row: its threshold, its latent and decoder start vectors (its
    modality's), where its current patch started, its latent positions so far, and the decoder's keys and values of
    the latent output its current patch reads."""

    buf: Tensor
    t: int
    enc: list
    ent: Any
    glob: list
    dec: list
    states: Tensor
    theta: Tensor
    latent_start: Tensor
    byte_start: Tensor
    start: Tensor = field(default=None)
    count: Tensor = field(default=None)
    kv: list = field(default=None)
    entropy: Tensor = field(default=None)


def patch_stats(starts: Tensor, mask: Tensor | None, modality: Tensor | None) -> dict[str, Tensor]:
    """Mean patch size (real bytes / patch starts among them), overall and per modality present."""
    real = torch.ones_like(starts) if mask is None else mask.bool()
    count, cut = real.sum(1).float(), (starts & real).sum(1).float()
    out = {"patch_size": (count.sum() / cut.sum().clamp(min=1)).detach()}
    if modality is not None:
        for m in modality.unique().tolist():
            rows = modality == m
            out[f"patch_size_{MODALITIES[m]}"] = (count[rows].sum() / cut[rows].sum().clamp(min=1)).detach()
    return out


def forward_flops(c: Any, rows: int, seq_len: int, n_patches: int) -> float:
    """Forward FLOPs of a BLT model's trainable parts (config ``c``) on ``rows`` windows of ``seq_len`` bytes cut into
    ``n_patches`` patches each (``mmbytes.model.flops``): local blocks (sliding-window attention), the pooling (query
    init, the patch cross-attention's projections, its scores and weighted values: each byte with the k queries of its
    patch), the latent transformer, the decoder's cross-attentions (projections of the latent output, queries, scores
    and weighted values) and the head."""
    T, K, n = seq_len, n_patches, rows
    DL, DG, k = c.d_local, c.d_global, c.cross_k
    mix = flops.attention(n * T, k, DL)  # scores and weighted values: each byte with k vectors
    fwd = flops.blocks(n, T, DL, c.n_layer_encoder + c.n_layer_decoder, c.mlp_ratio, c.local_window, c.mlp)
    fwd += flops.linear(n * K, DL, k * DL) + flops.linear(n * K * k, DL, DL) * 2 + flops.linear(n * T, DL, 2 * DL)
    fwd += mix + flops.linear(n * K, k * DL, DG)
    fwd += flops.blocks(n, K, DG, c.n_layer_global, c.mlp_ratio, mlp=c.mlp)
    cross = flops.linear(n * K, DG, k * DL) + flops.linear(n * K * k, DL, 2 * DL) + flops.linear(n * T, DL, DL) * 2
    fwd += c.n_layer_decoder * (cross + mix)
    return fwd + flops.linear(n * T, DL, c.vocab_size)
