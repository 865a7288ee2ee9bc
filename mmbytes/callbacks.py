"""Callbacks with side effects: writing generated samples. Rank zero only; the module's mode is left as found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from mmbytes.sample import sample_bytes, sample_length, warn_beyond_training, write_samples


class SampleWriter(L.Callback):
    def __init__(self, modality: str = "text", num: int = 4, num_bytes: int = 512, every_n_steps: int = 0,
                 on_validation_end: bool = True, prompt: str = "", temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 meta: dict[str, Any] | None = None) -> None:
        """Generates samples and writes them to ``<log_dir>/samples/step_<N>/`` and to TensorBoard.

        Args:
            modality: codec that turns the bytes into a file: text, raw, image or audio.
            num: samples per call, generated as one batch.
            num_bytes: bytes per sample for text, raw and audio (images: the ``meta`` size fixes it).
            every_n_steps: also sample every N training steps (0: only at the end of validation).
            on_validation_end: sample after each validation run.
            prompt: text that starts every sample.
            temperature: sampling temperature (0 is greedy).
            top_k: keep the k most likely bytes.
            top_p: keep the smallest set of bytes with this much probability.
            seed: sampling seed, the same at every call so samples are comparable across steps.
            meta: what the codec needs to decode: ``{height, width, channels, order, tile}`` for images,
                ``{sample_rate}`` for audio.
        """
        self.modality, self.num, self.num_bytes = modality, num, num_bytes
        self.every_n_steps, self.at_validation_end = every_n_steps, on_validation_end
        self.prompt = prompt.encode()
        self.kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        self.meta = meta or {}
        self._last_step = -1

    def on_fit_start(self, trainer, pl_module) -> None:
        """Warn once if the samples are longer than the training windows (the model would generate past them)."""
        seq_len = (getattr(trainer.datamodule, "hparams", None) or {}).get("seq_len")
        total = len(self.prompt) + sample_length(self.modality, self.meta, self.num_bytes)
        if trainer.is_global_zero:
            warn_beyond_training(total, seq_len, f"SampleWriter({self.modality})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at_validation_end and not trainer.sanity_checking:
            self._sample(trainer, pl_module)

    @rank_zero_only
    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # the step-based and validation triggers can meet on one step
            return
        self._last_step = step
        num_bytes = sample_length(self.modality, self.meta, self.num_bytes)
        samples = sample_bytes(pl_module.model, self.num, num_bytes, self.prompt, modality=self.modality, **self.kw)
        out = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{step}"
        paths = write_samples(samples, self.modality, self.meta, out)
        self._log_tensorboard(trainer, paths, samples, step)

    def _log_tensorboard(self, trainer: L.Trainer, paths: list[Path], samples: list[bytes], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            tag = f"samples/{self.modality}"
            if self.modality in ("text", "raw"):
                for i, data in enumerate(samples):
                    text = data.decode("utf-8", errors="replace") if self.modality == "text" else data[:2048].hex(" ")
                    writer.add_text(f"{tag}_{i}", "    " + text.replace("\n", "\n    "), step)
            elif self.modality == "image":
                from PIL import Image

                pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (N, H, W, 3)
                writer.add_images(tag, pixels, step, dataformats="NHWC")
            elif self.modality == "audio":
                for i, data in enumerate(samples):
                    wave = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
                    writer.add_audio(f"{tag}_{i}", wave[None], step, sample_rate=self.meta["sample_rate"])
