"""``mmbytes sample``: generate files from a checkpoint.

    mmbytes sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --modality text --num 4 --out samples_out
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmbytes.argtypes import nonnegative_float, positive_float, positive_int, probability, regular_file
from mmbytes.argtypes import seed as seed64
from mmbytes.codecs import MODALITIES
from mmbytes.model.generate import generate

SUFFIX = {"text": ".txt", "raw": ".bin", "image": ".png", "audio": ".wav"}
MAX_SAMPLE_BYTES = 2**28  # as the codecs' decoded-size limit: 256 MiB per sample


class SamplingTimeout(RuntimeError):
    """Sampling ran past its time budget."""


@torch.no_grad()
def sample_bytes(model: nn.Module, num: int, num_bytes: int, prompt: bytes = b"", *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 progress: bool = False, modality: str | None = None, desc: str = "sampling",
                 max_seconds: float | None = None) -> list[bytes]:
    """``num`` independent continuations of ``prompt``, each ``num_bytes`` long (prompt included when it fits),
    generated as one batch from a generator of their own (the global random state is left untouched).
    ``modality`` (a ``MODALITIES`` name) is every sample's: a conditioned model generates from its start state (and BLT
    patches with its threshold). Past ``max_seconds``: ``SamplingTimeout``."""
    import time

    device = next(model.parameters()).device
    p = torch.tensor(list(prompt[:num_bytes]), dtype=torch.long, device=device).expand(num, -1)
    g = torch.Generator(device).manual_seed(seed)
    new = num_bytes - p.shape[1]
    deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def made(n: int) -> None:
        bar.update(n * num - bar.n)
        if deadline is not None and time.monotonic() > deadline:
            raise SamplingTimeout(f"{n:,} of {new:,} bytes per sample made in the {max_seconds:g} s allowed")

    with tqdm(total=new * num, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
        ids = None if modality is None else torch.full((num,), MODALITIES.index(modality), device=device)
        out = generate(model, p, new, temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                       on_progress=made, modality=ids)
    return [bytes(row.tolist()) for row in out.to(torch.uint8).cpu()]


def sample_length(modality: str, meta: dict, num_bytes: int) -> int:
    """Bytes per sample: fixed by the codec for images (H*W*C) and whole 16-bit samples for audio."""
    if modality == "image":
        return meta["height"] * meta["width"] * meta["channels"]
    if modality == "audio":
        return num_bytes // 2 * 2
    return num_bytes


def warn_beyond_training(total: int, seq_len: int | None, what: str) -> bool:
    """Warn (and return True) when samples of ``total`` bytes, prompt included, are longer than the training windows:
    the model then generates at positions it never trained on."""
    if not seq_len or total <= seq_len:
        return False
    import warnings

    warnings.warn(f"{what}: samples of {total:,} bytes, but the model was trained on windows of {seq_len:,} bytes; "
                  "bytes past that length are generated at positions it never saw in training (rotary positions "
                  "extrapolate, quality drops). Train with data.seq_len >= the sample length, or sample fewer bytes.",
                  UserWarning, stacklevel=2)
    return True


def write_samples(samples: list[bytes], modality: str, meta: dict, out: Path, stem: str | None = None) -> list[Path]:
    """Decode each byte sequence with its modality's codec and write it under ``out``; images also get a
    contact sheet ``<stem>_sheet.png``."""
    from mmbytes.codecs import get_codec

    stem = stem or modality
    if modality not in SUFFIX:
        raise ValueError(f"unknown modality {modality!r}; known: {', '.join(sorted(SUFFIX))}")
    if Path(stem).name != stem or stem in ("", ".", ".."):  # "../x" or "/x" would write outside ``out``
        raise ValueError(f"sample name {stem!r} is not a plain file name")
    out.mkdir(parents=True, exist_ok=True)
    codec = get_codec(modality)
    paths = [safe_write(out / f"{stem}_{i:03d}{SUFFIX[modality]}", partial(codec.decode, data, meta))
             for i, data in enumerate(samples)]
    if modality == "image" and paths:
        safe_write(out / f"{stem}_sheet.png", partial(contact_sheet, paths))
    return paths


def safe_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a temporary file renamed over ``path`` by ``mmbytes.io.atomic_path``: a link planted at
    ``path`` is replaced, never written through, and a reader never sees half a file. A folder at ``path`` is
    refused."""
    from mmbytes.io import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)
    return path


