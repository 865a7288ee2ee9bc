"""Per-file plans: which bytes of a file the model codes, the container bytes stored around them, and the exact
inverse. Each plan mirrors a codec of ``mmbytes.codecs`` on the container it recognises (the audio codec's
little-endian int16 samples, the image codec's pixel order), and is used only after its inverse has given back the
file byte for byte:

- a 16-bit mono PCM WAV file codes its samples; the RIFF header and any other chunks are stored;
- an uncompressed image (binary PPM/PGM, 24-bit BMP, uncompressed TIFF) codes its pixels in the model's byte order
  (raster or patch, as the model was trained) and stores the container's header and trailer;
- everything else (PNG, JPEG, FLAC, text, any file) is coded as stored, labelled text when it is UTF-8 without NUL
  bytes, else raw.

The plan's mode is also the modality (``mmbytes.codecs.MODALITIES``) the model is told the coded bytes have.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mmbytes.compress.container import MODES


@dataclass
class Plan:
    """How one file is coded: the bytes the model codes (``body``), the stored container bytes around them and
    what the inverse needs."""

    mode: str
    body: bytes
    prefix: bytes = b""
    suffix: bytes = b""
    image: dict = field(default_factory=dict)


def wav_samples(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the sample bytes of a 16-bit mono PCM WAV file, else None."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt, found = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt " and size >= 16:
            tag, channels, _, _, _, bits = struct.unpack("<HHIIHH", data[body : body + 16])
            if tag == 0xFFFE and size >= 26:  # WAVE_FORMAT_EXTENSIBLE: the format is the sub-format GUID's first two
                tag = struct.unpack("<H", data[body + 24 : body + 26])[0]
            fmt = (tag, channels, bits)
        elif cid == b"data":
            found = (body, min(body + size, len(data)))
            break
        pos = body + size + (size & 1)
    if fmt != (1, 1, 16) or found is None:
        return None
    start, end = found
    return start, start + (end - start) // 2 * 2


def image_layouts(pixels: np.ndarray) -> dict[str, bytes]:
    """The byte layouts in which uncompressed image files store pixels (H, W, C)."""
    H, W, C = pixels.shape
    bgr = pixels[::-1, :, ::-1] if C == 3 else pixels[::-1]
    pad = -(W * C) % 4
    bmp = np.pad(bgr.reshape(H, W * C), ((0, 0), (0, pad))) if pad else bgr.reshape(H, W * C)
    return {"raster": pixels.tobytes(), "bmp": np.ascontiguousarray(bmp).tobytes()}


IMAGE_HEADS = (b"P5", b"P6", b"BM", b"II*\x00", b"MM\x00*")  # PGM, PPM, BMP, TIFF: formats that may store raw pixels


def image_plan(data: bytes, options: dict) -> Plan | None:
    """Pixels in the model's order plus the container bytes around them, when the file stores its pixels as they
    are (binary PPM/PGM, 24-bit BMP, uncompressed TIFF)."""
    if not data.startswith(IMAGE_HEADS):
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("RGB", "L"):
                return None
            pixels = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, -1)
    except Exception:  # not an image Pillow reads: coded as stored
        return None
    H, W, C = pixels.shape
    tile = int(options.get("tile") or 4)
    order = options.get("order", "raster")
    if order == "patch" and (H % tile or W % tile):
        order = "raster"
    for layout, stored in image_layouts(pixels).items():
        at = data.find(stored)
        if at >= 0:
            from mmbytes.codecs.image import to_order

            body = to_order(pixels, order, tile).tobytes()
            return Plan("image", body, data[:at], data[at + len(stored) :],
                        {"layout": layout, "height": H, "width": W, "channels": C, "order": order, "tile": tile})
    return None


def plan_file(data: bytes, modalities: Iterable[str], image_options: dict, raw_only: bool = False) -> Plan:
    """The cheapest exact way to code a file: samples or pixels when the container keeps them as they are, else the
    bytes as stored (labelled text when they are UTF-8 without NUL bytes)."""
    plan = None
    if not raw_only:
        if "audio" in modalities and (span := wav_samples(data)) is not None:
            plan = Plan("audio", data[span[0] : span[1]], data[: span[0]], data[span[1] :])
        elif "image" in modalities:
            plan = image_plan(data, image_options)
        if plan is not None and rebuild(plan.body, plan.mode, plan.prefix, plan.suffix, plan.image) != data:
            plan = None  # never "same pixels, different file"
    if plan is None:
        try:
            text = b"\x00" not in data and bool(data.decode("utf-8"))
        except UnicodeDecodeError:
            text = False
        plan = Plan("text" if text else "raw", data)
    return plan


def rebuild(body: bytes, mode: str, prefix: bytes, suffix: bytes, image: dict) -> bytes:
    """The original file from the coded bytes and the stored container bytes."""
    if mode == "image":
        from mmbytes.codecs.image import from_order

        H, W, C = image["height"], image["width"], image["channels"]
        if len(body) != H * W * C:
            raise ValueError(f"{len(body)} bytes cannot be a {W}x{H}x{C} image")
        pixels = from_order(np.frombuffer(body, dtype=np.uint8), H, W, C, image["order"], image["tile"])
        body = image_layouts(pixels)[image["layout"]]
    return prefix + body + suffix


def trained_codecs(description: dict) -> tuple[set[str], dict]:
    """From the data description the model was trained on (``mmbytes.data_description``): the modalities it knows
    (a file is coded as samples or pixels only in one of them) and its image byte order and tile."""
    known = set(description.get("modalities") or {}) & set(MODES)
    image = (description.get("modalities") or {}).get("image") or {}
    return known, {k: image[k] for k in ("order", "tile") if image.get(k) is not None}
