"""Codecs turn a file into the bytes the model sees (plus the metadata the inverse needs) and back.

A codec has ``name``, ``modality``, ``encode(path) -> (bytes, meta)`` and ``decode(bytes, meta, out_path) -> path``,
and decoding is the exact inverse of encoding. ``get_codec(name, **options)`` builds one by name; ``auto`` picks a
codec per file from its content (magic bytes), not its extension.
"""

from __future__ import annotations

MODALITIES = ("text", "raw", "image", "audio")


class CodecError(ValueError):
    """A file a codec cannot turn into bytes; the message names the file and the reason."""


def modality_id(name: str) -> int:
    return MODALITIES.index(name)


def get_codec(name: str, **options):
    from mmbytes.codecs.audio import AudioCodec
    from mmbytes.codecs.auto import AutoCodec
    from mmbytes.codecs.idx import IdxCodec
    from mmbytes.codecs.image import ImageCodec
    from mmbytes.codecs.raw import RawCodec
    from mmbytes.codecs.text import TextCodec

    codecs = {"text": TextCodec, "raw": RawCodec, "image": ImageCodec, "audio": AudioCodec, "auto": AutoCodec,
              "idx": IdxCodec}
    if name not in codecs:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(codecs)}")
    return codecs[name](**options)

