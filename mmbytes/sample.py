"""``mmbytes sample``: generate files from a checkpoint.

    mmbytes sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --modality text --num 4 --out samples_out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from mmbytes.model import Megabyte
from mmbytes.model.generate import generate

SUFFIX = {"text": ".txt", "raw": ".bin", "image": ".png", "audio": ".wav"}


@torch.no_grad()
def sample_bytes(model: Megabyte, num: int, num_bytes: int, prompt: bytes = b"", *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 progress: bool = False) -> list[bytes]:
    """``num`` independent continuations of ``prompt``, each ``num_bytes`` long (prompt included when it fits)."""
    device = model.global_pad.device
    p = torch.tensor(list(prompt[:num_bytes]), dtype=torch.long, device=device).expand(num, -1)
    g = torch.Generator(device).manual_seed(seed)
    new = num_bytes - p.shape[1]
    with tqdm(total=new * num, unit="B", unit_scale=True, desc="sampling", disable=not progress) as bar:
        out = generate(model, p, new, temperature=temperature, top_k=top_k, top_p=top_p, generator=g,
                       on_progress=lambda n: bar.update(n * num - bar.n))
    return [bytes(row.tolist()) for row in out.to(torch.uint8).cpu()]


def write_samples(samples: list[bytes], modality: str, meta: dict, out: Path, stem: str = "sample") -> list[Path]:
    """Decode each byte sequence with its modality's codec and write it under ``out``."""
    from mmbytes.codecs import get_codec

    out.mkdir(parents=True, exist_ok=True)
    codec = get_codec(modality)
    return [codec.decode(data, meta, out / f"{stem}_{i:03d}{SUFFIX[modality]}") for i, data in enumerate(samples)]


def main(argv: list[str] | None = None) -> None:
    from mmbytes.checkpoint import load_model

    ap = argparse.ArgumentParser(prog="mmbytes sample", description="Generate files from a mmbytes checkpoint.")
    ap.add_argument("--ckpt", required=True, type=Path, help="a checkpoint written by `mmbytes fit`")
    ap.add_argument("--modality", choices=sorted(SUFFIX), default="text")
    ap.add_argument("--num", type=int, default=4, help="independent samples (one batch)")
    ap.add_argument("--out", type=Path, required=True, help="output folder; nothing is written outside it")
    ap.add_argument("--bytes", type=int, default=1024, help="bytes per sample for text and raw")
    ap.add_argument("--prompt", type=Path, help="a file whose bytes (after the codec) start every sample")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    model, _ = load_model(args.ckpt, map_location=args.device)
    prompt = args.prompt.read_bytes() if args.prompt else b""
    samples = sample_bytes(model, args.num, args.bytes, prompt, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, progress=True)
    for path in write_samples(samples, args.modality, {}, args.out):
        print(path)
