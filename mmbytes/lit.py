"""LightningModule around the plain-torch model: loss, optimizer, schedule and bits-per-byte logging."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from mmbytes.config import MegabyteConfig
from mmbytes.metrics import BitsPerByte
from mmbytes.model import Megabyte


class ByteLM(L.LightningModule):
    def __init__(
        self,
        size: str = "debug",
        overrides: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        strided_eval: bool = False,
    ) -> None:
        """
        Args:
            size: named model size (``debug``, ``small``, ``base``, ``transformer-small``, ...; see
                ``mmbytes.config.NAMED``).
            overrides: config fields that replace those of the named size, e.g. ``{patch_size: 4}``.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay, applied to matrices and embeddings only (not norms or padding vectors).
            betas: AdamW betas.
            warmup_steps: linear warmup from 0 to ``lr``; afterwards cosine decay to ``lr * min_lr_ratio`` at the
                trainer's last step.
            min_lr_ratio: final learning rate as a fraction of ``lr``.
            strided_eval: in validation and test, also score with the paper's strided inference (a second pass offset
                by P/2; each byte scored by the pass where it has more local context) and log it as ``*_strided``.
        """
        super().__init__()
        self.save_hyperparameters()
        self.config = MegabyteConfig.from_name(size, **(overrides or {}))
        self.model = Megabyte(self.config)
        self.bits = torch.nn.ModuleDict({f"{stage}{kind}": BitsPerByte() for stage in ("val", "test")
                                         for kind in ("", "_strided")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask = batch["mask"]
        nats = self.model.nll(batch["x"], mask).sum()
        loss = nats / mask.sum().clamp(min=1)  # mean nats per real byte
        self.log("train/loss", loss)
        self.log("train/bpb", loss / math.log(2), prog_bar=True)
        return loss

    def _score(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        x, mask, modality = batch["x"], batch["mask"], batch.get("modality")
        self.bits[stage].update(self.model.nll(x, mask).sum(1), mask.sum(1), modality)
        if self.hparams.strided_eval:
            self.bits[f"{stage}_strided"].update(self.model.nll_strided(x, mask).sum(1), mask.sum(1), modality)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Scores each window: summed nats, real bytes and bits per byte."""
        mask = batch["mask"]
        nats = self.model.nll(batch["x"], mask).sum(1)
        count = mask.sum(1)
        return {"nats": nats, "count": count, "bpb": nats / count.clamp(min=1) / math.log(2)}

    def _log_bits(self, stage: str) -> None:
        # compute() sums the states over all processes first, so every rank logs the same exact figure
        for suffix in ("", "_strided") if self.hparams.strided_eval else ("",):
            metric = self.bits[stage + suffix]
            for name, value in metric.compute().items():
                self.log(f"{stage}/{name}{suffix}", value, prog_bar=name == "bpb")
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_bits("val")

    def on_test_epoch_end(self) -> None:
        self._log_bits("test")

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """Learning rate factor at a step: linear warmup, then cosine from 1 down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
