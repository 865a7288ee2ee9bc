"""Raw codec: a file's bytes exactly as stored, headers and container structure included (a PNG's chunks, a
WAV header, a PDF's objects), so a model learns real file formats."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mmbytes.codecs import CodecError


def read_bytes(path: Path) -> bytes:
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise CodecError(f"{path}: is a directory")
        if not stat.S_ISREG(mode):  # reading a FIFO would wait for a writer forever
            raise CodecError(f"{path}: not a regular file (a FIFO, socket or device)")
        data = Path(path).read_bytes()
    except IsADirectoryError as e:
        raise CodecError(f"{path}: is a directory") from e
    except OSError as e:
        raise CodecError(f"{path}: unreadable ({e.strerror or e})") from e
    if not data:
        raise CodecError(f"{path}: empty file")
    return data


@dataclass
class RawCodec:
    name = "raw"
    modality = "raw"

    def encode(self, path: Path) -> tuple[bytes, dict]:
        return read_bytes(path), {}

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        Path(out_path).write_bytes(data)
        return out_path
