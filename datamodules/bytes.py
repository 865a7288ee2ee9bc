"""Webdataset shards -> fixed-length byte windows, for training and exact validation.

Training streams shards resampled with replacement (every rank and worker draws its own, seeded), cuts random
windows, shuffles them in a buffer and yields exactly ``train_batches_per_epoch`` batches per rank and epoch, which
keeps DDP ranks in step. Every random choice is seeded by (seed, epoch, rank, worker), so each epoch is a stream of
its own, and the training loader (``EpochLoader``) keeps its place in Lightning checkpoints: a run resumed mid-epoch
sees the same batches as one that was never interrupted, and replays only the current epoch's batches. Validation
reads every validation shard in order in every worker, cuts consecutive windows and keeps window i on the worker
whose global index is i modulo (world size x workers), so every validation byte is scored exactly once whatever the
number of shards, workers and processes. Every rank runs the same number of validation batches (ranks that run out
first add fully masked one-window batches that count zero bytes), so collectives inside a step (FSDP's parameter
gathers, ``sync_dist`` logging) cannot hang.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from datamodules.reader import (
    MAX_SAMPLE_BYTES,
    ShardReadError,
    check_meta,
    count_samples,
    manifest_shards,
    pattern_shards,
    tar_samples,
)
from mmbytes.codecs import MODALITIES
from mmbytes.errors import NoDataError

log = logging.getLogger(__name__)
skipped = {"errors": 0}  # damaged shard members this process skipped (per process: each worker counts its own)
_reported: set[str] = set()


def skip_and_count(exn: Exception) -> bool:
    """A webdataset handler: a damaged shard or member is skipped, counted and reported; training goes on."""
    skipped["errors"] += 1
    kind = re.sub(r"sample \S+ in", "sample * in", repr(exn))
    if kind not in _reported:  # resampling draws a damaged shard again and again: warn once per error and shard
        _reported.add(kind)
        log.warning("skipping damaged shard data (%d so far in this process): %r", skipped["errors"], exn)
    return True


def decode(sample: dict) -> tuple[np.ndarray, dict]:
    """A tar sample -> (bytes as uint8, metadata checked by ``reader.check_meta``), or a ``ValueError`` naming the
    sample and its shard (the callers' handlers skip and count it)."""
    where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
    if not isinstance(sample.get("bin"), bytes) or not isinstance(sample.get("json"), bytes):
        raise ShardReadError(f"{where} lacks its bin or json member")
    try:
        meta = check_meta(json.loads(sample["json"]), len(sample["bin"]))
    except ValueError as e:  # not JSON, not UTF-8, or a field of the wrong shape
        raise ShardReadError(f"{where}: {e}") from None
    return np.frombuffer(sample["bin"], dtype=np.uint8), meta


def readable_samples(src: Iterator[dict], urls: list[str], split: str = "train",
                     usable: Callable[[np.ndarray, dict], bool] | None = None,
                     rotate: str | None = None, bound: int = MAX_SAMPLE_BYTES) -> Iterator[tuple[np.ndarray, dict]]:
    """Shards (``{"url": ...}`` items, drawn again and again when resampled) -> decoded samples. Damaged data is
    skipped and counted as before; but once every shard has been tried and none gave a single readable sample, the
    stream stops with a ``NoDataError`` naming each shard and its first error (a resampled stream would otherwise
    spin forever without yielding a batch). ``usable(data, meta)``, when given, leaves out samples this stream cannot
    use (False: another modality; an exception: damaged, counted); a shard of only such samples counts as unreadable.
    ``rotate`` (a seed): the first shard is read from a random sample on, then from its start up to that sample, so
    a stream that starts anew every epoch still reads every part of a shard equally often (the cost: one extra read
    of the skipped part of one shard per epoch and worker, and for a shard that is not a local file one read to
    count its samples). ``bound``: the most bytes one sample may have (``reader.tar_samples``)."""
    every, good, bad = set(urls), set(), {}
    for index, shard in enumerate(src):
        url, errors = shard["url"], []

        def handler(exn: Exception, errors=errors) -> bool:
            errors.append(exn)
            return skip_and_count(exn)

        n = 0
        for sample in _shard_samples(shard, handler, rotate if index == 0 else None, bound):
            try:
                item = decode(sample)
                if usable is not None and not usable(*item):
                    errors.append(f"no usable sample ({usable.__doc__ or 'left out'})")
                    continue
            except Exception as exn:
                handler(exn)
                continue
            n += 1
            yield item
        if n:
            good.add(url)
            bad.pop(url, None)
        elif url not in good:
            bad[url] = errors[0] if errors else "no samples"
            if not good and every <= bad.keys():
                reasons = "; ".join(f"{u}: {_reason(e)}" for u, e in sorted(bad.items()))
                raise NoDataError(f"no readable {split} sample in any of the {len(every)} {split} shards ({reasons}); "
                                  "rebuild them with `mmbytes shards`")


def _shard_samples(shard: dict, handler: Callable, rotate: str | None,
                   bound: int = MAX_SAMPLE_BYTES) -> Iterator[dict]:
    """The samples of one shard, in order, or rotated to start at a random sample (see ``readable_samples``)."""
    url = shard["url"]
    if rotate is None:
        yield from tar_samples(url, handler, bound)
        return
    n = count_samples(url, handler, bound)
    k = worker_rng(rotate, "rotate").randrange(n) if n else 0
    for i, sample in enumerate(tar_samples(url, handler, bound)):
        if i >= k:
            yield sample
    for i, sample in enumerate(tar_samples(url, handler, bound)):
        if i >= k:
            break
        yield sample


def shard_stream(src: Iterator[dict], bound: int = MAX_SAMPLE_BYTES,
                 handler: Callable = skip_and_count) -> Iterator[dict]:
    """A pipeline stage: shards (``{"url": ...}``) -> their tar samples, through the one reader."""
    for shard in src:
        yield from tar_samples(shard["url"], handler, bound)


def rotated_shards(src: Iterator[dict], seed: int | str, handler: Callable = skip_and_count) -> Iterator[dict]:
    """Samples of the shards ``src`` names (dicts with a ``url``), the first shard rotated to start at a random
    sample (see ``readable_samples``), the rest whole."""
    for index, shard in enumerate(src):
        yield from _shard_samples(shard, handler, str(seed) if index == 0 else None)


def _reason(exn: Exception | str) -> str:
    if isinstance(exn, str):
        return exn
    args = [a for a in exn.args if isinstance(a, str)]
    text = args[0] if args else str(exn)
    return f"{type(exn).__name__}: {text}".splitlines()[0]


def align_of(meta: dict, patch: int = 1) -> int:
    """Window starts fall on whole units: 2-byte audio samples; whole image tiles (patch order) or pixels (raster),
    and for images also whole model patches of ``patch`` bytes, so tiles line up with patches in every window;
    single bytes for text and raw files."""
    if meta.get("modality") == "audio":
        return meta.get("sample_width", 1)
    if meta.get("modality") == "image":
        c = meta.get("channels", 1)
        unit = meta.get("tile", 1) ** 2 * c if meta.get("order") == "patch" else c
        return math.lcm(unit, patch)
    return 1


def worker_rng(seed: int | str, stage: str) -> random.Random:
    """A generator of its own for every rank, worker and pipeline stage: reproducible runs, decorrelated workers."""
    rank, _, worker, _ = pytorch_worker_info()
    return random.Random(f"{seed}/{rank}/{worker}/{stage}")


class EpochLoader:
    """The training loader: epoch e is ``batches`` batches of a stream of its own, ``make(e)``, fixed by the seed and
    the epoch. Resumable mid-epoch: Lightning calls ``sampler.set_epoch`` at each epoch start and stores
    ``state_dict()`` (epoch, batches consumed) in its checkpoints; after ``load_state_dict`` the epoch's stream is drawn
    again up to that place and the batches before it are dropped, so a resume replays at most one epoch, however long
    the run (with ``pipe:`` or ``https://`` shards it re-reads only what this epoch read). Each epoch starts its
    workers afresh; within a worker, each epoch starts at a random sample of its first shard (``rotated_shards``), so
    epochs shorter than a shard do not all read the same start of it.

    ``epoch_of()``, when given and not None, is the trainer's own epoch count and decides the stream over
    ``set_epoch``: resumed from a checkpoint written at the end of an epoch (ModelCheckpoint after the epoch's
    validation), Lightning's fit loop first iterates the finished epoch once more (its first batch is fetched and
    dropped) and from then on numbers the samplers' epochs one ahead of ``current_epoch``; the stream follows
    ``current_epoch``, as in a run that was never interrupted (the finished epoch's iteration then yields nothing)."""

    def __init__(self, make: Callable[[int], Iterable], batches: int, num_workers: int = 0,
                 epoch_of: Callable[[], int | None] | None = None) -> None:
        self.make, self.batches, self.num_workers, self.epoch_of = make, batches, num_workers, epoch_of
        self.epoch = self.consumed = 0
        self.replayed = 0  # batches drawn again and dropped when this epoch was resumed
        self._resume: dict[str, int] | None = None
        self.sampler = self  # where Lightning's fit loop looks for ``set_epoch``

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a generator: nothing runs until the first batch is asked for, after Lightning has set the epoch and state
        current = self.epoch_of() if self.epoch_of is not None else None
        if current is not None:
            self.epoch = current
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume and resume["epoch"] == self.epoch else 0
        share_temp_dir(self.num_workers)
        stream = iter(wds.WebLoader(self.make(self.epoch), batch_size=None, num_workers=self.num_workers))
        for _ in range(skip):  # a resumed epoch draws the batches trained on before, and drops them
            next(stream)
        self.replayed = skip
        self.consumed = skip
        while self.consumed < self.batches:
            batch = next(stream)
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self._resume = {"epoch": state["epoch"], "batches": state["batches"]}


def trainer_epoch(module: L.LightningDataModule) -> int | None:
    """The attached trainer's ``current_epoch`` (None without a trainer): what the training stream follows."""
    return None if module.trainer is None else module.trainer.current_epoch


def share_temp_dir(workers: int) -> None:
    """Give this process its multiprocessing temp folder before workers fork: they then use it instead of each making
    a ``/tmp/pymp-*`` of its own, which stays behind when Lightning stops them; this one is removed at exit."""
    if workers > 0:
        import multiprocessing.util

        multiprocessing.util.get_temp_dir()


def epoch_seed(seed: int, epoch: int) -> str:
    """The seed of one epoch's stream (``worker_rng`` adds rank, worker and stage to it)."""
    return f"{seed}/epoch{epoch}"


def shard_samples(url: str, handler: Callable = skip_and_count) -> int:
    """Samples in one tar shard, counted from its member headers."""
    return count_samples(url, handler)


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


def random_windows(src: Iterator, seq_len: int, seed: int, patch: int = 1,
                   interleave: int = 16) -> Iterator[tuple[np.ndarray, int]]:
    """Random windows at aligned starts (``align_of``), ``len // seq_len`` of them per sample (a sample that fits is
    one whole window). ``interleave`` samples are open at a time and each window comes from one of them chosen at
    random, so the windows of a long sample (raw files up to 256 MiB and audio are never chunked) are spread over
    the stream instead of arriving back to back and filling the shuffle buffer: while open, a sample makes about
    1/interleave of the windows."""
    rng = worker_rng(seed, "windows")
    src = iter(src)
    open_: list[list] = []  # [data, modality id, alignment, windows left]
    more = True
    while True:
        while more and len(open_) < interleave:
            try:
                data, meta = next(src)
            except StopIteration:
                more = False
                break
            m = MODALITIES.index(meta.get("modality", "raw"))
            open_.append([data, m, align_of(meta, patch), max(1, len(data) // seq_len)])
        if not open_:
            return
        i = rng.randrange(len(open_))
        data, m, a, left = open_[i]
        if len(data) <= seq_len:
            yield data, m
        else:
            start = rng.randrange(0, (len(data) - seq_len) // a + 1) * a
            yield data[start : start + seq_len], m
        if left == 1:
            open_[i] = open_[-1]
            open_.pop()
        else:
            open_[i][3] = left - 1


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


def check_loader_options(seq_len: int, batch_size: int, num_workers: int, shuffle_buffer: int,
                         train_batches_per_epoch: int, val_fraction: float | dict[str, float],
                         patch_size: int = 1, interleave: int = 1) -> None:
    """Refuse values that would fail on the first batch, or never make one (a batch of 0 windows)."""
    from mmbytes.errors import OptionError

    for name, value, least in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                               ("shuffle_buffer", shuffle_buffer, 0),
                               ("train_batches_per_epoch", train_batches_per_epoch, 1), ("patch_size", patch_size, 1),
                               ("interleave", interleave, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise OptionError(f"data.{name} must be a whole number of at least {least}, not {value!r}")
    fractions = val_fraction if isinstance(val_fraction, dict) else {"default": val_fraction}
    for name, v in fractions.items():  # one modality may go to validation whole (1), the default may not
        number = not isinstance(v, bool) and isinstance(v, int | float)
        if name == "default" and not (number and 0 <= v < 1):
            raise OptionError(f"data.val_fraction must be at least 0 and less than 1, not {v!r}")
        if name != "default" and not (number and 0 <= v <= 1):
            raise OptionError(f"data.val_fraction of {name} must be between 0 and 1, not {v!r}")


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
        val_fraction: float | dict[str, float] = 0.1,
        split: str = "auto",
        val_sources: list[str] | None = None,
        train_shards: str | None = None,
        val_shards: str | None = None,
        seed: int = 0,
        patch_size: int | None = None,
        interleave: int = 16,
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
            val_fraction: share held out for validation when building shards, or one per modality
                (``{audio: 0.2, default: 0.1}``).
            split: how shards are split when built (``mmbytes shards --split``): ``auto`` (whole files by a hash of
                their content; a modality's only file by its last ``val_fraction`` of bytes), ``files`` or
                ``contiguous`` (every file of several samples split at its tail).
            val_sources: files and folders that are the validation split, whole (an official test set); the
                modalities they hold take no validation from ``sources``.
            train_shards: a webdataset URL pattern (local path, ``https://``, ``pipe:aws s3 cp ...``, brace
                ranges) to read training shards from instead of ``data_dir``.
            val_shards: the same for validation shards.
            seed: seeds shard resampling and window positions (each rank and worker differs from it).
            patch_size: the model's patch size P: image training windows start on whole tiles and whole patches
                (a multiple of both), so tiles line up with the model's patches in every window. Left out, the
                ``mmbytes`` CLI sets it from the model (its config's ``window_alignment``: P for fixed patches, 1 for
                patches that follow the content); 1 outside the CLI. Give each recipe tiles whose bytes are a
                multiple or a divisor of P.
            interleave: samples open at once when cutting training windows; each window comes from one of them
                at random, so one long file cannot dominate consecutive batches (memory: this many samples).
        """
        super().__init__()
        self.save_hyperparameters()
        self.hp = self.hparams
        check_loader_options(seq_len, batch_size, num_workers, shuffle_buffer, train_batches_per_epoch, val_fraction,
                             1 if patch_size is None else patch_size, interleave)
        if split not in ("auto", "files", "contiguous"):
            from mmbytes.errors import OptionError

            raise OptionError(f"data.split must be auto, files or contiguous, got {split!r}")

    def prepare_data(self) -> None:
        """Build the shards from ``sources`` when ``data_dir`` has none. Shards already there are compared with the
        recipe (codec, codec options, validation fraction, sources): shards this module built itself are rebuilt when
        the recipe changed; others are refused with one line naming the field that differs."""
        if not self.hp.sources or self.hp.train_shards:
            return
        from mmbytes import data_description
        from mmbytes.shards import write_shards

        manifest = data_description.read_manifest_file(self.hp.data_dir)
        if manifest is not None:
            differ = data_description.recipe_difference(manifest, dict(self.hp))
            if not differ:
                return
            field, theirs, ours = differ[0]
            if manifest.get(data_description.BUILT_BY) != "datamodule":
                from mmbytes.errors import OptionError

                raise OptionError(f"{Path(self.hp.data_dir) / 'manifest.json'}: shards built with {field} {theirs!r}, "
                                  f"the recipe asks for {ours!r}; give another data.data_dir, or rebuild them with "
                                  "`mmbytes shards` (these were not built by the datamodule, so it leaves them)")
            log.warning("%s: the recipe's %s changed (%r, was %r); rebuilding the shards it built", self.hp.data_dir,
                        ", ".join(d[0] for d in differ), ours, theirs)
        write_shards(self.hp.sources, self.hp.data_dir, self.hp.codec, self.hp.codec_options, self.hp.val_fraction,
                     val_sources=self.hp.get("val_sources"), split=self.hp.get("split", "auto"))
        data_description.mark_built_by(self.hp.data_dir, "datamodule")

    def urls(self, split: str) -> list[str]:
        """The ``split`` shards to read (``reader.manifest_shards`` or ``reader.pattern_shards``); the most bytes
        one sample may have is kept in ``self.bounds[split]``."""
        explicit = self.hp.train_shards if split == "train" else self.hp.val_shards
        self.bounds = getattr(self, "bounds", {})
        if explicit:
            self.bounds[split] = MAX_SAMPLE_BYTES
            return pattern_shards(explicit, f"data.{split}_shards")
        from mmbytes.shards import read_manifest

        manifest_path = Path(self.hp.data_dir) / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: no shards; run `mmbytes shards SRC --out {self.hp.data_dir}` "
                                    "or give data.sources")
        paths, self.bounds[split] = manifest_shards(read_manifest(manifest_path), manifest_path, split)
        return paths

    def samples(self, split: str) -> Iterator[tuple[np.ndarray, dict]]:
        """Every readable sample of ``split`` once, in shard order, as (bytes as uint8, checked metadata); damaged
        shards and samples are skipped and counted."""
        urls = self.urls(split)
        for url in urls:
            for sample in tar_samples(url, skip_and_count, self.bounds[split]):
                try:
                    yield decode(sample)
                except ValueError as exn:
                    skip_and_count(exn)

    def _loader(self, pipeline: wds.DataPipeline) -> wds.WebLoader:
        n = self.hp.num_workers
        share_temp_dir(n)
        return wds.WebLoader(pipeline, batch_size=None, num_workers=n, persistent_workers=n > 0)

    usable = None  # every decoded sample is a training item here; subclasses that keep only some say which

    def cut(self, src: Iterator, seed: int | None) -> Iterator:
        """Decoded samples -> training items: random windows with a seed, consecutive ones (validation) without."""
        if seed is None:
            return consecutive_windows(src, self.hp.seq_len)
        return random_windows(src, self.hp.seq_len, seed, self.hp.get("patch_size") or 1, self.hp.get("interleave", 16))

    def collation(self) -> Callable[[list], dict[str, torch.Tensor]]:
        return collate(self.hp.seq_len)

    def train_windows(self, epoch: int = 0) -> wds.DataPipeline:
        """The endless stream of training items (here (window, modality id)) of one epoch for this rank and worker,
        before shuffling."""
        seed = epoch_seed(self.hp.seed, epoch)
        urls = self.urls("train")
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=wds.utils.make_seed(self.hp.seed, epoch), deterministic=True),
            partial(readable_samples, urls=urls, usable=self.usable, rotate=seed, bound=self.bounds["train"]),
            partial(self.cut, seed=seed),
        )

    def val_windows(self) -> wds.DataPipeline:
        """Every consecutive validation window in order, as (window, modality id); ``val_batches`` shares them out."""
        urls = self.urls("val")
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            partial(readable_samples, urls=urls, split="val", bound=self.bounds["val"]),
            partial(self.cut, seed=None),
        )

    def train_samples(self) -> Iterator[bytes]:
        """Every training sample's bytes once, in shard order (to train a tokenizer on the training split)."""
        for data, _ in self.samples("train"):
            yield data.tobytes()

    def train_pipeline(self, epoch: int = 0) -> wds.DataPipeline:
        hp = self.hp
        return wds.DataPipeline(
            self.train_windows(epoch),
            partial(shuffled, size=hp.shuffle_buffer, seed=epoch_seed(hp.seed, epoch)),
            wds.batched(hp.batch_size, collation_fn=self.collation(), partial=False),
        )

    def train_dataloader(self) -> EpochLoader:
        self.urls("train")  # missing shards fail here, not at the first batch
        return EpochLoader(self.train_pipeline, self.hp.train_batches_per_epoch, self.hp.num_workers,
                           epoch_of=partial(trainer_epoch, self))

    def val_dataloader(self) -> wds.WebLoader:
        share = partial(val_batches, seq_len=self.hp.seq_len, batch_size=self.hp.batch_size, **rank_world(self))
        return self._loader(wds.DataPipeline(self.val_windows(), share))

    def test_dataloader(self) -> wds.WebLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> wds.WebLoader:
        return self.val_dataloader()
