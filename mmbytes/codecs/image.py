"""Image codec: any format Pillow reads -> RGB (or grayscale) uint8 bytes in patch-scan or raster order.

Patch scan (MEGABYTE section 5.2 / 6): the image is cut into t x t x C tiles, raster order inside a tile and between
tiles, with t chosen so one tile is one model patch (P = t * t * C: P=12 -> 2x2 RGB, P=192 -> 8x8 RGB).
Decoding turns exactly H*W*C bytes back into the same pixels and a PNG file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmbytes.codecs import CodecError


def tile_for_patch(patch_size: int, channels: int = 3) -> int:
    """The tile side t with t * t * channels == patch_size."""
    t = math.isqrt(patch_size // channels)
    if t * t * channels != patch_size:
        raise ValueError(f"patch size {patch_size} is not t*t*{channels} for any tile side t")
    return t


def to_order(pixels: np.ndarray, order: str, tile: int) -> np.ndarray:
    """(H, W, C) uint8 -> flat bytes in the given order."""
    if order == "raster":
        return pixels.reshape(-1)
    H, W, C = pixels.shape
    t = tile
    x = pixels.reshape(H // t, t, W // t, t, C).transpose(0, 2, 1, 3, 4)  # (H/t, W/t, t, t, C)
    return x.reshape(-1)


def from_order(flat: np.ndarray, height: int, width: int, channels: int, order: str, tile: int) -> np.ndarray:
    """Flat bytes -> (H, W, C) uint8; the inverse of ``to_order``."""
    if order == "raster":
        return flat.reshape(height, width, channels)
    t = tile
    x = flat.reshape(height // t, width // t, t, t, channels).transpose(0, 2, 1, 3, 4)  # (H/t, t, W/t, t, C)
    return x.reshape(height, width, channels)


@dataclass
class ImageCodec:
    size: int | tuple[int, int] | None = None
    """Output (height, width), or one side for a square; None keeps each image's native size."""
    channels: int = 3
    """3 for RGB, 1 for grayscale."""
    order: str = "patch"
    """``patch`` (tiles of ``tile`` x ``tile`` pixels) or ``raster`` (row by row)."""
    tile: int = 4
    """Tile side for the patch order; pick it with ``tile_for_patch(P, channels)`` to match the model."""

    name = "image"
    modality = "image"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.order not in ("patch", "raster"):
            raise ValueError(f"order must be 'patch' or 'raster', not {self.order!r}")
        if isinstance(self.size, int):
            self.size = (self.size, self.size)

    def pixels(self, path: Path) -> np.ndarray:
        """Read, convert and resize an image file to (H, W, C) uint8."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not later
                im = im.convert("L" if self.channels == 1 else "RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise CodecError(f"{path}: not a readable image ({e})") from e
        if self.size is not None and im.size != (self.size[1], self.size[0]):
            im = resize_center_crop(im, self.size)
        return np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, self.channels)

    def encode(self, path: Path) -> tuple[bytes, dict]:
        pixels = self.pixels(path)
        H, W, C = pixels.shape
        if self.order == "patch" and (H % self.tile or W % self.tile):
            raise CodecError(f"{path}: {W}x{H} image does not split into {self.tile}x{self.tile} tiles; set a size")
        meta = {"height": H, "width": W, "channels": C, "order": self.order, "tile": self.tile}
        return to_order(pixels, self.order, self.tile).tobytes(), meta

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        from PIL import Image

        H, W, C = meta["height"], meta["width"], meta["channels"]
        if len(data) != H * W * C:
            raise CodecError(f"{out_path}: {len(data)} bytes cannot be a {W}x{H}x{C} image ({H * W * C} bytes)")
        pixels = from_order(np.frombuffer(data, dtype=np.uint8), H, W, C, meta["order"], meta["tile"])
        Image.fromarray(pixels[..., 0] if C == 1 else pixels).save(out_path, format="PNG")
        return out_path


def resize_center_crop(im, size: tuple[int, int]):
    """The centre of the image at (H, W): the largest centred crop of its aspect, resized (``PIL.ImageOps.fit``)."""
    from PIL import Image, ImageOps

    H, W = size
    return ImageOps.fit(im, (W, H), Image.Resampling.BICUBIC)
