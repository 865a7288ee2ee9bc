"""MEGABYTE (Yu et al., 2023, section 2): a global transformer over patches and a local transformer inside each patch.

Shapes: B batch, T bytes, P patch size, K = T / P patches, D_G per-byte global width, D_L local width.
Position information is rotary: the global model rotates by patch index, the local model by byte index inside the
patch; a byte's slot inside the concatenated patch vector already tells the global model where in the patch it is.
Learned absolute tables are avoided so the same weights run at any T (up to million-byte sequences).

``MegabyteConfig`` holds the architecture's fields; its named sizes (``SIZES``) join the one namespace of
``mmbytes.model.registry``. The byte-level Transformer baseline of the paper (section 5) is the same config with
``arch="transformer"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops, patching
from mmbytes.model.layers import ModalityStart, Transformer, init_linear
from mmbytes.model.protocol import Capabilities, ModelData


@dataclass(frozen=True)
class MegabyteConfig:
    arch: Literal["megabyte", "transformer"] = "megabyte"
    """``megabyte``: global model over patches + local model inside each patch. ``transformer``: one flat causal
    transformer over bytes (the paper's baseline); it uses the global stack with patch_size 1 and no local model."""
    patch_size: int = 8
    """P, bytes per patch."""
    d_global: int = 32
    """D_G, per-byte embedding width of the global model; the global transformer is P * D_G wide."""
    n_layer_global: int = 2
    """Blocks in the global transformer."""
    n_head_global: int = 4
    """Attention heads in the global transformer."""
    mid_patch_sizes: tuple[int, ...] = ()
    """Patch sizes of middle stages between the global and the local model (the multiscale generalization of the
    paper): ``patch_size=64, mid_patch_sizes=(8,)`` runs the global model over 64-byte patches, a middle model over
    the eight 8-byte sub-patches inside each, and the local model over the bytes of each sub-patch. Each size divides
    the one above it."""
    d_mid: tuple[int, ...] = ()
    """Per-byte embedding width of each middle stage; its transformer is mid_patch_size * d_mid wide."""
    n_layer_mid: tuple[int, ...] = ()
    """Blocks of each middle transformer."""
    n_head_mid: tuple[int, ...] = ()
    """Attention heads of each middle transformer."""
    d_local: int = 64
    """D_L, width of the local transformer."""
    n_layer_local: int = 2
    """Blocks in the local transformer."""
    n_head_local: int = 2
    """Attention heads in the local transformer."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the block width."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output during training."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding (patch index in the global model, byte index in the local one)."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations (saves memory on long T)."""
    token_shift: bool = False
    """Token shift (RWKV; as in MEGABYTE-pytorch): every attention and MLP sublayer reads the second half of its
    input channels from the previous position of its stage (patch, sub-patch or byte). Causal and cached. Off in
    the paper's form, on in the named sizes (``LEARNS_FAST``)."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte embeddings and the trainable padding units (the paper's GPT-2 form:
    0.02; the named sizes: 1.0, see ``LEARNS_FAST``)."""
    patch_embed: Literal["concat", "project"] = "concat"
    """How the global model sees a patch. ``concat`` (paper): the P byte embeddings of width D_G concatenated.
    ``project``: byte embeddings of width ``d_embed`` concatenated, then LayerNorm -> Linear -> LayerNorm to P * D_G
    (MEGABYTE-pytorch)."""
    d_embed: int = 0
    """Byte embedding width of ``patch_embed: project`` (0: D_L)."""
    global_to_local: Literal["slice", "full"] = "slice"
    """How a patch's global output reaches its bytes. ``slice`` (paper, w^GL): byte i of the patch gets slice i of
    the global output, projected D_G -> D_L. ``full``: one projection of the whole global vector to all P positions
    (P*D_G -> P*D_L; MEGABYTE-pytorch). Middle stages follow the same choice."""
    window: int = 0
    """Sliding-window attention of the global model, in its positions (bytes for ``transformer``): each position
    sees itself and the ``window - 1`` before it; 0: full causal attention. BLT's entropy model is a windowed byte
    transformer (Pagnoni et al., 2024: window 512)."""
    init: Literal["gpt2", "fan_in"] = "gpt2"
    """Initialisation of the linear layers. ``gpt2`` (the paper's GPT-2 form): N(0, 0.02), the residual projections
    of every block 0.02 / sqrt(2 * its stack's layers). ``fan_in``: PyTorch's default, U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), head included (MEGABYTE-pytorch). Byte embeddings and padding units follow ``embed_std``."""
    local_shift: Literal["patch", "sequence"] = "patch"
    """How the stages below the global model are shifted. ``patch`` (paper): each patch's byte embeddings move right by
    one padding byte inside the patch, so a patch's first byte is predicted without any of its own stage's inputs
    (only the global model's summary of the patches before it). ``sequence``: they move right by one byte across the
    whole sequence, so a patch's first position reads the last byte of the patch before it (the padding byte only at
    the sequence start), as every byte after it reads the byte before it; MEGABYTE-pytorch's local model also sees the
    previous byte there. Middle stages follow the same choice, with sub-patches for bytes. Same cost; causal."""
    tied_head: bool = False
    """The output head reuses the last stage's byte embedding matrix (the local one; the global one in
    ``arch: transformer``), as the paper's output equation does (softmax of E^local-embed times the local output).
    Off by default: a separate head matrix (256 x D_L more parameters)."""
    vocab_size: int = 256
    """Byte values. All 256 are data: none is reserved for padding."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): the padding patch that stands before the first
    patch of the global model (the flat Transformer's start byte) is the shared one plus an offset chosen by the row's
    modality, so a window is predicted knowing its modality from its first byte on, and generation of an image starts
    from the image start state. Rows without a modality take the shared one. Off in the paper's form and in configs
    stored before the field existed (``LEGACY``); on in the named sizes."""

    def __post_init__(self) -> None:
        for name in ("mid_patch_sizes", "d_mid", "n_layer_mid", "n_head_mid"):  # YAML and checkpoints give lists
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        mids = (self.mid_patch_sizes, self.d_mid, self.n_layer_mid, self.n_head_mid)
        if len({len(m) for m in mids}) != 1:
            raise ValueError("mid_patch_sizes, d_mid, n_layer_mid and n_head_mid need one entry per middle stage, "
                             f"got {[len(m) for m in mids]}")
        sizes = (self.patch_size, *self.mid_patch_sizes)
        for above, below in zip(sizes, sizes[1:], strict=False):
            if below < 2 or below >= above or above % below:
                raise ValueError(f"patch sizes {sizes}: each middle patch size must be at least 2, smaller than the "
                                 "one above it and divide it")
        if self.arch == "transformer":
            if self.patch_size != 1 or self.n_layer_local != 0 or self.mid_patch_sizes:
                raise ValueError("arch='transformer' needs patch_size=1 and n_layer_local=0: one flat stack over bytes")
        elif self.arch == "megabyte":
            if self.patch_size < 1 or self.n_layer_local < 1:
                raise ValueError("arch='megabyte' needs patch_size >= 1 and n_layer_local >= 1")
        else:
            raise ValueError(f"unknown arch {self.arch!r}: expected 'megabyte' or 'transformer'")
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"init must be 'gpt2' or 'fan_in', got {self.init!r}")
        if self.local_shift not in ("patch", "sequence"):
            raise ValueError(f"local_shift must be 'patch' or 'sequence', got {self.local_shift!r}")
        if self.patch_embed not in ("concat", "project") or self.global_to_local not in ("slice", "full"):
            raise ValueError(f"patch_embed must be 'concat' or 'project' (got {self.patch_embed!r}) and "
                             f"global_to_local 'slice' or 'full' (got {self.global_to_local!r})")
        widths = [(self.d_global_model, self.n_head_global, "global"), (self.d_local, self.n_head_local, "local")]
        mid = zip(sizes[1:], self.d_mid, self.n_head_mid, strict=True)
        widths += [(p * d, h, f"middle {i}") for i, (p, d, h) in enumerate(mid)]
        for width, heads, what in widths:
            if heads and width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")

    @property
    def d_global_model(self) -> int:
        """Width of the global transformer: a patch's P byte embeddings concatenated."""
        return self.patch_size * self.d_global

    @property
    def stages(self) -> list[tuple[int, int, int, int]]:
        """(patch size, per-byte width, layers, heads) of every stage from the global model down; the local model is
        the last stage, with patch size 1 (one byte per position)."""
        out = [(self.patch_size, self.d_global, self.n_layer_global, self.n_head_global)]
        out += list(zip(self.mid_patch_sizes, self.d_mid, self.n_layer_mid, self.n_head_mid, strict=True))
        if self.n_layer_local:
            out.append((1, self.d_local, self.n_layer_local, self.n_head_local))
        return out

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MegabyteConfig:
        from mmbytes.model.registry import config_from_name

        return config_from_name(name, **overrides)


