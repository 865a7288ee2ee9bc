"""Transformer building blocks shared by the global and local models: pre-norm blocks, rotary positions,
attention through ``scaled_dot_product_attention`` with an optional preallocated KV cache."""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_TOKENS = 2**17
"""Positions per slice of a checkpointed block (see ``Transformer.forward``)."""


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer; ``pos`` is how many positions were written. With a
    ``window`` it is a ring of the last ``window`` positions (sliding-window attention): keys carry their rotary
    position already, so their order in the ring does not matter. ``last`` keeps the block's inputs at the newest
    position (for token shift), one slot per shifted sublayer."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=None,
                 window: int = 0) -> None:
        super().__init__()
        self.window = window
        shape = (batch, n_head, min(max_len, window) if window else max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.pos = 0
        self.last: list[Tensor | None] = [None, None]

    def write(self, k: Tensor, v: Tensor) -> None:
        """Append (B, H, L, hd) keys and values (a ring keeps only the newest ``window``)."""
        L, cap = k.shape[2], self.k.shape[2]
        if self.window:
            keep = min(L, cap)
            slots = torch.arange(self.pos + L - keep, self.pos + L, device=k.device) % cap
            self.k[:, :, slots], self.v[:, :, slots] = k[:, :, L - keep :], v[:, :, L - keep :]
        else:
            if self.pos + L > cap:
                raise RuntimeError(f"KV cache overflow: {self.pos + L} positions > capacity {cap}")
            self.k[:, :, self.pos : self.pos + L], self.v[:, :, self.pos : self.pos + L] = k, v
        self.pos += L

    def keys(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Every key and value a new query may see, and a mask (None: all of them)."""
        n = min(self.pos, self.k.shape[2])
        return self.k[:, :, :n], self.v[:, :, :n], None

    def recall(self, slot: int) -> Tensor | None:
        """The shifted half of a sublayer's input at the newest position (None before the first)."""
        return self.last[slot] if self.pos > 0 else None

    def remember(self, slot: int, x: Tensor) -> None:
        self.last[slot] = x[:, -1:, x.shape[-1] // 2 :]

    def reset(self) -> None:
        self.pos = 0
        self.last = [None, None]


class RowKVCache(KVCache):
    """A KV cache whose rows advance separately (SpaceByte's global blocks: each row takes a step only where its
    bytes open a word). ``n`` (B,) counts each row's positions; ``step`` writes one position per row at its own
    ``n`` and ``commit(rows)`` advances only the rows that really took the step."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__(batch, n_head, max_len, head_dim, device, dtype)
        self.n = torch.zeros(batch, dtype=torch.long, device=device)

    def write(self, k: Tensor, v: Tensor) -> None:
        if self.pos == 0:  # prefill: every row's slots from 0; ``set_lengths`` then says how many are real
            super().write(k, v)
            return
        rows = torch.arange(k.shape[0], device=k.device)
        if int(self.n.max()) >= self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: capacity {self.k.shape[2]}")
        self.k[rows, :, self.n], self.v[rows, :, self.n] = k[:, :, 0], v[:, :, 0]
        self.pos += 1

    def keys(self) -> tuple[Tensor, Tensor, Tensor | None]:
        S = int(self.n.max()) + 1  # each row sees its own positions and the one just written at n
        mask = torch.arange(S, device=self.n.device) <= self.n[:, None]  # (B, S)
        return self.k[:, :, :S], self.v[:, :, :S], mask[:, None, None, :]

    def set_lengths(self, n: Tensor) -> None:
        """Each row's real positions, set before a prefill (rows are padded at the end)."""
        self.n = n.clone()

    def remember(self, slot: int, x: Tensor) -> None:
        if x.shape[1] > 1:  # prefill: each row's newest real position, not the padding after it
            x = x[torch.arange(x.shape[0], device=x.device), (self.n - 1).clamp(min=0)][:, None]
        super().remember(slot, x)

    def commit(self, rows: Tensor) -> None:
        self.n = self.n + rows.long()

    def reset(self) -> None:
        super().reset()
        self.n.zero_()


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
        self._grow(end)
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)

    def rows(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin (B, 1, 1, hd) of one position per row."""
        self._grow(int(positions.max()) + 1)
        return self._cos[positions][:, None, None].to(dtype), self._sin[positions][:, None, None].to(dtype)

    def _grow(self, end: int) -> None:
        if self._cos is None or self._cos.shape[0] < end or self._cos.device != self.inv_freq.device:
            n = max(end, 2 * (0 if self._cos is None else self._cos.shape[0]), 64)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)  # (n, hd)
            self._cos, self._sin = emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, dropout_p: float = 0.0) -> Tensor:
    """Causal attention in which each query sees itself and the ``window - 1`` positions before it, computed block by
    block: queries in blocks of ``window`` attend to their own block and the one before, so the cost is
    O(T * window), not O(T^2). ``dropout_p``: attention dropout, as in full attention. (B, H, T, hd) in and out."""
    B, H, T, hd = q.shape
    W = window
    pad = -T % W
    if pad:  # padded queries are dropped; padded keys come after every real query, so no real query sees them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (T + pad) // W
    qb, kb, vb = (t.view(B, H, n, W, hd) for t in (q, k, v))  # (B, H, n, W, hd)
    k2 = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)  # (B, H, n, 2W, hd): block before + own
    v2 = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    mask = (j > i) & (j <= i + W)  # (W, 2W): key j of the two blocks sits at offset j - W from the query block
    mask = mask.expand(n, W, 2 * W).clone()
    mask[0, :, :W] = False  # the first block has no block before it
    y = F.scaled_dot_product_attention(qb, k2, v2, attn_mask=mask, dropout_p=dropout_p)  # (B, H, n, W, hd)
    return y.reshape(B, H, n * W, hd)[:, :, :T]


@functools.lru_cache(maxsize=32)
def sliding_block_mask(T: int, window: int, device: str):
    """FlexAttention's block mask of causal sliding-window attention over T positions: query i sees keys
    i - window + 1 .. i. Blocks outside the band are skipped, so the work is O(T * window)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q, k):
        return (k <= q) & (q - k < window)

    return create_block_mask(band, None, None, T, T, device=device)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """``window_attention`` as one fused FlexAttention kernel, compiled for CUDA tensors (elsewhere FlexAttention's
    unfused reference, which the tests compare). (B, H, T, hd) in and out."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = sliding_block_mask(q.shape[2], window, str(q.device))
    return (_flex() if q.is_cuda else flex_attention)(q, k, v, block_mask=mask)


class Attention(nn.Module):
    """Causal self-attention; ``window`` > 0 limits each query to itself and the ``window - 1`` positions before it.
    With a cache, a fresh cache takes the whole input (prefill) and a started one one position at a time."""

    def __init__(self, d: int, n_head: int, dropout: float, window: int = 0) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.window = n_head, d // n_head, window
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.dropout = dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        fresh = cache is None or cache.pos == 0
        if cache is not None:
            cache.write(k, v)
        drop = self.dropout if self.training else 0.0
        if fresh and self.window and L > self.window:
            fused = q.is_cuda and not drop  # FlexAttention has no dropout
            y = flex_window_attention(q, k, v, self.window) if fused else window_attention(q, k, v, self.window, drop)
        elif fresh:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif L == 1:  # one new query sees every cached key (the ring of a windowed cache holds just the window)
            k, v, mask = cache.keys()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            raise ValueError("a started KV cache takes one position at a time")
        return self.proj(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


def mlp_hidden(d: int, ratio: float, kind: Literal["gelu", "swiglu"] = "gelu") -> int:
    """Hidden width of a block's MLP. ``gelu``: d * ratio. ``swiglu``: 2/3 of that, rounded to a multiple of 8 (at
    least 8), so its three matrices hold about the parameters of the two of the ``gelu`` MLP (Shazeer, 2020, GLU
    Variants Improve Transformer, section 2)."""
    hidden = int(d * ratio)
    if kind == "gelu":
        return hidden
    if kind == "swiglu":
        return max(8, 8 * round(2 * hidden / 3 / 8))
    raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}")


class MLP(nn.Module):
    """The MLP of a block. ``gelu``: proj(GELU(fc x)), hidden width d * ratio (GPT-2). ``swiglu``: proj(SiLU(x W) *
    (x V)) (Shazeer, 2020, GLU Variants Improve Transformer), at equal parameters: hidden width ``mlp_hidden`` (2/3 of
    the gelu one, rounded to a multiple of 8); W and V are one ``fc`` matrix of twice that width. ``proj`` is the
    output projection in both (the residual projection that ``Transformer.reset_parameters`` scales by depth)."""

    def __init__(self, d: int, ratio: float, dropout: float, kind: Literal["gelu", "swiglu"] = "gelu") -> None:
        super().__init__()
        self.kind = kind
        hidden = mlp_hidden(d, ratio, kind)
        self.fc = nn.Linear(d, 2 * hidden if kind == "swiglu" else hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            gate, up = self.fc(x).chunk(2, dim=-1)  # (..., hidden) each
            return self.drop(self.proj(F.silu(gate) * up))
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm block; with ``shift``, each sublayer reads its input token-shifted (see ``token_shift``); ``mlp``:
    the MLP's form (``MLP``)."""

    def __init__(self, d: int, n_head: int, mlp_ratio: float, dropout: float, shift: bool = False,
                 window: int = 0, mlp: Literal["gelu", "swiglu"] = "gelu") -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.attn = Attention(d, n_head, dropout, window)
        self.mlp = MLP(d, mlp_ratio, dropout, mlp)
        self.drop = nn.Dropout(dropout)
        self.shift = shift

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        shift = self.shift
        prev = [cache.recall(0), cache.recall(1)] if shift and cache is not None else [None, None]  # before writing
        h = x
        if shift:
            h = token_shift(x, prev[0])
            if cache is not None:
                cache.remember(0, x)
        x = x + self.drop(self.attn(self.norm1(h), cos, sin, cache))
        h = x
        if shift:
            h = token_shift(x, prev[1])
            if cache is not None:
                cache.remember(1, x)
        return x + self.mlp(self.norm2(h))


def init_linear(m: nn.Linear, init: Literal["gpt2", "fan_in"]) -> None:
    """``gpt2``: weight N(0, 0.02), bias 0. ``fan_in``: PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    weight and bias."""
    if init == "fan_in":
        m.reset_parameters()
    elif init == "gpt2":
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:
        raise ValueError(f"init must be 'gpt2' or 'fan_in', got {init!r}")


class Transformer(nn.Module):
    """A causal pre-norm transformer stack, with a final norm unless ``final_norm`` is False (a stack whose output
    goes on in a residual stream). Positions are rotary, so any length works; ``window`` > 0 makes the attention
    sliding-window; ``mlp``: every block's MLP form (``MLP``)."""

    def __init__(self, d: int, n_layer: int, n_head: int, mlp_ratio: float, dropout: float, rope_base: float,
                 checkpointing: bool = False, token_shift: bool = False, window: int = 0,
                 final_norm: bool = True, mlp: Literal["gelu", "swiglu"] = "gelu") -> None:
        super().__init__()
        self.d, self.n_head, self.checkpointing, self.window = d, n_head, checkpointing, window
        self.blocks = nn.ModuleList(Block(d, n_head, mlp_ratio, dropout, token_shift, window, mlp)
                                    for _ in range(n_layer))
        self.norm = nn.RMSNorm(d, eps=1e-6) if final_norm else nn.Identity()
        self.rotary = Rotary(d // n_head, rope_base)

    def reset_parameters(self, init: Literal["gpt2", "fan_in"] = "gpt2") -> None:
        """``gpt2``: N(0, 0.02), residual projections scaled down by depth (0.02 / sqrt(2 * layers)). ``fan_in``:
        PyTorch's default for every linear layer, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (as MEGABYTE-pytorch)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m, init)
        if init == "gpt2":
            for block in self.blocks:
                for proj in (block.attn.proj, block.mlp.proj):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))

    def forward(self, x: Tensor, caches: list[KVCache] | None = None, positions: Tensor | None = None) -> Tensor:
        """x (B, L, d). With ``positions`` (B,), x holds one position per row at that row's own index (row caches)."""
        if positions is not None:
            cos, sin = self.rotary.rows(positions, x.dtype)
        else:
            cos, sin = self.rotary(caches[0].pos if caches else 0, x.shape[1], x.dtype)
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

    def row_step(self, x: Tensor, caches: list[RowKVCache], positions: Tensor, rows: Tensor) -> Tensor:
        """One cached position per row (x (B, 1, d)), each row at its own index ``positions`` (B,), taken only by the
        rows where ``rows`` (B,) is true: the others' caches keep their length and their token-shift state, so their
        output here is to be discarded (SpaceByte's and BLT's global models step only where a patch opens)."""
        kept = [list(c.last) for c in caches]
        out = self(x, caches, positions=positions)
        for c, old in zip(caches, kept, strict=True):
            c.commit(rows)
            if c.last[0] is not None and old[0] is not None:  # token shift: only stepping rows move on
                c.last = [torch.where(rows[:, None, None], new, prev) for new, prev in zip(c.last, old, strict=True)]
        return out

    def make_caches(self, batch: int, max_len: int, device=None, dtype=None, rows: bool = False) -> list[KVCache]:
        """One cache per block; ``rows``: caches whose rows advance separately (``RowKVCache``)."""
        hd = self.d // self.n_head
        if rows:
            return [RowKVCache(batch, self.n_head, max_len, hd, device, dtype) for _ in self.blocks]
        return [KVCache(batch, self.n_head, max_len, hd, device, dtype, self.window) for _ in self.blocks]


class ModalityStart(nn.Module):
    """A learned start state per modality (the ids of ``mmbytes.codecs.MODALITIES``): a model's shared start unit
    (its trainable padding patch or start vector, ``base``) plus one offset per modality, chosen by each row's
    modality; a row without a modality (``modality=None``) gets ``base`` alone. The offsets start at zero, so a
    freshly built conditioned model computes what the same weights compute unconditioned, and a state dict without
    them (a model trained before it was conditioned) loads with zero offsets and scores exactly as before. It reads
    nothing but the modality, so it keeps every causal dependency of the unit it conditions. The offsets are kept as
    one flat vector: like the padding units they condition, they take no weight decay (``mmbytes.lit.param_groups``
    decays matrices only)."""

    def __init__(self, width: int, n_modalities: int) -> None:
        super().__init__()
        self.n_modalities, self.width = n_modalities, width
        self.offset = nn.Parameter(torch.zeros(n_modalities * width))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset)

    def forward(self, base: Tensor, batch: int, modality: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
        """Each row's start unit (batch, 1, width) in ``dtype`` (default: ``base``'s)."""
        dtype = dtype or base.dtype
        if modality is None:
            return base.to(dtype).expand(batch, 1, -1)
        table = self.offset.view(self.n_modalities, self.width)
        return (base + table[modality.to(table.device).long()]).to(dtype).view(batch, 1, -1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "offset" not in state_dict:  # saved unconditioned: zero offsets are exactly that model
            state_dict[prefix + "offset"] = torch.zeros_like(self.offset)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
