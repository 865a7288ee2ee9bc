"""The flat byte-level Transformer: one causal decoder-only stack over bytes, the baseline of the MEGABYTE paper
(Yu et al., 2023, section 5) and, windowed, BLT's entropy model (Pagnoni et al., 2024, section 2.3).

Position t reads the embedding of byte t - 1 (position 0 a trainable start vector: no byte value is reserved for
padding), so its output predicts byte t from bytes < t. Positions are rotary; ``window`` > 0 makes every attention a
sliding window of that many bytes. Shapes: B batch, T bytes, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops
from mmbytes.model.common import check_heads, chunked_nll, named_config, rename_stored
from mmbytes.model.layers import KVCache, ModalityStart, Transformer, init_linear
from mmbytes.model.protocol import Capabilities, Complete, FixedCost, ModelData


@dataclass(frozen=True)
class TransformerConfig:
    arch: Literal["transformer"] = "transformer"
    """Architecture name in checkpoints and the registry."""
    d_model: int = 384
    """D, width of the stack."""
    n_layer: int = 6
    """Blocks."""
    n_head: int = 6
    """Attention heads."""
    window: int = 0
    """Sliding-window attention: each position sees itself and the ``window - 1`` bytes before it; 0: full causal
    attention. BLT's entropy model is windowed (the paper: 512 bytes)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Every block's MLP: ``gelu`` or ``swiglu`` at about equal parameters (see ``MegabyteConfig.mlp``)."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs in training."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding (byte index)."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    token_shift: bool = False
    """Token shift in every block (see ``MegabyteConfig.token_shift``)."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte embeddings and the start vector."""
    init: Literal["gpt2", "fan_in"] = "gpt2"
    """Linear layers' initialisation (see ``MegabyteConfig.init``)."""
    tied_head: bool = False
    """The output head reuses the byte embedding matrix."""
    vocab_size: int = 256
    """Byte values. All 256 are data."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): the start vector before byte 0 is the shared
    one plus an offset chosen by the row's modality. Off in the paper's form and in BLT's entropy models (which must
    give the same entropies whatever the modality); on in the ``transformer-*`` sizes."""

    def __post_init__(self) -> None:
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"init must be 'gpt2' or 'fan_in', got {self.init!r}")
        if self.n_layer < 1 or self.window < 0:
            raise ValueError(f"n_layer must be >= 1 and window >= 0, got {self.n_layer} and {self.window}")
        check_heads((self.d_model, self.n_head, "transformer"))

    @property
    def window_alignment(self) -> int:
        """Bytes that training windows of image data start on a multiple of (``data.patch_size``, set from this by
        the CLI): 1 (no patches)."""
        return 1

    @property
    def patch_size(self) -> int:
        """Bytes per position: 1 (no patches; what the data aligns windows and image tiles to)."""
        return 1

    @classmethod
    def from_name(cls, name: str, preset: str | None = None, **overrides) -> TransformerConfig:
        """A named size of this module (``SIZES``), in ``preset`` if given, with fields replaced by ``overrides``."""
        return named_config(SIZES, PRESETS, name, preset, overrides)


