"""BLT, the Byte Latent Transformer (Pagnoni et al., 2024, arXiv 2412.09871): bytes are cut into patches where a
small frozen byte model is unsure of the next byte, a light local encoder pools each patch into one vector, a latent
transformer runs over the patches, and a light local decoder predicts the bytes.

    bytes ─► byte + hash n-gram embeddings ─► encoder (windowed causal byte blocks) ─► h (B, T, D_L)
              │                                                                      │
              │   entropy model (frozen) ─► next-byte entropy ─► patch starts        │ cross-attention pooling:
              │                                                  │                   │ k queries per patch, from a
              │                                                  ▼                   ▼ max pooling of its own bytes
              │                                  latent transformer over [start, p_0, p_1, ...]  (B, K, D)
              │                                                  │ output j has seen patches < j
              ▼                                                  ▼
    decoder: position t's input is h[t-1]; before each byte block it cross-attends to the k key vectors of the
    latent output of its own patch index (which has seen only the patches before its patch) ─► head ─► 256 logits

Causality: whether byte t starts a patch depends on the entropy of the prediction of byte t, i.e. on bytes < t, so
the boundaries before t are fixed by bytes < t; a byte of patch j sees the latent summary of patches < j only (the
one-patch shift; using patch j's own summary would leak the rest of patch j). Changing byte t may move every later
boundary, never an earlier prediction (tested).

Where mmbytes differs from the reference code: the per-patch cross-attentions are computed as segment softmaxes
over each patch's own bytes (O(T k D) memory, no (patches x bytes) mask, no all-masked rows and so no NaN for padded
patches); the hash n-gram ids are a fixed polynomial rolling hash (the same in every process); entropies are
computed row by row (the reference flattens the batch into one stream); generation is incremental with caches
(the reference re-runs the model for every byte); per-modality thresholds are calibrated (``calibrate_threshold``).

Shapes: B batch, T bytes, D_L local width, D latent width, K patches of a batch (the most of any row), k query
vectors per patch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmbytes.codecs import MODALITIES
from mmbytes.model import patching
from mmbytes.model.blt_config import BLTConfig
from mmbytes.model.blt_generate import BLTGeneration
from mmbytes.model.blt_layers import PatchCrossAttention, entropy_of, forward_flops, ngram_ids, patch_stats
from mmbytes.model.common import chunked_nll
from mmbytes.model.layers import ModalityStart, Transformer, init_linear
from mmbytes.model.protocol import Capabilities, ModelData
from mmbytes.model.transformer import ByteTransformer

CALIBRATION_WINDOWS = 256
"""Training windows per modality, drawn at random across the training split, that ``prepare`` calibrates the
thresholds on."""

DEFAULT_MODALITY = "raw"
"""Whose threshold a row without a modality gets."""


class BLT(BLTGeneration, nn.Module):
    """``BLT(config)(x, modality)`` maps bytes (B, T) to logits (B, T, 256); position t predicts byte t from bytes
    < t. ``modality`` (B,) ids (``mmbytes.codecs.MODALITIES``) pick each row's entropy threshold."""

    @property
    def capabilities(self) -> Capabilities:
        """The patching of a row depends on its modality (its calibrated threshold; with ``modality_start`` its
        latent start state too): callers pass ``modality``. Rows are padded to the batch's most patches."""
        return Capabilities(per_modality=True, independent_rows=False, entropy_patches=self.config.uses_entropy)

    def __init__(self, config: BLTConfig) -> None:
        super().__init__()
        c = self.config = config
        DL, DG, k = c.d_local, c.d_global, c.cross_k
        block = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, rope_base=c.rope_base, checkpointing=c.checkpointing,
                     token_shift=c.token_shift, mlp=c.mlp)
        self.entropy_model = None
        self.entropy_loaded = False  # trained weights given (``set_entropy``), not the random initialisation
        self.calibrated = False  # thresholds calibrated for this entropy model (stored or by ``prepare``)
        self._memo: tuple | None = None  # (x, modality, starts) of the last training ``nll``, for ``train_flops``
        if c.uses_entropy:
            self.entropy_model = ByteTransformer(c.entropy_config)
            self.entropy_model.requires_grad_(False)
            self.entropy_model.eval()
        self.embed = nn.Embedding(c.vocab_size, DL)
        self.hash_embed = nn.ModuleList(nn.Embedding(c.hash_vocab, DL) for _ in c.hash_ngrams if c.hash_vocab)
        self.encoder = Transformer(DL, c.n_layer_encoder, c.n_head_local, window=c.local_window, final_norm=False,
                                   **block)
        self.pool_init = nn.Linear(DL, k * DL, bias=False)  # a patch's pooled byte states -> its k query vectors
        self.pool = PatchCrossAttention(DL, c.n_head_local)
        self.to_global = nn.Linear(k * DL, DG, bias=False)
        self.global_start = nn.Parameter(torch.empty(DG))  # the latent input before the first patch
        self.modality_start = ModalityStart(DG, len(MODALITIES)) if c.modality_start else None
        self.global_model = Transformer(DG, c.n_layer_global, c.n_head_global, **block)
        self.from_global = nn.ModuleList(nn.Linear(DG, k * DL, bias=False) for _ in range(c.n_layer_decoder))
        self.cross = nn.ModuleList(PatchCrossAttention(DL, c.n_head_local) for _ in range(c.n_layer_decoder))
        self.start = nn.Parameter(torch.empty(DL))  # the decoder input of position 0: no in-band BOS byte
        self.modality_byte_start = ModalityStart(DL, len(MODALITIES)) if c.modality_start else None
        self.decoder = Transformer(DL, c.n_layer_decoder, c.n_head_local, window=c.local_window, **block)
        self.head = nn.Linear(DL, c.vocab_size, bias=False)
        self.register_buffer("theta", torch.full((len(MODALITIES),), float(c.threshold)))
        self.stats: dict[str, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init = self.config.init
        for m in (self.encoder, self.global_model, self.decoder):
            m.reset_parameters(init)
        linears = [self.pool_init, self.to_global, self.head, *self.from_global]
        for attn in (self.pool, *self.cross):
            linears += [attn.q, attn.kv, attn.proj]
        for m in linears:
            init_linear(m, init)
        for e in (self.embed, *self.hash_embed):
            nn.init.normal_(e.weight, std=self.config.embed_std)
        for p in (self.global_start, self.start):
            nn.init.normal_(p, std=self.config.embed_std)
        if self.modality_start is not None:
            self.modality_start.reset_parameters()
            self.modality_byte_start.reset_parameters()

    def train(self, mode: bool = True) -> BLT:
        super().train(mode)
        if self.entropy_model is not None:  # frozen: always in eval mode
            self.entropy_model.eval()
        return self

    def num_params(self, part: str = "all") -> int:
        """Trainable parameters (``all``: hash tables included, entropy model not), or one part: ``global``,
        ``local`` (encoder, decoder, pooling, cross-attention, embeddings, head), ``hash``, ``entropy``."""
        def count(modules: list) -> int:
            return sum(p.numel() for m in modules if m is not None for p in m.parameters())

        parts = {"global": count([self.global_model, self.modality_start]) + self.global_start.numel(),
                 "hash": count(self.hash_embed), "entropy": count([self.entropy_model])}
        parts["all"] = sum(p.numel() for p in self.parameters()) - parts["entropy"]
        parts["local"] = parts["all"] - parts["global"] - parts["hash"]
        return parts[part]

    def set_entropy(self, state: dict[str, Tensor], calibration: dict | None = None, where: str = "") -> bool:
        """Load a trained entropy model's weights and the per-modality thresholds calibrated for it (``mmbytes
        calibrate``); thresholds calibrated for another rule are refused. Returns whether thresholds were set."""
        self.entropy_model.load_state_dict(state)
        self.entropy_loaded = True
        if not calibration:
            return False
        c = self.config
        if (calibration["rule"], calibration.get("max_patch_len", 0)) != (c.patching, c.max_patch_len):
            raise ValueError(f"{where}: thresholds calibrated for rule={calibration['rule']}, max_patch_len="
                             f"{calibration.get('max_patch_len', 0)}; this model has patching={c.patching}, "
                             f"max_patch_len={c.max_patch_len}")
        for name, theta in calibration["thresholds"].items():
            self.theta[MODALITIES.index(name)] = float(theta)
        self.calibrated = True
        return True

    def calibrate_(self, x: Tensor, patch_size: float | None = None, mask: Tensor | None = None,
                   modality: Tensor | None = None, batch_size: int = 16) -> float:
        """Set the thresholds so that the rule cuts the real bytes (``mask``) of x (B, T) into patches of
        ``patch_size`` bytes on average (default: the config's): one per modality present in ``modality`` (B,) ids,
        the pooled one for every other modality. Returns the pooled threshold."""
        if self.entropy_model is None:
            return float("nan")
        c = self.config
        target = patch_size or c.patch_size
        h = torch.cat([self.entropies(part) for part in x.split(batch_size)]).float()  # (B, T)
        rows = [h[b] if mask is None else h[b, mask[b].bool()] for b in range(x.shape[0])]
        rows_of = {m: [r for r, i in zip(rows, modality.tolist(), strict=True) if i == m]
                   for m in ([] if modality is None else modality.unique().tolist())}
        pooled, _ = patching.calibrate_threshold(rows, target, c.patching, c.max_patch_len)
        self.theta.fill_(pooled)
        for m, hs in rows_of.items():
            self.theta[m] = patching.calibrate_threshold(hs, target, c.patching, c.max_patch_len)[0]
        self.calibrated = True
        return pooled

    # -- the protocol: readying for data, FLOPs as run, patches

    def prepare(self, data: ModelData) -> None:
        """Calibrate the thresholds for the config's mean patch size on ``CALIBRATION_WINDOWS`` training windows
        drawn at random across the training split, one per modality, unless they are stored already (with the entropy
        model or in the checkpoint being restored). Done by the main process and shared."""
        if self.entropy_model is None or self.calibrated or data.restoring or data.draw_windows is None:
            return
        theta = None
        if data.is_main:
            x, mask, modality = data.draw_windows(CALIBRATION_WINDOWS, data.seq_len, 0)
            device = self.theta.device
            self.calibrate_(x.to(device), mask=mask.to(device), modality=modality.to(device))
            theta = self.theta.tolist()
        self.theta.copy_(torch.tensor(data.share(theta), dtype=self.theta.dtype))
        self.calibrated = True

    def requires(self) -> dict[str, str]:
        """A trained entropy model (``entropy_ckpt``) of the size the config names, until one is given."""
        if self.entropy_model is None or self.entropy_loaded:
            return {}
        return {"entropy_ckpt": self.config.entropy if isinstance(self.config.entropy, str) else "blt-entropy-small"}

    def caveats(self) -> list[str]:
        if not self.requires():
            return []
        return [f"BLT with {self.config.patching} patches but no trained entropy model: its patches are cut where a "
                "randomly initialised byte model is unsure, so they carry no information about the data (and cost "
                "what they cut, counted as run). Train one (`mmbytes fit --model.size "
                f"{self.requires()['entropy_ckpt']}`) and give it as entropy_ckpt."]

    def _starts(self, x: Tensor, modality: Tensor | None) -> Tensor:
        """Patch starts of x: those of the last training ``nll`` when it ran on this very batch, else computed."""
        if self._memo is not None and self._memo[0] is x and self._memo[1] is modality:
            return self._memo[2]
        return self.starts(x, modality)

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *,
                     modality: Tensor | None = None) -> Tensor | None:
        """Where patches start in x, as the model cuts them."""
        return self._starts(x, modality)

    def train_flops(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> float:
        """FLOPs of one training step on x (B, T) as run: the latent transformer and the pooling over the most
        patches of any row (every row is padded to it), the local blocks, cross-attentions and head (3 x forward),
        and the frozen entropy model's forward."""
        B, T = x.shape
        K = int((self._starts(x, modality).long().sum(1)).max())
        entropy = 0.0 if self.entropy_model is None else self.entropy_model.train_flops(x) / 3
        return 3 * self.forward_flops(B, T, K) + entropy

    # -- patches

    def thresholds(self, modality: Tensor | None, batch: int) -> Tensor:
        """Each row's threshold (B,), from its modality (rows without one: the ``raw`` threshold)."""
        if modality is None:
            return self.theta[MODALITIES.index(DEFAULT_MODALITY)].expand(batch)
        return self.theta[modality.long()]

    @torch.no_grad()
    def entropies(self, x: Tensor) -> Tensor:
        """Next-byte entropy (B, T) in nats of the entropy model at every position (position t: its distribution of
        byte t given bytes < t), in float32 at least. Rows are independent (one batched pass)."""
        return entropy_of(self.entropy_model(x))

    def starts(self, x: Tensor, modality: Tensor | None = None, theta: Tensor | None = None) -> Tensor:
        """(B, T) True where byte t starts a patch (byte 0 always does); depends on bytes < t only. Entropy rules use
        each row's threshold: ``theta`` (B,) if given, else the one of its modality."""
        c = self.config
        if c.patching == "fixed":
            s = patching.fixed_starts(x, int(c.patch_size))
        elif c.patching == "space":
            s = patching.spacelike_starts(x)
        else:
            theta = self.thresholds(modality, x.shape[0]) if theta is None else theta
            return patching.ENTROPY_RULES[c.patching](self.entropies(x), theta, c.max_patch_len)
        return patching.limit_length(s.clone(), c.max_patch_len)

    # -- the pieces, shared by training, prefill and generation

    def latent_start(self, batch: int, modality: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The latent input before the first patch (B, 1, D): the shared one, plus the row's modality offset with
        ``modality_start``."""
        if self.modality_start is None:
            return self.global_start.to(dtype).expand(batch, 1, -1)
        return self.modality_start(self.global_start, batch, modality, dtype)

    def byte_start(self, batch: int, modality: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The decoder input of position 0 (B, 1, D_L): the shared one, plus the row's modality offset with
        ``modality_start``."""
        if self.modality_byte_start is None:
            return self.start.to(dtype).expand(batch, 1, -1)
        return self.modality_byte_start(self.start, batch, modality, dtype)

    def embed_bytes(self, x: Tensor) -> Tensor:
        """Byte embeddings plus the hash n-gram embeddings of the n-grams ending at each byte: (B, L, D_L)."""
        e = self.embed(x)
        if self.config.hash_vocab:
            c = self.config
            for table, ids in zip(self.hash_embed, ngram_ids(x, c.hash_ngrams, c.hash_vocab, c.hash_version),
                                  strict=True):
                e = e + table(ids)
        return e

    def patch_vectors(self, h: Tensor, pid: Tensor, K: int) -> Tensor:
        """Encoder byte states h (B, T, D_L) and their patch indices (B, T) -> K patch vectors (B, K, D): k queries per
        patch from a max pooling of its bytes' states, cross-attending to those bytes, projected to the latent width."""
        B, T, D = h.shape
        idx = pid[..., None].expand(-1, -1, D)
        top = torch.full((B, K, D), -torch.inf, device=h.device, dtype=h.dtype).scatter_reduce(1, idx, h, "amax")
        top = torch.where(torch.isfinite(top), top, 0.0)  # a padded patch (no bytes) pools to zeros
        queries = self.pool_init(top).view(B, K, self.config.cross_k, D)
        return self.to_global(self.pool.pool(queries, h, pid).reshape(B, K, -1))

    def latent_keys(self, g: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The latent outputs g (B, G, D) as the keys and values each decoder layer's cross-attention reads: k vectors
        per patch, (B, G, k, H, hd) each."""
        B, G = g.shape[:2]
        return [cross.keys(proj(g).view(B, G, self.config.cross_k, -1))
                for cross, proj in zip(self.cross, self.from_global, strict=True)]

    def decode(self, d: Tensor, kv: list[tuple[Tensor, Tensor]], pid: Tensor, caches: list | None = None) -> Tensor:
        """Decoder: byte inputs d (B, L, D_L), each reading the keys and values ``kv`` (``latent_keys``) of latent
        output pid[b, t] before every byte block. Returns the final-normed states (B, L, D_L)."""
        cos, sin = self.decoder.rotary(caches[0].pos if caches else 0, d.shape[1], d.dtype)
        for i, block in enumerate(self.decoder.blocks):
            d = d + self.cross[i].attend(d, *kv[i], pid)
            if self.config.checkpointing and self.training and torch.is_grad_enabled():
                d = checkpoint(block, d, cos, sin, use_reentrant=False)
            else:
                d = block(d, cos, sin, caches[i] if caches else None)
        return self.decoder.norm(d)

    def hidden(self, x: Tensor, modality: Tensor | None = None, starts: Tensor | None = None) -> Tensor:
        if x.dtype != torch.long:
            x = x.long()
        B, T = x.shape
        starts = self.starts(x, modality) if starts is None else starts
        pid = starts.long().cumsum(1) - 1  # (B, T) each byte's patch
        K = int(pid[:, -1].max()) + 1
        h = self.encoder(self.embed_bytes(x))  # (B, T, D_L)
        p = self.patch_vectors(h, pid, K)  # (B, K, D)
        g_in = torch.cat([self.latent_start(B, modality, p.dtype), p[:, :-1]], dim=1)  # the one-patch shift
        g = self.global_model(g_in)  # (B, K, D): output j has seen patches < j
        d = torch.cat([self.byte_start(B, modality, h.dtype), h[:, :-1]], dim=1)  # position t reads byte t - 1
        return self.decode(d, self.latent_keys(g), pid)

    def forward(self, x: Tensor, *, modality: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(x, modality))

    def nll(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768, *,
            modality: Tensor | None = None) -> Tensor:
        """Negative log-likelihood in nats of every byte, (B, T), zero where ``mask`` is False. In training,
        ``stats`` holds the mean patch size (real bytes per patch start), overall and per modality."""
        starts = self.starts(x, modality)
        if self.training:
            self.stats = patch_stats(starts, mask, modality)
            self._memo = (x, modality, starts)
        return chunked_nll(self.head.weight, self.hidden(x, modality, starts), x, mask, chunk)

    def entropy_flops_per_byte(self, seq_len: int) -> float:
        """Forward FLOPs per byte of the entropy model (it runs in every training step; no backward)."""
        return 0.0 if self.entropy_model is None else self.entropy_model.flops_per_byte(seq_len) / 3

    def forward_flops(self, rows: int, seq_len: int, n_patches: int) -> float:
        """Forward FLOPs of the trainable parts on ``rows`` windows of ``seq_len`` bytes cut into ``n_patches``
        patches each (``blt_layers.forward_flops``)."""
        return forward_flops(self.config, rows, seq_len, n_patches)

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte planned at ``seq_len``: 3 x the forward of the trainable parts with
        ceil(T / patch_size) patches, plus the entropy model's forward (``entropy_flops_per_byte``). ``train_flops``
        counts the patches a batch really has."""
        K = math.ceil(seq_len / self.config.patch_size)
        return 3 * self.forward_flops(1, seq_len, K) / seq_len + self.entropy_flops_per_byte(seq_len)
