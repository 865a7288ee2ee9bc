"""LightningModules for the VQ baselines: the VQ-VAE and the prior over its codes, trained from the byte model's
shards through ``datamodules.VQDataModule``.

    mmbytes fit --config recipes/vq_cifar10.yaml          # VQ-VAE
    mmbytes fit --config recipes/vq_prior_cifar10.yaml    # prior, encoding with the frozen VQ-VAE checkpoint

The prior encodes each batch on the fly with a frozen VQ-VAE loaded (weights only) from ``vq_ckpt`` when fitting
starts: no second copy of the data, and the codes always match the VQ-VAE that ``mmbytes compare`` decodes with.
The VQ-VAE is kept out of the prior's state dict, so a prior checkpoint holds the prior alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.audio import SignalNoiseRatio
from torchmetrics.image import PeakSignalNoiseRatio

from mmbytes.checkpoint import load_checkpoint
from mmbytes.codecs import modality_id
from mmbytes.lit import adamw_warmup_cosine, param_groups
from mmbytes.metrics import BYTES_PER_DIM, BitsPerByte
from mmbytes.vq.measures import to_pixels
from mmbytes.vq.models import VQVAE, CodePrior
from mmbytes.vq.quantizer import usage_and_perplexity

VQ_ARGS = ("modality", "channels", "hidden", "n_res", "downsample", "codebook_size", "code_dim", "decay",
           "commitment", "dead_threshold")
PRIOR_ARGS = ("codebook_size", "d", "n_layer", "n_head", "mlp_ratio", "dropout")


def _optimizer(module: L.LightningModule, lr: float, weight_decay: float, warmup: int, min_ratio: float):
    """The byte model's optimizer and schedule; weight decay on every matrix (embeddings included)."""
    groups = param_groups(module, weight_decay, decay_embeddings=True)
    return adamw_warmup_cosine(module, groups, lr, module.hparams.betas, warmup, min_ratio)


