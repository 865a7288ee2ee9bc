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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops, patching
from mmbytes.model.blt_config import BLTConfig
from mmbytes.model.blt_layers import BLTCache, PatchCrossAttention, entropy_of, ngram_ids, patch_stats
from mmbytes.model.common import chunked_nll
from mmbytes.model.layers import ModalityStart, Transformer, init_linear
from mmbytes.model.protocol import Capabilities, ModelData

CALIBRATION_WINDOWS = 256
"""Training windows per modality, drawn at random across the training split, that ``prepare`` calibrates the
thresholds on."""

DEFAULT_MODALITY = "raw"
"""Whose threshold a row without a modality gets."""


class BLT(nn.Module):
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
            from mmbytes.model.registry import build, config_from_dict

            self.entropy_model = build(c.entropy if isinstance(c.entropy, str) else config_from_dict(c.entropy))
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
        patches each (``mmbytes.model.flops``): local blocks (sliding-window attention), the pooling (query init, the
        patch cross-attention's projections, its scores and weighted values: each byte with the k queries of its
        patch), the latent transformer, the decoder's cross-attentions (projections of the latent output, queries,
        scores and weighted values) and the head."""
        c, T, K, n = self.config, seq_len, n_patches, rows
        DL, DG, k = c.d_local, c.d_global, c.cross_k
        mix = flops.attention(n * T, k, DL)  # scores and weighted values: each byte with k vectors
        fwd = flops.blocks(n, T, DL, c.n_layer_encoder + c.n_layer_decoder, c.mlp_ratio, c.local_window, c.mlp)
        fwd += flops.linear(n * K, DL, k * DL) + flops.linear(n * K * k, DL, DL) * 2 + flops.linear(n * T, DL, 2 * DL)
        fwd += mix + flops.linear(n * K, k * DL, DG)
        fwd += flops.blocks(n, K, DG, c.n_layer_global, c.mlp_ratio, mlp=c.mlp)
        cross = flops.linear(n * K, DG, k * DL) + flops.linear(n * K * k, DL, 2 * DL) + flops.linear(n * T, DL, DL) * 2
        fwd += c.n_layer_decoder * (cross + mix)
        return fwd + flops.linear(n * T, DL, c.vocab_size)

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte planned at ``seq_len``: 3 x the forward of the trainable parts with
        ceil(T / patch_size) patches, plus the entropy model's forward (``entropy_flops_per_byte``). ``train_flops``
        counts the patches a batch really has."""
        K = math.ceil(seq_len / self.config.patch_size)
        return 3 * self.forward_flops(1, seq_len, K) / seq_len + self.entropy_flops_per_byte(seq_len)

    # -- cached generation: the entropy model runs along the bytes with its own cache; when it opens a patch, the
    # finished patch is pooled and the latent transformer takes one cached step (rows advance separately)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None, *,
                  modality: Tensor | None = None) -> BLTCache:
        c = self.config
        return BLTCache(
            buf=torch.zeros(batch, max_len, dtype=torch.long, device=device), t=0,
            enc=self.encoder.make_caches(batch, max_len + 1, device, dtype),
            ent=None if self.entropy_model is None else self.entropy_model.new_cache(batch, max_len + 1, device,
                                                                                     dtype),
            glob=self.global_model.make_caches(batch, max_len + 2, device, dtype, rows=True),
            dec=self.decoder.make_caches(batch, max_len + 1, device, dtype),
            states=torch.zeros(batch, max_len, c.d_local, device=device, dtype=dtype),
            theta=self.thresholds(None if modality is None else modality.to(self.theta.device), batch).clone(),
            latent_start=self.latent_start(batch, modality, dtype or self.global_start.dtype),
            byte_start=self.byte_start(batch, modality, dtype or self.start.dtype))

    def prefill(self, prompt: Tensor, cache: BLTCache) -> Tensor:
        """Positions 0..L0 (the prompt's bytes and the next one) in one parallel pass; the logits of byte L0."""
        B, L0 = prompt.shape
        cache.buf[:, :L0] = prompt
        cache.t = L0
        x = F.pad(cache.buf[:, :L0], (0, 1))  # the byte at L0 is not known yet; no position <= L0 depends on it
        starts = self.starts(x, theta=cache.theta)
        if cache.ent is not None:  # the entropy model's cache, for the bytes to come
            cache.entropy = entropy_of(self.entropy_model.prefill(x[:, :L0], cache.ent))
        pid = starts.long().cumsum(1) - 1  # (B, L0 + 1)
        done = pid[:, L0]  # patches finished before byte L0 (L0's own patch index)
        h = self.encoder(self.embed_bytes(x[:, :L0]), cache.enc) if L0 else x.new_zeros(B, 0, self.config.d_local,
                                                                                          dtype=cache.states.dtype)
        cache.states[:, :L0] = h
        p = h.new_zeros(B, 0, self.config.d_global)
        if L0:  # every patch the prompt touches is pooled; the latent model takes the finished ones
            p = self.patch_vectors(h, pid[:, :L0], int(pid[:, L0 - 1].max()) + 1)[:, : int(done.max())]
        g_in = torch.cat([cache.latent_start.to(h.dtype), p], dim=1)  # (B, max done + 1, D)
        for c in cache.glob:
            c.set_lengths(done + 1)
        g = self.global_model(g_in, cache.glob)
        rows = torch.arange(B, device=g.device)
        kv = self.latent_keys(g)
        cache.kv = [(key[rows, done][:, None], val[rows, done][:, None]) for key, val in kv]  # byte L0's patch
        cache.count = done + 1
        cache.start = patching.latest_start(starts)[:, L0]
        d = torch.cat([cache.byte_start.to(h.dtype), h], dim=1)  # (B, L0 + 1, D_L)
        return self.head(self.decode(d, kv, pid, cache.dec)[:, -1])

    def step(self, byte: Tensor, cache: BLTCache) -> Tensor:
        """Append one byte per row (B,); return the logits of the byte after it."""
        t = cache.t
        cache.buf[:, t] = byte
        cache.t = t + 1
        lo = max(0, t + 1 - max(self.config.hash_ngrams, default=1))
        h = self.encoder(self.embed_bytes(cache.buf[:, lo : t + 1])[:, -1:], cache.enc)  # (B, 1, D_L)
        cache.states[:, t] = h[:, 0]
        opens = self._opens(byte, cache)  # does byte t + 1 start a patch
        if bool(opens.any()):  # pool each opening row's finished patch start..t; one latent step for those rows
            first = int(cache.start[opens].min())
            mine = torch.arange(first, t + 1, device=h.device) >= cache.start[:, None]  # (B, L) bytes of the patch
            p = self.patch_vectors(cache.states[:, first : t + 1], (~mine).long(), 2)[:, :1]  # patch 0: its bytes
            g = self.global_model.row_step(p, cache.glob, cache.count, opens)  # each row at its own latent index
            now = opens.view(-1, 1, 1, 1, 1)  # the decoder's keys change only where a patch opened
            cache.kv = [(torch.where(now, key, old_key), torch.where(now, val, old_val))
                        for (key, val), (old_key, old_val) in zip(self.latent_keys(g), cache.kv, strict=True)]
            cache.count = cache.count + opens.long()
            cache.start = torch.where(opens, t + 1, cache.start)
        zero = torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device)
        return self.head(self.decode(h, cache.kv, zero, cache.dec)[:, -1])

    def _opens(self, byte: Tensor, cache: BLTCache) -> Tensor:
        """Whether byte t + 1 (t: the byte just appended) starts a patch, by the same rule as ``starts``."""
        c, t = self.config, cache.t - 1
        if c.uses_entropy:
            prev = cache.entropy
            cache.entropy = entropy_of(self.entropy_model.step(byte, cache.ent))
            h = torch.stack([prev, cache.entropy], dim=1)  # the rules look back one position at most
            opens = patching.ENTROPY_RULES[c.patching](h, cache.theta)[:, 1]
        elif c.patching == "fixed":
            opens = torch.full_like(byte, (t + 1) % int(c.patch_size) == 0, dtype=torch.bool)
        else:
            opens = patching.spacelike_starts(F.pad(cache.buf[:, max(0, t - 1) : t + 1], (0, 1)))[:, -1]
        if c.max_patch_len:
            opens = opens | (t + 1 - cache.start >= c.max_patch_len)
        return opens
