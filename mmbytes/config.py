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
    vocab_size: int = 256
    """Byte values. All 256 are data: none is reserved for padding."""

    def __post_init__(self) -> None:
        if self.arch == "transformer":
            if self.patch_size != 1 or self.n_layer_local != 0:
                raise ValueError("arch='transformer' needs patch_size=1 and n_layer_local=0: one flat stack over bytes")
        elif self.arch == "megabyte":
            if self.patch_size < 1 or self.n_layer_local < 1:
                raise ValueError("arch='megabyte' needs patch_size >= 1 and n_layer_local >= 1")
        else:
            raise ValueError(f"unknown arch {self.arch!r}: expected 'megabyte' or 'transformer'")
        for width, heads, what in ((self.d_global_model, self.n_head_global, "global"),
                                   (self.d_local, self.n_head_local, "local")):
            if heads and width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")

    @property
    def d_global_model(self) -> int:
        """Width of the global transformer: a patch's P byte embeddings concatenated."""
        return self.patch_size * self.d_global

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
    # ~10M parameters: 7.1M global (P*D_G = 384) + 3.2M local
    "small": MegabyteConfig(patch_size=8, d_global=48, n_layer_global=4, n_head_global=6,
                            d_local=256, n_layer_local=4, n_head_local=4),
    # ~100M parameters: 85M global (P*D_G = 768) + 12.6M local
    "base": MegabyteConfig(patch_size=8, d_global=96, n_layer_global=12, n_head_global=12,
                           d_local=512, n_layer_local=4, n_head_local=8),
    # flat byte-level Transformers with the parameter count of the size they are named after
    "transformer-debug": _transformer(64, 2, 2),
    "transformer-small": _transformer(384, 6, 6),
    "transformer-base": _transformer(768, 14, 12),
}