def _transformer(d: int, n_layer: int, n_head: int) -> MegabyteConfig:
    return MegabyteConfig(arch="transformer", patch_size=1, d_global=d, n_layer_global=n_layer, n_head_global=n_head,
                          d_local=d, n_layer_local=0, n_head_local=0, modality_start=True)


LEARNS_FAST = dict(embed_std=1.0, init="fan_in", local_shift="sequence", token_shift=True, patch_embed="project")
"""The form of the named MEGABYTE sizes: byte embeddings and padding units N(0, 1), PyTorch's fan-in initialisation
of every linear layer, a patch's first byte reading the byte before it, token shift in every sublayer, and the
global model reading a patch through LayerNorm -> Linear -> LayerNorm of its concatenated byte embeddings. Together
they learn faster than the paper's form, at equal steps and at equal time (``bench/learning.py``; docs/measurements.md,
learning efficiency). The dataclass defaults stay the paper's exact form (``MegabyteConfig()``): give ``embed_std: 0.02,
init: gpt2, local_shift: patch, token_shift: false, patch_embed: concat`` to a named size to train it that way."""

CONDITIONED = dict(LEARNS_FAST, modality_start=True)
"""The named MEGABYTE sizes: ``LEARNS_FAST`` with a learned start state per modality (``modality_start``)."""

