"""SpaceByte (Slagle, 2024, arXiv 2404.14408): byte-level local blocks, with wide global blocks applied only where a
word starts.

Section 2 of the paper: byte embeddings -> the first half of the local blocks (sliding-window causal attention) ->
the residual stream at the global positions is gathered, widened to D by zero channels (the local activations in
the last D_L channels, as in the reference code), run through causal global blocks over those positions, narrowed
back and returned to the same byte positions -> the second half of the local blocks -> norm -> 256 logits.

Where mmbytes differs from the reference code: every byte is scored (the reference drops from the loss every byte
after the (T_G + 1)-th boundary; here, boundaries beyond the cap T_G are simply not global positions, and the share
of bytes that go on without a fresh global position is reported in ``stats``); all 256 byte values are data (a
learned start vector replaces the in-band BOS byte 255); positions are rotary (byte index in the local blocks,
global index in the global blocks) rather than learned tables.

Shapes: B batch, T bytes, D_L local width, D global width, G global positions of a batch (at most T_G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops, patching
from mmbytes.model.common import check_heads, chunked_nll
from mmbytes.model.layers import ModalityStart, Transformer, init_linear
from mmbytes.model.protocol import Capabilities, Complete, ModelData


@dataclass(frozen=True)
class SpaceByteConfig:
    arch: Literal["spacebyte"] = "spacebyte"
    """Architecture name in checkpoints and the registry."""
    patching: Literal["spacelike", "fixed"] = "spacelike"
    """Where the global blocks run: ``spacelike`` (the paper: where a word starts) or ``fixed`` (every
    ``patch_size`` bytes: the paper's fixed-patch ablation)."""
    patch_size: int = 6
    """Bytes per patch of ``patching: fixed``."""
    d_local: int = 256
    """D_L, width of the local (byte) blocks."""
    n_layer_local: int = 4
    """Local blocks; the first half runs before the global blocks, the rest after."""
    n_head_local: int = 4
    """Attention heads of the local blocks."""
    window: int = 0
    """W, how many bytes a local attention query sees (itself included); 0: D_L, the paper's choice."""
    d_global: int = 384
    """D, width of the global blocks (at least D_L)."""
    n_layer_global: int = 4
    """Global blocks."""
    n_head_global: int = 6
    """Attention heads of the global blocks."""
    context: int = 8192
    """The training sequence length T the global cap is set for (``prepare`` sets it to the training window)."""
    global_ratio: float = 1 / 6
    """T_G = ceil(context * global_ratio) global positions at most per sequence (the paper: T/6 for prose, T/8 for
    code). Boundaries after the T_G-th are not global positions; every byte is still scored."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the block width."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Every block's MLP: ``gelu`` (GPT-2: d -> d * mlp_ratio -> d) or ``swiglu`` (Shazeer, 2020: SiLU-gated, three
    matrices of hidden width 2/3 of gelu's, rounded to a multiple of 8: about the same parameters; ``layers.MLP``)."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs in training."""
    rope_base: float = 10000.0
    """Base of the rotary position embeddings."""
    token_shift: bool = False
    """Token shift in every block (see ``MegabyteConfig.token_shift``; off by default, as in the paper)."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte embeddings and the start vector (as MEGABYTE's default)."""
    init: Literal["gpt2", "fan_in"] = "gpt2"
    """Linear layers' initialisation (see ``MegabyteConfig.init``): ``gpt2`` (N(0, 0.02), residual projections
    depth-scaled) or ``fan_in`` (PyTorch's default)."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    vocab_size: int = 256
    """Byte values. All 256 are data."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): the start vector, position 0's input, is the
    shared one plus an offset chosen by the row's modality (rows without one: the shared one). Off in configs stored
    before the field existed (``registry.migrate``); on in the named sizes."""

    def __post_init__(self) -> None:
        if self.patching not in ("spacelike", "fixed"):
            raise ValueError(f"patching must be 'spacelike' or 'fixed', got {self.patching!r}")
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"init must be 'gpt2' or 'fan_in', got {self.init!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.d_global < self.d_local:
            raise ValueError(f"d_global ({self.d_global}) must be at least d_local ({self.d_local}): the global "
                             "blocks widen the local stream with zero channels")
        if self.n_layer_local < 2 or self.n_layer_global < 1:
            raise ValueError("SpaceByte needs at least 2 local blocks (half before, half after) and 1 global block")
        check_heads((self.d_local, self.n_head_local, "local"), (self.d_global, self.n_head_global, "global"))
        if self.patch_size < 1 or self.context < 1 or not 0 < self.global_ratio <= 1:
            raise ValueError("patch_size and context must be positive and global_ratio in (0, 1]")

    @property
    def window_alignment(self) -> int:
        """Bytes that training windows of image data start on a multiple of (``data.patch_size``, set from this by
        the CLI): ``patch_size`` with fixed patches, 1 where patches follow the words."""
        return self.patch_size if self.patching == "fixed" else 1

    @property
    def max_global(self) -> int:
        """T_G, the cap on global positions per sequence."""
        return math.ceil(self.context * self.global_ratio)

    @property
    def local_window(self) -> int:
        return self.window or self.d_local


_PAPER = dict(token_shift=False, embed_std=0.02, init="gpt2", mlp="gelu", modality_start=False)
PRESETS: dict[str, dict] = {
    "paper": _PAPER,
    "conditioned": {**_PAPER, "modality_start": True},
    "shift-swiglu": {**_PAPER, "modality_start": True, "token_shift": True, "mlp": "swiglu"},
}
"""Named forms (field -> value) a size is built in. ``paper``: the paper's form (a two-matrix MLP, as its reference
code's), unconditioned. ``conditioned``: with a learned start state per modality. ``shift-swiglu`` (the named sizes):
``conditioned`` with token shift and SwiGLU MLPs, the form that learned best over 1,000 steps (docs/learning.md)."""

_DEBUG = dict(d_local=32, n_layer_local=2, n_head_local=2, window=8, d_global=64, n_layer_global=2, n_head_global=2,
              context=64)

SHAPES: dict[str, tuple[str, dict]] = {
    # for tests: a window of 8 bytes and a cap of 11 global positions, both reached by short test sequences
    "spacebyte-debug": ("shift-swiglu", _DEBUG),
    "spacebyte-fixed-debug": ("shift-swiglu", dict(_DEBUG, patching="fixed", patch_size=6)),
    # ~10M parameters: 7.1M global (D = 384, as MEGABYTE small's global model) + 3.2M local (D_L = 256, W = 256)
    "spacebyte-small": ("shift-swiglu", dict()),
    "spacebyte-fixed-small": ("shift-swiglu", dict(patching="fixed", patch_size=6)),
}
"""Each named size: (its preset, its shape)."""

SIZES: dict[str, SpaceByteConfig] = {name: SpaceByteConfig(**shape, **PRESETS[preset])
                                     for name, (preset, shape) in SHAPES.items()}


class SpaceByte(Complete, nn.Module):
    """``SpaceByte(config)(x)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from bytes < t."""

    @property
    def capabilities(self) -> Capabilities:
        """Rows are padded to the batch's most global positions. With ``modality_start`` the model is conditioned
        on each row's modality: callers pass it."""
        return Capabilities(independent_rows=False, per_modality=self.config.modality_start)

    def __init__(self, config: SpaceByteConfig) -> None:
        super().__init__()
        c = self.config = config
        block = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, rope_base=c.rope_base, checkpointing=c.checkpointing,
                     token_shift=c.token_shift, mlp=c.mlp)
        half = c.n_layer_local // 2
        self.embed = nn.Embedding(c.vocab_size, c.d_local)
        self.start = nn.Parameter(torch.empty(c.d_local))  # the input of position 0: no in-band BOS byte
        self.modality_start = ModalityStart(c.d_local, len(MODALITIES)) if c.modality_start else None
        self.local_in = Transformer(c.d_local, half, c.n_head_local, window=c.local_window, final_norm=False, **block)
        self.global_model = Transformer(c.d_global, c.n_layer_global, c.n_head_global, final_norm=False, **block)
        self.local_out = Transformer(c.d_local, c.n_layer_local - half, c.n_head_local, window=c.local_window,
                                     **block)
        self.head = nn.Linear(c.d_local, c.vocab_size, bias=False)
        self.stats: dict[str, float] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.local_in, self.global_model, self.local_out):
            m.reset_parameters(self.config.init)
        init_linear(self.head, self.config.init)
        nn.init.normal_(self.embed.weight, std=self.config.embed_std)
        nn.init.normal_(self.start, std=self.config.embed_std)
        if self.modality_start is not None:
            self.modality_start.reset_parameters()

    def num_params(self, part: str = "all") -> int:
        modules = {"all": self, "global": self.global_model, "local": [self.local_in, self.local_out]}[part]
        modules = modules if isinstance(modules, list) else [modules]
        return sum(p.numel() for m in modules for p in m.parameters())

    # -- where the global blocks run

    def starts(self, x: Tensor, offset: int = 0) -> Tensor:
        """(B, T) True where byte t starts a patch (before the cap), for bytes x whose first byte is at ``offset``."""
        if self.config.patching == "fixed":
            return patching.fixed_starts(x, self.config.patch_size, offset)
        return patching.spacelike_starts(x)

    def capped_starts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Patch starts of bytes x (B, T) and the global positions among them (the first T_G of each row)."""
        starts = self.starts(x)
        return starts, patching.cap_starts(starts, self.config.max_global)

    def global_positions(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Capped global positions of bytes x (B, T): the mask (B, T) and their indices (B, G), padded at the end of
        each row with position 0 (padding slots come after a row's real ones, so causal attention keeps them out)."""
        starts, glob = self.capped_starts(x)
        counts = glob.sum(1)
        G = int(counts.max())
        rank = glob.long().cumsum(1) - 1
        idx = torch.zeros(x.shape[0], G, dtype=torch.long, device=x.device)
        b, t = glob.nonzero(as_tuple=True)
        idx[b, rank[b, t]] = t
        if self.training:
            self.stats = {"spacebyte_overflow": patching.overflow_share(starts, glob).detach(),
                          "spacebyte_global_share": glob.float().mean().detach()}
        return glob, idx

    def widen(self, h: Tensor) -> Tensor:
        """(..., D_L) -> (..., D): zero channels first, the local activations last (the reference code's layout)."""
        return F.pad(h, (self.config.d_global - self.config.d_local, 0))

    def narrow(self, g: Tensor) -> Tensor:
        return g[..., -self.config.d_local :]

    # -- training and scoring

    def start_vector(self, batch: int, modality: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Position 0's input (B, 1, D_L): the shared start vector, plus the row's modality offset with
        ``modality_start``."""
        if self.modality_start is None:
            return self.start.to(dtype).expand(batch, 1, -1)
        return self.modality_start(self.start, batch, modality, dtype)

    def inputs(self, x: Tensor, start: Tensor | None = None, modality: Tensor | None = None) -> Tensor:
        """Position t's input is byte t-1 (the start vector at t = 0, ``start`` if given): (B, T, D_L)."""
        e = self.embed(x[:, :-1])
        start = self.start_vector(x.shape[0], modality, e.dtype) if start is None else start.to(e.dtype)
        return torch.cat([start, e], dim=1)

    def hidden(self, x: Tensor, modality: Tensor | None = None) -> Tensor:
        if x.dtype != torch.long:
            x = x.long()
        h = self.local_in(self.inputs(x, modality=modality))  # (B, T, D_L)
        return self.local_out(self.global_pass(h, x)[0])  # (B, T, D_L), final norm included

    def global_pass(self, h: Tensor, x: Tensor, caches: list | None = None) -> tuple[Tensor, Tensor]:
        """Gather the residual stream h (B, T, D_L) at the global positions of bytes x, run the global blocks over
        them (filling ``caches`` if given) and add what they wrote back at the same positions. Returns the new stream
        and each row's number of global positions."""
        glob, idx = self.global_positions(x)
        counts = glob.sum(1)
        real = torch.arange(idx.shape[1], device=x.device) < counts[:, None]  # (B, G) real slots
        gathered = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))  # (B, G, D_L)
        g_in = self.widen(gathered)
        for c in caches or []:
            c.set_lengths(counts)
        g_out = self.global_model(g_in, caches)  # (B, G, D): causal over the global positions
        delta = self.narrow(g_out - g_in) * real[..., None]  # what the global blocks added to the residual stream
        return h.scatter_add(1, idx[..., None].expand(-1, -1, h.shape[-1]), delta), counts

    def forward(self, x: Tensor, *, modality: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(x, modality))

    def nll(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768, *,
            modality: Tensor | None = None) -> Tensor:
        """Negative log-likelihood in nats of every byte, (B, T), zero where ``mask`` is False."""
        return chunked_nll(self.head.weight, self.hidden(x, modality), x, mask, chunk)

    def forward_flops(self, rows: int, seq_len: int, n_global: int) -> float:
        """Forward FLOPs of ``rows`` windows of ``seq_len`` bytes whose global blocks run over ``n_global`` positions
        per row: the local blocks (sliding-window attention), the global blocks, the head. Gather and scatter are
        free (``mmbytes.model.flops``)."""
        c = self.config
        fwd = flops.blocks(rows, seq_len, c.d_local, c.n_layer_local, c.mlp_ratio, c.local_window, c.mlp)
        fwd += flops.blocks(rows, n_global, c.d_global, c.n_layer_global, c.mlp_ratio, mlp=c.mlp)
        return fwd + flops.linear(rows * seq_len, c.d_local, c.vocab_size)

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte planned at ``seq_len`` (3 x forward): the global blocks charged for
        ceil(T * global_ratio) positions, at most T_G (the paper's accounting: a sequence pays for its share of global
        slots whatever its text). ``train_flops`` counts the positions a batch really has."""
        c = self.config
        G = min(c.max_global, math.ceil(seq_len * c.global_ratio))
        return 3 * self.forward_flops(1, seq_len, G) / seq_len

    def train_flops(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> float:
        """FLOPs of one training step on x (B, T) as run: the global blocks over the most global positions of any row
        (every row is padded to it; capped at T_G)."""
        _, glob = self.capped_starts(x)
        return 3 * self.forward_flops(x.shape[0], x.shape[1], int(glob.sum(1).max()))

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *,
                     modality: Tensor | None = None) -> Tensor | None:
        """The global positions (capped)."""
        return self.capped_starts(x)[1]

    def prepare(self, data: ModelData) -> None:
        """The cap on global positions is set for the training window: ``context`` = ``data.seq_len`` (kept when
        the data does not say its window)."""
        if data.seq_len is not None and self.config.context != data.seq_len:
            self.config = replace(self.config, context=data.seq_len)

    # -- cached generation: local blocks keep a sliding-window cache; a row whose new byte opens a word takes one
    # cached step of the global blocks (rows advance separately)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None, *,
                  modality: Tensor | None = None) -> SpaceByteCache:
        return SpaceByteCache(
            buf=torch.zeros(batch, max_len, dtype=torch.long, device=device), t=0,
            local_in=self.local_in.make_caches(batch, max_len + 1, device, dtype),
            # one slot beyond the cap: a row at the cap writes its discarded step there while other rows step
            glob=self.global_model.make_caches(batch, min(self.config.max_global, max_len + 1) + 1, device, dtype,
                                               rows=True),
            local_out=self.local_out.make_caches(batch, max_len + 1, device, dtype),
            count=torch.zeros(batch, dtype=torch.long, device=device),
            start=self.start_vector(batch, modality, dtype or self.start.dtype))

    def prefill(self, prompt: Tensor, cache: SpaceByteCache) -> Tensor:
        """Positions 0..L0 (the start and the prompt's bytes) in one parallel pass; the logits of byte L0."""
        B, L0 = prompt.shape
        cache.buf[:, :L0] = prompt
        cache.t = L0
        x = F.pad(cache.buf[:, :L0], (0, 1))  # the byte at L0 is not known yet; no position <= L0 depends on it
        h = self.local_in(self.inputs(x, cache.start), cache.local_in)
        h, cache.count = self.global_pass(h, x, cache.glob)
        return self.head(self.local_out(h, cache.local_out)[:, -1])

    def step(self, byte: Tensor, cache: SpaceByteCache) -> Tensor:
        """Append one byte per row (B,); return the logits of the byte after it."""
        t = cache.t
        cache.buf[:, t] = byte
        cache.t = t + 1
        lo = max(0, t - 1)  # the rules look back two bytes at most (fixed: at the absolute index)
        opens = self.starts(F.pad(cache.buf[:, lo : t + 1], (0, 1)), lo)[:, -1]  # does position t + 1 start a patch
        opens = opens & (cache.count < self.config.max_global)
        h = self.local_in(self.embed(byte)[:, None], cache.local_in)  # (B, 1, D_L)
        if bool(opens.any()):
            g_in = self.widen(h)
            g_out = self.global_model.row_step(g_in, cache.glob, cache.count, opens)  # each row at its global index
            h = h + self.narrow(g_out - g_in) * opens[:, None, None]
            cache.count = cache.count + opens.long()
        return self.head(self.local_out(h, cache.local_out)[:, -1])


@dataclass
class SpaceByteCache:
    """Generation state: the bytes so far (``t`` known), sliding-window caches of the local blocks, row caches of
    the global blocks, each row's number of global positions and its start vector (its modality's)."""

    buf: Tensor
    t: int
    local_in: list
    glob: list
    local_out: list
    count: Tensor
    start: Tensor
