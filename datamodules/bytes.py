"""Webdataset shards -> fixed-length byte windows, for training and exact validation.

Training streams shards resampled with replacement (every rank and worker draws its own, seeded), cuts random
windows, shuffles them in a buffer and yields exactly ``train_batches_per_epoch`` batches per rank and epoch, which
keeps DDP ranks in step. Every random choice is seeded by (seed, rank, worker), and the training loader
(``EpochLoader``) keeps its place in Lightning checkpoints, so a run resumed mid-epoch sees the same batches as one
that was never interrupted. Validation reads every validation shard in order in every worker, cuts consecutive
windows and keeps window i on the worker whose global index is i modulo (world size x workers), so every validation
byte is scored exactly once whatever the number of shards, workers and processes. Every rank runs the same number of
validation batches (ranks that run out first add fully masked one-window batches that count zero bytes), so
collectives inside a step (FSDP's parameter gathers, ``sync_dist`` logging) cannot hang.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from mmbytes.codecs import MODALITIES

log = logging.getLogger(__name__)
skipped = {"errors": 0}  # damaged shard members this process skipped (per process: each worker counts its own)
_reported: set[str] = set()


def skip_and_count(exn: Exception) -> bool:
    """A webdataset handler: a damaged shard or member is skipped, counted and reported; training goes on."""
    skipped["errors"] += 1
    if repr(exn) not in _reported:  # resampling draws a damaged shard again and again: warn once per error
        _reported.add(repr(exn))
        log.warning("skipping damaged shard data (%d so far in this process): %r", skipped["errors"], exn)
    return True


def decode(sample: dict) -> tuple[np.ndarray, dict]:
    if "bin" not in sample or "json" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks its bin or json member")
    meta = json.loads(sample["json"])
    if len(sample["bin"]) != meta.get("nbytes", len(sample["bin"])):  # a member cut short in a damaged tar
        raise ValueError(f"sample {sample['__key__']} in {sample.get('__url__')}: {len(sample['bin'])} bytes, "
                         f"{meta['nbytes']} expected")
    return np.frombuffer(sample["bin"], dtype=np.uint8), meta


def align_of(meta: dict) -> int:
    """Window starts fall on whole units: 2-byte audio samples, else single bytes."""
    return meta.get("sample_width", 1) if meta.get("modality") == "audio" else 1


def worker_rng(seed: int | str, stage: str) -> random.Random:
    """A generator of its own for every rank, worker and pipeline stage: reproducible runs, decorrelated workers."""
    rank, _, worker, _ = pytorch_worker_info()
    return random.Random(f"{seed}/{rank}/{worker}/{stage}")


class EpochLoader:
    """The training loader: one endless stream, fixed by the seed, cut into epochs of ``batches`` batches; epoch e is
    batches [e * batches, (e + 1) * batches) of it, so every epoch goes on where the last one stopped (an epoch that
    restarted the stream would see only the start of each shard). Resumable mid-epoch: Lightning calls
    ``sampler.set_epoch`` at each epoch start and stores ``state_dict()`` (epoch, batches consumed) in its checkpoints;
    after ``load_state_dict`` a fresh stream is drawn up to that place and the batches before it are dropped (reading
    runs hundreds of times faster than training, see bench/data_throughput.py, so this takes a small fraction of the
    time already trained). The stream's workers stay alive from one epoch to the next."""

    def __init__(self, make: Callable[[], Iterable], batches: int, num_workers: int = 0) -> None:
        self.make, self.batches, self.num_workers = make, batches, num_workers
        self.epoch = self.consumed = 0
        self._resume: dict[str, int] | None = None
        self._stream: Iterator | None = None
        self._drawn = 0  # batches drawn from the live stream so far
        self.sampler = self  # where Lightning's fit loop looks for ``set_epoch``

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a generator: nothing runs until the first batch is asked for, after Lightning has set the epoch and state
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume and resume["epoch"] == self.epoch else 0
        place = self.epoch * self.batches + skip
        if self._stream is None or self._drawn > place:
            loader = wds.WebLoader(self.make(), batch_size=None, num_workers=self.num_workers)
            self._stream, self._drawn = iter(loader), 0
        for _ in range(place - self._drawn):  # a resumed run draws the batches trained on before, and drops them
            next(self._stream)
        self._drawn = place
        self.consumed = skip
        while self.consumed < self.batches:
            batch = next(self._stream)
            self._drawn += 1
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self._resume = {"epoch": state["epoch"], "batches": state["batches"]}


