"""A few training steps and a validation of the ``debug`` model on 2 CPU processes (gloo), for
tests/test_distributed.py; run as a script so the test process never joins a process group.

    python tests/ddp_script.py --shards DIR --out DIR --strategy ddp --workers 2

Each rank writes ``rank<N>.json`` (steps done, validation batches and real bytes it scored, the logged ``val/*``
figures); rank 0 also writes ``final.ckpt``, the weights those figures were measured with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from datamodules import ByteDataModule
from mmbytes.lit import ByteLM


class Record(L.Callback):
    """Counts this rank's validation batches and the real bytes in them (the last validation epoch)."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.batches = self.bytes = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches += 1
        self.bytes += int(batch["mask"].sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    L.seed_everything(0)
    dm = ByteDataModule(data_dir=args.shards, seq_len=args.seq_len, batch_size=args.batch_size,
                        num_workers=args.workers, train_batches_per_epoch=args.steps)
    if args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    else:  # FSDP2: ByteLM.configure_model shards the model over this mesh
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=args.out, callbacks=[record])
    # the epoch is args.steps batches long, so validation runs once, after the last step, on the final weights
    trainer.fit(ByteLM(size="debug", lr=3e-3, warmup_steps=1), dm)
    trainer.save_checkpoint(args.out / "final.ckpt", weights_only=True)
    figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {"rank": trainer.global_rank, "world": trainer.world_size, "steps": trainer.global_step,
              "val_batches": record.batches, "val_bytes": record.bytes, "figures": figures,
              "sharded": any(type(p).__name__ == "DTensor" for p in trainer.lightning_module.parameters())}
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
