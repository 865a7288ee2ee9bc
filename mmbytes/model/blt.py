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
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmbytes.codecs import MODALITIES
from mmbytes.model import flops, patching
from mmbytes.model.layers import ModalityStart, Transformer
from mmbytes.model.megabyte import MegabyteConfig, chunked_nll
from mmbytes.model.protocol import Capabilities, ModelData

HASH_BASE, HASH_MOD = 1_000_003, 2**31 - 1
"""The rolling hash of the n-gram ids: sum over the n bytes ending at t of (byte + 1) * HASH_BASE^age mod HASH_MOD
(a byte before the start of the sequence counts 0). Integer arithmetic: the same ids in every process and run."""

CALIBRATION_WINDOWS = 256
"""Training windows per modality, drawn at random across the training split, that ``prepare`` calibrates the
thresholds on."""

DEFAULT_MODALITY = "raw"
"""Whose threshold a row without a modality gets."""


@dataclass(frozen=True)
class BLTConfig:
    arch: Literal["blt"] = "blt"
    """Architecture name in checkpoints and the registry."""
    patching: Literal["entropy", "monotonic", "fixed", "space"] = "entropy"
    """Where patches start: ``entropy`` (the paper's global threshold: the entropy model's next-byte entropy above
    theta), ``monotonic`` (its rise over the previous byte's above theta), ``fixed`` (every ``patch_size`` bytes:
    the paper's static baseline) or ``space`` (SpaceByte's word boundaries)."""
    threshold: float = 2.0
    """theta in nats, for every modality until calibrated (``mmbytes calibrate`` stores one per modality)."""
    patch_size: float = 4.5
    """``fixed``: bytes per patch (a whole number). Entropy rules: the mean patch size aimed at, used by the
    calibration and by ``flops_per_byte``."""
    max_patch_len: int = 0
    """A patch that reaches this many bytes is cut (0: no limit)."""
    entropy: Any = "blt-entropy-small"
    """The entropy model: a named size of any architecture, or a stored config (set from an entropy checkpoint).
    Frozen inside the BLT model; not built for ``fixed`` and ``space``."""
    d_local: int = 256
    """D_L, width of the byte-level encoder and decoder."""
    n_layer_encoder: int = 1
    """Byte blocks of the local encoder (the paper keeps it light)."""
    n_layer_decoder: int = 2
    """Byte blocks of the local decoder, each after a cross-attention to the latent output."""
    n_head_local: int = 4
    """Attention heads of the local blocks and the cross-attentions."""
    window: int = 0
    """How many bytes a local attention query sees (itself included); 0: D_L."""
    d_global: int = 384
    """D, width of the latent transformer."""
    n_layer_global: int = 4
    """Blocks of the latent transformer."""
    n_head_global: int = 6
    """Attention heads of the latent transformer."""
    cross_k: int = 2
    """k: query vectors per patch in the encoder's pooling, key vectors per patch in the decoder's cross-attention."""
    hash_ngrams: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    """Sizes n of the hash n-gram embeddings (one table per n), summed with the byte embedding."""
    hash_vocab: int = 4096
    """Rows of each hash n-gram table; 0 turns the hash embeddings off (the paper's ablation)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the block width."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs in training."""
    rope_base: float = 10000.0
    """Base of the rotary position embeddings (byte index locally, patch index in the latent transformer)."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte and hash embeddings and the start vectors."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    vocab_size: int = 256
    """Byte values. All 256 are data."""
    hash_version: int = 2
    """How an n-gram's rolling hash becomes a table row (``ngram_ids``). 2: the hash is mixed (a 32-bit integer
    mixer) before it is reduced modulo ``hash_vocab``, so ids spread like a random hash at any table size. 1: reduced
    directly, which leaves most rows unused at table sizes related to ``HASH_BASE`` (500,002 rows: HASH_BASE = -1 mod
    the size); configs stored without this field have it (``LEGACY``), so their checkpoints keep their ids."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): both start vectors, the latent input before
    the first patch and the decoder input of position 0, are the shared ones plus offsets chosen by the row's
    modality (rows without one: the shared ones), so every latent position, and through the decoder's cross-attention
    every byte, is conditioned on the modality, and the first bytes also directly through the local decoder. Off in
    configs stored before the field existed (``LEGACY``); on in the named sizes. The entropy model stays
    unconditioned."""

    def __post_init__(self) -> None:
        if self.hash_version not in (1, 2):
            raise ValueError(f"hash_version must be 1 or 2, got {self.hash_version}")
        object.__setattr__(self, "hash_ngrams", tuple(int(n) for n in self.hash_ngrams))
        if self.patching not in ("entropy", "monotonic", "fixed", "space"):
            raise ValueError(f"patching must be entropy, monotonic, fixed or space, got {self.patching!r}")
        if self.patching == "fixed" and (self.patch_size < 1 or self.patch_size != int(self.patch_size)):
            raise ValueError(f"fixed patching needs a whole patch_size >= 1, got {self.patch_size}")
        if self.patch_size < 1 or self.max_patch_len < 0 or self.cross_k < 1 or self.n_layer_decoder < 1:
            raise ValueError("patch_size must be >= 1, max_patch_len >= 0, cross_k >= 1 and n_layer_decoder >= 1")
        if any(n < 1 for n in self.hash_ngrams):
            raise ValueError(f"hash n-gram sizes must be positive, got {self.hash_ngrams}")
        for width, heads, what in ((self.d_local, self.n_head_local, "local"),
                                   (self.d_global, self.n_head_global, "global")):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")

    @property
    def local_window(self) -> int:
        return self.window or self.d_local

    @property
    def uses_entropy(self) -> bool:
        return self.patching in patching.ENTROPY_RULES


def _entropy_transformer(d: int, n_layer: int, n_head: int, window: int) -> MegabyteConfig:
    return MegabyteConfig(arch="transformer", patch_size=1, d_global=d, n_layer_global=n_layer, n_head_global=n_head,
                          d_local=d, n_layer_local=0, n_head_local=0, window=window)


SIZES: dict[str, Any] = {
    # entropy models: small windowed byte transformers (the paper's is ~100M parameters with a 512-byte window)
    "blt-entropy-debug": _entropy_transformer(32, 1, 2, 16),
    "blt-entropy-small": _entropy_transformer(128, 4, 4, 512),
    # for tests: windows of 8 bytes, tiny hash tables
    "blt-debug": BLTConfig(entropy="blt-entropy-debug", d_local=32, n_layer_encoder=1, n_layer_decoder=1,
                           n_head_local=2, window=8, d_global=64, n_layer_global=2, n_head_global=2, hash_vocab=64,
                           modality_start=True),
    # the paper's ablation: no hash n-gram embeddings
    "blt-nohash-debug": BLTConfig(entropy="blt-entropy-debug", d_local=32, n_layer_encoder=1, n_layer_decoder=1,
                                  n_head_local=2, window=8, d_global=64, n_layer_global=2, n_head_global=2,
                                  hash_vocab=0, modality_start=True),
    "blt-fixed-debug": BLTConfig(patching="fixed", patch_size=4, d_local=32, n_layer_encoder=1, n_layer_decoder=1,
                                 n_head_local=2, window=8, d_global=64, n_layer_global=2, n_head_global=2,
                                 hash_vocab=64, modality_start=True),
    # ~10.9M parameters without the hash tables (7.1M latent + 2.4M local + 1.4M pooling and cross-attention); the
    # six hash tables add 6.3M
    "blt-small": BLTConfig(modality_start=True),
    "blt-fixed-small": BLTConfig(patching="fixed", patch_size=4, modality_start=True),
}


LEGACY = {"hash_version": 1, "modality_start": False}
"""Values of fields that configs stored before the field existed were trained with."""


def mix32(h: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (int64 tensors of values below 2**32): every input bit moves every output
    bit, so a reduction modulo any table size spreads the ids like a random hash."""
    mask = 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    return h ^ (h >> 16)