class VQVAEModule(L.LightningModule):
    def __init__(
        self,
        modality: str = "image",
        channels: int = 3,
        hidden: int = 128,
        n_res: int = 2,
        downsample: int = 4,
        codebook_size: int = 512,
        code_dim: int = 64,
        decay: float = 0.99,
        commitment: float = 0.25,
        dead_threshold: float = 0.1,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
    ) -> None:
        """
        Args:
            modality: ``image`` (2-D convolutions over (C, H, W)) or ``audio`` (1-D over 16-bit waveforms).
            channels: input channels: 3 for RGB, 1 for grayscale or audio.
            hidden: convolution width.
            n_res: residual blocks in the encoder and in the decoder.
            downsample: f, a power of two: the code grid is (H/f, W/f) for images, L/f for audio.
            codebook_size: K codes.
            code_dim: width of a code vector.
            decay: EMA decay of the codebook.
            commitment: beta of the commitment loss.
            dead_threshold: EMA count under which a code is restarted at a random encoder output.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay on matrices and kernels.
            betas: AdamW betas.
            warmup_steps: linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step.
            min_lr_ratio: final learning rate as a fraction of ``lr``.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = VQVAE(**{k: v for k, v in self.hparams.items() if k in VQ_ARGS})
        self.val_counts = torch.zeros(codebook_size)
        self.psnr = PeakSignalNoiseRatio(data_range=255.0)
        self.snr = SignalNoiseRatio()

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def _losses(self, batch: dict[str, torch.Tensor]):
        x, mask = batch["x"], batch.get("mask")
        recon, idx, commit, counts = self.model(x)
        if mask is None:
            mse = F.mse_loss(recon, x)
        else:  # padding after the end of a short clip is not data
            recon = torch.where(mask, recon, 0.0)
            mse = ((recon - x) ** 2).sum() / mask.sum().clamp(min=1)
        return x, recon, mse, commit, counts

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, _, mse, commit, counts = self._losses(batch)
        usage, perplexity = usage_and_perplexity(counts)
        loss = mse + commit
        self.log_dict({"train/loss": loss, "train/mse": mse, "train/commit": commit, "train/usage": usage,
                       "train/perplexity": perplexity, "train/restarts": float(self.model.quantizer.restarts)},
                      prog_bar=False)
        self.log("train/mse_bar", mse, prog_bar=True, logger=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_counts = torch.zeros(self.hparams.codebook_size, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, recon, mse, commit, counts = self._losses(batch)
        self.val_counts = self.val_counts.to(counts.device) + counts
        self.log("val/mse", mse, prog_bar=True, batch_size=x.shape[0])
        if self.hparams.modality == "image":
            self.psnr.update(to_pixels(recon).float(), to_pixels(x).float())
            self.log("val/psnr", self.psnr, batch_size=x.shape[0])
        else:
            self.snr.update(recon[:, 0], x[:, 0])
            self.log("val/snr", self.snr, batch_size=x.shape[0])

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self.val_counts, reduce_op="sum") if self.trainer else self.val_counts
        usage, perplexity = usage_and_perplexity(counts)
        self.log_dict({"val/usage": usage, "val/perplexity": perplexity})

    def configure_optimizers(self):
        hp = self.hparams
        return _optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)


class VQPriorModule(L.LightningModule):
    def __init__(
        self,
        vq_ckpt: str = "runs/vq_cifar10/version_0/checkpoints/last.ckpt",
        codebook_size: int = 512,
        d: int = 256,
        n_layer: int = 6,
        n_head: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        context: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.1,
    ) -> None:
        """
        Args:
            vq_ckpt: the trained VQ-VAE checkpoint whose codes the prior models; loaded (weights only) when fitting
                starts and kept frozen.
            codebook_size: the VQ-VAE's K (checked against the checkpoint): the prior's vocabulary.
            d: transformer width.
            n_layer: transformer blocks.
            n_head: attention heads.
            mlp_ratio: MLP hidden width as a multiple of ``d``.
            dropout: dropout in the blocks.
            context: longest code sequence scored at once; ``mmbytes compare`` cuts longer ones (long audio clips)
                into consecutive windows of this many codes. None: no limit.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay on matrices and embeddings.
            betas: AdamW betas.
            warmup_steps: linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step.
            min_lr_ratio: final learning rate as a fraction of ``lr``.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = CodePrior(**{k: v for k, v in self.hparams.items() if k in PRIOR_ARGS})
        self.vq: VQVAE | None = None
        self.bits = BitsPerByte()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "vq":  # not a submodule: outside the state dict, the optimizer and train()/eval()
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        if self.vq is None:
            self.vq, hp = load_vq(self.hparams.vq_ckpt)
            if self.vq.codebook_size != self.hparams.codebook_size:
                raise ValueError(f"{self.hparams.vq_ckpt}: codebook of {self.vq.codebook_size} codes, but the prior's "
                                 f"codebook_size is {self.hparams.codebook_size}")
            self.vq.requires_grad_(False)

    def codes(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """A batch -> code sequences (B, N), their mask (B, N) or None, and original bytes per item (B,)."""
        x, mask = batch["x"], batch.get("mask")
        if self.vq is None:
            raise RuntimeError("the prior has no VQ-VAE yet: call setup() or set .vq")
        self.vq.to(x.device).eval()
        idx = self.vq.encode(x)
        codes = idx.flatten(1)  # raster order of the code grid
        per_dim = BYTES_PER_DIM[self.vq.modality]
        if mask is None:
            return codes, None, torch.full((x.shape[0],), x[0].numel() * per_dim, device=x.device)
        f = self.vq.downsample
        code_mask = F.max_pool1d(mask.float(), f, f)[:, 0] > 0  # a code is data if any of its samples is
        return codes, code_mask, mask.flatten(1).sum(1) * per_dim

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        codes, mask, _ = self.codes(batch)
        nats = self.model.nll(codes, mask)
        n = mask.sum() if mask is not None else codes.numel()
        loss = nats.sum() / n
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        codes, mask, nbytes = self.codes(batch)
        nats = self.model.nll(codes, mask)
        n = mask.sum() if mask is not None else codes.numel()
        self.log("val/nll", nats.sum() / n, prog_bar=True, batch_size=codes.shape[0])
        m = torch.full_like(nbytes, modality_id(self.vq.modality), dtype=torch.long)
        self.bits.update(nats.sum(1), nbytes, m)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.bits.compute().items():
            if name != "bpb":  # bits of the codes per original byte and dimension: the rate
                self.log(f"val/{name}", value, prog_bar=True)
        self.bits.reset()

    def configure_optimizers(self):
        hp = self.hparams
        return _optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps, hp.min_lr_ratio)


def _state(ckpt: dict, path: str | Path, need: tuple[str, ...], what: str) -> tuple[dict, dict]:
    hp = ckpt.get("hyper_parameters", {})
    if any(k not in hp for k in need) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a {what} checkpoint (hyperparameters lack {[k for k in need if k not in hp]})")
    return hp, {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def load_vq(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VQVAE, dict]:
    """The VQ-VAE of a ``VQVAEModule`` checkpoint (weights only), in eval mode, and its hyperparameters."""
    hp, state = _state(load_checkpoint(path, map_location), path, ("downsample", "codebook_size", "modality"),
                       "VQ-VAE")
    model = VQVAE(**{k: hp[k] for k in VQ_ARGS if k in hp}).to(map_location)
    model.load_state_dict(state)
    return model.eval(), dict(hp)


def load_prior(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[CodePrior, dict]:
    """The prior of a ``VQPriorModule`` checkpoint (weights only), in eval mode, and its hyperparameters."""
    hp, state = _state(load_checkpoint(path, map_location), path, ("codebook_size", "n_layer", "vq_ckpt"),
                       "VQ prior")
    model = CodePrior(**{k: hp[k] for k in PRIOR_ARGS if k in hp}).to(map_location)
    model.load_state_dict(state)
    return model.eval(), dict(hp)


def code_nats(prior: CodePrior, codes: torch.Tensor, context: int | None = None) -> float:
    """Nats of code sequences (B, N) under the prior, summed, each scored in consecutive windows of ``context`` codes
    when it is longer (``mmbytes compare``; ``measures.bits_per_dim`` turns them into bits per original dimension)."""
    n = codes.shape[-1]
    step = context or n
    with torch.no_grad():
        return sum(prior.nll(codes[:, s : s + step]).sum().item() for s in range(0, n, step))
