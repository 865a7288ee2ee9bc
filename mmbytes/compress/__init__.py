"""Lossless compression with any trained byte model: ``mmbytes compress`` / ``mmbytes decompress``.

    mmbytes compress --ckpt runs/x/checkpoints/last.ckpt photo.ppm speech.wav notes.txt --out packed/
    mmbytes decompress --ckpt runs/x/checkpoints/last.ckpt packed/*.mmbz --out restored/

The package in the order data flows: ``plans`` (which bytes of a file the model codes, the container bytes stored
around them, the exact inverse), ``coder`` (the model's next-byte distributions drive a range coder; the thread
policy and determinism envelope that make decoding exact), ``container`` (the ``.mmbz`` bytes, specified in
``docs/compression-format.md``), ``cli`` (files and folders, atomic output). Python callers use ``compress_files`` and
``decompress_files``.
"""

from mmbytes.compress.cli import load, main, main_decompress
from mmbytes.compress.coder import (
    THREADS,
    coding_policy,
    compress_files,
    decompress_files,
    machine_envelope,
    model_hash,
    shares_batches,
)
from mmbytes.compress.container import MODES, SUFFIX, VERSION, CompressionError, Envelope, Header, unpack
from mmbytes.compress.plans import Plan, plan_file, trained_codecs

__all__ = [
    "MODES", "SUFFIX", "THREADS", "VERSION", "CompressionError", "Envelope", "Header", "Plan", "coding_policy",
    "compress_files", "decompress_files", "load", "machine_envelope", "main", "main_decompress", "model_hash",
    "plan_file", "shares_batches", "trained_codecs", "unpack",
]