def ngram_ids(x: Tensor, ngrams: tuple[int, ...], vocab: int, version: int = 2) -> list[Tensor]:
    """Hash ids (B, T) of the n-gram ending at each byte, one tensor per n in ``ngrams``; position t depends on bytes
    t-n+1..t only (fewer near the start, where the missing bytes count 0). ``version``: see
    ``BLTConfig.hash_version``."""
    x = x.long() + 1
    T = x.shape[-1]
    acc = torch.zeros_like(x)
    out = {}
    for age in range(max(ngrams)):
        older = F.pad(x[..., : T - age], (age, 0)) if age < T else torch.zeros_like(x)
        acc = (acc + older * pow(HASH_BASE, age, HASH_MOD)) % HASH_MOD
        if age + 1 in ngrams:
            out[age + 1] = (mix32(acc) if version >= 2 else acc) % vocab
    return [out[n] for n in ngrams]


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy in nats of the distributions given by logits (..., 256), in float32 at least."""
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class PatchCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention in BLT's two forms, both over one patch at a time:

    - ``pool``: each patch's k query vectors attend to the bytes of that patch only (the encoder);
    - ``attend``: each byte attends to the k key vectors of one patch (the decoder).
    """

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, d // n_head
        self.norm_q, self.norm_kv = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(self.norm_kv(x)).view(*x.shape[:-1], 2, self.n_head, self.head_dim).unbind(-3)
        return k, v  # (..., H, hd)

    def pool(self, queries: Tensor, states: Tensor, pid: Tensor) -> Tensor:
        """queries (B, K, k, D) of K patches, byte states (B, T, D), each byte's patch index pid (B, T) -> queries
        plus what they read from their own patch's bytes (B, K, k, D). A softmax over the bytes of each patch (a
        segment softmax); a patch without bytes reads nothing."""
        B, K, k, D = queries.shape
        H, hd = self.n_head, self.head_dim
        q = self.q(self.norm_q(queries)).view(B, K, k, H, hd)
        key, val = self._kv(states)  # (B, T, H, hd)
        idx = pid[:, :, None, None].expand(-1, -1, k, H)  # (B, T, k, H)
        qt = q.gather(1, idx[..., None].expand(-1, -1, -1, -1, hd))  # (B, T, k, H, hd): each byte's patch queries
        score = torch.einsum("btkhd,bthd->btkh", qt, key) / math.sqrt(hd)
        top = torch.full((B, K, k, H), -torch.inf, device=score.device, dtype=score.dtype)
        top = top.scatter_reduce(1, idx, score.detach(), "amax")  # per patch: only for stability, no gradient
        w = (score - top.gather(1, idx)).exp()
        total = torch.zeros_like(top).scatter_add(1, idx, w)
        w = w / total.gather(1, idx)  # softmax weights within each patch; every byte is in a patch with total >= 1
        out = torch.zeros(B, K, k, H, hd, device=val.device, dtype=val.dtype)
        out = out.scatter_add(1, idx[..., None].expand(-1, -1, -1, -1, hd), w[..., None] * val[:, :, None])
        return queries + self.proj(out.reshape(B, K, k, D))

    def keys(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, K, k, H, hd) of k vectors per patch (B, K, k, D)."""
        return self._kv(vectors)

    def attend(self, x: Tensor, key: Tensor, val: Tensor, pid: Tensor) -> Tensor:
        """Bytes x (B, T, D), each reading the k keys and values of patch pid[b, t] (keys from ``keys``); returns
        what they read (B, T, D), to be added to x."""
        B, T, D = x.shape
        H, hd = self.n_head, self.head_dim
        q = self.q(self.norm_q(x)).view(B, T, H, hd)
        idx = pid[:, :, None, None, None].expand(-1, -1, *key.shape[2:])
        key, val = key.gather(1, idx), val.gather(1, idx)  # (B, T, k, H, hd)
        w = (torch.einsum("bthd,btkhd->bthk", q, key) / math.sqrt(hd)).softmax(-1)
        return self.proj(torch.einsum("bthk,btkhd->bthd", w, val).reshape(B, T, D))


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
        block = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout, rope_base=c.rope_base, checkpointing=c.checkpointing)
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
        for m in (self.encoder, self.global_model, self.decoder):
            m.reset_parameters()
        linears = [self.pool_init, self.to_global, self.head, *self.from_global]
        for attn in (self.pool, *self.cross):
            linears += [attn.q, attn.kv, attn.proj]
        for m in linears:
            nn.init.normal_(m.weight, std=0.02)
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
        fwd = flops.blocks(n, T, DL, c.n_layer_encoder + c.n_layer_decoder, c.mlp_ratio, c.local_window)
        fwd += flops.linear(n * K, DL, k * DL) + flops.linear(n * K * k, DL, DL) * 2 + flops.linear(n * T, DL, 2 * DL)
        fwd += mix + flops.linear(n * K, k * DL, DG)
        fwd += flops.blocks(n, K, DG, c.n_layer_global, c.mlp_ratio)
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
            g = self.global_model(p, cache.glob, positions=cache.count)  # each row at its own latent index
            for c in cache.glob:
                c.commit(opens)
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


@dataclass
class BLTCache:
    """Generation state: the bytes so far (``t`` known), the encoder's and decoder's sliding-window caches, the
    entropy model's cache and its latest entropy, the latent transformer's row caches, every byte's encoder state
    (to pool a patch when it closes), and per row: its threshold, its latent and decoder start vectors (its
    modality's), where its current patch started, its latent positions so far, and the decoder's keys and values of
    the latent output its current patch reads."""

    buf: Tensor
    t: int
    enc: list
    ent: Any
    glob: list
    dec: list
    states: Tensor
    theta: Tensor
    latent_start: Tensor
    byte_start: Tensor
    start: Tensor = field(default=None)
    count: Tensor = field(default=None)
    kv: list = field(default=None)
    entropy: Tensor = field(default=None)


def patch_stats(starts: Tensor, mask: Tensor | None, modality: Tensor | None) -> dict[str, Tensor]:
    """Mean patch size (real bytes / patch starts among them), overall and per modality present."""
    real = torch.ones_like(starts) if mask is None else mask.bool()
    count, cut = real.sum(1).float(), (starts & real).sum(1).float()
    out = {"patch_size": (count.sum() / cut.sum().clamp(min=1)).detach()}
    if modality is not None:
        for m in modality.unique().tolist():
            rows = modality == m
            out[f"patch_size_{MODALITIES[m]}"] = (count[rows].sum() / cut[rows].sum().clamp(min=1)).detach()
    return out
