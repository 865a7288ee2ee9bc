"""Model configuration: one dataclass with named sizes (litgpt style).

``MegabyteConfig.from_name("small", patch_size=4)`` gives a named size with overrides. The byte-level Transformer
baseline of the MEGABYTE paper (Yu et al., 2023, section 5) is the same config with ``arch="transformer"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal


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
    input channels from the previous position of its stage (patch, sub-patch or byte). Causal and cached."""
    embed_std: float = 0.02
    """Initial standard deviation of the byte embeddings and the trainable padding units (the paper's GPT-2 form:
    0.02; 1.0 keeps a byte's identity above the noise the blocks add at initialisation)."""
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
    vocab_size: int = 256
    """Byte values. All 256 are data: none is reserved for padding."""

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
        if name not in NAMED:
            raise ValueError(f"unknown model size {name!r}; known: {', '.join(NAMED)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        return replace(NAMED[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _transformer(d: int, n_layer: int, n_head: int) -> MegabyteConfig:
    return MegabyteConfig(arch="transformer", patch_size=1, d_global=d, n_layer_global=n_layer, n_head_global=n_head,
                          d_local=d, n_layer_local=0, n_head_local=0)


NAMED: dict[str, MegabyteConfig] = {
    # a training step in a few milliseconds on a CPU: for tests
    "debug": MegabyteConfig(patch_size=4, d_global=16, n_layer_global=2, n_head_global=2,
                            d_local=32, n_layer_local=1, n_head_local=2),
    # the same with a middle stage: 8-byte patches, 2-byte sub-patches, bytes
    "debug-long": MegabyteConfig(patch_size=8, d_global=8, n_layer_global=1, n_head_global=2,
                                 mid_patch_sizes=(2,), d_mid=(16,), n_layer_mid=(1,), n_head_mid=(2,),
                                 d_local=16, n_layer_local=1, n_head_local=2),
    # ~10M parameters: 7.1M global (P*D_G = 384) + 3.2M local
    "small": MegabyteConfig(patch_size=8, d_global=48, n_layer_global=4, n_head_global=6,
                            d_local=256, n_layer_local=4, n_head_local=4),
    # ~100M parameters: 85M global (P*D_G = 768) + 12.6M local
    "base": MegabyteConfig(patch_size=8, d_global=96, n_layer_global=12, n_head_global=12,
                           d_local=512, n_layer_local=4, n_head_local=8),
    # three stages for million-byte sequences: 64-byte global patches (16,384 of them at T = 2**20), 8-byte middle
    # patches, bytes; 12.6M global + 1.6M middle + 0.5M local
    "long": MegabyteConfig(patch_size=64, d_global=8, n_layer_global=4, n_head_global=8,
                           mid_patch_sizes=(8,), d_mid=(32,), n_layer_mid=(2,), n_head_mid=(4,),
                           d_local=128, n_layer_local=2, n_head_local=4, checkpointing=True),
    # flat byte-level Transformers with the parameter count of the size they are named after
    "transformer-debug": _transformer(64, 2, 2),
    "transformer-small": _transformer(384, 6, 6),
    "transformer-base": _transformer(768, 14, 12),
}
