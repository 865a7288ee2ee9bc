"""BLT's config (Pagnoni et al., 2024), its presets and named sizes; see ``mmbytes.model.blt``. Its entropy models
(``blt-entropy-*``) are flat byte Transformers: ``mmbytes.model.transformer``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from mmbytes.model import patching, transformer
from mmbytes.model.common import check_heads, named_config
from mmbytes.model.transformer import TransformerConfig


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
    """The entropy model, a flat byte Transformer (``mmbytes.model.transformer``): one of its named sizes, or its
    config as a dict (set from an entropy checkpoint; ``registry.migrate`` brings stored ones up to date). Frozen
    inside the BLT model; not built for ``fixed`` and ``space``."""
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
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Every block's MLP: ``gelu`` (GPT-2: d -> d * mlp_ratio -> d) or ``swiglu`` (Shazeer, 2020: SiLU-gated, three
    matrices of hidden width 2/3 of gelu's, rounded to a multiple of 8: about the same parameters; ``layers.MLP``)."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs in training."""
    rope_base: float = 10000.0
    """Base of the rotary position embeddings (byte index locally, patch index in the latent transformer)."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte and hash embeddings and the start vectors."""
    token_shift: bool = False
    """Token shift (see ``MegabyteConfig.token_shift``) in every block of the local encoder, the latent transformer
    and the local decoder (the decoder's cross-attentions read their input unshifted). Off by default."""
    init: Literal["gpt2", "fan_in"] = "gpt2"
    """Linear layers' initialisation (see ``MegabyteConfig.init``): ``gpt2`` (N(0, 0.02), the blocks' residual
    projections depth-scaled) or ``fan_in`` (PyTorch's default), for the blocks, pooling, cross-attentions and
    head alike. The entropy model keeps its own config's."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    vocab_size: int = 256
    """Byte values. All 256 are data."""
    hash_version: int = 2
    """How an n-gram's rolling hash becomes a table row (``ngram_ids``). 2: the hash is mixed (a 32-bit integer
    mixer) before it is reduced modulo ``hash_vocab``, so ids spread like a random hash at any table size. 1: reduced
    directly, which leaves most rows unused at table sizes related to ``HASH_BASE`` (500,002 rows: HASH_BASE = -1 mod
    the size); configs stored without this field have it (``registry.migrate``), so their checkpoints keep their ids."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): both start vectors, the latent input before
    the first patch and the decoder input of position 0, are the shared ones plus offsets chosen by the row's
    modality (rows without one: the shared ones), so every latent position, and through the decoder's cross-attention
    every byte, is conditioned on the modality, and the first bytes also directly through the local decoder. Off in
    configs stored before the field existed (``registry.migrate``); on in the named sizes. The entropy model stays
    unconditioned."""

    def __post_init__(self) -> None:
        if self.hash_version not in (1, 2):
            raise ValueError(f"hash_version must be 1 or 2, got {self.hash_version}")
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"init must be 'gpt2' or 'fan_in', got {self.init!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        object.__setattr__(self, "hash_ngrams", tuple(int(n) for n in self.hash_ngrams))
        if self.patching not in ("entropy", "monotonic", "fixed", "space"):
            raise ValueError(f"patching must be entropy, monotonic, fixed or space, got {self.patching!r}")
        if self.patching == "fixed" and (self.patch_size < 1 or self.patch_size != int(self.patch_size)):
            raise ValueError(f"fixed patching needs a whole patch_size >= 1, got {self.patch_size}")
        if self.patch_size < 1 or self.max_patch_len < 0 or self.cross_k < 1 or self.n_layer_decoder < 1:
            raise ValueError("patch_size must be >= 1, max_patch_len >= 0, cross_k >= 1 and n_layer_decoder >= 1")
        if any(n < 1 for n in self.hash_ngrams):
            raise ValueError(f"hash n-gram sizes must be positive, got {self.hash_ngrams}")
        check_heads((self.d_local, self.n_head_local, "local"), (self.d_global, self.n_head_global, "global"))
        if self.uses_entropy:
            self.entropy_config  # noqa: B018 -- refused here, by name, if it is not a flat byte Transformer's

    @property
    def window_alignment(self) -> int:
        """Bytes that training windows of image data start on a multiple of (``data.patch_size``, set from this by
        the CLI): ``patch_size`` with fixed patches, 1 where patches follow the entropy."""
        return self.patch_size if self.patching == "fixed" else 1

    @property
    def local_window(self) -> int:
        return self.window or self.d_local

    @property
    def uses_entropy(self) -> bool:
        return self.patching in patching.ENTROPY_RULES

    @property
    def entropy_config(self) -> TransformerConfig:
        """The config of the entropy model that ``entropy`` names or holds."""
        if isinstance(self.entropy, TransformerConfig):
            return self.entropy
        if isinstance(self.entropy, str):
            if self.entropy not in transformer.SIZES:
                raise ValueError(f"BLT's entropy model {self.entropy!r} is not a flat byte Transformer size; known: "
                                 f"{', '.join(transformer.SIZES)}")
            return transformer.SIZES[self.entropy]
        if self.entropy.get("arch") != "transformer":
            raise ValueError(f"BLT's entropy model is a flat byte Transformer (a transformer-* or blt-entropy-* "
                             f"size); this one has arch {self.entropy.get('arch')!r}")
        unknown = sorted(set(self.entropy) - {f.name for f in fields(TransformerConfig)})
        if unknown:
            raise ValueError(f"BLT's entropy config has fields {unknown} that TransformerConfig does not: stored "
                             "configs go through mmbytes.model.registry, which migrates them")
        return TransformerConfig(**self.entropy)

    @classmethod
    def from_name(cls, name: str, preset: str | None = None, **overrides) -> BLTConfig:
        """A named size of this module (``SIZES``), in ``preset`` if given, with fields replaced by ``overrides``."""
        return named_config(SIZES, PRESETS, name, preset, overrides)


PRESETS: dict[str, dict] = {
    "paper": dict(mlp="swiglu", token_shift=False, modality_start=False),
    "conditioned": dict(mlp="gelu", token_shift=False, modality_start=True),
    "shift-swiglu": dict(mlp="swiglu", token_shift=True, modality_start=True),
}
"""Named forms (field -> value) a size is built in. ``paper``: the paper's form, unconditioned, with the SwiGLU MLPs of
its Llama-style blocks (Pagnoni et al., 2024; the reference code's ``TransformerBlock``). ``conditioned``: GELU MLPs
and a learned start state per modality. ``shift-swiglu`` (the named sizes): SwiGLU MLPs, token shift and the start
state per modality, the form chosen by measurement (docs/learning.md)."""

_DEBUG = dict(d_local=32, n_layer_encoder=1, n_layer_decoder=1, n_head_local=2, window=8, d_global=64,
              n_layer_global=2, n_head_global=2, hash_vocab=64)

SHAPES: dict[str, tuple[str, dict]] = {
    # for tests: windows of 8 bytes, tiny hash tables
    "blt-debug": ("shift-swiglu", dict(_DEBUG, entropy="blt-entropy-debug")),
    # the paper's ablation: no hash n-gram embeddings
    "blt-nohash-debug": ("shift-swiglu", dict(_DEBUG, entropy="blt-entropy-debug", hash_vocab=0)),
    "blt-fixed-debug": ("shift-swiglu", dict(_DEBUG, patching="fixed", patch_size=4)),
    # ~10.9M parameters without the hash tables (7.1M latent + 2.4M local + 1.4M pooling and cross-attention); the
    # six hash tables add 6.3M
    "blt-small": ("shift-swiglu", dict()),
    "blt-fixed-small": ("shift-swiglu", dict(patching="fixed", patch_size=4)),
}
"""Each named size: (its preset, its shape)."""

SIZES: dict[str, BLTConfig] = {name: BLTConfig(**shape, **PRESETS[preset]) for name, (preset, shape) in SHAPES.items()}