def contact_sheet(paths: list[Path], out: Path, columns: int = 8, gap: int = 2) -> Path:
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (w + gap) + gap, rows * (h + gap) + gap), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, (gap + (i % cols) * (w + gap), gap + (i // cols) * (h + gap)))
    sheet.save(out, format="PNG")
    return out


def codec_meta(modality: str, description: dict, args: argparse.Namespace, patch_size: int) -> dict:
    """What the decoder needs: from the command line, else from the data description the model was trained on
    (``mmbytes.data_description``), else the defaults (32x32 RGB images in the patch order, 16 kHz audio)."""
    from mmbytes import data_description
    from mmbytes.codecs.image import tile_for_patch

    if modality == "image":
        size = (args.image_size, args.image_size) if args.image_size else (None, None)
        meta = data_description.codec_meta(description, "image", {
            "height": size[0], "width": size[1], "channels": args.channels, "order": args.order, "tile": args.tile})
        h, w = meta["height"] or 32, meta["width"] or 32
        channels, order = meta["channels"] or 3, meta["order"] or "patch"
        tile = meta["tile"] or tile_for_patch(patch_size, channels)
        return {"height": h, "width": w, "channels": channels, "order": order, "tile": tile}
    if modality == "audio":
        meta = data_description.codec_meta(description, "audio", {"sample_rate": args.sample_rate})
        return {"sample_rate": meta["sample_rate"] or 16000}
    return {}


def check_device(device: str) -> None:
    """A device this machine does not have is refused as such, before any checkpoint is read."""
    from mmbytes.errors import OptionError

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {device}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise OptionError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"{build}); use --device cpu")
    if kind == "cuda" and (index := torch.device(device).index) is not None and index >= torch.cuda.device_count():
        raise OptionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def main(argv: list[str] | None = None) -> None:
    from mmbytes.checkpoint import load_model

    ap = argparse.ArgumentParser(prog="mmbytes sample", description="Generate files from a mmbytes checkpoint.",
                                 allow_abbrev=False)
    ap.add_argument("--ckpt", required=True, type=Path, help="a checkpoint written by `mmbytes fit`")
    ap.add_argument("--modality", choices=sorted(SUFFIX), default="text")
    ap.add_argument("--num", type=positive_int, default=4, help="independent samples (one batch)")
    ap.add_argument("--out", type=Path, required=True, help="output folder; nothing is written outside it")
    ap.add_argument("--bytes", type=positive_int, default=1024,
                    help="new bytes per text or raw sample, after the prompt")
    ap.add_argument("--seconds", type=positive_float, default=1.0, help="length of audio samples")
    ap.add_argument("--image-size", type=positive_int, help="image side (default: as trained, else 32)")
    ap.add_argument("--channels", type=int, choices=[1, 3])
    ap.add_argument("--order", choices=["patch", "raster"])
    ap.add_argument("--tile", type=positive_int)
    ap.add_argument("--sample-rate", type=positive_int)
    ap.add_argument("--prompt", type=regular_file, help="a file whose bytes (after the codec) start every sample")
    ap.add_argument("--temperature", type=nonnegative_float, default=1.0, help="0 is greedy")
    ap.add_argument("--top-k", type=positive_int, help="sample from the k likeliest bytes (1 or more)")
    ap.add_argument("--top-p", type=probability, help="sample from the likeliest bytes holding this mass, in (0, 1]")
    ap.add_argument("--seed", type=seed64, default=0, help="a 64-bit seed: 0 to 2^64-1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    args = ap.parse_args(argv)
    if args.image_size and args.tile and (args.order or "patch") == "patch" and args.image_size % args.tile:
        ap.error(f"--image-size {args.image_size} does not split into --tile {args.tile} tiles")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")

    from mmbytes.checkpoint import load_checkpoint
    from mmbytes.codecs import get_codec
    from mmbytes.data_description import of_checkpoint
    from mmbytes.errors import OptionError

    check_device(args.device)
    model, _ = load_model(args.ckpt, map_location=args.device)
    ckpt = load_checkpoint(args.ckpt)
    data_hp = ckpt.get("datamodule_hyper_parameters") or {}
    description = of_checkpoint(ckpt, args.ckpt)
    del ckpt
    meta = codec_meta(args.modality, description, args, getattr(model.config, "patch_size", 1))
    if args.modality == "image" and meta["order"] == "patch" and (meta["height"] % meta["tile"]
                                                                  or meta["width"] % meta["tile"]):
        raise OptionError(f"{args.ckpt}: {meta['width']}x{meta['height']} images do not split into {meta['tile']}x"
                          f"{meta['tile']} tiles; give --tile, --image-size or --order raster")
    if args.modality == "audio":
        num_bytes = int(args.seconds * meta["sample_rate"]) * 2
    else:
        num_bytes = sample_length(args.modality, meta, args.bytes)
    if num_bytes < 1:
        raise OptionError(f"--seconds {args.seconds} at {meta.get('sample_rate')} Hz is not one whole sample")
    if num_bytes > MAX_SAMPLE_BYTES:  # before the model allocates its cache for that many bytes
        raise OptionError(f"{num_bytes:,} bytes per sample asked for, over the {MAX_SAMPLE_BYTES:,}-byte limit; ask "
                          "for fewer bytes, seconds or pixels")
    prompt = b""
    if args.prompt:  # the prompt goes through the same codec, so an image prompt is its top rows in scan order
        if args.modality == "image":
            prompt = get_codec("image", size=(meta["height"], meta["width"]), channels=meta["channels"],
                               order=meta["order"], tile=meta["tile"]).encode(args.prompt)[0][: num_bytes // 2]
        elif args.modality == "audio":
            prompt = get_codec("audio", sample_rate=meta["sample_rate"]).encode(args.prompt)[0][: num_bytes // 2]
        else:
            prompt = get_codec(args.modality).encode(args.prompt)[0]
            num_bytes += len(prompt)
            if num_bytes > MAX_SAMPLE_BYTES:
                raise OptionError(f"{args.prompt}: a {len(prompt):,}-byte prompt makes samples of {num_bytes:,} bytes, "
                                  f"over the {MAX_SAMPLE_BYTES:,}-byte limit")
    warn_beyond_training(num_bytes, data_hp.get("seq_len"), "mmbytes sample")
    samples = sample_bytes(model, args.num, num_bytes, prompt, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, progress=True, modality=args.modality)
    for path in write_samples(samples, args.modality, meta, args.out):
        print(path)
