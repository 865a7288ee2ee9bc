"""Compute-matched study (issue 13): the FLOP budget callback, the BPE baseline, ``mmbytes study``."""

import math
from pathlib import Path

import lightning as L
import pytest

from datamodules import ByteDataModule
from mmbytes.callbacks import FlopBudget
from mmbytes.lit import ByteLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of 48 KiB of real text cut into 2 KiB samples (some go to validation)."""
    from mmbytes.shards import write_shards

    tmp = tmp_path_factory.mktemp("study_data")
    src = tmp / "src"
    src.mkdir()
    (src / "shakespeare.txt").write_bytes((ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()[:48_000])
    write_shards([src], tmp / "shards", codec="text", chunk_bytes=2048, progress=False)
    return tmp / "shards"


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     limit_val_batches=0, **kw)


def test_flop_budget_counts_flops_per_byte_times_bytes_and_ends_the_schedule_there(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, train_batches_per_epoch=3)
    model = ByteLM(size="debug", warmup_steps=1)
    fpb = model.model.flops_per_byte(64)
    budget = fpb * 64 * 2 * 4.5  # pays for 4.5 steps: 5 are run, the last one crosses the budget
    counter = FlopBudget(budget)
    trainer = _trainer(tmp_path, [counter], max_epochs=1)  # the budget lifts max_epochs (3 batches an epoch)
    trainer.fit(model, data)
    assert trainer.global_step == counter.steps == 5
    assert counter.bytes == 5 * 2 * 64
    assert counter.flops == pytest.approx(fpb * counter.bytes, rel=1e-12) and counter.flops >= budget
    assert float(trainer.callback_metrics["train/flops"]) == pytest.approx(counter.flops, rel=1e-6)
    # the learning-rate schedule was planned for those 5 steps: it ends at min_lr_ratio
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.lr_lambdas[0](5) == pytest.approx(model.hparams.min_lr_ratio)
    assert sched.lr_lambdas[0](4) > model.hparams.min_lr_ratio


def test_flop_budget_without_budget_only_counts(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, train_batches_per_epoch=3)
    model = ByteLM(size="transformer-debug")
    counter = FlopBudget()
    _trainer(tmp_path, [counter], max_steps=2).fit(model, data)
    assert counter.flops == pytest.approx(model.model.flops_per_byte(64) * 2 * 2 * 64, rel=1e-12)
    assert math.isfinite(counter.flops)