class ByteTransformer(Complete, FixedCost, nn.Module):
    """``ByteTransformer(config)(x)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from
    bytes < t."""

    @property
    def capabilities(self) -> Capabilities:
        """No patches (no strided inference); conditioned on each row's modality with ``modality_start``."""
        return Capabilities(per_modality=self.config.modality_start)

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.start = nn.Parameter(torch.empty(c.d_model))  # the input of position 0
        self.modality_start = ModalityStart(c.d_model, len(MODALITIES)) if c.modality_start else None
        self.model = Transformer(c.d_model, c.n_layer, c.n_head, mlp_ratio=c.mlp_ratio, dropout=c.dropout,
                                 rope_base=c.rope_base, checkpointing=c.checkpointing, token_shift=c.token_shift,
                                 window=c.window, mlp=c.mlp)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tied_head:
            self.head.weight = self.embed.weight  # one (256, D) matrix: embedding in, logits out
        self.reset_parameters()

    # state-dict names of the same tensors as stored when the flat Transformer was MEGABYTE with P = 1
    STORED_NAMES = {"global_embed.": "embed.", "global_pad": "start", "modality_pad.": "modality_start.",
                    "global_model.": "model."}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        rename_stored(state_dict, prefix, self.STORED_NAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        c = self.config
        nn.init.normal_(self.embed.weight, std=c.embed_std)
        if not c.tied_head:
            init_linear(self.head, c.init)
        self.model.reset_parameters(c.init)
        nn.init.normal_(self.start, std=c.embed_std)
        if self.modality_start is not None:
            self.modality_start.reset_parameters()

    def num_params(self, part: str = "all") -> int:
        """Parameters in all, or of the stack alone (``global``; ``local``: none)."""
        modules = {"all": self, "global": self.model, "local": None}[part]
        return sum(p.numel() for p in modules.parameters()) if modules is not None else 0

    def start_vector(self, batch: int, modality: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The input of position 0 (B, 1, D): the shared start vector, plus the row's modality offset with
        ``modality_start``."""
        if self.modality_start is None:
            return self.start.to(dtype).expand(batch, 1, -1)
        return self.modality_start(self.start, batch, modality, dtype)

    def hidden(self, x: Tensor, modality: Tensor | None = None) -> Tensor:
        """Bytes (B, T) -> final hidden states (B, T, D); position t has read bytes < t."""
        x = x.long()
        e = self.embed(x)  # (B, T, D)
        return self.model(torch.cat([self.start_vector(x.shape[0], modality, e.dtype), e[:, :-1]], dim=1))

    def forward(self, x: Tensor, *, modality: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(x, modality))

    def nll(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768, *,
            modality: Tensor | None = None) -> Tensor:
        """Nats of every byte (B, T), zero where ``mask`` is False; logits made ``chunk`` positions at a time."""
        return chunked_nll(self.head.weight, self.hidden(x, modality), x, mask, chunk)

    def forward_flops(self, rows: int, seq_len: int) -> float:
        """Forward FLOPs of ``rows`` windows of ``seq_len`` bytes: the blocks (windowed if configured) and the
        head."""
        c = self.config
        return (flops.blocks(rows, seq_len, c.d_model, c.n_layer, c.mlp_ratio, c.window, c.mlp)
                + flops.linear(rows * seq_len, c.d_model, c.vocab_size))

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *,
                     modality: Tensor | None = None) -> Tensor | None:
        """None: no patches."""
        return None

    def prepare(self, data: ModelData) -> None:
        """Nothing to ready."""

    # -- cached generation: one KV cache per block, one byte per step

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None, *,
                  modality: Tensor | None = None) -> TransformerCache:
        start = self.start_vector(batch, modality, dtype or self.start.dtype)
        return TransformerCache(self.model.make_caches(batch, max_len, device, dtype), start)

    def prefill(self, prompt: Tensor, cache: TransformerCache) -> Tensor:
        """Take in the prompt (B, L0) in one call; return the logits of byte L0."""
        for c in cache.kv:
            c.reset()
        inputs = torch.cat([cache.start, self.embed(prompt.long())], dim=1)
        return self.head(self.model(inputs, cache.kv)[:, -1])

    def step(self, byte: Tensor, cache: TransformerCache) -> Tensor:
        """Append one byte per row (B,); return the logits of the byte after it."""
        return self.head(self.model(self.embed(byte.long())[:, None], cache.kv)[:, -1])


@dataclass
class TransformerCache:
    """Generation state: a KV cache per block and each row's start vector (its modality's)."""

    kv: list[KVCache]
    start: Tensor


PRESETS: dict[str, dict] = {
    "paper": dict(token_shift=False, embed_std=0.02, init="gpt2", modality_start=False),
    "conditioned": dict(token_shift=False, embed_std=0.02, init="gpt2", modality_start=True),
}
"""Named forms (field -> value) a size is built in. ``paper``: the GPT-2-style baseline of the MEGABYTE paper
(section 5), unconditioned, also BLT's entropy models. ``conditioned``: the same with a learned start state per
modality (the ``transformer-*`` sizes)."""

SHAPES: dict[str, tuple[str, dict]] = {
    # flat byte-level Transformers with the parameter count of the MEGABYTE size they are named after
    "transformer-debug": ("conditioned", dict(d_model=64, n_layer=2, n_head=2)),
    "transformer-small": ("conditioned", dict(d_model=384, n_layer=6, n_head=6)),
    "transformer-base": ("conditioned", dict(d_model=768, n_layer=14, n_head=12)),
    # BLT's entropy models: small windowed byte transformers (the paper's is ~100M parameters, window 512)
    "blt-entropy-debug": ("paper", dict(d_model=32, n_layer=1, n_head=2, window=16)),
    "blt-entropy-small": ("paper", dict(d_model=128, n_layer=4, n_head=4, window=512)),
}
"""Each named size: (its preset, its shape)."""

SIZES: dict[str, TransformerConfig] = {name: TransformerConfig(**shape, **PRESETS[preset])
                                       for name, (preset, shape) in SHAPES.items()}
