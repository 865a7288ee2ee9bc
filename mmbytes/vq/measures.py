"""Rate and distortion figures for comparing a VQ system with the lossless byte model.

Rate: the prior's negative log-likelihood of the codes in bits, divided by the number of original dimensions (8-bit
sub-pixels, or 16-bit audio samples), so it sits on the same axis as the byte model's bits per dimension.

Lossless total: a VQ system becomes lossless by also sending the integer residual (original - reconstruction). The
residual is coded under a discretized Laplace distribution with location 0 and one scale per image or clip, fitted
as the mean absolute residual (the maximum-likelihood scale of a continuous Laplace), sent as a 32-bit float. The
decoder knows the reconstruction, so the residual's range is known; the Laplace tails beyond it are folded into the
two end values (as in PixelCNN++'s discretized logistic), which makes the probabilities sum to one over the range.
This "simple model" is an upper bound on what a residual coder needs; a learned one would pay less.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCALE_BITS = 32  # one float32 Laplace scale per image or clip
MIN_SCALE = 1e-3  # a zero residual still gets a proper (very peaked) distribution


def bits_per_dim(nats: float, dims: int) -> float:
    """Summed nats of a code sequence -> bits per original dimension."""
    if dims <= 0:
        raise ValueError(f"bits per dimension of {dims} dimensions")
    return nats / math.log(2) / dims


def laplace_scale(residual: Tensor) -> float:
    """Mean absolute residual, at least ``MIN_SCALE``."""
    return max(residual.double().abs().mean().item(), MIN_SCALE)


def residual_bits(residual: Tensor, low: Tensor, high: Tensor, scale: float | None = None) -> float:
    """Bits to code the integer ``residual`` under a discretized Laplace of the given (or fitted) scale, each value
    known to lie in [low, high] (elementwise), plus ``SCALE_BITS`` for the scale. All three tensors the same shape."""
    r, low, high = residual.double(), low.double(), high.double()
    if ((r < low) | (r > high)).any():
        raise ValueError("a residual lies outside its stated range")
    b = laplace_scale(r) if scale is None else scale
    inf = torch.full_like(r, torch.inf)
    upper = torch.where(r >= high, inf, r + 0.5)  # the end values take the tails beyond the range
    lower = torch.where(r <= low, -inf, r - 0.5)
    return float(-laplace_log_mass(lower, upper, b).sum().item()) / math.log(2) + SCALE_BITS


def laplace_log_mass(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """log P(a < X <= b) in nats for X ~ Laplace(0, scale), float64, a < b elementwise (either may be infinite).
    Computed in log space: an interval in one tail has mass 0.5 exp(-|near end| / scale) (1 - exp(-width / scale)),
    which a difference of two CDF values near 1 would lose to rounding far in the tail (a residual of 120 at scale 3:
    about 60 bits, not the 997 of a mass rounded to zero)."""
    a, b = a.double(), b.double()
    flip = b <= 0  # an interval in the negative tail: its mirror image in the positive one
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    tail = math.log(0.5) - a / scale + torch.log1p(-torch.exp(-(b - a) / scale))  # 0 <= a < b
    middle = torch.log1p(-0.5 * torch.exp(-b / scale) - 0.5 * torch.exp(a / scale))  # a < 0 < b
    return torch.where(a >= 0, tail, middle)


def image_residual_bits(original: Tensor, recon: Tensor) -> float:
    """``original`` and ``recon``: integer pixels 0..255 of one image, same shape."""
    r = original.long() - recon.long()
    return residual_bits(r, -recon.long(), 255 - recon.long())


def audio_residual_bits(original: Tensor, recon: Tensor) -> float:
    """``original`` and ``recon``: int16 samples of one clip, same shape."""
    r = original.long() - recon.long()
    return residual_bits(r, -32768 - recon.long(), 32767 - recon.long())


def to_pixels(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels (rounded, clamped)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_samples(x: Tensor) -> Tensor:
    """[-1, 1] floats -> int16 samples (rounded, clamped)."""
    return (x * 32768.0).round().clamp(-32768, 32767).to(torch.int16)


def from_pixels(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1


def from_samples(x: Tensor) -> Tensor:
    return x.float() / 32768.0
