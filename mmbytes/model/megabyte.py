"""MEGABYTE (Yu et al., 2023, section 2): a global transformer over patches and a local transformer inside each patch.

Shapes: B batch, T bytes, P patch size, K = T / P patches, D_G per-byte global width, D_L local width.
Position information is rotary: the global model rotates by patch index, the local model by byte index inside the
patch; a byte's slot inside the concatenated patch vector already tells the global model where in the patch it is.
Learned absolute tables are avoided so the same weights run at any T (up to million-byte sequences).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmbytes.config import MegabyteConfig
from mmbytes.model.layers import Transformer


class Megabyte(nn.Module):
    """``Megabyte(config)(x)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from bytes < t."""

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
        self.global_model = Transformer(P * DG, c.n_layer_global, c.n_head_global, **block)
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.embed_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, Transformer):
                m.reset_parameters()
        for pad in (self.global_pad, *self.mid_pad, *([self.local_pad] if self.local_model is not None else [])):
            nn.init.normal_(pad, std=std)

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

    def local_inputs(self, x: Tensor) -> Tensor:
        """Shift each patch's local byte embeddings right by one padding byte. x: (N, P) -> (N, P, D_L)."""
        e = self.local_embed(x[:, :-1])  # (N, P-1, D_L)
        return torch.cat([self.local_pad.expand(x.shape[0], 1, -1), e], dim=1)

    def hidden(self, x: Tensor) -> Tensor:
        """Bytes (B, T) -> final hidden states (B, T, D) that the head turns into logits."""
        if x.dtype != torch.long:
            x = x.long()
        B, T = x.shape
        P = self.config.patch_size
        pad = -T % P
        if pad:  # padded bytes come after every real byte, so causality keeps them out of real positions
            x = F.pad(x, (0, pad))
        h = self.patch_embed(x)  # (B, K, P*D_G)
        h = torch.cat([self.global_pad.to(h.dtype).expand(B, 1, -1), h[:, :-1]], dim=1)  # shift by a padding patch
        out = self.global_model(h)  # (B, K, P*D_G); patch k has seen patches < k
        for s in self.stages()[1:]:
            # fold every parent position into the batch; its output, cut into one slice per sub-patch, is projected
            # and added to the sub-patches' own embeddings, shifted right by one padding sub-patch inside the parent
            N = out.shape[0] * out.shape[1]
            up = s.up(out.reshape(N, -1), P)  # (N, P/p, p*D_s)
            xs = x.reshape(N, P)
            if s.patch == 1:
                own = self.local_inputs(xs)
            else:
                own = torch.cat([s.pad.to(up.dtype).expand(N, 1, -1), s.embed(xs[:, : P - s.patch])], dim=1)
            out = s.model(up + own)  # (N, P/p, p*D_s): causal over the sub-patches of each parent
            P = s.patch
        return out.reshape(B, x.shape[1], -1)[:, :T]  # (B, T, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    def nll(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768) -> Tensor:
        """Negative log-likelihood in nats of every byte, (B, T), zero where ``mask`` is False.

        Logits are made ``chunk`` positions at a time (recomputed in the backward pass) so no (B*T, 256) float32
        tensor outlives its chunk: at T = 2**20 that tensor alone would be 1 GiB.
        """
        h = self.hidden(x)
        B, T, D = h.shape
        h, target = h.reshape(B * T, D), x.reshape(B * T).long()
        if B * T <= chunk:
            out = _ce(self.head.weight, h, target)
        else:
            grad = torch.is_grad_enabled()
            parts = [checkpoint(_ce, self.head.weight, h[i : i + chunk], target[i : i + chunk], use_reentrant=False)
                     if grad else _ce(self.head.weight, h[i : i + chunk], target[i : i + chunk])
                     for i in range(0, B * T, chunk)]
            out = torch.cat(parts)
        out = out.view(B, T)
        return out if mask is None else torch.where(mask, out, 0.0)

    def nll_strided(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768) -> Tensor:
        """Strided inference (paper section 3.3): a second pass offset by P/2 bytes, and each byte scored by the
        pass in which it sits in the later half of its patch, i.e. with more local context. Twice the cost."""
        P = self.config.patch_size
        first = self.nll(x, chunk=chunk)
        s = P // 2
        if s == 0 or x.shape[1] <= s:
            out = first
        else:
            second = self.nll(x[:, s:], chunk=chunk)  # byte t sits at t - s, patch index (t - s) % P
            late = torch.arange(x.shape[1], device=x.device) % P >= s
            late[:s] = True  # the second pass never sees the first s bytes
            out = torch.where(late, first, F.pad(second, (s, 0)))
        return out if mask is None else torch.where(mask, out, 0.0)


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


def _ce(weight: Tensor, h: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), target, reduction="none")
