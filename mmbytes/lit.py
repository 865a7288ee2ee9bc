"""LightningModule around the plain-torch model: loss, optimizer, schedule and bits-per-byte logging."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mmbytes.checkpoint import check_config, checkpoint_config
from mmbytes.metrics import BitsPerByte
from mmbytes.model.registry import build, config_from_name, config_to_dict


class NonFiniteLossError(RuntimeError):
    """Too many training steps in a row had a NaN or infinite loss."""


class ByteLM(L.LightningModule):
    def __init__(
        self,
        size: str = "debug",
        overrides: dict[str, Any] | None = None,
        preset: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        strided_eval: bool | Literal["paper", "later"] = False,
        max_bad_steps: int = 8,
        decay_embeddings: bool = True,
        entropy_ckpt: str | None = None,
        tokenizer: str | None = None,
        tokenizer_bytes: int = 64 * 2**20,
        prepare_dir: str | None = None,
        compile: bool | str = False,
    ) -> None:
        """
        Args:
            size: named model size of any architecture (``debug``, ``small``, ``base``, ``transformer-small``,
                ``spacebyte-small``, ...; see ``mmbytes.model.registry.SIZES``).
            overrides: config fields that replace those of the named size, e.g. ``{patch_size: 4}``.
            preset: build the named size in this named form of its architecture (``PRESETS`` of its module, e.g.
                ``paper``: the paper's form) instead of the form it is named in; ``overrides`` apply after it.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay, applied to matrices (and embeddings, see ``decay_embeddings``), never
                to norms, biases or padding vectors.
            betas: AdamW betas.
            warmup_steps: linear warmup from 0 to ``lr``; afterwards cosine decay to ``lr * min_lr_ratio`` at the
                trainer's last step.
            min_lr_ratio: final learning rate as a fraction of ``lr``.
            strided_eval: in validation and test, also score with strided inference (paper section 2.3.3: a
                second pass offset by P/2) and log it as ``*_strided``. ``paper`` (or ``true``): each byte is taken
                from the pass where it sits in the first P/2 positions of its patch, as in the paper. ``later``: from
                the pass where it sits in the later half (more local context; better on small models, see
                docs/training.md). The rule used is printed at each evaluation and kept in the hyperparameters.
            max_bad_steps: a step whose loss is NaN or infinite, or whose loss is finite but whose gradients are not
                (an overflow in the backward pass; left to the GradScaler under ``16-mixed``), is skipped (no update)
                and counted in ``train/skipped_steps``; this many in a row stop training with ``NonFiniteLossError``.
            decay_embeddings: apply weight decay to the byte embedding tables too.
            entropy_ckpt: BLT: the checkpoint of its entropy model (a flat byte Transformer trained with ``mmbytes
                fit`` without a start state per modality: a ``blt-entropy-*`` size or ``modality_start: false``; best
                with thresholds stored by ``mmbytes calibrate``); frozen inside the BLT model and saved with it.
                Without it a BLT size carries a randomly initialised entropy model (warned at construction: its
                patches carry no information). Thresholds not stored with it are calibrated at the start of ``fit``
                on training windows drawn at random across the training split.
            tokenizer: BPE baseline (``bpe-*``): a Hugging Face tokenizer JSON file of a byte-level BPE tokenizer
                (``mmbytes.model.bpe_tokenizer.train_tokenizer``). Without it, ``fit`` trains one of the size's
                ``vocab_size`` on the datamodule's training split before training. Either way it is stored in the
                checkpoint.
            tokenizer_bytes: BPE baseline: train the tokenizer (and measure its bytes per token) on the first this
                many bytes of the training split.
            prepare_dir: a folder where the model keeps what it prepares for its data, reused by later runs on the
                same data (the BPE baseline: its tokenizer per vocabulary size).
            compile: compile each transformer block with ``torch.compile`` (regional compilation, after FSDP
                sharding where used): ``true`` for the inductor backend, or a backend's name. Cached generation
                runs the blocks eagerly. Same weights and checkpoints as eager.
        """
        super().__init__()
        self.save_hyperparameters()
        entropy = load_entropy(entropy_ckpt, overrides)
        self.model = build(model_config(size, overrides, entropy, preset))
        if entropy is not None:
            # the entropy model's config goes into the hyperparameters, so that a checkpoint of this run rebuilds the
            # same model (its weights and thresholds are in the state dict) also once the entropy file is gone
            self.hparams["overrides"] = {**(overrides or {}), "entropy": entropy["config"]}
            if not self.model.set_entropy(entropy["state"], entropy["calibration"], entropy_ckpt):
                rank_zero_info(f"{entropy_ckpt}: no thresholds stored; they are calibrated on the training data at "
                               "the start of fit (or run `mmbytes calibrate`)")
        restored = entropy is None and isinstance((overrides or {}).get("entropy"), dict)  # weights in a checkpoint
        for caveat in [] if restored else self.model.caveats():
            rank_zero_warn(f"{size}: {caveat}")
        if strided_eval not in (False, True, "paper", "later"):
            raise ValueError(f"strided_eval must be false, true, 'paper' or 'later', got {strided_eval!r}")
        self.strided_rule = "paper" if strided_eval is True else strided_eval or None
        if self.strided_rule and not self.model.capabilities.strided:
            raise ValueError(f"strided_eval needs fixed patches (MEGABYTE); {size!r} has none")
        self.bits = torch.nn.ModuleDict({f"{stage}{kind}": BitsPerByte() for stage in ("val", "test")
                                         for kind in ("", "_strided")})
        self.skipped_steps = 0  # non-finite losses skipped in all (kept in checkpoints)
        self.bad_in_row = 0

    @property
    def config(self):
        """The model's config, as prepared for its data (SpaceByte's cap follows the training window)."""
        return self.model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        self.prepare_model(stage)

    def prepare_model(self, stage: str) -> None:
        """The model readies itself for the data (``ByteModel.prepare``: the BPE baseline its tokenizer, BLT its
        thresholds, SpaceByte its global cap), once, at the first ``setup``; a resumed run's model, or one about to be
        scored, takes from its checkpoint what that holds. ``FlopBudget`` calls this from its own ``setup``
        (callbacks are set up before the module), since what the model prepares sets its FLOPs."""
        if getattr(self, "_prepared", False):
            return
        self._prepared = True
        hp = self.hparams
        options = {"tokenizer": hp.tokenizer, "tokenizer_bytes": hp.tokenizer_bytes}
        self.model.prepare(model_data(self.trainer, options, hp.get("prepare_dir"), restoring=stage != "fit"))

    def configure_model(self) -> None:
        """Shard under ``ModelParallelStrategy`` (``_shard``), then compile the blocks if asked (``compile``)."""
        if self.device_mesh is not None and not getattr(self.model, "_mmbytes_sharded", False):
            self._shard()
        if self.hparams.get("compile") and not getattr(self.model, "_mmbytes_compiled", False):
            compile_blocks(self.model, "inductor" if self.hparams.compile is True else self.hparams.compile)

    def _shard(self) -> None:
        """FSDP2: shard each transformer block and then the rest of the model over the data-parallel processes;
        other strategies keep the model whole. Works on CPU (gloo) and GPUs."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from mmbytes.model.layers import Block

        if self.device_mesh["tensor_parallel"].size() > 1:
            raise ValueError("ByteLM shards over data-parallel processes only: give ModelParallelStrategy "
                             "tensor_parallel_size=1 and data_parallel_size=devices x num_nodes")
        mesh = self.device_mesh["data_parallel"]
        for block in [m for m in self.model.modules() if isinstance(m, Block)]:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        register_fsdp_forward_method(self.model, "nll")  # training and scoring call nll(), not forward()
        self.model._mmbytes_sharded = True

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        mask = batch["mask"]
        nats = self.model.nll(batch["x"], mask, **self._modality(batch)).sum()
        loss = nats / mask.sum().clamp(min=1)  # mean nats per real byte
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None:  # one decision for all processes: a rank that skips alone would hang DDP
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._loss_finite = finite
        if not finite:
            return self._skip_step("the loss is")
        self.log("train/loss", loss)
        self.log("train/bpb", loss / math.log(2), prog_bar=True)
        self.log("train/skipped_steps", float(self.skipped_steps))
        for name, value in getattr(self.model, "stats", {}).items():  # e.g. SpaceByte's share of capped bytes
            self.log(f"train/{name}", value)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss whose gradients are not (NaN or infinite somewhere after the backward pass) skips the step
        as a non-finite loss does: every gradient is dropped, so the optimizer changes no weight. All processes
        decide together (sharded gradients differ by rank). Under ``16-mixed`` the GradScaler skips such steps
        itself and lowers its scale, so it is left to it."""
        if not getattr(self, "_loss_finite", True):
            return  # skipped already: Lightning runs no optimizer step after a training_step that gave None
        if self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self.bad_in_row = 0
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # one fused pass (NaN or infinity anywhere makes the norm so), one host sync per step
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.bad_in_row = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._skip_step("the gradients are (the loss is finite)")

    def _skip_step(self, what: str) -> None:
        """No update this step (Lightning skips the backward and optimizer step when training_step gives None; an
        optimizer step over no gradients changes nothing)."""
        self.skipped_steps += 1
        self.bad_in_row += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        step = self.trainer.global_step if self._trainer is not None else 0
        if self.bad_in_row >= self.hparams.max_bad_steps:
            raise NonFiniteLossError(
                f"training stopped at step {step}: the loss or its gradients were NaN or infinite in {self.bad_in_row} "
                f"steps in a row (max_bad_steps={self.hparams.max_bad_steps}; {self.skipped_steps} skipped in all). "
                "Those steps did not change the weights; lower the learning rate or check the data.")
        rank_zero_warn(f"step {step}: {what} NaN or infinite; step skipped ({self.bad_in_row} in a row, "
                       f"{self.skipped_steps} in all)")
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmbytes"] = {"config": config_to_dict(self.config), "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another architecture is refused by name, before its weights meet this model."""
        check_config(checkpoint_config(checkpoint), self.config)
        self.skipped_steps = checkpoint.get("mmbytes", {}).get("skipped_steps", 0)

    def _score(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        x, mask, modality = batch["x"], batch["mask"], batch.get("modality")
        self.bits[stage].update(self.model.nll(x, mask, **self._modality(batch)).sum(1), mask.sum(1), modality)
        if self.strided_rule:
            strided = self.model.nll_strided(x, mask, rule=self.strided_rule, **self._modality(batch))
            self.bits[f"{stage}_strided"].update(strided.sum(1), mask.sum(1), modality)

    def _modality(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows' modality ids: a model conditioned on them (``capabilities.per_modality``: its start state per
        modality, BLT's thresholds) uses them, the others ignore them."""
        return {"modality": batch.get("modality")}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Scores each window: summed nats, real bytes and bits per byte."""
        mask = batch["mask"]
        nats = self.model.nll(batch["x"], mask, **self._modality(batch)).sum(1)
        count = mask.sum(1)
        return {"nats": nats, "count": count, "bpb": nats / count.clamp(min=1) / math.log(2)}

    def _log_bits(self, stage: str) -> None:
        # compute() sums the states over all processes first, so every rank logs the same exact figure
        if self.strided_rule:
            P = self.config.patch_size
            rank_zero_info(f"{stage}/*_strided: strided inference, rule {self.strided_rule!r} (each byte from the pass "
                           f"where it is in the {'first' if self.strided_rule == 'paper' else 'later'} {P // 2} of "
                           f"the {P} positions of its patch)")
        for suffix in ("", "_strided") if self.strided_rule else ("",):
            metric = self.bits[stage + suffix]
            values = metric.compute()
            if not values:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"no {stage} byte was scored, so {stage}/bpb{suffix} is not logged (a figure over zero "
                               f"bytes is undefined): the {stage} data is empty or unreadable")
            for name, value in values.items():
                self.log(f"{stage}/{name}{suffix}", value, prog_bar=name == "bpb")
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_bits("val")

    def on_test_epoch_end(self) -> None:
        self._log_bits("test")

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, hp.get("decay_embeddings", True))
        return adamw_warmup_cosine(self, groups, hp.lr, hp.betas, hp.warmup_steps, hp.min_lr_ratio)


def compile_blocks(model: torch.nn.Module, backend: str) -> None:
    """Regional compilation: each transformer block's forward without a KV cache goes through ``torch.compile``
    (one graph per block, reused by every block of the same shape); with a cache (generation) the block runs eagerly.
    Parameters and state-dict keys are unchanged."""
    from mmbytes.model.layers import Block

    for block in [m for m in model.modules() if isinstance(m, Block)]:
        eager = block.forward
        compiled = torch.compile(eager, backend=backend)

        def forward(x, cos, sin, cache=None, eager=eager, compiled=compiled):
            return eager(x, cos, sin, cache) if cache is not None else compiled(x, cos, sin)

        block.forward = forward
    model._mmbytes_compiled = True


def adamw_warmup_cosine(module: L.LightningModule, groups: list[dict], lr: float, betas: tuple[float, float],
                        warmup: int, min_ratio: float) -> dict:
    """AdamW over ``groups`` with linear warmup and cosine decay to ``lr * min_ratio`` at the trainer's last step,
    stepped every batch: the optimizer of every module here (byte models, VQ-VAE, prior). The last step is read at
    every step: ``max_steps`` as it stands (a ``FlopBudget`` re-plans it from the FLOPs counted so far, so the decay
    ends where the budget runs out), else the steps estimated at the start."""
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    trainer, estimated = module.trainer, max(1, int(module.trainer.estimated_stepping_batches))

    def factor(step: int) -> float:  # a closure: LambdaLR keeps it out of the checkpoint's state dict
        last = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else estimated
        return warmup_cosine(warmup, last, min_ratio)(step)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def model_data(trainer: L.Trainer, options: dict[str, Any] | None = None, cache_dir: str | None = None,
               restoring: bool = False):
    """What a model may know of the trainer's training data (``mmbytes.model.protocol.ModelData``): the window, the
    training samples, random training windows across the split, and how to share across processes."""
    from mmbytes.entropy import draw_windows, split_items
    from mmbytes.model.protocol import ModelData

    dm = trainer.datamodule
    hp = getattr(dm, "hparams", None) or {}
    readable = dm is not None and (callable(getattr(dm, "urls", None)) or getattr(dm, "children", None) is not None)
    return ModelData(
        seq_len=hp.get("seq_len"),
        train_samples=(lambda: (data.tobytes() for data, _ in split_items(dm))) if readable else None,
        draw_windows=(lambda n, seq_len, seed: draw_windows(split_items(dm), n, seq_len, seed)) if readable else None,
        restoring=restoring or bool(trainer.ckpt_path), is_main=trainer.is_global_zero,
        share=lambda obj: trainer.strategy.broadcast(obj, src=0),
        cache_dir=Path(cache_dir) if cache_dir else None, options=dict(options or {}))


def load_entropy(path: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """BLT's entropy checkpoint (``load_entropy_model``), or None without a path, or when the file is gone but the
    overrides already hold its config (a run's own checkpoint being loaded brings the weights and thresholds)."""
    if not path:
        return None
    if not Path(path).is_file() and isinstance((overrides or {}).get("entropy"), dict):
        rank_zero_warn(f"{path}: no such entropy checkpoint; the entropy model comes from the checkpoint being loaded")
        return None
    from mmbytes.checkpoint import load_entropy_model

    return load_entropy_model(path)


def model_config(size: str, overrides: dict[str, Any] | None = None, entropy: dict[str, Any] | str | None = None,
                 preset: str | None = None):
    """The config ``ByteLM(size, overrides, preset, entropy_ckpt)`` builds: the named size in the preset with the
    overrides, and for BLT the config of the entropy model in ``entropy`` (a checkpoint path or ``load_entropy``'s
    result)."""
    overrides = dict(overrides or {})
    if isinstance(entropy, str):
        entropy = load_entropy(entropy, overrides)
    if entropy is not None:
        overrides["entropy"] = entropy["config"]
    return config_from_name(size, preset, **overrides)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (embedding tables only with ``decay_embeddings``), none on
    norms, biases and padding vectors."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            wd = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
            (decay if wd else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """Learning rate factor at a step: linear warmup, then cosine from 1 down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
