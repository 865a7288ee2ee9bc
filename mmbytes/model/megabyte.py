"""MEGABYTE (Yu et al., 2023, section 2): a global transformer over patches and a local transformer inside each patch.

Shapes: B batch, T bytes, P patch size, K = T / P patches, D_G per-byte global width, D_L local width.
Position information is rotary: the global model rotates by patch index, the local model by byte index inside the
patch; a byte's slot inside the concatenated patch vector already tells the global model where in the patch it is.
Learned absolute tables are avoided so the same weights run at any T (up to million-byte sequences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmbytes.config import MegabyteConfig
from mmbytes.model.layers import KVCache, Transformer


class Megabyte(nn.Module):
    """``Megabyte(config)(x)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from bytes < t."""

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__()
        c = self.config = config
        P, DG, DL = c.patch_size, c.d_global, c.d_local
        self.global_embed = nn.Embedding(c.vocab_size, DG)
        self.global_pad = nn.Parameter(torch.empty(P * DG))  # the trainable padding patch
        self.global_model = Transformer(P * DG, c.n_layer_global, c.n_head_global, c.mlp_ratio, c.dropout,
                                        c.rope_base, c.checkpointing)
        if c.n_layer_local:
            self.global_to_local = nn.Linear(DG, DL, bias=False)  # w^GL of the paper
            self.local_embed = nn.Embedding(c.vocab_size, DL)
            self.local_pad = nn.Parameter(torch.empty(DL))  # the trainable padding byte
            self.local_model = Transformer(DL, c.n_layer_local, c.n_head_local, c.mlp_ratio, c.dropout,
                                           c.rope_base, c.checkpointing)
        else:
            self.local_model = None
        self.head = nn.Linear(DL if c.n_layer_local else DG, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, Transformer):
                m.reset_parameters()
        nn.init.normal_(self.global_pad, std=0.02)
        if self.local_model is not None:
            nn.init.normal_(self.local_pad, std=0.02)

    def num_params(self, part: str = "all") -> int:
        modules = {"all": self, "global": self.global_model, "local": self.local_model}[part]
        return sum(p.numel() for p in modules.parameters()) if modules is not None else 0

    # -- the pieces, shared by training (all patches at once) and generation (one patch at a time)

    def patch_embed(self, x: Tensor) -> Tensor:
        """Bytes (B, K*P) -> global inputs (B, K, P*D_G): the P byte embeddings of a patch concatenated."""
        B, T = x.shape
        return self.global_embed(x).view(B, T // self.config.patch_size, self.config.d_global_model)

    def local_hidden(self, g: Tensor, x: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Global outputs for N patches (N, L, D_G) + bytes (N, L) fed to the local model (already shifted right by
        the padding byte) -> local hidden states (N, L, D_L)."""
        return self.local_model(self.global_to_local(g) + self.local_embed(x), caches)

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
        K = x.shape[1] // P
        h = self.patch_embed(x)  # (B, K, P*D_G)
        h = torch.cat([self.global_pad.to(h.dtype).expand(B, 1, -1), h[:, :-1]], dim=1)  # shift by a padding patch
        g = self.global_model(h)  # (B, K, P*D_G); patch k has seen patches < k
        if self.local_model is None:
            return g[:, :T]  # P == 1: a flat byte-level transformer
        g = g.reshape(B * K, P, self.config.d_global)  # (B*K, P, D_G): patches folded into the batch
        xp = x.reshape(B * K, P)
        local_in = self.global_to_local(g) + self.local_inputs(xp)  # (B*K, P, D_L)
        out = self.local_model(local_in)  # (B*K, P, D_L)
        return out.view(B, K * P, -1)[:, :T]  # (B, T, D_L)

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


def _ce(weight: Tensor, h: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), target, reduction="none")
