"""VQ-VAE for images (2-D convolutions) and 16-bit audio (1-D convolutions), and the autoregressive prior over
their codes. Plain torch: no Lightning, no data layer.

The autoencoder follows van den Oord et al. (2017, section 4): strided convolutions halve the resolution log2(f)
times, residual blocks, a 1x1 projection to the code width, the quantizer, and the mirror image with transposed
convolutions. Inputs are floats in [-1, 1]: 8-bit pixels as x / 127.5 - 1, audio samples as x / 32768.

The prior is the project's own causal transformer (``mmbytes.model.layers.Transformer``, rotary positions, KV cache)
over the code indices in raster order (images: rows of the latent grid; audio: time), vocabulary = codebook size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbytes.model.generate import sample_next
from mmbytes.model.layers import Transformer
from mmbytes.vq.quantizer import VectorQuantizer

MODALITIES = ("image", "audio")


class ResBlock(nn.Module):
    def __init__(self, conv: type[nn.Module], ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), conv(ch, ch, 3, padding=1), nn.ReLU(), conv(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VQVAE(nn.Module):
    """``VQVAE(modality="image")(x)`` with x (B, C, H, W) in [-1, 1] -> (reconstruction, indices (B, H/f, W/f),
    commitment loss, code counts); ``modality="audio"``: x (B, 1, L), indices (B, L/f)."""

    def __init__(self, modality: str = "image", channels: int = 3, hidden: int = 64, n_res: int = 2,
                 downsample: int = 4, codebook_size: int = 512, code_dim: int = 64, decay: float = 0.99,
                 commitment: float = 0.25, dead_threshold: float = 0.1) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
        levels = int(math.log2(downsample)) if downsample >= 1 else -1
        if downsample < 1 or 2**levels != downsample:
            raise ValueError(f"downsample must be a power of two (1, 2, 4, 8, ...), not {downsample}")
        self.modality, self.channels, self.downsample = modality, channels, downsample
        conv, up = (nn.Conv2d, nn.ConvTranspose2d) if modality == "image" else (nn.Conv1d, nn.ConvTranspose1d)
        enc: list[nn.Module] = [conv(channels, hidden, 3, padding=1)]
        for _ in range(levels):  # each halves the resolution
            enc += [nn.ReLU(), conv(hidden, hidden, 4, stride=2, padding=1)]
        enc += [ResBlock(conv, hidden) for _ in range(n_res)] + [nn.ReLU(), conv(hidden, code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(codebook_size, code_dim, decay, commitment, dead_threshold)
        dec: list[nn.Module] = [conv(code_dim, hidden, 3, padding=1)]
        dec += [ResBlock(conv, hidden) for _ in range(n_res)]
        for _ in range(levels):
            dec += [nn.ReLU(), up(hidden, hidden, 4, stride=2, padding=1)]
        dec += [nn.ReLU(), conv(hidden, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.num_codes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, x: Tensor) -> None:
        want = 4 if self.modality == "image" else 3
        if x.dim() != want or x.shape[1] != self.channels:
            raise ValueError(f"{self.modality} VQ-VAE expects ({'B, C, H, W' if want == 4 else 'B, 1, L'}) with "
                             f"{self.channels} channels, got {tuple(x.shape)}")
        if any(s % self.downsample for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not a multiple of the downsampling {self.downsample}")

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self._check(x)
        z = self.encoder(x).movedim(1, -1)  # channels last: (B, H/f, W/f, D) or (B, L/f, D)
        return self.quantizer(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, idx, commit, counts = self.quantize(x)
        return self.decoder(q.movedim(-1, 1)), idx, commit, counts

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Inputs -> code indices (B, H/f, W/f) or (B, L/f)."""
        self._check(x)
        z = self.encoder(x).movedim(1, -1)
        return self.quantizer.assign(z.reshape(-1, z.shape[-1]).float()).view(z.shape[:-1])

    @torch.no_grad()
    def decode(self, idx: Tensor) -> Tensor:
        """Code indices -> reconstruction in [-1, 1] (not clamped)."""
        q = self.quantizer.lookup(idx)  # (B, ..., D)
        return self.decoder(q.movedim(-1, 1))


class CodePrior(nn.Module):
    """Autoregressive transformer over code indices (B, N) -> logits (B, N, K): position n predicts code n from
    codes < n. A trainable start vector takes the place of the code before the first."""

    def __init__(self, codebook_size: int = 512, d: int = 256, n_layer: int = 4, n_head: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, rope_base: float = 10000.0) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed = nn.Embedding(codebook_size, d)
        self.start = nn.Parameter(torch.empty(d))
        self.transformer = Transformer(d, n_layer, n_head, mlp_ratio, dropout, rope_base)
        self.head = nn.Linear(d, codebook_size, bias=False)
        for m in (self.embed, self.head):
            nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.start, std=0.02)
        self.transformer.reset_parameters()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, codes: Tensor) -> Tensor:
        B, N = codes.shape
        h = torch.cat([self.start.expand(B, 1, -1), self.embed(codes[:, :-1])], dim=1)  # (B, N, d), shifted by one
        return self.head(self.transformer(h))

    def nll(self, codes: Tensor, mask: Tensor | None = None) -> Tensor:
        """Nats of every code (B, N), zero where ``mask`` is False."""
        logits = self(codes)
        out = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none").view(codes.shape)
        return out if mask is None else torch.where(mask, out, 0.0)

    @torch.no_grad()
    def generate(self, num: int, length: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 on_logits: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """``num`` sequences of ``length`` codes, one position at a time with a KV cache; (num, length).
        ``on_logits(n, logits)`` sees the (num, K) logits that chose code n."""
        was_training = self.training
        self.eval()
        device = self.start.device
        caches = self.transformer.make_caches(num, length, device, self.start.dtype)
        out = torch.zeros(num, length, dtype=torch.long, device=device)
        x = self.start.expand(num, 1, -1)
        for n in range(length):
            logits = self.head(self.transformer(x, caches)[:, -1])  # (num, K)
            if on_logits is not None:
                on_logits(n, logits)
            out[:, n] = sample_next(logits, temperature, top_k, top_p, generator)
            x = self.embed(out[:, n : n + 1])
        self.train(was_training)
        return out