PAPER_FORM = {k: getattr(MegabyteConfig(), k) for k in LEARNS_FAST}
"""The same fields at the paper's values (the dataclass defaults): a named size with these overrides is the paper's
exact form."""

SIZES: dict[str, MegabyteConfig] = {
    # a training step in a few milliseconds on a CPU: for tests
    "debug": MegabyteConfig(patch_size=4, d_global=16, n_layer_global=2, n_head_global=2,
                            d_local=32, n_layer_local=1, n_head_local=2, **CONDITIONED),
    # the same with a middle stage: 8-byte patches, 2-byte sub-patches, bytes
    "debug-long": MegabyteConfig(patch_size=8, d_global=8, n_layer_global=1, n_head_global=2,
                                 mid_patch_sizes=(2,), d_mid=(16,), n_layer_mid=(1,), n_head_mid=(2,),
                                 d_local=16, n_layer_local=1, n_head_local=2, **CONDITIONED),
    # ~10M parameters: 7.1M global (P*D_G = 384) + 3.2M local
    "small": MegabyteConfig(patch_size=8, d_global=48, n_layer_global=4, n_head_global=6,
                            d_local=256, n_layer_local=4, n_head_local=4, **CONDITIONED),
    # ~100M parameters: 85M global (P*D_G = 768) + 12.6M local
    "base": MegabyteConfig(patch_size=8, d_global=96, n_layer_global=12, n_head_global=12,
                           d_local=512, n_layer_local=4, n_head_local=8, **CONDITIONED),
    # three stages for million-byte sequences: 64-byte global patches (16,384 of them at T = 2**20), 8-byte middle
    # patches, bytes; 12.6M global + 1.6M middle + 0.5M local
    "long": MegabyteConfig(patch_size=64, d_global=8, n_layer_global=4, n_head_global=8,
                           mid_patch_sizes=(8,), d_mid=(32,), n_layer_mid=(2,), n_head_mid=(4,),
                           d_local=128, n_layer_local=2, n_head_local=4, checkpointing=True,
                           **CONDITIONED),
    # flat byte-level Transformers with the parameter count of the size they are named after
    "transformer-debug": _transformer(64, 2, 2),
    "transformer-small": _transformer(384, 6, 6),
    "transformer-base": _transformer(768, 14, 12),
}

