"""Text codec: UTF-8 bytes, unchanged. Files that are not valid UTF-8 are refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmbytes.codecs import CodecError
from mmbytes.codecs.raw import read_bytes


@dataclass
class TextCodec:
    name = "text"
    modality = "text"

    def encode(self, path: Path) -> tuple[bytes, dict]:
        data = read_bytes(path)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"{path}: not valid UTF-8 text (byte {e.start})") from e
        return data, {}

    def decode(self, data: bytes, meta: dict, out_path: Path) -> Path:
        Path(out_path).write_bytes(data)  # a model may make invalid UTF-8: keep its bytes as they are
        return out_path
