"""IDX image files (the MNIST format, optionally gzipped) -> one image sample per picture.

An IDX3 file holds N grayscale pictures of H x W bytes; each becomes an image sample in the order of the image codec
(patch scan by default), so MNIST trains and decodes like any other image set.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmbytes.codecs import CodecError, check_decoded
from mmbytes.codecs.image import ImageCodec, to_order
from mmbytes.errors import OptionError


@dataclass
class IdxCodec:
    order: str = "patch"
    """``patch`` or ``raster``, as in the image codec."""
    tile: int = 4
    """Tile side of the patch order (28 x 28 MNIST digits split into 7 x 7 tiles of 4 x 4)."""

    name = "idx"
    modality = "image"

    def __post_init__(self) -> None:
        if self.order not in ("patch", "raster"):
            raise OptionError(f"order must be 'patch' or 'raster', not {self.order!r}")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise OptionError(f"tile must be a positive number of pixels, not {self.tile!r}")

    def encode_many(self, path: Path) -> list[tuple[bytes, dict]]:
        """The header is read and checked first: a header promising more than the decoded-size limit, or pictures of
        no pixels, is refused before anything is decompressed or allocated."""
        try:
            with open(path, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            with (gzip.open if gz else open)(path, "rb") as f:
                head = f.read(16)
                if len(head) < 16 or head[:4] != b"\x00\x00\x08\x03":
                    raise CodecError(f"{path}: not an IDX3 file of unsigned bytes (magic {head[:4].hex()})")
                n, h, w = struct.unpack(">III", head[4:16])
                if not (n and h and w):
                    raise CodecError(f"{path}: header promises {n} images of {h}x{w}: no pixels")
                check_decoded(path, n * h * w, f"a header promising {n:,} images of {h}x{w}")
                body = f.read(n * h * w + 1)  # one byte more than promised shows a file that holds more
        except (OSError, EOFError, zlib.error) as e:
            raise CodecError(f"{path}: unreadable IDX file ({e})") from e
        raw = head + body
        if len(raw) != 16 + n * h * w:
            raise CodecError(f"{path}: header promises {n} images of {h}x{w}, data holds {len(raw) - 16} bytes")
        if self.order == "patch" and (h % self.tile or w % self.tile):
            raise CodecError(f"{path}: {w}x{h} images do not split into {self.tile}x{self.tile} tiles")
        images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w, 1)
        meta = {"height": h, "width": w, "channels": 1, "order": self.order, "tile": self.tile, "codec": "image"}
        return [(to_order(im, self.order, self.tile).tobytes(), {**meta, "index": i}) for i, im in enumerate(images)]

    def encode(self, path: Path) -> tuple[bytes, dict]:
        raise CodecError(f"{path}: an IDX file holds many images; shards use encode_many")

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        return ImageCodec(channels=1, order=meta["order"], tile=meta["tile"]).decode(data, meta, out_path)