LEGACY = {"window": 0, "token_shift": False, "embed_std": 0.02, "patch_embed": "concat", "d_embed": 0,
          "global_to_local": "slice", "tied_head": False, "local_shift": "patch",
          "init": "gpt2", "modality_start": False}
"""Values of fields that configs stored before the field existed were trained with (the paper's form)."""


class Megabyte(nn.Module):
    """``Megabyte(config)(x)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from bytes < t."""

    @property
    def capabilities(self) -> Capabilities:
        """Strided inference needs patches: MEGABYTE, not the flat byte Transformer. A model with
        ``modality_start`` is conditioned on each row's modality: callers pass it."""
        return Capabilities(strided=self.config.arch == "megabyte", per_modality=self.config.modality_start)

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__()
        c = self.config = config
        P, DG, DL = c.patch_size, c.d_global, c.d_local
        block = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, rope_base=c.rope_base, checkpointing=c.checkpointing,
                     token_shift=c.token_shift)
        full = c.global_to_local == "full"
        if c.patch_embed == "concat":
            self.global_embed = nn.Embedding(c.vocab_size, DG)
        else:  # byte embeddings of width d_embed, concatenated, normalised and projected to the global width
            de = c.d_embed or DL
            self.global_embed = nn.Embedding(c.vocab_size, de)
            self.patch_proj = nn.Sequential(nn.LayerNorm(P * de), nn.Linear(P * de, P * DG), nn.LayerNorm(P * DG))
        self.global_pad = nn.Parameter(torch.empty(P * DG))  # the trainable padding patch
        self.modality_pad = ModalityStart(P * DG, len(MODALITIES)) if c.modality_start else None
        self.global_model = Transformer(P * DG, c.n_layer_global, c.n_head_global, window=c.window, **block)
        # middle stages (none in the two-stage model of the paper): each sees its parent's output for its sub-patch,
        # projected, plus its own embeddings of the sub-patches before it inside the parent
        self.mid_embed, self.mid_proj, self.mid_models = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.mid_pad = nn.ParameterList()
        d_above, p_above = DG, P
        for p, d, n_layer, n_head in zip(c.mid_patch_sizes, c.d_mid, c.n_layer_mid, c.n_head_mid, strict=True):
            self.mid_embed.append(nn.Embedding(c.vocab_size, d))
            self.mid_proj.append(nn.Linear(p_above * d_above, p_above * d) if full
                                 else nn.Linear(p * d_above, p * d, bias=False))
            self.mid_pad.append(nn.Parameter(torch.empty(p * d)))
            self.mid_models.append(Transformer(p * d, n_layer, n_head, **block))
            d_above, p_above = d, p
        if c.n_layer_local:
            # w^GL of the paper (one slice of the parent's output per byte), or one projection of the whole output
            self.global_to_local = (nn.Linear(p_above * d_above, p_above * DL) if full
                                    else nn.Linear(d_above, DL, bias=False))
            self.local_embed = nn.Embedding(c.vocab_size, DL)
            self.local_pad = nn.Parameter(torch.empty(DL))  # the trainable padding byte
            self.local_model = Transformer(DL, c.n_layer_local, c.n_head_local, **block)
        else:
            self.local_model = None
        self.head = nn.Linear(DL if c.n_layer_local else DG, c.vocab_size, bias=False)
        if c.tied_head:
            table = self.local_embed if c.n_layer_local else self.global_embed
            if table.embedding_dim != self.head.in_features:
                raise ValueError(f"tied_head needs byte embeddings as wide as the head ({self.head.in_features}); "
                                 f"they are {table.embedding_dim} wide (patch_embed: project with d_embed?)")
            self.head.weight = table.weight  # one (256, D) matrix: embedding in, logits out
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        transformers = [m for m in self.modules() if isinstance(m, Transformer)]
        inside = {id(p) for t in transformers for p in t.parameters()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in inside and not (m is self.head and c.tied_head):
                init_linear(m, c.init)  # tied: the head is an embedding
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=c.embed_std)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for t in transformers:  # last, so nothing above undoes their depth-scaled residual projections
            t.reset_parameters(c.init)
        for pad in (self.global_pad, *self.mid_pad, *([self.local_pad] if self.local_model is not None else [])):
            nn.init.normal_(pad, std=c.embed_std)
        if self.modality_pad is not None:
            self.modality_pad.reset_parameters()

    def num_params(self, part: str = "all") -> int:
        modules = {"all": self, "global": self.global_model, "mid": self.mid_models, "local": self.local_model}[part]
        return sum(p.numel() for p in modules.parameters()) if modules is not None else 0

    # -- the pieces, shared by training (all patches at once) and generation (one patch at a time)

    def patch_embed(self, x: Tensor) -> Tensor:
        """Bytes (B, K*P) -> global inputs (B, K, P*D_G): the P byte embeddings of a patch concatenated."""
        B, T = x.shape
        P = self.config.patch_size
        e = self.global_embed(x).view(B, T // P, P * self.global_embed.embedding_dim)  # (B, K, P*D_e)
        return e if self.config.patch_embed == "concat" else self.patch_proj(e)

    def stages(self) -> list[Stage]:
        """Every stage from the global model down to the local one, as generation walks them."""
        c = self.config
        full = c.global_to_local == "full"
        out = [Stage(c.patch_size, self.global_model, None, self.patch_embed, self.global_pad, full)]
        for i, p in enumerate(c.mid_patch_sizes):
            def embed(x: Tensor, e: nn.Embedding = self.mid_embed[i], p: int = p) -> Tensor:
                return e(x).view(x.shape[0], x.shape[1] // p, p * e.embedding_dim)  # a sub-patch's bytes concatenated

            out.append(Stage(p, self.mid_models[i], self.mid_proj[i], embed, self.mid_pad[i], full))
        if self.local_model is not None:
            out.append(Stage(1, self.local_model, self.global_to_local, self.local_embed, self.local_pad, full))
        return out

    def unit_inputs(self, s: Stage, x: Tensor, parent: int) -> Tensor:
        """A stage's own inputs below the global model: the embeddings of its units (bytes or sub-patches) shifted right
        by one unit, inside each parent unit (``local_shift: patch``) or across the sequence (``sequence``).
        x: (B, T) bytes, T a multiple of ``parent`` -> (B * T / parent, parent / s.patch, width)."""
        B, T = x.shape
        N, n = B * T // parent, parent // s.patch
        if self.config.local_shift == "patch":
            xs = x.reshape(N, parent)
            return torch.cat([s.pad.expand(N, 1, -1), s.embed(xs[:, : parent - s.patch])], dim=1)
        e = s.embed(x).reshape(B, T // s.patch, -1)
        return torch.cat([s.pad.expand(B, 1, -1), e[:, :-1]], dim=1).reshape(N, n, -1)

    def start_patch(self, batch: int, modality: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The padding patch before the first patch of the global model (B, 1, P*D_G): the shared one, plus the
        row's modality offset with ``modality_start``."""
        if self.modality_pad is None:
            return self.global_pad.to(dtype).expand(batch, 1, -1)
        return self.modality_pad(self.global_pad, batch, modality, dtype)

    def hidden(self, x: Tensor, modality: Tensor | None = None) -> Tensor:
        """Bytes (B, T) -> final hidden states (B, T, D) that the head turns into logits."""
        if x.dtype != torch.long:
            x = x.long()
        B, T = x.shape
        P = self.config.patch_size
        pad = -T % P
        if pad:  # padded bytes come after every real byte, so causality keeps them out of real positions
            x = F.pad(x, (0, pad))
        h = self.patch_embed(x)  # (B, K, P*D_G)
        h = torch.cat([self.start_patch(B, modality, h.dtype), h[:, :-1]], dim=1)  # shift by a padding patch
        out = self.global_model(h)  # (B, K, P*D_G); patch k has seen patches < k
        for s in self.stages()[1:]:
            # fold every parent position into the batch; its output, cut into one slice per sub-patch, is projected
            # and added to the sub-patches' own embeddings, shifted right by one unit (``unit_inputs``)
            N = out.shape[0] * out.shape[1]
            up = s.up(out.reshape(N, -1), P)  # (N, P/p, p*D_s)
            out = s.model(up + self.unit_inputs(s, x, P).to(up.dtype))  # (N, P/p, p*D_s), causal inside each parent
            P = s.patch
        return out.reshape(B, x.shape[1], -1)[:, :T]  # (B, T, D)

    def forward(self, x: Tensor, *, modality: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(x, modality))

    def nll(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768, *,
            modality: Tensor | None = None) -> Tensor:
        """Negative log-likelihood in nats of every byte, (B, T), zero where ``mask`` is False.

        Logits are made ``chunk`` positions at a time (recomputed in the backward pass) so no (B*T, 256) float32
        tensor outlives its chunk: at T = 2**20 that tensor alone would be 1 GiB.
        """
        return chunked_nll(self.head.weight, self.hidden(x, modality), x, mask, chunk)

    def nll_strided(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768,
                    rule: Literal["paper", "later"] = "paper", *, modality: Tensor | None = None) -> Tensor:
        """Strided inference (paper section 2.3.3): a second pass over the bytes from P/2 on, whose patches are
        offset by s = P/2, and each byte scored by one of the two passes. Twice the cost.

        ``rule="paper"``: as in the paper, which observes that the loss rises toward the end of a patch, each byte is
        taken from the pass in which it sits in the *first* P/2 positions of its patch. ``rule="later"``: from the pass
        in which it sits in the later half (more bytes of its own patch as local context; on a small trained model
        the per-position loss fell along the patch, so this rule can score better there; docs/training.md).

        The second pass starts at byte s: bytes 0..s-1 are not context for any byte it scores (a window's first s
        bytes would otherwise form a partial patch that training never shows the model). Those first s bytes always
        come from the first pass, whatever the rule.
        """
        if rule not in ("paper", "later"):
            raise ValueError(f"strided inference rule must be 'paper' or 'later', got {rule!r}")
        P = self.config.patch_size
        first = self.nll(x, chunk=chunk, modality=modality)
        s = P // 2
        if s == 0 or x.shape[1] <= s:
            out = first
        else:
            # byte t sits at t - s, patch position (t - s) % P
            second = self.nll(x[:, s:], chunk=chunk, modality=modality)
            pos = torch.arange(x.shape[1], device=x.device) % P  # position of byte t in its first-pass patch
            keep_first = pos < s if rule == "paper" else pos >= s
            keep_first[:s] = True  # the second pass never sees the first s bytes
            out = torch.where(keep_first, first, F.pad(second, (s, 0)))
        return out if mask is None else torch.where(mask, out, 0.0)

    # -- training FLOPs as computed (``mmbytes.model.flops``; ``FlopCounterMode`` agrees: tests/test_flops.py)

    def forward_flops(self, rows: int, seq_len: int) -> float:
        """Forward FLOPs of ``rows`` windows of ``seq_len`` bytes: every stage's blocks (the global one windowed if
        configured) over the window padded to whole patches, the patch projection, the projections between stages
        and the head."""
        c, T = self.config, seq_len
        P = c.patch_size
        Tp = -(-T // P) * P  # padded to whole patches, as the model runs it
        fwd = flops.blocks(rows, Tp // P, P * c.d_global, c.n_layer_global, c.mlp_ratio, c.window)
        if c.patch_embed == "project":
            fwd += flops.linear(rows * Tp // P, P * self.global_embed.embedding_dim, P * c.d_global)
        full = c.global_to_local == "full"
        width_above, p_above = c.d_global, P
        for p, width, n_layer, _ in c.stages[1:]:
            parents = rows * Tp // p_above  # every parent unit is a sequence of p_above / p units
            fwd += flops.blocks(parents, p_above // p, p * width, n_layer, c.mlp_ratio)
            fwd += flops.linear(parents, p_above * width_above, p_above * width) if full else \
                flops.linear(rows * Tp // p, p * width_above, p * width)
            width_above, p_above = width, p
        return fwd + flops.linear(rows * T, self.head.in_features, c.vocab_size)

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte (forward + backward = 3 x forward) at ``seq_len`` (``forward_flops``)."""
        return 3 * self.forward_flops(1, seq_len) / seq_len

    def train_flops(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> float:
        """FLOPs of one training step on x (B, T): fixed patches, so exactly ``flops_per_byte(T)`` x B x T."""
        return 3 * self.forward_flops(x.shape[0], x.shape[1])

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *,
                     modality: Tensor | None = None) -> Tensor | None:
        """Every P-th byte (None for the flat byte Transformer: no patches)."""
        return None if self.config.arch == "transformer" else patching.fixed_starts(x, self.config.patch_size)

    def prepare(self, data: ModelData) -> None:
        """Nothing to ready: fixed patches, no tokenizer."""

    def requires(self) -> dict[str, str]:
        return {}

    def caveats(self) -> list[str]:
        return []

    # -- cached generation (mmbytes.model.generate): the global model advances one patch at a time with its own cache;
    # a stage below it decodes the units of one parent unit with a cache cleared whenever the parent advances

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None, *,
                  modality: Tensor | None = None) -> MegabyteCache:
        stages = self.stages()
        kv = [stages[0].model.make_caches(batch, -(-max_len // stages[0].patch), device, dtype)]
        kv += [s.model.make_caches(batch, above.patch // s.patch, device, dtype)
               for above, s in zip(stages, stages[1:], strict=False)]
        buf = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        dtype = dtype or self.global_pad.dtype
        return MegabyteCache(buf, 0, kv, [None] * len(stages), self.start_patch(batch, modality, dtype))

    def prefill(self, prompt: Tensor, cache: MegabyteCache) -> Tensor:
        """Take in the prompt (B, L0), in parallel at every stage: its whole patches in one global call, the whole
        sub-patches of its last partial patch in one call of the stage below, and so on. Returns the next logits."""
        B, L0 = prompt.shape
        cache.buf[:, :L0] = prompt
        cache.t = L0
        stages, h, start = self.stages(), None, 0
        for i, s in enumerate(stages):
            for c in cache.kv[i]:
                c.reset()
            up = None if i == 0 else s.up(h, stages[i - 1].patch)  # (B, units in the parent, width)
            cache.up[i] = up
            known = (L0 - start) // s.patch  # whole units of this stage already known
            first = cache.start if i == 0 else self.first_input(s, cache.buf, start, i)
            inputs = torch.cat([first, s.embed(cache.buf[:, start : start + known * s.patch])], 1)
            if up is not None:
                inputs = inputs + up[:, : known + 1]
            h = s.model(inputs, cache.kv[i])[:, -1]  # output for the unit the next byte falls in
            start += known * s.patch
        return self.head(h)

    def step(self, byte: Tensor, cache: MegabyteCache) -> Tensor:
        """Append one byte per row (B,); return the logits of the byte after it. The highest stage whose unit just
        ended advances by that unit; every stage below it starts a new unit from its parent's fresh output."""
        cache.buf[:, cache.t] = byte
        t = cache.t = cache.t + 1
        stages = self.stages()
        top = next(i for i, s in enumerate(stages) if t % s.patch == 0)
        s = stages[top]
        inputs = s.embed(cache.buf[:, t - s.patch : t])  # (B, 1, width): the unit just finished
        if top > 0:
            inputs = inputs + cache.up[top][:, (t % stages[top - 1].patch) // s.patch].unsqueeze(1)
        h = s.model(inputs, cache.kv[top])[:, -1]
        for i in range(top + 1, len(stages)):
            s = stages[i]
            for c in cache.kv[i]:
                c.reset()
            cache.up[i] = s.up(h, stages[i - 1].patch)
            h = s.model(self.first_input(s, cache.buf, t, i) + cache.up[i][:, :1], cache.kv[i])[:, -1]
        return self.head(h)

    def first_input(self, s: Stage, buf: Tensor, start: int, level: int) -> Tensor:
        """Own input (B, 1, width) of the first unit of stage ``s`` (below the global model, whose first input is the
        cache's ``start``) when it starts at byte ``start``: the padding unit, or with ``local_shift: sequence`` the
        unit just before it, once there is one."""
        if self.config.local_shift == "patch" or start == 0:
            return s.pad.expand(buf.shape[0], 1, -1)
        return s.embed(buf[:, start - s.patch : start])


@dataclass
class MegabyteCache:
    """Generation state: the bytes so far (``buf``, ``t`` of them known), a KV cache per stage, below the global
    model the projected output of the current parent unit (one slice per unit), and each row's padding patch before
    the first patch (``Megabyte.start_patch``: its modality's)."""

    buf: Tensor
    t: int
    kv: list
    up: list
    start: Tensor


class Stage(NamedTuple):
    """One level of the hierarchy: ``model`` runs over units of ``patch`` bytes; ``proj`` maps the parent's output
    slice for a unit to its width (None for the global model); ``embed`` maps bytes (N, L*patch) to unit inputs
    (N, L, width); ``pad`` is the trainable unit that shifts the inputs right by one; ``full``: ``proj`` maps the
    parent's whole output rather than one slice per unit."""

    patch: int
    model: Transformer
    proj: nn.Module | None
    embed: Callable[[Tensor], Tensor]
    pad: Tensor
    full: bool = False

    def up(self, parent: Tensor, parent_patch: int) -> Tensor:
        """The parent's output for one of its units (N, width) -> this stage's share per sub-unit (N, n, width_s)."""
        n = parent_patch // self.patch
        if self.full:
            return self.proj(parent).view(parent.shape[0], n, -1)
        return self.proj(parent.view(parent.shape[0], n, -1))


def chunked_nll(weight: Tensor, h: Tensor, x: Tensor, mask: Tensor | None, chunk: int) -> Tensor:
    """Nats (B, T) of bytes x under the head ``weight`` applied to hidden states h (B, T, D), ``chunk`` positions at
    a time (recomputed in the backward pass) so no (B*T, 256) float32 tensor outlives its chunk."""
    B, T, D = h.shape
    h, target = h.reshape(B * T, D), x.reshape(B * T).long()
    if B * T <= chunk:
        out = _ce(weight, h, target)
    else:
        grad = torch.is_grad_enabled()
        out = torch.cat([checkpoint(_ce, weight, h[i : i + chunk], target[i : i + chunk], use_reentrant=False)
                         if grad else _ce(weight, h[i : i + chunk], target[i : i + chunk])
                         for i in range(0, B * T, chunk)])
    out = out.view(B, T)
    return out if mask is None else torch.where(mask, out, 0.0)


def _ce(weight: Tensor, h: Tensor, target: Tensor) -> Tensor:
    logits = F.linear(h, weight)  # bf16/fp16 logits are scored in fp32; fp32 and fp64 as they are
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target, reduction="none")
