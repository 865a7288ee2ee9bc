"""Vector quantizer with EMA codebook updates, commitment loss and restart of dead codes.

VQ-VAE (van den Oord et al., 2017, section 3.2 and appendix A.1): the encoder output z is replaced by its nearest
codebook vector e_k; gradients pass straight through (z + (e_k - z).detach()); the codebook follows an exponential
moving average of the vectors assigned to each code (Laplace-smoothed counts) instead of a codebook loss, and the
commitment loss beta * ||z - sg(e_k)||^2 keeps the encoder close to its codes. Codes whose EMA count falls below a
threshold are restarted at random encoder outputs of the current batch (Dhariwal et al., 2020, Jukebox, section 2.2).
Plain torch; in DDP the counts and sums are all-reduced and the restart vectors come from rank zero.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def usage_and_perplexity(counts: Tensor) -> tuple[float, float]:
    """Code counts (K,) -> (fraction of the K codes used at least once, perplexity exp(H) of the code frequencies)."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean().item(), math.exp(entropy.item())


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int = 512, dim: int = 64, decay: float = 0.99, commitment: float = 0.25,
                 dead_threshold: float = 0.1, eps: float = 1e-5) -> None:
        """
        Args:
            num_codes: codebook size K.
            dim: code vector width D (the encoder's output channels).
            decay: EMA decay of the counts and sums that define the codebook.
            commitment: beta, weight of the commitment loss.
            dead_threshold: a code whose EMA count (assignments per batch, averaged) falls below this is restarted;
                a code that stops being used gets there in about 230 steps at decay 0.99.
            eps: Laplace smoothing of the counts.
        """
        super().__init__()
        self.num_codes, self.dim, self.decay, self.commitment = num_codes, dim, decay, commitment
        self.dead_threshold, self.eps = dead_threshold, eps
        self.register_buffer("embedding", torch.randn(num_codes, dim) / math.sqrt(dim))
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_avg", self.embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self.restarts = 0  # codes restarted since construction, in this process

    def assign(self, flat: Tensor) -> Tensor:
        """Vectors (N, D) -> index of the nearest code (N,), squared Euclidean distance."""
        e = self.embedding
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # (N, K)
        return d.argmin(1)

    def lookup(self, idx: Tensor) -> Tensor:
        """Indices (...) -> code vectors (..., D)."""
        return F.embedding(idx, self.embedding)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Channels-last vectors z (..., D) -> (straight-through quantized (..., D), indices (...), commitment loss,
        code counts (K,) of this batch). In training the codebook is updated from this batch."""
        shape = z.shape[:-1]
        flat = z.reshape(-1, self.dim).float()  # (N, D)
        if self.training and not bool(self.initialized):
            self._init_from(flat)
        idx = self.assign(flat)  # (N,)
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        if self.training:
            self._ema_update(flat, idx, counts)
        q = self.lookup(idx).view(*shape, self.dim).to(z.dtype)
        loss = self.commitment * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through estimator: the decoder's gradient reaches the encoder unchanged
        return q, idx.view(shape), loss, counts

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        """Codes start at random encoder outputs of the first batch, so none starts far from the data."""
        self.embedding.copy_(self._random_rows(flat, self.num_codes))
        self.embed_avg.copy_(self.embedding)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def _random_rows(self, flat: Tensor, n: int) -> Tensor:
        """n rows of ``flat`` drawn at random (with replacement when the batch is smaller), plus a little noise so
        repeated rows differ; in DDP, rank zero's draw."""
        pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[pick] + 1e-4 * flat.std().clamp(min=1e-6) * torch.randn(n, flat.shape[1], device=flat.device)
        if _distributed():
            dist.broadcast(rows, 0)
        return rows

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor, counts: Tensor) -> None:
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, idx, flat)  # (K, D)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embedding.copy_(self.embed_avg / smoothed[:, None])
        dead = self.cluster_size < self.dead_threshold
        if dead.any():
            k = int(dead.sum())
            rows = self._random_rows(flat, k)
            self.embedding[dead] = rows
            self.embed_avg[dead] = rows  # a count of one: the restarted code sits at its vector
            self.cluster_size[dead] = 1.0
            self.restarts += k
