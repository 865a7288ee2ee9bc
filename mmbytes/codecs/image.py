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

from mmbytes.codecs import CodecError, check_decoded
from mmbytes.errors import OptionError


def tile_for_patch(patch_size: int, channels: int = 3) -> int:
    """The tile side t with t * t * channels == patch_size."""
    t = math.isqrt(patch_size // channels)
    if t * t * channels != patch_size:
        raise OptionError(f"patch size {patch_size} is not t*t*{channels} for any tile side t; give a tile side "
                          "(--tile) or the raster order")
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
            raise OptionError(f"channels must be 1 or 3, not {self.channels}")
        if self.order not in ("patch", "raster"):
            raise OptionError(f"order must be 'patch' or 'raster', not {self.order!r}")
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise OptionError(f"tile must be a positive number of pixels, not {self.tile!r}")
        if self.size is not None:
            self.size = tuple(self.size)
            if len(self.size) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.size):
                raise OptionError(f"size must be one or two positive numbers of pixels, not {self.size!r}")
            if self.order == "patch" and any(v % self.tile for v in self.size):
                raise OptionError(f"size {self.size[0]}x{self.size[1]} does not split into {self.tile}x{self.tile} "
                                 "tiles; give a multiple of the tile or order raster")

    def pixels(self, path: Path, changes: list[str] | None = None) -> np.ndarray:
        """Read, convert and resize an image file to (H, W, C) uint8; every change made to the picture (frames
        dropped, alpha dropped, mode or bit depth changed, resized) is appended to ``changes``."""
        from PIL import Image, UnidentifiedImageError

        changes = [] if changes is None else changes
        target = "L" if self.channels == 1 else "RGB"
        try:
            with Image.open(path) as im:
                w, h = im.size
                check_decoded(path, w * h * 4, f"a {w}x{h} image")  # before decoding: at most 4 bytes a pixel
                if self.size is not None:
                    check_decoded(path, self.size[0] * self.size[1] * self.channels, "the resized image")
                else:
                    check_decoded(path, w * h * self.channels, f"a {w}x{h} image")
                frames = getattr(im, "n_frames", 1)
                args = im.tile[0][3] if im.tile else None
                rawmode = args if isinstance(args, str) else ""
                # netpbm's maximum sample value (PPM/PGM): Pillow scales it to 0..255 as it decodes
                maxval = args[1] if im.format == "PPM" and isinstance(args, tuple) and len(args) > 1 else None
                im.load()  # decode now: a truncated file fails here, not later
                if frames > 1:
                    changes.append(f"first frame of {frames} kept")
                if isinstance(maxval, int) and maxval not in (1, 255) and im.mode not in ("I", "F"):
                    changes.append(f"{im.mode} {maxval.bit_length()}-bit -> 8-bit (maximum {maxval} scaled to 255)")
                im = to_8bit(upright(im, changes), rawmode, changes)
                if "A" in im.getbands() or "transparency" in im.info:
                    changes.append(f"{im.mode} -> {target} (alpha dropped)")
                elif im.mode != target:
                    changes.append(f"{im.mode} -> {target}")
                im = im.convert(target)
        except CodecError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
            raise CodecError(f"{path}: not a readable image ({e})") from e
        if self.size is not None and im.size != (self.size[1], self.size[0]):
            changes.append(f"{im.width}x{im.height} -> {self.size[1]}x{self.size[0]} (scaled, centre-cropped)")
            im = resize_center_crop(im, self.size)
        return np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, self.channels)

    def encode(self, path: Path) -> tuple[bytes, dict]:
        changes: list[str] = []
        pixels = self.pixels(path, changes)
        H, W, C = pixels.shape
        if self.order == "patch" and (H % self.tile or W % self.tile):
            raise CodecError(f"{path}: {W}x{H} image does not split into {self.tile}x{self.tile} tiles; set a size")
        meta = {"height": H, "width": W, "channels": C, "order": self.order, "tile": self.tile}
        if changes:
            meta["converted"] = changes
        return to_order(pixels, self.order, self.tile).tobytes(), meta

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        from PIL import Image

        H, W, C = meta["height"], meta["width"], meta["channels"]
        if len(data) != H * W * C:
            raise CodecError(f"{out_path}: {len(data)} bytes cannot be a {W}x{H}x{C} image ({H * W * C} bytes)")
        pixels = from_order(np.frombuffer(data, dtype=np.uint8), H, W, C, meta["order"], meta["tile"])
        Image.fromarray(pixels[..., 0] if C == 1 else pixels).save(out_path, format="PNG")
        return out_path


def to_8bit(im, rawmode: str, changes: list[str]):
    """Images of more than 8 bits a channel, scaled to 8 bits (Pillow's own conversion of 16-bit and 32-bit
    grayscale to L or RGB clips everything above 255 to white)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # a 16-bit grayscale file: Pillow >= 10.1 opens it as I;16, Pillow 10.0 as I (its rawmode still says 16 bits)
        mode = "I;16" if im.mode.startswith("I;16") or (im.mode == "I" and ";16" in rawmode) else im.mode
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "I;16" or (im.mode == "I" and lo >= 0 and hi <= 65535):
            scaled, how = np.round(a / 257), "16-bit -> 8-bit (divided by 257)"
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            scaled, how = np.round(a * 255), "32-bit float -> 8-bit (times 255)"
        else:
            scale = 255 / (hi - lo) if hi > lo else 0.0
            scaled, how = np.round((a - lo) * scale), f"-> 8-bit (range {lo:g}..{hi:g} stretched to 0..255)"
        changes.append(f"{mode} {how}")
        return Image.fromarray(np.nan_to_num(scaled, nan=0.0).clip(0, 255).astype(np.uint8), "L")
    if rawmode.endswith(";16") or rawmode.endswith(";16B") or rawmode.endswith(";16L"):  # 16-bit colour
        changes.append(f"{im.mode} 16-bit -> 8-bit (high byte)")
    return im


ORIENTATION = {2: "mirrored", 3: "rotated 180", 4: "flipped", 5: "transposed", 6: "rotated 90 clockwise",
               7: "transversed", 8: "rotated 90 counter-clockwise"}


def upright(im, changes: list[str]):
    """The picture as it is meant to be seen: the EXIF orientation tag (cameras store pictures sideways and say so
    in the tag) applied with ``PIL.ImageOps.exif_transpose`` and recorded."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: the pixels are still the picture
        return im
    if orientation not in ORIENTATION:
        return im
    changes.append(f"EXIF orientation {orientation} applied ({ORIENTATION[orientation]})")
    return ImageOps.exif_transpose(im)


def resize_center_crop(im, size: tuple[int, int]):
    """The centre of the image at (H, W): the largest centred crop of its aspect, resized (``PIL.ImageOps.fit``)."""
    from PIL import Image, ImageOps

    H, W = size
    return ImageOps.fit(im, (W, H), Image.Resampling.BICUBIC)
