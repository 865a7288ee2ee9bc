"""The ``.mmbz`` container: header, chunk streams and CRC, read and written byte for byte as
``docs/compression-format.md`` specifies. Nothing here runs a model.

A container carries, besides what the inverse of the file's plan needs, the determinism envelope of the machine that
wrote it (``Envelope``): a range decoder reproduces the file only where the model's distributions come out bit for
bit as they did when encoding, and the envelope names what that depends on, so a decoder can refuse a mismatch before
it decodes anything.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

MAGIC = b"MMBZ"
VERSION = 2
"""The version this package writes; it reads 1 (no envelope, no modality) and 2."""
READS = (1, 2)
MODES = ("raw", "text", "image", "audio")
"""What the model codes (by header id): stored bytes labelled raw or text, pixels, 16-bit samples. From version 2 a
mode is also the modality (``mmbytes.codecs.MODALITIES`` name) the model is told its bytes have."""
DEVICES = ("cpu", "cuda", "other")
SUFFIX = ".mmbz"
MAX_TEXT = 255
MAX_CHUNK = 2**24
"""Most bytes per chunk a file may declare (``mmbytes compress --chunk``): a decoder's buffers and caches are
sized by it."""
MAX_ROWS = 2**16
"""Most batch rows a file may declare (``mmbytes compress --batch``)."""
MIN_STREAM = 4
"""Bytes of the shortest coded stream of a non-empty chunk (one 32-bit word of the range coder)."""
"""Longest envelope string (torch version, kernel family, dtype), in UTF-8 bytes."""


class CompressionError(ValueError):
    """A file that cannot be compressed or decompressed; the message names the file and the reason."""


@dataclass(frozen=True)
class Envelope:
    """What bit-identical distributions depend on besides the model and the batch layout. Version 1 containers
    record only the device (the other fields are empty, threads 0: not recorded)."""

    device: str  # cpu, cuda or other
    torch: str  # torch.__version__ (its local part names the build: +cpu, +cu124, ...)
    kernels: str  # CPU: machine and torch.backends.cpu.get_cpu_capability(); CUDA: the GPU's name and CUDA version
    dtype: str  # the model's parameter dtype, e.g. float32
    threads: int  # intra-op threads of the model pass (the coder's fixed thread policy)

    LABELS = {"device": "device", "torch": "torch", "kernels": "kernels", "dtype": "dtype", "threads": "threads"}

    def mismatch(self, machine: Envelope) -> tuple[str, str, str] | None:
        """The first recorded field (device first: the others follow from it) that differs from ``machine``'s, as
        (label, recorded value, machine's value); None when every recorded field matches."""
        for f in fields(self):
            ours, theirs = getattr(self, f.name), getattr(machine, f.name)
            if ours not in ("", 0) and ours != theirs:
                return self.LABELS[f.name], str(ours), str(theirs)
        return None

    def __str__(self) -> str:
        if not self.torch:
            return f"{self.device} (nothing else recorded)"
        return f"{self.device}, torch {self.torch}, {self.kernels}, {self.dtype}, {self.threads} thread(s)"


# -- varints and strings


def put_varint(out: bytearray, n: int) -> None:
    """Unsigned LEB128: 7 bits a byte, least significant first, high bit set on all but the last byte."""
    if n < 0:
        raise ValueError(f"varint of a negative number {n}")
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return


def put_text(out: bytearray, s: str) -> None:
    raw = s.encode()
    if len(raw) > MAX_TEXT:
        raise ValueError(f"envelope string longer than {MAX_TEXT} bytes: {s!r}")
    put_varint(out, len(raw))
    out += raw


class Reader:
    """Reads a header; running past the end raises ``EOFError`` (a truncated file)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EOFError
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.u8()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def text(self) -> str:
        n = self.varint()
        if n > MAX_TEXT:
            raise ValueError("envelope string too long")
        return self.take(n).decode()  # UnicodeDecodeError is a ValueError: a corrupt header


# -- the header


@dataclass
class Header:
    """Everything before the chunk streams. ``slots``/``sizes``: each chunk's batch row and stream length."""

    mode: str
    model: bytes
    length: int
    digest: bytes
    envelope: Envelope
    chunk: int
    rows: int
    shared: bool
    image: dict
    prefix: bytes
    suffix: bytes
    slots: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    version: int = VERSION

    @property
    def modality(self) -> str | None:
        """The modality the model was told the coded bytes have: the mode (version 2); none (version 1)."""
        return self.mode if self.version >= 2 else None

    def pack(self) -> bytes:
        out = bytearray(MAGIC)
        out += bytes([self.version, MODES.index(self.mode)]) + self.model[:8]
        put_varint(out, self.length)
        env = self.envelope
        out += self.digest[:8] + bytes([DEVICES.index(env.device)])
        if self.version >= 2:
            for s in (env.torch, env.kernels, env.dtype):
                put_text(out, s)
            put_varint(out, env.threads)
        for n in (self.chunk, self.rows):
            put_varint(out, n)
        out.append(int(self.shared))
        if self.mode == "image":
            im = self.image
            out.append(("raster", "bmp").index(im["layout"]))
            for n in (im["height"], im["width"], im["channels"]):
                put_varint(out, n)
            out.append(("raster", "patch").index(im["order"]))
            put_varint(out, im["tile"])
        for stored in (self.prefix, self.suffix):
            put_varint(out, len(stored))
            out += stored
        for slot, size in zip(self.slots, self.sizes, strict=True):
            if self.shared:
                put_varint(out, slot)
            put_varint(out, size)
        return bytes(out)

    @property
    def body_length(self) -> int:
        return self.length - len(self.prefix) - len(self.suffix)

    def chunk_lengths(self) -> list[int]:
        n = self.body_length
        return [min(self.chunk, n - i) for i in range(0, n, self.chunk)]


def pack(header: Header, streams: list[bytes]) -> bytes:
    """Header, streams (their lengths set in the header here) and the CRC-32 of everything before it."""
    header.sizes = [len(s) for s in streams]
    packed = header.pack() + b"".join(streams)
    return packed + struct.pack("<I", zlib.crc32(packed))


def unpack(data: bytes, name: str | Path) -> tuple[Header, list[bytes]]:
    """Parse and check a ``.mmbz`` file: magic, version, length and CRC; returns the header and the chunk streams."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise CompressionError(f"{name}: truncated ({len(data)} bytes, not even a header)")
        raise CompressionError(f"{name}: not an mmbytes compressed file (no {MAGIC.decode()} magic)")
    r = Reader(data)
    try:
        r.take(len(MAGIC))
        version = r.u8()
        if version not in READS:
            raise CompressionError(f"{name}: format version {version}; this mmbytes reads versions "
                                   f"{', '.join(map(str, READS))}")
        mode = r.u8()
        model = r.take(8)
        length = r.varint()
        digest = r.take(8)
        device = DEVICES[r.u8()]
        if version >= 2:
            envelope = Envelope(device, r.text(), r.text(), r.text(), r.varint())
            if not (envelope.torch and envelope.kernels and envelope.dtype and envelope.threads):
                raise ValueError
        else:
            envelope = Envelope(device, "", "", "", 0)
        chunk, rows, shared = r.varint(), r.varint(), r.u8()
        if mode >= len(MODES) or shared > 1 or not 1 <= chunk <= MAX_CHUNK or not 1 <= rows <= MAX_ROWS:
            raise ValueError
        image = {}
        if MODES[mode] == "image":
            image["layout"] = ("raster", "bmp")[r.u8()]
            image["height"], image["width"], image["channels"] = r.varint(), r.varint(), r.varint()
            image["order"] = ("raster", "patch")[r.u8()]
            image["tile"] = r.varint()
        prefix = r.take(r.varint())
        suffix = r.take(r.varint())
        h = Header(MODES[mode], model, length, digest, envelope, chunk, rows, bool(shared), image, prefix, suffix,
                   version=version)
        if h.body_length < 0:
            raise ValueError
        n = -(-h.body_length // chunk)  # counted before anything is built: the sizes claimed must fit in the file
        if n * (1 + MIN_STREAM) > len(data) - r.pos:
            raise CompressionError(f"{name}: corrupt (the header claims {h.length:,} bytes in {n:,} chunks, more than "
                                   f"its {len(data):,} bytes can hold)")
        for i in range(n):
            h.slots.append(r.varint() if h.shared else i % rows)
            h.sizes.append(r.varint())
        if any(s >= rows for s in h.slots) or any(s % 4 or s < MIN_STREAM for s in h.sizes):
            raise ValueError
        streams = [r.take(s) for s in h.sizes]
        crc = r.take(4)
    except CompressionError:
        raise
    except EOFError:
        raise CompressionError(f"{name}: truncated ({len(data)} bytes; the header promises more)") from None
    except (ValueError, IndexError):  # a field out of range: a flipped bit that CRC checking comes too late for
        raise CompressionError(f"{name}: corrupt (invalid header)") from None
    if r.pos != len(data):
        raise CompressionError(f"{name}: corrupt ({len(data) - r.pos} bytes after the end of the data)")
    if struct.unpack("<I", crc)[0] != zlib.crc32(data[: r.pos - 4]):
        raise CompressionError(f"{name}: corrupt (CRC-32 mismatch: the file was damaged after it was written)")
    return h, streams
