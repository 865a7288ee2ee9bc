"""Auto codec: picks image, audio, text or raw per file from its first bytes (magic numbers), not its name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmbytes.codecs.audio import AudioCodec
from mmbytes.codecs.image import ImageCodec
from mmbytes.codecs.raw import RawCodec, read_bytes
from mmbytes.codecs.text import TextCodec

IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
AUDIO_MAGIC = (b"fLaC", b"OggS")
WAVE_CONTAINERS = (b"RIFF", b"RF64", b"BW64")  # RF64 / BW64: the 64-bit WAV of broadcast recorders (EBU Tech 3306)


def sniff(head: bytes) -> str:
    """The codec name for a file that starts with ``head``."""
    if head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[:1] == b"P" and head[1:2] in (b"4", b"5", b"6") and head[2:3] in (b" ", b"\t", b"\n", b"\r"):
        return "image"  # binary PBM / PGM / PPM (netpbm)
    if head.startswith(AUDIO_MAGIC) or (head[:4] in WAVE_CONTAINERS and head[8:12] == b"WAVE"):
        return "audio"
    return "text_or_raw"


@dataclass
class AutoCodec:
    image: dict = field(default_factory=dict)
    """Options of the image codec (size, channels, order, tile)."""
    audio: dict = field(default_factory=dict)
    """Options of the audio codec (sample_rate, convert, max_seconds)."""

    name = "auto"
    modality = "raw"

    def __post_init__(self) -> None:
        self.codecs = {"image": ImageCodec(**self.image), "audio": AudioCodec(**self.audio),
                       "text": TextCodec(), "raw": RawCodec()}

    def choose(self, path: Path) -> str:
        data = read_bytes(path)  # refuses directories, unreadable and empty files with a CodecError
        kind = sniff(data[:16])
        if kind != "text_or_raw":
            return kind
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return "raw"
        return "raw" if b"\x00" in data else "text"

    def encode(self, path: Path) -> tuple[bytes, dict]:
        name = self.choose(path)
        data, meta = self.codecs[name].encode(path)
        return data, {**meta, "codec": name, "modality": self.codecs[name].modality}

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        return self.codecs[meta["codec"]].decode(data, meta, out_path)
