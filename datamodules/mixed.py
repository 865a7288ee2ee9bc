"""Several shard sets (say images, audio and text) mixed with given weights into one training stream.

``mix: sample`` draws every window from a set chosen by weight, so a batch holds several modalities;
``mix: batch`` draws whole batches from one set, so each batch holds one modality. Validation concatenates the
validation windows of every set, so each modality's bits per byte are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property, partial
from typing import Any, Literal

import lightning as L
import webdataset as wds

from datamodules.bytes import (
    ByteDataModule,
    EpochLoader,
    collate,
    epoch_seed,
    rank_world,
    shuffled,
    trainer_epoch,
    val_batches,
    worker_rng,
)

SET_SEED_STRIDE = 1_000_003
"""Seeds of the sets of one MixedDataModule lie this far apart: set i of seed s draws as no set of a nearby seed."""


def mixed(sources: list, weights: list[float], seed: int) -> Iterator:
    """Draw the next item from source i with probability weights[i] (each source is endless)."""
    rng = worker_rng(seed, "mix")
    iters = [iter(s) for s in sources]
    index = list(range(len(iters)))
    while True:
        yield next(iters[rng.choices(index, weights)[0]])


def chained(sources: list) -> Iterator:
    for s in sources:
        yield from s


class MixedDataModule(L.LightningDataModule):
    def __init__(
        self,
        sets: list[dict[str, Any]],
        weights: list[float] | None = None,
        mix: Literal["sample", "batch"] = "sample",
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        train_batches_per_epoch: int = 200,
        seed: int = 0,
        patch_size: int | None = None,
    ) -> None:
        """
        Args:
            sets: one dict per shard set with the arguments of ``ByteDataModule`` that describe its data
                (``data_dir``, and ``sources``, ``codec``, ``codec_options`` to build it on first use, or
                ``train_shards``/``val_shards`` URLs).
            weights: relative share of each set in training (default: equal).
            mix: ``sample`` mixes sets inside every batch; ``batch`` makes each batch from one set.
            seq_len: bytes per window, shared by all sets.
            batch_size: windows per batch.
            num_workers: data loader worker processes.
            shuffle_buffer: training windows shuffled together.
            train_batches_per_epoch: batches per rank in one training epoch.
            seed: seeds the mixing; set i draws its shards and windows from seed + i * SET_SEED_STRIDE, so no two
                sets draw alike.
            patch_size: the model's patch size P for every set that gives none (``ByteDataModule.patch_size``);
                left out, the ``mmbytes`` CLI sets it from the model.
        """
        super().__init__()
        self.save_hyperparameters()
        weights = weights or [1.0] * len(sets)
        if len(weights) != len(sets):
            raise ValueError(f"{len(weights)} weights for {len(sets)} sets")
        self.weights = weights

    @cached_property
    def children(self) -> list[ByteDataModule]:
        """One ``ByteDataModule`` per set. Made on first use, not in ``__init__``: while LightningCLI instantiates this
        module, every ``save_hyperparameters`` call inside it would record this module's arguments, not the set's."""
        hp = self.hparams
        shared = {"seq_len": hp.seq_len, "batch_size": hp.batch_size, "shuffle_buffer": hp.shuffle_buffer}
        return [ByteDataModule(**{"patch_size": hp.get("patch_size"), **s, **shared,
                                  "seed": hp.seed + i * SET_SEED_STRIDE}) for i, s in enumerate(hp.sets)]

    def prepare_data(self) -> None:
        for child in self.children:
            child.prepare_data()

    def _loader(self, pipeline) -> wds.WebLoader:
        n = self.hparams.num_workers
        return wds.WebLoader(pipeline, batch_size=None, num_workers=n, persistent_workers=n > 0)

    def train_pipeline(self, epoch: int = 0) -> wds.DataPipeline:
        """The endless stream of training batches of one epoch, fixed by the seed and the epoch."""
        hp = self.hparams
        seed = epoch_seed(hp.seed, epoch)
        batch = wds.batched(hp.batch_size, collation_fn=collate(hp.seq_len), partial=False)
        shuffle = partial(shuffled, size=hp.shuffle_buffer, seed=seed)
        if hp.mix == "sample":
            streams = [c.train_windows(epoch) for c in self.children]
            return wds.DataPipeline(partial(mixed, streams, self.weights, seed), shuffle, batch)
        streams = [wds.DataPipeline(c.train_windows(epoch), shuffle, batch) for c in self.children]
        return wds.DataPipeline(partial(mixed, streams, self.weights, seed))

    def train_dataloader(self) -> EpochLoader:
        return EpochLoader(self.train_pipeline, self.hparams.train_batches_per_epoch, self.hparams.num_workers,
                           epoch_of=partial(trainer_epoch, self))

    def val_dataloader(self) -> wds.WebLoader:
        hp = self.hparams
        streams = [c.val_windows() for c in self.children]
        share = partial(val_batches, seq_len=hp.seq_len, batch_size=hp.batch_size, **rank_world(self))
        return self._loader(wds.DataPipeline(partial(chained, streams), share))

    def test_dataloader(self) -> wds.WebLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> wds.WebLoader:
        return self.val_dataloader()