def shuffled(src: Iterator, size: int, seed: int) -> Iterator:
    """Buffer shuffle: keep ``size`` items and emit a random one as each new item arrives."""
    rng, buf = worker_rng(seed, "shuffle"), []
    for item in src:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def random_windows(src: Iterator, seq_len: int, seed: int) -> Iterator[tuple[np.ndarray, int]]:
    rng = worker_rng(seed, "windows")
    for data, meta in src:
        m = MODALITIES.index(meta.get("modality", "raw"))
        if len(data) <= seq_len:
            yield data, m
            continue
        a = align_of(meta)
        for _ in range(len(data) // seq_len):
            start = rng.randrange(0, (len(data) - seq_len) // a + 1) * a
            yield data[start : start + seq_len], m


def consecutive_windows(src: Iterator, seq_len: int) -> Iterator[tuple[np.ndarray, int]]:
    for data, meta in src:
        m = MODALITIES.index(meta.get("modality", "raw"))
        for start in range(0, len(data), seq_len):
            yield data[start : start + seq_len], m


def take_share(src: Iterator) -> Iterator:
    """Keep the samples that belong to this rank and worker: the i-th goes to worker i mod (world * workers)."""
    rank, world, worker, workers = pytorch_worker_info()
    me, every = rank * workers + worker, world * workers
    for i, sample in enumerate(src):
        if i % every == me:
            yield sample


def rank_batches(windows: int, batch_size: int, rank: int, world: int, workers: int) -> int:
    """Validation batches that ``rank`` makes from its share of ``windows`` (window i goes to worker i mod
    (world * workers) and each worker batches its own)."""
    every = world * workers
    return sum(-(-len(range(rank * workers + w, windows, every)) // batch_size) for w in range(workers))


def val_batches(src: Iterator[tuple[np.ndarray, int]], seq_len: int, batch_size: int, rank: int | None = None,
                world: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This rank and worker's batches of all validation windows ``src`` (the same stream in every worker): window i
    goes to worker i mod (world * workers). Every worker reads every window, so at the end each knows the total and
    worker 0 pads its rank with fully masked batches up to the batch count of the busiest rank."""
    env_rank, env_world, worker, workers = pytorch_worker_info()
    rank, world = env_rank if rank is None else rank, env_world if world is None else world
    me, every = rank * workers + worker, world * workers
    batch, n = [], 0
    for n, window in enumerate(src, 1):
        if (n - 1) % every == me:
            batch.append(window)
            if len(batch) == batch_size:
                yield stack(batch, seq_len)
                batch = []
    if batch:
        yield stack(batch, seq_len)
    if worker == 0:
        busiest = max(rank_batches(n, batch_size, r, world, workers) for r in range(world))
        for _ in range(busiest - rank_batches(n, batch_size, rank, world, workers)):
            yield stack([(np.zeros(0, dtype=np.uint8), 0)], seq_len)  # one window, no real byte


def stack(items: list[tuple[np.ndarray, int]], seq_len: int) -> dict[str, torch.Tensor]:
    """Windows -> ``{"x": uint8 (B, T), "mask": bool (B, T), "modality": long (B,)}``, zero-padded and masked."""
    x = torch.zeros(len(items), seq_len, dtype=torch.uint8)
    mask = torch.zeros(len(items), seq_len, dtype=torch.bool)
    for i, (data, _) in enumerate(items):
        x[i, : len(data)] = torch.from_numpy(data.copy())
        mask[i, : len(data)] = True
    return {"x": x, "mask": mask, "modality": torch.tensor([m for _, m in items], dtype=torch.long)}


def rank_world(datamodule: L.LightningDataModule) -> dict[str, int]:
    """The attached trainer's rank and world size (taken in the main process, so workers need no environment
    variables or process group); without a trainer, ``val_batches`` reads them from the environment."""
    trainer = datamodule.trainer
    return {} if trainer is None else {"rank": trainer.global_rank, "world": trainer.world_size}


def collate(seq_len: int):
    return partial(stack, seq_len=seq_len)


class ByteDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data/quickstart",
        sources: list[str] | None = None,
        codec: str = "raw",
        codec_options: dict[str, Any] | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        train_batches_per_epoch: int = 200,
        val_fraction: float = 0.1,
        train_shards: str | None = None,
        val_shards: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            data_dir: folder with shards and ``manifest.json`` (written by ``mmbytes shards``).
            sources: files and folders to build the shards from when ``data_dir`` has no manifest yet.
            codec: codec for building from ``sources``: text, raw, image, audio or auto.
            codec_options: options of that codec (e.g. ``{image: {size: 32}, audio: {sample_rate: 8000}}`` for auto).
            seq_len: bytes per window (T). Shorter samples are padded and the padding is masked out of the loss.
            batch_size: windows per batch.
            num_workers: data loader worker processes.
            shuffle_buffer: training windows shuffled together.
            train_batches_per_epoch: batches per rank in one training epoch (the stream itself is endless).
            val_fraction: share of samples held out for validation when building shards.
            train_shards: a webdataset URL pattern (local path, ``https://``, ``pipe:aws s3 cp ...``, brace
                ranges) to read training shards from instead of ``data_dir``.
            val_shards: the same for validation shards.
            seed: seeds shard resampling and window positions (each rank and worker differs from it).
        """
        super().__init__()
        self.save_hyperparameters()
        self.hp = self.hparams

    def prepare_data(self) -> None:
        if self.hp.sources and not self.hp.train_shards and not (Path(self.hp.data_dir) / "manifest.json").exists():
            from mmbytes.shards import write_shards

            write_shards(self.hp.sources, self.hp.data_dir, self.hp.codec, self.hp.codec_options,
                         self.hp.val_fraction)

    def urls(self, split: str) -> str | list[str]:
        explicit = self.hp.train_shards if split == "train" else self.hp.val_shards
        if explicit:
            return explicit
        manifest_path = Path(self.hp.data_dir) / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: no shards; run `mmbytes shards SRC --out {self.hp.data_dir}` "
                                    "or give data.sources")
        names = json.loads(manifest_path.read_text())["splits"][split]["shards"]
        if not names:
            raise ValueError(f"{manifest_path}: the {split} split has no shards")
        for n in names:  # a manifest names files inside its own folder, nothing else
            if Path(n).name != n or n in (".", ".."):
                raise ValueError(f"{manifest_path}: shard {n!r} is not a file name inside {self.hp.data_dir}")
        return [str(Path(self.hp.data_dir) / n) for n in names]

    def _loader(self, pipeline: wds.DataPipeline) -> wds.WebLoader:
        n = self.hp.num_workers
        return wds.WebLoader(pipeline, batch_size=None, num_workers=n, persistent_workers=n > 0)

    def cut(self, src: Iterator, seed: int | None) -> Iterator:
        """Decoded samples -> training items: random windows with a seed, consecutive ones (validation) without."""
        if seed is None:
            return consecutive_windows(src, self.hp.seq_len)
        return random_windows(src, self.hp.seq_len, seed)

    def collation(self) -> Callable[[list], dict[str, torch.Tensor]]:
        return collate(self.hp.seq_len)

    def train_windows(self) -> wds.DataPipeline:
        """The endless stream of training items (here (window, modality id)) for this rank and worker, before
        shuffling."""
        return wds.DataPipeline(
            wds.ResampledShards(self.urls("train"), seed=self.hp.seed, deterministic=True),
            wds.tarfile_to_samples(handler=skip_and_count),
            wds.map(decode, handler=skip_and_count),
            partial(self.cut, seed=self.hp.seed),
        )

    def val_windows(self) -> wds.DataPipeline:
        """Every consecutive validation window in order, as (window, modality id); ``val_batches`` shares them out."""
        return wds.DataPipeline(
            wds.SimpleShardList(self.urls("val")),
            wds.tarfile_to_samples(handler=skip_and_count),
            wds.map(decode, handler=skip_and_count),
            partial(self.cut, seed=None),
        )

    def train_samples(self) -> Iterator[bytes]:
        """Every training sample's bytes once, in shard order (to train a tokenizer on the training split)."""
        pipeline = wds.DataPipeline(wds.SimpleShardList(self.urls("train")),
                                    wds.tarfile_to_samples(handler=skip_and_count),
                                    wds.map(decode, handler=skip_and_count))
        for data, _ in pipeline:
            yield data.tobytes()

    def train_pipeline(self) -> wds.DataPipeline:
        hp = self.hp
        return wds.DataPipeline(
            self.train_windows(),
            partial(shuffled, size=hp.shuffle_buffer, seed=hp.seed),
            wds.batched(hp.batch_size, collation_fn=self.collation(), partial=False),
        )

    def train_dataloader(self) -> EpochLoader:
        self.urls("train")  # missing shards fail here, not at the first batch
        return EpochLoader(self.train_pipeline, self.hp.train_batches_per_epoch, self.hp.num_workers)

    def val_dataloader(self) -> wds.WebLoader:
        share = partial(val_batches, seq_len=self.hp.seq_len, batch_size=self.hp.batch_size, **rank_world(self))
        return self._loader(wds.DataPipeline(self.val_windows(), share))

    def test_dataloader(self) -> wds.WebLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> wds.WebLoader:
        return self.val_dataloader()
