"""MEGABYTE (Yu et al., 2023, section 2): a global transformer over patches and a local transformer inside each patch.

The two-stage path follows section 2.2: the patch embedder (2.2.1) embeds every byte, concatenates the P embeddings
of each patch and shifts the patches right by one trainable padding patch; the global model (2.2.2), a decoder-only
transformer, runs over the patches; the local model (2.2.3) runs inside each patch, byte p reading slice p of its
patch's global output (projected by w^GL) plus the embedding of byte p - 1 of its own patch; the head reads the local
model's output (Eq. 6). Middle stages between the global and the local model (``mid_patch_sizes``) are the multiscale
generalization: each repeats the local step with sub-patches in place of bytes. Strided inference is section 2.3.3.

Shapes: B batch, T bytes, P patch size, K = T / P patches, D_G per-byte global width, D_L local width.
Position information is rotary: the global model rotates by patch index, the local model by byte index inside the
patch; a byte's slot inside the concatenated patch vector already tells the global model where in the patch it is.
Learned absolute tables are avoided so the same weights run at any T (up to million-byte sequences).

``mmbytes.model.megabyte_config.MegabyteConfig`` holds the architecture's fields, its presets and named sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops, patching
from mmbytes.model.common import chunked_nll
from mmbytes.model.layers import ModalityStart, Transformer, init_linear
from mmbytes.model.megabyte_config import MegabyteConfig
from mmbytes.model.protocol import Capabilities, Complete, FixedCost, ModelData


class Megabyte(Complete, FixedCost, nn.Module):
    """``Megabyte(config)(x)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from bytes < t."""

    @property
    def capabilities(self) -> Capabilities:
        """Strided inference (section 2.3.3). A model with ``modality_start`` is conditioned on each row's modality:
        callers pass it."""
        return Capabilities(strided=True, per_modality=self.config.modality_start)

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__()
        c = self.config = config
        P, DG, DL = c.patch_size, c.d_global, c.d_local
        block = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, rope_base=c.rope_base, checkpointing=c.checkpointing,
                     token_shift=c.token_shift, mlp=c.mlp)
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
        # w^GL of the paper (one slice of the parent's output per byte), or one projection of the whole output
        self.global_to_local = (nn.Linear(p_above * d_above, p_above * DL) if full
                                else nn.Linear(d_above, DL, bias=False))
        self.local_embed = nn.Embedding(c.vocab_size, DL)
        self.local_pad = nn.Parameter(torch.empty(DL))  # the trainable padding byte
        self.local_model = Transformer(DL, c.n_layer_local, c.n_head_local, **block)
        self.head = nn.Linear(DL, c.vocab_size, bias=False)
        if c.tied_head:  # Eq. 6: the logits are the local embedding matrix times the local output
            self.head.weight = self.local_embed.weight
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
        for pad in (self.global_pad, *self.mid_pad, self.local_pad):
            nn.init.normal_(pad, std=c.embed_std)
        if self.modality_pad is not None:
            self.modality_pad.reset_parameters()

    def num_params(self, part: str = "all") -> int:
        modules = {"all": self, "global": self.global_model, "mid": self.mid_models, "local": self.local_model}[part]
        return sum(p.numel() for p in modules.parameters())

    # -- the pieces, shared by training (all patches at once) and generation (one patch at a time)

    def patch_embed(self, x: Tensor) -> Tensor:
        """The patch embedder (section 2.2.1): bytes (B, K*P) -> global inputs (B, K, P*D_G), the P byte embeddings
        of each patch concatenated (``patch_embed: project``: then normalised and projected)."""
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
        return [*out, Stage(1, self.local_model, self.global_to_local, self.local_embed, self.local_pad, full)]

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
        """Bytes (B, T) -> the local model's final states (B, T, D_L) that the head turns into logits."""
        if x.dtype != torch.long:
            x = x.long()
        B, T = x.shape
        P = self.config.patch_size
        pad = -T % P
        if pad:  # padded bytes come after every real byte, so causality keeps them out of real positions
            x = F.pad(x, (0, pad))
        # patch embedder (section 2.2.1): the patches shifted right by one padding patch, so that the global input
        # of patch k holds patches < k only
        patches = self.patch_embed(x)  # (B, K, P*D_G)
        global_in = torch.cat([self.start_patch(B, modality, patches.dtype), patches[:, :-1]], dim=1)
        # global model (section 2.2.2): a decoder-only transformer over the patches
        out = self.global_model(global_in)  # (B, K, P*D_G); patch k has seen patches < k
        # local model (section 2.2.3), each patch a sequence of its own (folded into the batch): byte p of patch k reads
        # slice p of patch k's global output, projected by w^GL, plus the embedding of the byte before it
        # (``unit_inputs``: the paper's padding byte at p = 0, or with ``local_shift: sequence`` the previous patch's
        # last byte). Middle stages run first, the same way, with sub-patches in place of bytes.
        for s in self.stages()[1:]:
            N = out.shape[0] * out.shape[1]
            up = s.up(out.reshape(N, -1), P)  # (N, P/p, p*D_s)
            out = s.model(up + self.unit_inputs(s, x, P).to(up.dtype))  # (N, P/p, p*D_s), causal inside each parent
            P = s.patch
        return out.reshape(B, x.shape[1], -1)[:, :T]  # (B, T, D_L)

    def forward(self, x: Tensor, *, modality: Tensor | None = None) -> Tensor:
        """Logits (B, T, 256) of every byte from the local model's output (Eq. 6)."""
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
        fwd = flops.blocks(rows, Tp // P, P * c.d_global, c.n_layer_global, c.mlp_ratio, c.window, c.mlp)
        if c.patch_embed == "project":
            fwd += flops.linear(rows * Tp // P, P * self.global_embed.embedding_dim, P * c.d_global)
        full = c.global_to_local == "full"
        width_above, p_above = c.d_global, P
        for p, width, n_layer, _ in c.stages[1:]:
            parents = rows * Tp // p_above  # every parent unit is a sequence of p_above / p units
            fwd += flops.blocks(parents, p_above // p, p * width, n_layer, c.mlp_ratio, mlp=c.mlp)
            fwd += flops.linear(parents, p_above * width_above, p_above * width) if full else \
                flops.linear(rows * Tp // p, p * width_above, p * width)
            width_above, p_above = width, p
        return fwd + flops.linear(rows * T, self.head.in_features, c.vocab_size)

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *,
                     modality: Tensor | None = None) -> Tensor | None:
        """Every P-th byte."""
        return patching.fixed_starts(x, self.config.patch_size)

    def prepare(self, data: ModelData) -> None:
        """Nothing to ready: fixed patches, no tokenizer."""

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
