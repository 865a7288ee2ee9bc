"""Transformer building blocks shared by the global and local models: pre-norm blocks, rotary positions,
attention through ``scaled_dot_product_attention`` with an optional preallocated KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_TOKENS = 2**17
"""Positions per slice of a checkpointed block (see ``Transformer.forward``)."""


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer; ``pos`` is how many positions are filled. ``last`` keeps
    the block's inputs at the newest position (for token shift), one slot per shifted sublayer."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.pos = 0
        self.last: list[Tensor | None] = [None, None]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, H, L, hd) keys and values; return all filled positions."""
        end = self.pos + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.k.shape[2]}")
        self.k[:, :, self.pos : end] = k
        self.v[:, :, self.pos : end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.pos = 0
        self.last = [None, None]


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """Token shift (Peng et al., 2023, RWKV): the second half of the channels comes from the previous position
    (``prev``, (B, 1, D - D/2), or zeros before the first). Causal: position t mixes inputs t and t - 1 only."""
    half = x.shape[-1] // 2
    late = x[..., half:]
    prev = torch.zeros_like(late[:, :1]) if prev is None else prev
    return torch.cat([x[..., :half], torch.cat([prev, late[:, :-1]], dim=1)], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al., 2021); cos/sin tables grow on demand."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self._cos = self._sin = None

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        end = start + length
        if self._cos is None or self._cos.shape[0] < end or self._cos.device != self.inv_freq.device:
            n = max(end, 2 * (0 if self._cos is None else self._cos.shape[0]), 64)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)  # (n, hd)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, d // n_head
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.dropout = dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(k, v)
        if start == 0:
            mask, causal = None, True
        elif L == 1:
            mask, causal = None, False  # one new query sees every cached key
        else:  # prefill continuing a cache: query i sits at position start + i
            mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, d: int, ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(d * ratio)
        self.fc = nn.Linear(d, hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm block; with ``shift``, each sublayer reads its input token-shifted (see ``token_shift``)."""

    def __init__(self, d: int, n_head: int, mlp_ratio: float, dropout: float, shift: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.attn = Attention(d, n_head, dropout)
        self.mlp = MLP(d, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)
        self.shift = shift

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        prev = cache.last if cache is not None and cache.pos > 0 else [None, None]  # read before attention fills it
        new = [None, None]
        h = x
        if self.shift:
            new[0], h = x[:, -1:, x.shape[-1] // 2 :], token_shift(x, prev[0])
        x = x + self.drop(self.attn(self.norm1(h), cos, sin, cache))
        h = x
        if self.shift:
            new[1], h = x[:, -1:, x.shape[-1] // 2 :], token_shift(x, prev[1])
            if cache is not None:
                cache.last = new
        return x + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """A causal pre-norm transformer stack with a final norm. Positions are rotary, so any length works."""

    def __init__(self, d: int, n_layer: int, n_head: int, mlp_ratio: float, dropout: float, rope_base: float,
                 checkpointing: bool = False, token_shift: bool = False) -> None:
        super().__init__()
        self.d, self.n_head, self.checkpointing = d, n_head, checkpointing
        self.blocks = nn.ModuleList(Block(d, n_head, mlp_ratio, dropout, token_shift) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.rotary = Rotary(d // n_head, rope_base)

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled down by depth."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))

    def forward(self, x: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        start = caches[0].pos if caches else 0
        cos, sin = self.rotary(start, x.shape[1], x.dtype)
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                # only the block's input is kept; its intermediates are recomputed in the backward pass. The rows of
                # a folded batch (every patch of a million-byte sequence) go through in slices, so the recomputed
                # intermediates of one slice, not of all rows, are alive at a time
                rows = max(1, CHECKPOINT_TOKENS // x.shape[1])
                x = torch.cat([checkpoint(block, part, cos, sin, use_reentrant=False) for part in x.split(rows)])
            else:
                x = block(x, cos, sin, caches[i] if caches else None)
        return self.norm(x)

    def make_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[KVCache]:
        hd = self.d // self.n_head
        return [KVCache(batch, self.n_head, max_len, hd, device, dtype) for _ in self.blocks]
