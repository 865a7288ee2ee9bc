"""Codecs turn a file into the bytes the model sees (plus the metadata the inverse needs) and back.

A codec has ``name``, ``modality``, ``encode(path) -> (bytes, meta)`` and ``decode(bytes, meta, out_path) -> path``,
and decoding is the exact inverse of encoding. ``get_codec(name, **options)`` builds one by name; ``auto`` picks a
codec per file from its content (magic bytes), not its extension.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmbytes.errors import MmbytesError, OptionError

MODALITIES = ("text", "raw", "image", "audio")


class CodecError(MmbytesError, ValueError):
    """A file a codec cannot turn into bytes; the message names the file and the reason."""


DECODED_LIMIT = {"bytes": 256 * 2**20}


@contextmanager
def decoded_limit(max_bytes: int) -> Iterator[None]:
    """Within this block, codecs refuse a file whose decoded form would exceed ``max_bytes`` (checked from headers,
    before the memory is taken)."""
    old, DECODED_LIMIT["bytes"] = DECODED_LIMIT["bytes"], max_bytes
    try:
        yield
    finally:
        DECODED_LIMIT["bytes"] = old


def check_decoded(path, nbytes: int, what: str) -> None:
    """Refuse ``path`` if it would decode to more than the limit."""
    if nbytes > DECODED_LIMIT["bytes"]:
        raise CodecError(f"{path}: {what} would decode to {nbytes:,} bytes, over the {DECODED_LIMIT['bytes']:,}-byte "
                         "limit")


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
        raise OptionError(f"unknown codec {name!r}; known: {', '.join(codecs)}")
    return codecs[name](**options)

