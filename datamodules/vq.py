"""The same webdataset shards as the byte model, decoded for the VQ baselines: whole images as (C, H, W) and
fixed-length audio crops as (1, L), floats in [-1, 1].

Shard bytes go back through the codec's layout first: images stored in ``patch`` order become H x W x C pixels,
audio bytes become little-endian int16 samples. Training takes every image whole and random ``crop``-sample windows
of audio (a clip shorter than the crop is zero-padded and masked); validation takes every image and consecutive
crops of every validation clip, so every validation sample is seen exactly once, as in ``ByteDataModule``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds

from datamodules.bytes import ByteDataModule, decode, shard_stream, skip_and_count, take_share, worker_rng
from mmbytes.codecs.image import from_order


def sample_array(data: np.ndarray, meta: dict, where: str = "sample") -> np.ndarray:
    """A shard sample's bytes -> (C, H, W) uint8 pixels for images, (L,) int16 samples for audio."""
    modality = meta.get("modality")
    if modality == "image":
        H, W, C = meta["height"], meta["width"], meta["channels"]
        if len(data) != H * W * C:
            raise ValueError(f"{where}: {len(data)} bytes cannot be a {W}x{H}x{C} image")
        pixels = from_order(np.asarray(data, dtype=np.uint8), H, W, C, meta.get("order", "raster"), meta.get("tile", 1))
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (C, H, W)
    if modality == "audio":
        if meta.get("sample_width", 2) != 2:
            raise ValueError(f"{where}: {meta.get('sample_width')}-byte audio samples; the VQ baselines read 16-bit")
        return np.frombuffer(np.asarray(data, dtype=np.uint8)[: len(data) // 2 * 2].tobytes(), dtype="<i2").copy()
    raise ValueError(f"{where}: modality {modality!r}; the VQ baselines read images and audio")


def of_modality(src: Iterator, modality: str) -> Iterator[tuple[np.ndarray, dict]]:
    """Decoded arrays of one modality; samples of other modalities (from an ``auto`` shard set) are left out."""
    for data, meta in src:
        if meta.get("modality") == modality:
            try:
                array = sample_array(data, meta, meta.get("source", "sample"))
            except (KeyError, TypeError, ValueError) as e:  # a damaged sample: skipped and counted, the run goes on
                skip_and_count(ValueError(f"{meta.get('source', 'sample')}: {e!r}"))
                continue
            yield array, meta


def audio_crops(src: Iterator, crop: int, seed: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(int16 crop, real length). ``seed`` None: consecutive crops covering every sample; else random crops, one
    per ``crop`` samples of the clip."""
    rng = worker_rng(seed, "crops") if seed is not None else None
    for samples, _ in src:
        if rng is None:
            for start in range(0, len(samples), crop):
                yield samples[start : start + crop], len(samples[start : start + crop])
        elif len(samples) <= crop:
            yield samples, len(samples)
        else:
            for _ in range(len(samples) // crop):
                start = rng.randrange(0, len(samples) - crop + 1)
                yield samples[start : start + crop], crop


def stack_images(items: list[tuple[np.ndarray, dict]]) -> dict[str, torch.Tensor]:
    shapes = {a.shape for a, _ in items}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)} in one batch (e.g. {items[0][1].get('source')});"
                         " build the shards with a fixed --image-size")
    x = torch.from_numpy(np.stack([a for a, _ in items]))  # (B, C, H, W) uint8
    return {"x": x.float() / 127.5 - 1}


def stack_audio(items: list[tuple[np.ndarray, int]], crop: int) -> dict[str, torch.Tensor]:
    x = torch.zeros(len(items), 1, crop)
    mask = torch.zeros(len(items), 1, crop, dtype=torch.bool)
    for i, (a, n) in enumerate(items):
        x[i, 0, :n] = torch.from_numpy(a[:n].astype(np.float32)) / 32768.0
        mask[i, 0, :n] = True
    return {"x": x, "mask": mask}


class VQDataModule(ByteDataModule):
    def __init__(
        self,
        data_dir: str = "data/cifar10",
        sources: list[str] | None = None,
        codec: str = "image",
        codec_options: dict[str, Any] | None = None,
        modality: str = "image",
        crop: int = 8000,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        train_batches_per_epoch: int = 200,
        val_fraction: float | dict[str, float] = 0.1,
        train_shards: str | None = None,
        val_shards: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            data_dir: folder with shards and ``manifest.json`` (written by ``mmbytes shards``), the byte model's.
            sources: files and folders to build the shards from when ``data_dir`` has no manifest yet.
            codec: codec for building from ``sources`` (image, audio or auto).
            codec_options: options of that codec, e.g. ``{size: 32, order: patch, tile: 4}``.
            modality: ``image`` or ``audio``: which samples of the shards to read.
            crop: audio samples per training and validation crop (a multiple of the VQ-VAE's downsampling).
            batch_size: images or crops per batch.
            num_workers: data loader worker processes.
            shuffle_buffer: training items shuffled together.
            train_batches_per_epoch: batches per rank in one training epoch (the stream itself is endless).
            val_fraction: share of samples held out for validation when building shards, or one per modality
                (``{audio: 0.2, default: 0.1}``); each sample's split is a hash of its name.
            train_shards: a webdataset URL pattern to read training shards from instead of ``data_dir``.
            val_shards: the same for validation shards.
            seed: seeds shard resampling and crop positions.
        """
        if modality not in ("image", "audio"):
            raise ValueError(f"modality must be 'image' or 'audio', not {modality!r}")
        super().__init__(data_dir=data_dir, sources=sources, codec=codec, codec_options=codec_options,
                         seq_len=crop, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                         train_batches_per_epoch=train_batches_per_epoch, val_fraction=val_fraction,
                         train_shards=train_shards, val_shards=val_shards, seed=seed)
        self.modality, self.crop = modality, crop

    def cut(self, src: Iterator, seed: int | None) -> Iterator:
        """Decoded samples -> whole images, or audio crops (random with a seed, consecutive without)."""
        arrays = of_modality(src, self.modality)
        if self.modality == "image":
            return arrays
        return audio_crops(arrays, self.crop, seed)

    def collation(self):
        return stack_images if self.modality == "image" else partial(stack_audio, crop=self.crop)

    def usable(self, data: np.ndarray, meta: dict) -> bool:
        """of this datamodule's modality"""
        if meta.get("modality") != self.modality:
            return False
        sample_array(data, meta, meta.get("source", "sample"))  # a damaged one raises: skipped and counted
        return True

    def train_dataloader(self):
        """Refused when the manifest lists no training sample of this modality: the stream would skip every sample
        forever without making a batch."""
        if not self.hp.train_shards:
            from pathlib import Path

            from mmbytes.errors import NoDataError
            from mmbytes.shards import read_manifest

            path = Path(self.hp.data_dir) / "manifest.json"
            if path.exists():
                stats = read_manifest(path).get("modalities", {}).get(self.modality, {})
                if not stats.get("train_samples"):
                    raise NoDataError(f"{path}: no {self.modality} sample in the train split; give shards with "
                                      f"{self.modality} samples")
        return super().train_dataloader()

    def val_windows(self) -> wds.DataPipeline:
        urls = self.urls("val")
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            partial(shard_stream, bound=self.bounds["val"]),
            take_share,
            wds.map(decode, handler=skip_and_count),
            partial(self.cut, seed=None),
        )

    def val_dataloader(self) -> wds.WebLoader:
        # each rank and worker batches its own share; steps log without collectives, so unequal counts are harmless
        pipeline = wds.DataPipeline(self.val_windows(),
                                    wds.batched(self.hp.batch_size, collation_fn=self.collation(), partial=True))
        return self._loader(pipeline)
