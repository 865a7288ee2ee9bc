"""Lossless compression with any trained model: ``mmbytes compress`` / ``mmbytes decompress``.

    mmbytes compress --ckpt runs/x/checkpoints/last.ckpt photo.ppm speech.wav notes.txt --out packed/
    mmbytes decompress --ckpt runs/x/checkpoints/last.ckpt packed/*.mmbz --out restored/

A byte model's next-byte distribution drives a range coder (Deletang et al., 2023, "Language Modeling Is
Compression", arXiv:2309.10668): a file costs the model's negative log-likelihood in bits plus a few bytes. The coder
is ``constriction``'s range coder (32-bit words, 24-bit probabilities); each distribution is the float64 softmax of
the model's logits, quantized by ``constriction``'s ``Categorical(perfect=False)``, which gives every byte value a
nonzero frequency.

Encoder and decoder must compute bit-identical distributions. Both run the one cached incremental path of the model
(``new_cache`` / ``prefill`` of an empty prompt / ``step``, as in ``mmbytes.model.generate``) over the same batch
layout: a chunk is always coded in a batch of the same number of rows, in the same row, with caches sized for the same
chunk length. Batched kernels are not row-invariant (on CPU a row's logits change with its row index and with the
batch size; SpaceByte's global attention also changes with the other rows' bytes), so the layout is part of the
format. Architectures whose rows are independent of the other rows' bytes for a fixed batch shape (MEGABYTE and the
flat Transformer; tested in ``tests/test_compress.py``) share batches between files, unused rows holding zeros;
every other architecture (SpaceByte, and any new one until it is tested) codes each file's chunks in batches of
their own. The decoder checks the original's checksum before anything is written.

Each input goes through the codec of its modality when that reproduces the file exactly: 16-bit mono PCM WAV files
code their samples (little-endian int16, as the audio codec gives them) and keep the rest of the container (header,
other chunks) as stored bytes; uncompressed images (binary PPM/PGM, 24-bit BMP) code their pixels in the model's
byte order (patch or raster, as the model was trained) and keep the container's header; everything else (PNG, JPEG,
FLAC, text, any file) is coded as stored. A modality transform is used only after its inverse has given back the
file byte for byte.

File format (``.mmbz``, all integers unsigned LEB128 varints unless sized):

    magic b"MMBZ" | version u8 | mode u8 (0 raw, 1 text, 2 image, 3 audio) | model hash 8 bytes
    | original length | original SHA-256, first 8 bytes | device u8 (0 cpu, 1 cuda, 2 other)
    | chunk length L | rows R | shared u8 | mode parameters | prefix length, prefix | suffix length, suffix
    | per chunk: [row if shared] compressed length | compressed chunks | CRC-32 of everything before it, u32 LE

The model hash is the SHA-256 of the model config and every weight. Mode parameters: image: layout u8 (0 raster
top-down, 1 BMP bottom-up BGR with rows padded to 4 bytes), height, width, channels, order u8 (0 raster, 1 patch),
tile; other modes: none.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAGIC = b"MMBZ"
VERSION = 1
MODES = ("raw", "text", "image", "audio")
DEVICES = ("cpu", "cuda")
SUFFIX = ".mmbz"
ROW_INDEPENDENT = ("megabyte", "transformer")
"""Architectures whose cached step gives a row the same logits whatever the other rows hold (for a fixed batch size
and row): their files may share batches. Checked for every size in ``tests/test_compress.py``."""


class CompressionError(ValueError):
    """A file that cannot be compressed or decompressed; the message names the file and the reason."""


# -- model identity


def model_hash(model: nn.Module) -> bytes:
    """SHA-256 of the model's config and weights (names, dtypes, shapes, values): the first 8 bytes go in the header."""
    from dataclasses import asdict, is_dataclass

    config = model.config
    h = hashlib.sha256(json.dumps(asdict(config) if is_dataclass(config) else repr(config), sort_keys=True,
                                  default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def require_byte_model(model: nn.Module) -> None:
    """Coding needs next-byte distributions from the cached byte path; a token model (the BPE baseline) has none."""
    if not hasattr(model, "step"):
        raise CompressionError(f"a {getattr(model.config, 'arch', type(model).__name__)} model predicts tokens, not "
                               "bytes: compress with a byte model (MEGABYTE, SpaceByte, BLT, the byte Transformer)")


def rows_independent(model: nn.Module) -> bool:
    return getattr(model.config, "arch", None) in ROW_INDEPENDENT


# -- varints and the header


def put_varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise ValueError(f"varint of a negative number {n}")
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return


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


@dataclass
class Plan:
    """How one file is coded: the bytes the model codes (``body``), the stored container bytes around them and
    what the inverse needs."""

    mode: str
    body: bytes
    prefix: bytes = b""
    suffix: bytes = b""
    image: dict = field(default_factory=dict)


@dataclass
class Header:
    mode: str
    model: bytes
    length: int
    digest: bytes
    device: str
    chunk: int
    rows: int
    shared: bool
    image: dict
    prefix: bytes
    suffix: bytes
    slots: list[int]
    sizes: list[int]

    def pack(self) -> bytes:
        out = bytearray(MAGIC)
        out += bytes([VERSION, MODES.index(self.mode)]) + self.model[:8]
        put_varint(out, self.length)
        out += self.digest[:8] + bytes([DEVICES.index(self.device) if self.device in DEVICES else 2])
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
        if version != VERSION:
            raise CompressionError(f"{name}: format version {version}; this mmbytes reads version {VERSION}")
        mode = r.u8()
        model = r.take(8)
        length = r.varint()
        digest = r.take(8)
        device = r.u8()
        chunk, rows, shared = r.varint(), r.varint(), r.u8()
        if mode >= len(MODES) or shared > 1 or chunk < 1 or rows < 1:
            raise ValueError
        image = {}
        if MODES[mode] == "image":
            image["layout"] = ("raster", "bmp")[r.u8()]
            image["height"], image["width"], image["channels"] = r.varint(), r.varint(), r.varint()
            image["order"] = ("raster", "patch")[r.u8()]
            image["tile"] = r.varint()
        prefix = r.take(r.varint())
        suffix = r.take(r.varint())
        h = Header(MODES[mode], model, length, digest, (*DEVICES, "other")[min(device, 2)], chunk, rows,
                   bool(shared), image, prefix, suffix, [], [])
        if h.body_length < 0:
            raise ValueError
        n = len(h.chunk_lengths())
        for i in range(n):
            h.slots.append(r.varint() if h.shared else i % rows)
            h.sizes.append(r.varint())
        if any(s >= rows for s in h.slots) or any(s % 4 for s in h.sizes):
            raise ValueError
        streams = [r.take(s) for s in h.sizes]
        crc = r.take(4)
    except EOFError:
        raise CompressionError(f"{name}: truncated ({len(data)} bytes; the header promises more)") from None
    except (ValueError, IndexError):  # a field out of range: a flipped bit that CRC checking comes too late for
        raise CompressionError(f"{name}: corrupt (invalid header)") from None
    if r.pos != len(data):
        raise CompressionError(f"{name}: corrupt ({len(data) - r.pos} bytes after the end of the data)")
    if struct.unpack("<I", crc)[0] != zlib.crc32(data[: r.pos - 4]):
        raise CompressionError(f"{name}: corrupt (CRC-32 mismatch: the file was damaged after it was written)")
    return h, streams


# -- modalities: which bytes the model codes, and the exact inverse


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


def trained_codecs(data_hparams: dict | None) -> tuple[set[str], dict, int | None]:
    """From a checkpoint's datamodule hyperparameters: the modalities the model was trained on, its image codec
    options (byte order, tile) and its sequence length. Unknown (no hyperparameters): every modality, raster."""
    if not data_hparams:
        return set(MODES), {}, None
    modalities, image = set(), {}
    for s in data_hparams.get("sets") or [data_hparams]:
        codec, options = s.get("codec", "raw"), s.get("codec_options") or {}
        if codec == "auto":
            modalities |= set(MODES)
            image = options.get("image", image)
        elif codec in ("image", "idx"):
            modalities.add("image")
            image = options
        elif codec in MODES:
            modalities.add(codec)
    return modalities, {k: image[k] for k in ("order", "tile") if k in image}, data_hparams.get("seq_len")


# -- the coder


@dataclass
class Row:
    """One chunk in one batch row: ``length`` bytes, coded by ``encoder`` (its bytes known) or ``decoder``."""

    length: int
    data: np.ndarray | None = None  # (length,) uint8: known when encoding, filled when decoding
    coder: object = None
    bits: float = 0.0  # the model's NLL of this chunk's bytes under the quantized-to-float64 distributions


@contextmanager
def deterministic():
    """Deterministic kernels while coding; no TF32 on CUDA (both sides must compute the same bits)."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[2], prev[3]


@torch.no_grad()
def code_batch(model: nn.Module, rows: dict[int, Row], batch: int, chunk: int, encode: bool,
               on_step: Callable[[int], None] | None = None) -> None:
    """Run one batch of ``batch`` rows through the model's cached path, byte by byte, and encode (or decode) the
    chunk in each used row. Unused rows, and rows past their chunk's end, are fed zeros: encoder and decoder feed the
    model the same bytes in the same rows at every step, so they see the same logits."""
    import constriction

    family = constriction.stream.model.Categorical(perfect=False)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    steps = max(r.length for r in rows.values())
    cache = model.new_cache(batch, chunk, device, dtype)
    logits = model.prefill(torch.zeros(batch, 0, dtype=torch.long, device=device), cache)
    fed = np.zeros(batch, dtype=np.int64)
    for t in range(steps):
        probs = torch.softmax(logits.double(), dim=-1).cpu().numpy()  # (batch, 256)
        fed[:] = 0
        done = 0
        for slot, row in rows.items():
            if t >= row.length:
                continue
            p = probs[slot : slot + 1]
            if encode:
                sym = int(row.data[t])
                row.coder.encode(np.array([sym], dtype=np.int32), family, p)
            else:
                try:
                    sym = int(row.coder.decode(family, p)[0])
                except Exception:  # a stream that ends early or holds garbage: the checksum will refuse the file
                    sym = 0
                row.data[t] = sym
            row.bits -= float(np.log2(p[0, sym] / p[0].sum()))
            fed[slot] = sym
            done += 1
        if on_step is not None:
            on_step(done)
        if t + 1 < steps:
            logits = model.step(torch.from_numpy(fed).to(device), cache)


@dataclass
class Job:
    """One file being compressed or decompressed: its name, header, chunks (one ``Row`` each) and, when compressing,
    its plan and bytes; ``index`` is its place in the caller's list."""

    name: str
    index: int
    header: Header | None = None
    rows: list[Row] = field(default_factory=list)
    plan: Plan | None = None
    original: bytes | None = None


def schedule(jobs: list[Job], batch: int, shared: bool) -> list[tuple[int, dict[int, Row]]]:
    """Batches as (rows, {row index: Row}). Shared: chunks of all files in their recorded rows of ``batch``, packed so
    that each batch holds at most one chunk per row index. Not shared: each file's chunks in batches of their own,
    ``rows`` at a time (the last batch of a file has only the rows it needs)."""
    groups = []
    if shared:
        queues: dict[int, list[Row]] = {}
        for job in jobs:
            for slot, row in zip(job.header.slots, job.rows, strict=True):
                queues.setdefault(slot, []).append(row)
        while any(queues.values()):
            groups.append((batch, {slot: q.pop(0) for slot, q in queues.items() if q}))
        return groups
    for job in jobs:
        rows = job.header.rows
        for g in range(0, len(job.rows), rows):
            part = job.rows[g : g + rows]
            groups.append((len(part), dict(enumerate(part))))
    return groups


def run_groups(model: nn.Module, groups: list[tuple[int, int, dict[int, Row]]], encode: bool, desc: str,
               progress: bool) -> None:
    from tqdm import tqdm

    total = sum(r.length for _, _, g in groups for r in g.values())
    with deterministic(), tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for batch, chunk, rows in groups:
            code_batch(model, rows, batch, chunk, encode, on_step=bar.update)


def compress_files(model: nn.Module, inputs: list[tuple[bytes, str]], *, chunk: int = 4096, batch: int = 16,
                   modalities: Iterable[str] = MODES, image_options: dict | None = None, raw_only: bool = False,
                   progress: bool = False) -> list[tuple[bytes, dict]]:
    """Compress ``(data, name)`` items; returns ``(mmbz bytes, stats)`` per item. All chunks of all files
    are coded in batches of ``batch`` rows (of each file alone for architectures with row-dependent kernels)."""
    import constriction

    if chunk < 1 or batch < 1:
        raise ValueError(f"chunk ({chunk}) and batch ({batch}) must be at least 1")
    require_byte_model(model)
    mhash = model_hash(model)
    device = next(model.parameters()).device.type
    shared = rows_independent(model)
    jobs = []
    for k, (data, name) in enumerate(inputs):
        plan = plan_file(data, set(modalities), image_options or {}, raw_only)
        job = Job(name, k, plan=plan, original=data)
        body = np.frombuffer(plan.body, dtype=np.uint8)
        job.rows = [Row(min(chunk, len(body) - i), body[i : i + chunk], constriction.stream.queue.RangeEncoder())
                    for i in range(0, len(body), chunk)]
        n = len(job.rows)
        job.header = Header(plan.mode, mhash, len(data), hashlib.sha256(data).digest(), device, chunk,
                            batch if shared else min(batch, max(n, 1)), shared, plan.image, plan.prefix,
                            plan.suffix, [i % batch for i in range(n)], [])
        jobs.append(job)
    if shared:  # longest chunks together, so short ones do not wait on long ones; rows assigned in that order
        order = sorted(((r.length, j, i) for j, job in enumerate(jobs) for i, r in enumerate(job.rows)), reverse=True)
        for k, (_, j, i) in enumerate(order):
            jobs[j].header.slots[i] = k % batch
        groups = [[jobs[j].rows[i] for _, j, i in order[g : g + batch]] for g in range(0, len(order), batch)]
        groups = [(batch, chunk, dict(enumerate(g))) for g in groups]
    else:
        groups = [(rows, chunk, g) for rows, g in schedule(jobs, batch, False)]
    run_groups(model, groups, True, "compress", progress)
    out = []
    for job in jobs:
        streams = [r.coder.get_compressed().astype("<u4").tobytes() for r in job.rows]
        job.header.sizes = [len(s) for s in streams]
        packed = job.header.pack() + b"".join(streams)
        packed += struct.pack("<I", zlib.crc32(packed))
        bits = sum(r.bits for r in job.rows)
        out.append((packed, {"name": job.name, "mode": job.plan.mode, "original": len(job.original),
                             "compressed": len(packed), "coded": len(job.plan.body), "model_bits": bits,
                             "payload": sum(job.header.sizes),
                             "container": len(job.plan.prefix) + len(job.plan.suffix)}))
    return out


def decompress_files(model: nn.Module, inputs: list[tuple[bytes, str]], *, progress: bool = False
                     ) -> list[bytes | CompressionError]:
    """Decompress ``(mmbz bytes, name)`` items: the original bytes, or the error that refused the item (another
    model, truncated, corrupt, or decoded bytes whose checksum differs: nothing of such an item is returned)."""
    import constriction

    require_byte_model(model)
    mhash = model_hash(model)
    device = next(model.parameters()).device.type
    shared = rows_independent(model)
    results: list[bytes | CompressionError | None] = [None] * len(inputs)
    jobs = []
    for k, (data, name) in enumerate(inputs):
        try:
            h, streams = unpack(data, name)
            if h.model != mhash[:8]:
                raise CompressionError(f"{name}: compressed with another model (hash {h.model.hex()}); this "
                                       f"checkpoint's model is {mhash[:8].hex()}")
            if h.shared and not shared:
                raise CompressionError(f"{name}: coded with batches shared between files, which this architecture "
                                       f"({model.config.arch}) cannot reproduce")
        except CompressionError as e:
            results[k] = e
            continue
        job = Job(name, k, header=h)
        job.rows = [Row(n, np.zeros(n, dtype=np.uint8),
                        constriction.stream.queue.RangeDecoder(np.frombuffer(s, dtype="<u4").astype(np.uint32)))
                    for n, s in zip(h.chunk_lengths(), streams, strict=True)]
        jobs.append(job)
    groups = []
    for (rows, chunk, sh), members in _by_layout(jobs).items():
        groups += [(n, chunk, g) for n, g in schedule(members, rows, sh)]
    run_groups(model, groups, False, "decompress", progress)
    for job in jobs:
        h = job.header
        body = b"".join(r.data.tobytes() for r in job.rows)
        try:
            data = rebuild(body, h.mode, h.prefix, h.suffix, h.image)
        except ValueError as e:
            results[job.index] = CompressionError(f"{job.name}: corrupt ({e})")
            continue
        if len(data) != h.length or hashlib.sha256(data).digest()[:8] != h.digest:
            where = f" (compressed on {h.device}, decoded on {device})" if h.device != device else ""
            results[job.index] = CompressionError(
                f"{job.name}: decoded bytes do not match the original's checksum{where}; nothing written. The model's "
                "distributions were not reproduced bit for bit (another device, torch version or thread setup?)")
        else:
            results[job.index] = data
    return results


def _by_layout(jobs: list[Job]) -> dict[tuple[int, int, bool], list[Job]]:
    out: dict[tuple[int, int, bool], list[Job]] = {}
    for job in jobs:
        h = job.header
        out.setdefault((h.rows, h.chunk, h.shared), []).append(job)
    return out


# -- files and the command line


def atomic_write(path: Path, data: bytes, root: Path) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over it (a link at ``path`` is replaced, not
    followed). Refuses a folder on the way that leads outside ``root`` (a link left in the output folder)."""
    root.mkdir(parents=True, exist_ok=True)
    existing = path.parent
    while not existing.exists():  # check before making folders: mkdir would follow a link out of ``root``
        existing = existing.parent
    if not existing.resolve().is_relative_to(root.resolve()):
        raise CompressionError(f"{path}: its folder leads outside {root}; not written")
    from mmbytes.checkpoint import write_atomically

    write_atomically(path, lambda f: f.write(data))


def walk(sources: list[Path], suffix: str | None = None) -> list[tuple[Path, Path]]:
    """(file, path relative to the output folder): a file given directly keeps its name; a folder's files keep their
    path inside it, under the folder's name. With ``suffix`` only files with that suffix are taken from folders."""
    out = []
    for src in sources:
        if src.is_dir():
            root = Path(src.resolve().name)
            out += [(p, root / p.relative_to(src)) for p in sorted(src.rglob("*"))
                    if p.is_file() and (suffix is None or p.name.endswith(suffix))]
        elif src.is_file():
            out.append((src, Path(src.name)))
        else:
            raise CompressionError(f"{src}: no such file or folder")
    return out


def load(ckpt: Path, device: str) -> tuple[nn.Module, dict]:
    from mmbytes.checkpoint import load_checkpoint, load_model

    model, _ = load_model(ckpt, map_location=device)
    data_hp = load_checkpoint(ckpt).get("datamodule_hyper_parameters") or {}
    return model, data_hp


def main(argv: list[str] | None = None, command: str = "compress") -> None:
    from mmbytes.argtypes import at_most

    decompress = command == "decompress"
    ap = argparse.ArgumentParser(
        prog=f"mmbytes {command}",
        description="Decompress .mmbz files with the model that compressed them." if decompress else
        "Compress files losslessly with a trained model (arithmetic coding of its next-byte distributions).")
    ap.add_argument("--ckpt", required=True, type=Path, help="a checkpoint written by `mmbytes fit`")
    ap.add_argument("inputs", nargs="+", type=Path,
                    help=".mmbz files or folders holding them" if decompress else "files and folders")
    ap.add_argument("--out", required=True, type=Path, help="output folder; nothing is written outside it")
    if not decompress:
        ap.add_argument("--chunk", type=at_most(int, 1, 2**24),
                        help="bytes per independently coded chunk (default: the model's training sequence length, "
                        "else 4096); longer chunks give more context, shorter ones more rows to code in parallel")
        ap.add_argument("--batch", type=at_most(int, 1, 2**16), default=16,
                        help="rows coded together (chunks of one or many files)")
        ap.add_argument("--raw", action="store_true", help="code every file as stored (no pixel or sample mode)")
        ap.add_argument("--verify", action="store_true",
                        help="decompress every file before writing it and write only those that come back exact "
                        "(twice the time)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs; decompress on the kind of device the files were compressed on")
    ap.add_argument("--threads", type=at_most(int, 1, 1024), default=1,
                    help="torch CPU threads (default 1: a step runs small matrices, which more threads slow down on a "
                    "busy machine; more help large models on idle cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        files = walk(args.inputs, SUFFIX if decompress else None)
    except CompressionError as e:
        sys.exit(f"mmbytes {command}: {e}")
    model, data_hp = load(args.ckpt, args.device)
    failed = 0
    if decompress:
        targets = [args.out / (rel.with_name(rel.name[: -len(SUFFIX)]) if rel.name.endswith(SUFFIX) else rel)
                   for _, rel in files]
        if len(set(targets)) < len(targets):
            twice = sorted({str(t) for t in targets if targets.count(t) > 1})
            sys.exit(f"mmbytes decompress: two inputs would be written to the same file: {', '.join(twice)}")
        items = [(p.read_bytes(), str(p)) for p, _ in files]
        results = decompress_files(model, items, progress=not args.quiet)
        for (p, _), target, result in zip(files, targets, results, strict=True):
            if isinstance(result, CompressionError):
                print(f"mmbytes decompress: {result}", file=sys.stderr)
                failed += 1
                continue
            try:
                atomic_write(target, result, args.out)
            except CompressionError as e:
                print(f"mmbytes decompress: {e}", file=sys.stderr)
                failed += 1
                continue
            print(f"{p} -> {target} ({len(result):,} bytes)")
    else:
        modalities, image_options, seq_len = trained_codecs(data_hp)
        items = [(p.read_bytes(), str(p), args.out / rel.with_name(rel.name + SUFFIX)) for p, rel in files]
        targets = [target for _, _, target in items]
        if len(set(targets)) < len(targets):
            twice = sorted({str(t) for t in targets if targets.count(t) > 1})
            sys.exit(f"mmbytes compress: two inputs would be written to the same file: {', '.join(twice)}")
        results = compress_files(model, [(data, name) for data, name, _ in items], chunk=args.chunk or seq_len or 4096,
                                 batch=args.batch, modalities=modalities, image_options=image_options,
                                 raw_only=args.raw, progress=not args.quiet)
        checked = decompress_files(model, [(p, s["name"]) for p, s in results], progress=not args.quiet) \
            if args.verify else [data for data, _, _ in items]
        for (data, name, target), (packed, stats), back in zip(items, results, checked, strict=True):
            if back != data:
                print(f"mmbytes compress: {name}: did not decompress to the original ({back}); not written",
                      file=sys.stderr)
                failed += 1
                continue
            try:
                atomic_write(target, packed, args.out)
            except CompressionError as e:
                print(f"mmbytes compress: {e}", file=sys.stderr)
                failed += 1
                continue
            rate = f", {stats['compressed'] / stats['original']:.1%}" if stats["original"] else ""
            print(f"{name} -> {target} ({stats['mode']}: {stats['original']:,} -> {stats['compressed']:,} bytes"
                  f"{rate})")
    if failed:
        sys.exit(f"mmbytes {command}: {failed} of {len(files)} files refused")


def main_decompress(argv: list[str] | None = None) -> None:
    main(argv, "decompress")
