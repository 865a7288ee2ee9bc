"""The one interface every architecture implements, so that nothing outside ``mmbytes.model`` branches on which
model it holds: the Lightning module, the CLI, the study, compress, compare, sample and the benches read a model's
``capabilities`` and call the methods of ``ByteModel``.

``ModelData`` is what a model may know about the data it is about to train on (``ByteModel.prepare``): plain values
and callables, no data-layer import, so the models stay plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class Capabilities:
    byte_logits: bool = True
    """``forward(x)`` gives (B, T, 256) byte logits (False: BPE, token logits)."""
    cached: bool = True
    """``new_cache`` / ``prefill`` / ``step``: cached byte-by-byte decoding (False: ``generate_bytes``, BPE)."""
    strided: bool = False
    """``nll_strided``: MEGABYTE's strided inference (paper section 2.3.3)."""
    independent_rows: bool = True
    """A row's outputs never depend on another row of the batch, to the bit (no padding of rows to the batch's
    longest patch or token sequence, whose shapes change the floating-point sums): what arithmetic coding of several
    files in one batch needs."""
    per_modality: bool = False
    """Patching (or conditioning) depends on each row's modality: callers pass ``modality``. Every architecture's
    named sizes learn a start state per modality (their configs' ``modality_start``)."""
    entropy_patches: bool = False
    """Patches are cut where the model's own frozen byte model (``entropy_model``) is unsure of the next byte, at a
    threshold per modality (``theta``): BLT with an entropy rule."""
    per_byte_nll: bool = True
    """``nll`` gives each byte its own nats (False: BPE puts a token's nats at its last byte, so per-position
    analyses are not meaningful; only sums over whole windows are)."""


def identity(obj: Any) -> Any:
    return obj


@dataclass
class ModelData:
    """What a model may know of its training data when it readies itself for it (``ByteModel.prepare``)."""

    seq_len: int
    """Bytes per training window."""
    train_samples: Callable[[], Iterable[bytes]] | None = None
    """Every training sample's bytes once (a fresh iterator per call), e.g. to train a tokenizer."""
    modalities: tuple[str, ...] = ()
    """Names (``mmbytes.codecs.MODALITIES``) of the modalities in the training data."""
    draw_windows: Callable[[int, int, int], tuple[Tensor, Tensor, Tensor]] | None = None
    """``draw_windows(n, seq_len, seed)``: up to n windows of each modality, drawn at random across the whole
    training split, as (x (N, seq_len) long bytes, mask (N, seq_len) bool real bytes, modality (N,) long ids)."""
    restoring: bool = False
    """The model's weights and state come from a checkpoint next: prepare only what the checkpoint does not hold."""
    is_main: bool = True
    """This process does work whose result ``share`` gives to every process (rank 0 under DDP)."""
    share: Callable[[Any], Any] = identity
    """``share(obj)``: the main process's ``obj`` in every process (a broadcast; identity in one process)."""
    cache_dir: Path | None = None
    """A folder where a model may keep what it prepares for this data to reuse it across runs (BPE: tokenizers)."""
    options: dict[str, Any] = field(default_factory=dict)
    """User settings for preparation, read by the models that know them (BPE: ``tokenizer``, a tokenizer JSON file;
    ``tokenizer_bytes``, how many training bytes it is trained on)."""


class Complete:
    """``ByteModel.requires`` and ``caveats`` of a model that is what its config says as soon as it is built."""

    def requires(self) -> dict[str, str]:
        return {}

    def caveats(self) -> list[str]:
        return []


class FixedCost:
    """``ByteModel.flops_per_byte`` and ``train_flops`` of a model whose every byte costs the same whatever the bytes
    (no patches cut by content): both from its ``forward_flops(rows, seq_len)``, training = 3 x forward."""

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte (forward + backward = 3 x forward) at ``seq_len`` (``forward_flops``)."""
        return 3 * self.forward_flops(1, seq_len) / seq_len

    def train_flops(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> float:
        """FLOPs of one training step on x (B, T): every byte costs the same, so exactly ``flops_per_byte(T)`` x B x
        T."""
        return 3 * self.forward_flops(x.shape[0], x.shape[1])


@runtime_checkable
class ByteModel(Protocol):
    """Every architecture, the BPE baseline included. Modality ids are ``mmbytes.codecs.MODALITIES`` indices."""

    config: Any
    capabilities: ClassVar[Capabilities]

    def forward(self, x: Tensor, *, modality: Tensor | None = None) -> Tensor: ...

    def nll(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> Tensor:
        """(B, T) nats, zero where ``mask`` is False."""

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte planned at ``seq_len`` (``mmbytes.model.flops``)."""

    def train_flops(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> float:
        """FLOPs of one training step (forward + backward) on batch x as the model runs it."""

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> Tensor | None:
        """(B, T) True where a patch (a position of the model's top stage; a token for BPE) starts in batch x as the
        model runs it; None for a model without patches (the flat byte Transformer). Real bytes / patch starts among
        them, summed over training: its mean patch size."""

    def prepare(self, data: ModelData) -> None:
        """Ready the model for ``data``: BPE its tokenizer, BLT its entropy thresholds, SpaceByte its global cap."""

    def requires(self) -> dict[str, str]:
        """What the model still needs to be what its config says: ``ByteLM`` arguments, each with the named size of
        the model that provides it (BLT without a trained entropy model: ``{"entropy_ckpt": its size}``)."""

    def caveats(self) -> list[str]:
        """Why this model, as built, is not what its config promises (warned by whoever builds it for training)."""

    def num_params(self, part: str = "all") -> int: ...
