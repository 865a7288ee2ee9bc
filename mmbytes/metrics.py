"""Bits per byte and per dimension as a torchmetrics metric: summed nats and byte counts per modality.

Sums (not means) are the state, so the figure is exact over any batching and across processes (``dist_reduce_fx``
is a sum). A byte of an image is one 8-bit sub-pixel, so its bits per dimension equal its bits per byte
(``bpd_image``). An audio sample is two bytes (16-bit little endian): audio is reported in bits per byte
(``bpb_audio``, as MEGABYTE reports its audio results: Yu et al., 2023) and, under a name that cannot be taken for a
per-byte figure, in bits per 16-bit sample (``bits_per_sample_audio`` = 2 x ``bpb_audio``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from mmbytes.codecs import MODALITIES

BYTES_PER_DIM = {"image": 1, "audio": 2}
PER_DIM_NAME = {"image": "bpd_image", "audio": "bits_per_sample_audio"}
"""The name of each modality's figure per original dimension (8-bit sub-pixel, 16-bit sample)."""


class BitsPerByte(Metric):
    """``update(nats, counts, modality)`` with per-sample summed nats (B,), real byte counts (B,) and modality ids
    (B,); ``compute()`` returns ``{"bpb": overall, "bpb_<m>": ..., "bpd_image": ..., "bits_per_sample_audio": ...}``
    for the modalities seen, and ``{}`` when no byte was scored."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(MODALITIES)
        self.add_state("nats", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def _apply(self, fn, exclude_state=()):
        """Moves the sums with the module's device, never its dtype: a module cast to bf16 or fp16
        (``precision: bf16-true``) keeps float64 sums, so the figure stays exact."""
        this = super()._apply(fn, exclude_state=(*exclude_state, "nats", "count"))
        for key in ("nats", "count"):
            this._defaults[key] = this._defaults[key].to(this.device)
            setattr(this, key, getattr(this, key).to(this.device))
        return this

    def update(self, nats: Tensor, counts: Tensor, modality: Tensor | None = None) -> None:
        if modality is None:
            modality = torch.full_like(counts, MODALITIES.index("raw"), dtype=torch.long)
        self.nats.index_add_(0, modality.long(), nats.detach().to(torch.float64))
        self.count.index_add_(0, modality.long(), counts.detach().to(torch.float64))

    def compute(self) -> dict[str, Tensor]:
        total = self.count.sum()
        if total == 0:  # a figure over zero bytes is undefined: nothing to log, never 0
            return {}
        out = {"bpb": self.nats.sum() / total / math.log(2)}
        for i, m in enumerate(MODALITIES):
            if self.count[i] > 0:
                bpb = self.nats[i] / self.count[i] / math.log(2)
                out[f"bpb_{m}"] = bpb
                if m in BYTES_PER_DIM:
                    out[PER_DIM_NAME[m]] = bpb * BYTES_PER_DIM[m]
        return {k: v.float() for k, v in out.items()}
