"""MEGABYTE's config (Yu et al., 2023, section 2), its named forms (``PRESETS``) and its named sizes (``SIZES``: a
shape in a preset), which join the one namespace of ``mmbytes.model.registry``. The flat byte Transformer of the
paper's section 5 has its own config (``mmbytes.model.transformer``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmbytes.model.common import check_heads, named_config


@dataclass(frozen=True)
class MegabyteConfig:
    arch: Literal["megabyte"] = "megabyte"
    """Architecture name in checkpoints and the registry: a global model over patches and a local model inside each
    patch."""
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
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Every block's MLP: ``gelu`` (GPT-2: d -> d * mlp_ratio -> d) or ``swiglu`` (Shazeer, 2020: SiLU-gated, three
    matrices of hidden width 2/3 of gelu's, rounded to a multiple of 8: about the same parameters; ``layers.MLP``)."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output during training."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding (patch index in the global model, byte index in the local one)."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations (saves memory on long T)."""
    token_shift: bool = False
    """Token shift (RWKV; as in MEGABYTE-pytorch): every attention and MLP sublayer reads the second half of its
    input channels from the previous position of its stage (patch, sub-patch or byte). Causal and cached. Off in
    the paper's form, on in the named sizes (presets ``shifted``, ``shifted-swiglu``)."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte embeddings and the trainable padding units (the paper's GPT-2 form:
    0.02; the named sizes: 1.0)."""
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
    """Sliding-window attention of the global model, in patches: each patch sees itself and the ``window - 1``
    before it; 0: full causal attention."""
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
    """The output head reuses the local model's byte embedding matrix, as the paper's output equation does (Eq. 6:
    softmax of E^local-embed times the local output). Off by default: a separate head matrix (256 x D_L more
    parameters)."""
    vocab_size: int = 256
    """Byte values. All 256 are data: none is reserved for padding."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): the padding patch that stands before the first
    patch of the global model is the shared one plus an offset chosen by the row's
    modality, so a window is predicted knowing its modality from its first byte on, and generation of an image starts
    from the image start state. Rows without a modality take the shared one. Off in the paper's form and in configs
    stored before the field existed (``registry.migrate``); on in the named sizes."""

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
        if self.arch != "megabyte":
            raise ValueError(f"MegabyteConfig has arch 'megabyte', got {self.arch!r} (the flat byte Transformer: "
                             "mmbytes.model.transformer.TransformerConfig)")
        if self.patch_size < 1 or self.n_layer_local < 1:
            raise ValueError("MEGABYTE needs patch_size >= 1 and n_layer_local >= 1")
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"init must be 'gpt2' or 'fan_in', got {self.init!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.local_shift not in ("patch", "sequence"):
            raise ValueError(f"local_shift must be 'patch' or 'sequence', got {self.local_shift!r}")
        if self.patch_embed not in ("concat", "project") or self.global_to_local not in ("slice", "full"):
            raise ValueError(f"patch_embed must be 'concat' or 'project' (got {self.patch_embed!r}) and "
                             f"global_to_local 'slice' or 'full' (got {self.global_to_local!r})")
        widths = [(self.d_global_model, self.n_head_global, "global"), (self.d_local, self.n_head_local, "local")]
        mid = zip(sizes[1:], self.d_mid, self.n_head_mid, strict=True)
        widths += [(p * d, h, f"middle {i}") for i, (p, d, h) in enumerate(mid)]
        check_heads(*widths)

    @property
    def window_alignment(self) -> int:
        """Bytes that training windows of image data start on a multiple of (``data.patch_size``, set from this by
        the CLI): P, so that image tiles line up with the fixed patches."""
        return self.patch_size

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
        return [*out, (1, self.d_local, self.n_layer_local, self.n_head_local)]

    @classmethod
    def from_name(cls, name: str, preset: str | None = None, **overrides) -> MegabyteConfig:
        """A named size of this module (``SIZES``), in ``preset`` if given, with fields replaced by ``overrides``."""
        return named_config(SIZES, PRESETS, name, preset, overrides)


_SHIFTED = dict(embed_std=1.0, init="fan_in", local_shift="sequence", token_shift=True, patch_embed="project",
                modality_start=True, mlp="gelu")
PRESETS: dict[str, dict] = {
    "paper": dict(embed_std=0.02, init="gpt2", local_shift="patch", token_shift=False, patch_embed="concat",
                  modality_start=False, mlp="gelu"),
    "shifted": _SHIFTED,
    "shifted-swiglu": {**_SHIFTED, "mlp": "swiglu"},
}
"""Named forms (field -> value) a size is built in. ``paper``: the paper's exact form (section 2; the dataclass
defaults): GPT-2 initialisation, N(0, 0.02) embeddings, a patch's bytes shifted inside the patch, the P byte embeddings
concatenated for the global model, no token shift, no start state per modality. ``shifted``, as MEGABYTE-pytorch:
token shift in every sublayer, a patch's first byte reading the byte before it (``local_shift: sequence``), PyTorch's
fan-in initialisation of every linear layer, byte embeddings and padding units N(0, 1), the global model reading a
patch through LayerNorm -> Linear -> LayerNorm of its concatenated byte embeddings (``patch_embed: project``); and a
learned start state per modality. ``shifted-swiglu`` (the named sizes): ``shifted`` with SwiGLU MLPs (``mlp``), the
form that learned best over 1,000 steps (docs/learning.md; ``bench/learning.py`` compares them)."""

SHAPES: dict[str, tuple[str, dict]] = {
    # a training step in a few milliseconds on a CPU: for tests
    "debug": ("shifted-swiglu", dict(patch_size=4, d_global=16, n_layer_global=2, n_head_global=2,
                                     d_local=32, n_layer_local=1, n_head_local=2)),
    # the same with a middle stage: 8-byte patches, 2-byte sub-patches, bytes
    "debug-long": ("shifted-swiglu", dict(patch_size=8, d_global=8, n_layer_global=1, n_head_global=2,
                                          mid_patch_sizes=(2,), d_mid=(16,), n_layer_mid=(1,), n_head_mid=(2,),
                                          d_local=16, n_layer_local=1, n_head_local=2)),
    # ~10M parameters: 7.1M global (P*D_G = 384) + 3.2M local
    "small": ("shifted-swiglu", dict(patch_size=8, d_global=48, n_layer_global=4, n_head_global=6,
                                     d_local=256, n_layer_local=4, n_head_local=4)),
    # ~100M parameters: 85M global (P*D_G = 768) + 12.6M local
    "base": ("shifted-swiglu", dict(patch_size=8, d_global=96, n_layer_global=12, n_head_global=12,
                                    d_local=512, n_layer_local=4, n_head_local=8)),
    # three stages for million-byte sequences: 64-byte global patches (16,384 of them at T = 2**20), 8-byte middle
    # patches, bytes; 12.6M global + 1.6M middle + 0.5M local
    "long": ("shifted-swiglu", dict(patch_size=64, d_global=8, n_layer_global=4, n_head_global=8,
                                    mid_patch_sizes=(8,), d_mid=(32,), n_layer_mid=(2,), n_head_mid=(4,),
                                    d_local=128, n_layer_local=2, n_head_local=4, checkpointing=True)),
}
"""Each named size: (its preset, its shape)."""

SIZES: dict[str, MegabyteConfig] = {name: MegabyteConfig(**shape, **PRESETS[preset])
                                    for name, (preset, shape) in SHAPES.items()}
