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


@torch.no_grad()
def sample_bytes(model: nn.Module, num: int, num_bytes: int, prompt: bytes = b"", *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 progress: bool = False, modality: str | None = None) -> list[bytes]:
    """``num`` independent continuations of ``prompt``, each ``num_bytes`` long (prompt included when it fits).
    ``modality`` picks a BLT model's threshold for the samples."""
    device = next(model.parameters()).device
    p = torch.tensor(list(prompt[:num_bytes]), dtype=torch.long, device=device).expand(num, -1)
    g = torch.Generator(device).manual_seed(seed)
    new = num_bytes - p.shape[1]
    with tqdm(total=new * num, unit="B", unit_scale=True, desc="sampling", disable=not progress) as bar:
        ids = None if modality is None else torch.full((num,), MODALITIES.index(modality), device=device)
        out = generate(model, p, new, temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                       on_progress=lambda n: bar.update(n * num - bar.n), modality=ids)
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


def codec_meta(modality: str, data_hparams: dict, args: argparse.Namespace, patch_size: int) -> dict:
    """What the decoder needs, from the command line, else from the options the model was trained with."""
    from mmbytes.codecs.image import tile_for_patch

    options = data_hparams.get("codec_options") or {}
    options = options.get(modality, options) if data_hparams.get("codec") == "auto" else options
    if modality == "image":
        size = args.image_size or options.get("size") or 32
        h, w = (size, size) if isinstance(size, int) else size
        channels = args.channels or options.get("channels", 3)
        order = args.order or options.get("order", "patch")
        tile = args.tile or options.get("tile")
        if tile is None:
            tile = tile_for_patch(patch_size, channels)
        return {"height": h, "width": w, "channels": channels, "order": order, "tile": tile}
    if modality == "audio":
        return {"sample_rate": args.sample_rate or options.get("sample_rate") or 16000}
    return {}


def main(argv: list[str] | None = None) -> None:
    from mmbytes.checkpoint import load_model

    ap = argparse.ArgumentParser(prog="mmbytes sample", description="Generate files from a mmbytes checkpoint.")
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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.image_size and args.tile and (args.order or "patch") == "patch" and args.image_size % args.tile:
        ap.error(f"--image-size {args.image_size} does not split into --tile {args.tile} tiles")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")

    from mmbytes.checkpoint import load_checkpoint
    from mmbytes.codecs import get_codec
    from mmbytes.errors import OptionError

    model, _ = load_model(args.ckpt, map_location=args.device)
    data_hp = load_checkpoint(args.ckpt).get("datamodule_hyper_parameters") or {}
    meta = codec_meta(args.modality, data_hp, args, getattr(model.config, "patch_size", 1))
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
