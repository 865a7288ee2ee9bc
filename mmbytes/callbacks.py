"""Callbacks: writing generated samples (rank zero only; the module's mode is left as found), storing the data
description in checkpoints (``DataDescription``) and counting training FLOPs against a budget (``FlopBudget``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from mmbytes.sample import sample_bytes, sample_length, warn_beyond_training, write_samples


class SampleWriter(L.Callback):
    def __init__(self, modality: str = "text", num: int = 4, num_bytes: int = 512, every_n_steps: int = 0,
                 on_validation_end: bool = True, prompt: str = "", temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 meta: dict[str, Any] | None = None, max_seconds: float | None = 600.0) -> None:
        """Generates samples and writes them to ``<log_dir>/samples/step_<N>/`` and to TensorBoard.

        In training, the samples of a step are made after that step's checkpoint is written (at the next training
        batch, or at the end of training): interrupting the sampling loses no training. They are generated as one
        batch, with a progress bar (or a log line) on rank zero, from a generator of their own: the global random
        state, and so the training, is the same with and without sample writers.

        Args:
            modality: codec that turns the bytes into a file: text, raw, image or audio.
            num: samples per call, generated as one batch.
            num_bytes: bytes per sample for text, raw and audio (images: the image size fixes it).
            every_n_steps: also sample every N training steps (0: only at the end of validation).
            on_validation_end: sample after each validation run.
            prompt: text that starts every sample.
            temperature: sampling temperature (0 is greedy).
            top_k: keep the k most likely bytes.
            top_p: keep the smallest set of bytes with this much probability.
            seed: sampling seed, the same at every call so samples are comparable across steps.
            meta: what the codec needs to decode (``{height, width, channels, order, tile}`` for images,
                ``{sample_rate}`` for audio); by default the data description of the datamodule's shards
                (``mmbytes.data_description``), so samples are decoded as the training data was encoded.
            max_seconds: time budget of one call; samples not finished by then are dropped with a warning and
                training goes on (None: no limit).
        """
        self.modality, self.num, self.num_bytes = modality, num, num_bytes
        self.every_n_steps, self.at_validation_end = every_n_steps, on_validation_end
        self.prompt = prompt.encode()
        self.kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        self.given_meta = meta
        self.meta = dict(meta or {})
        self.max_seconds = max_seconds
        self._last_step = -1
        self._pending: int | None = None  # a step whose samples wait for its checkpoint

    def _meta(self, trainer) -> dict[str, Any]:
        """The codec's decoding options: ``meta`` as given, else read from the data description."""
        if self.given_meta is not None:
            return dict(self.given_meta)
        from mmbytes.data_description import codec_meta, of_datamodule

        description = of_datamodule(getattr(trainer, "datamodule", None)) or {}
        meta = codec_meta(description, self.modality)
        if self.modality == "image" and None in (meta["height"], meta["width"]):
            raise ValueError(f"SampleWriter(image): the training data has no images of one size to copy; give meta: "
                             f"{{height, width, channels, order, tile}} (data description: {meta})")
        if self.modality == "audio" and not meta["sample_rate"]:
            raise ValueError("SampleWriter(audio): the training data has no audio to take the sample rate from; give "
                             "meta: {sample_rate: N}")
        return meta

    def on_fit_start(self, trainer, pl_module) -> None:
        """Read the decoding options, and warn once if the samples are longer than the training windows (the model
        would generate past them)."""
        self.meta = self._meta(trainer)
        seq_len = (getattr(trainer.datamodule, "hparams", None) or {}).get("seq_len")
        total = len(self.prompt) + sample_length(self.modality, self.meta, self.num_bytes)
        if trainer.is_global_zero:
            warn_beyond_training(total, seq_len, f"SampleWriter({self.modality})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._pending = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.at_validation_end or trainer.sanity_checking:
            return
        if getattr(trainer.state, "fn", None) == "fit":
            self._pending = trainer.global_step  # ModelCheckpoint saves in this hook too, after the other callbacks
        else:
            self._sample(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._pending = None  # an interrupted run stops; it does not sample first

    def _flush(self, trainer, pl_module) -> None:
        if self._pending is not None:
            self._pending = None
            self._sample(trainer, pl_module)

    @rank_zero_only
    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

        from mmbytes.sample import SamplingTimeout

        step = trainer.global_step
        if step == self._last_step:  # the step-based and validation triggers can meet on one step
            return
        self._last_step = step
        if not self.meta:
            self.meta = self._meta(trainer)
        num_bytes = sample_length(self.modality, self.meta, self.num_bytes)
        started = time.monotonic()
        show = getattr(trainer, "progress_bar_callback", None) is not None
        try:
            samples = sample_bytes(pl_module.model, self.num, num_bytes, self.prompt, modality=self.modality,
                                   progress=show, desc=f"samples {self.modality} step {step}",
                                   max_seconds=self.max_seconds, **self.kw)
        except SamplingTimeout as e:
            rank_zero_warn(f"SampleWriter({self.modality}) at step {step}: {e}; no samples written (raise "
                           "max_seconds, or lower num or num_bytes)")
            return
        out = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{step}"
        paths = write_samples(samples, self.modality, self.meta, out)
        self._log_tensorboard(trainer, paths, samples, step)
        rank_zero_info(f"SampleWriter({self.modality}): {len(paths)} samples of {num_bytes:,} bytes at step {step} in "
                       f"{time.monotonic() - started:.1f} s -> {out}")

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


class DataDescription(L.Callback):
    """Stores the description of the training data (``mmbytes.data_description``: modalities, codec and decoding
    options, derived from the shards' manifests) in every checkpoint, as ``checkpoint["data_description"]``, for
    ``mmbytes sample`` and the other readers of a checkpoint. ``mmbytes fit`` adds it to every run."""

    def __init__(self) -> None:
        self.description: dict[str, Any] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from mmbytes.data_description import of_datamodule

        self.description = of_datamodule(trainer.datamodule)  # after prepare_data: the manifests are there

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        from mmbytes.data_description import KEY

        if self.description is not None:
            checkpoint[KEY] = self.description


class FlopBudget(L.Callback):
    def __init__(self, budget: float | None = None, seq_len: int | None = None) -> None:
        """Counts training FLOPs as the model runs them and, with a ``budget``, trains until it is spent
        (compute-matched comparisons, as in the MEGABYTE, SpaceByte and BLT papers: bits per byte against training
        FLOPs).

        FLOPs = the model's ``train_flops(batch)`` summed over every training batch of every process: patches as the
        model cut them, padding to a batch's longest row, tokens for BPE, a frozen entropy model's forward
        (``mmbytes.model.flops`` says what is counted). The total is logged as ``train/flops`` and every validation
        figure is also written to TensorBoard with the FLOPs as its step (``flops/val/bpb``...), so TensorBoard plots
        bits per byte against compute. ``flops_per_byte`` is the model's planned figure at ``seq_len``;
        ``counted_flops_per_byte`` the counted one (a batch counts all its window positions, padding included);
        ``mean_patch`` the real bytes per patch over all of training (None for a model without patches).

        With a budget the trainer's ``max_steps`` is set in ``setup`` (before ``configure_optimizers``, so the
        learning-rate schedule ends where the budget is planned to) to the steps the budget pays for at the planned
        FLOPs per byte, rounded up; ``max_epochs`` is lifted. After every batch the rest is planned again from the
        running mean of the counted FLOPs per step, and training stops at the first step whose total reaches the
        budget.

        Args:
            budget: training FLOPs to spend (None: count only).
            seq_len: bytes per training window; default: the datamodule's ``seq_len``.
        """
        self.budget, self.seq_len = budget, seq_len
        self.flops = 0.0
        self.bytes = 0
        self.batches = 0  # training batches counted (each summed over the processes)
        self.steps_done = 0  # optimizer steps taken when the last batch was counted
        self.real_bytes = 0  # bytes under the mask, for the mean patch size
        self.patches = 0  # patches among them (models with patches)
        self.flops_per_byte = 0.0
        self.steps: int | None = None
        self._trainer: L.Trainer | None = None

    @property
    def counted_flops_per_byte(self) -> float | None:
        return self.flops / self.bytes if self.bytes else None

    @property
    def mean_patch(self) -> float | None:
        return self.real_bytes / self.patches if self.patches else None

    def _window(self, trainer: L.Trainer) -> tuple[int, int]:
        """(seq_len, batch_size) of the training windows."""
        hp = getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule is not None else {}
        seq_len = self.seq_len or hp.get("seq_len")
        if seq_len is None:
            raise ValueError("FlopBudget needs seq_len (give it, or use a datamodule with a seq_len)")
        return int(seq_len), int(hp.get("batch_size", 0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        seq_len, _ = self._window(trainer)
        # callbacks are set up before the module; a model whose FLOPs depend on what it prepares for its data (the
        # BPE baseline's tokenizer, BLT's thresholds, SpaceByte's cap) prepares it now
        getattr(pl_module, "prepare_model", lambda stage: None)(stage)
        self.flops_per_byte = float(pl_module.model.flops_per_byte(seq_len))
        self._trainer = trainer
        self._plan(trainer)

    def _plan(self, trainer: L.Trainer) -> None:
        """``max_steps``: the steps done so far and those the rest of the budget pays for, rounded up; a step's
        FLOPs are the running mean of the counted ones once there are some, else the planned ones."""
        if self.budget is None:
            return
        seq_len, batch_size = self._window(trainer)
        if not batch_size:
            raise ValueError("FlopBudget with a budget needs the datamodule's batch_size to plan the steps")
        if self.batches:
            per_step = self.flops / self.batches * trainer.accumulate_grad_batches
        else:
            per_step = self.flops_per_byte * seq_len * batch_size * trainer.world_size * \
                trainer.accumulate_grad_batches
        left = self.budget * (1 - 1e-9) - self.flops
        self.steps = max(1, self.steps_done + max(0, math.ceil(left / per_step)))
        trainer.fit_loop.epoch_loop.max_steps = self.steps
        trainer.fit_loop.max_epochs = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model, x, mask, modality = pl_module.model, batch["x"], batch.get("mask"), batch.get("modality")
        starts = model.patch_starts(x, mask, modality=modality)
        real = x.numel() if mask is None else int(mask.sum())
        patches = None if starts is None else int((starts if mask is None else starts & mask.bool()).sum())
        n = torch.tensor([model.train_flops(x, mask, modality=modality), x.numel(), real, patches or 0],
                         device=pl_module.device, dtype=torch.float64)
        n = trainer.strategy.reduce(n, reduce_op="sum")  # every process's batch
        self.flops += float(n[0])
        self.bytes += int(n[1])
        self.batches += 1
        self.steps_done = trainer.global_step
        if patches is not None:
            self.real_bytes += int(n[2])
            self.patches += int(n[3])
        pl_module.log("train/flops", self.flops)
        if self.budget is not None:
            if self.flops >= self.budget * (1 - 1e-9):
                trainer.should_stop = True
            elif (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                self._plan(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                for name, value in trainer.callback_metrics.items():
                    if name.startswith("val/"):
                        logger.experiment.add_scalar(f"flops/{name}", float(value), int(self.flops))

    def state_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes": self.bytes, "flops_per_byte": self.flops_per_byte,
                "batches": self.batches, "steps_done": self.steps_done, "real_bytes": self.real_bytes,
                "patches": self.patches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run goes on counting where it stopped and plans the rest of its budget from its own running
        mean (restored before ``configure_optimizers``, so the schedule is planned with it too)."""
        self.flops, self.bytes = float(state["flops"]), int(state["bytes"])
        self.batches, self.steps_done = int(state.get("batches", 0)), int(state.get("steps_done", 0))
        self.real_bytes, self.patches = int(state.get("real_bytes", 0)), int(state.get("patches", 0))
        if state.get("flops_per_byte"):
            self.flops_per_byte = float(state["flops_per_byte"])
        if getattr(self, "_trainer", None) is not None:
            self._plan(self._trainer)
