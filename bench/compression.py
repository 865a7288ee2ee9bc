"""Lossless compression of held-out real files: ``mmbytes compress`` against gzip -9, xz -9, zstd -19, PNG (Pillow,
optimize) and WebP lossless for images, FLAC (soundfile, level 8) for audio.

The files are the validation side of the shards ``recipes/compression.yaml`` trains on (the same split hash as
``mmbytes shards``, so the model never saw them): CIFAR-10 images (their pixels in binary PPM files: an uncompressed
container the model codes pixel by pixel and every codec starts from), FSDD spoken digits (WAV as stored), pieces of
the held-out 64 KiB text chunks, and mixed files. Rates are compressed bytes / original bytes over all files of a
modality, every header included (the .mmbz header, gzip's, PNG's, ...); the model itself is not counted. ``gap``
is the .mmbz size over the model's NLL of the coded bytes (the ideal code length), ``coder`` the same for the coded
streams alone, ``header`` the share of the .mmbz size that is header and stored container bytes; ``enc``/``dec`` are
coding speeds in original bytes per second (the coder's model pass runs on one thread, its fixed thread policy), and
``best other`` names the smallest baseline, so the table says plainly where the model loses. Baselines whose library
is missing (zstandard, Pillow, soundfile) are left out.

    python bench/compression.py --ckpt runs/compression/version_0/checkpoints/last.ckpt --device cuda \
        --json bench/compression.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import platform
import time
from pathlib import Path

import torch

from mmbytes.compress import compress_files, decompress_files, load, machine_envelope, trained_codecs
from mmbytes.io import write_text
from mmbytes.shards import DEFAULT_CHUNK, chunks, split_hash
from mmbytes.stamp import stamp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def held_out(name: str, part: int = 0, val_fraction: float = 0.1) -> bool:
    """Whether ``mmbytes shards`` put chunk ``part`` of the file it names ``name`` in the validation split."""
    return split_hash(hashlib.sha1(f"{name}#{part}".encode()).hexdigest()) < val_fraction


def ppm(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PPM")
        return buf.getvalue()


def select(root: Path, per_modality: int, text_bytes: int, max_file: int) -> dict[str, list[tuple[str, bytes]]]:
    """Held-out files per modality: (name, bytes)."""
    images = [p for p in sorted((root / "images" / "cifar10_train_subset").rglob("*.jpg"))
              if held_out(f"cifar10_train_subset/{p.relative_to(root / 'images' / 'cifar10_train_subset')}")]
    audio = [p for p in sorted((root / "audio" / "fsdd").glob("*.wav")) if held_out(f"fsdd/{p.name}")]
    files = [p for p in sorted((root / "files").iterdir())
             if held_out(f"files/{p.name}") and p.stat().st_size <= max_file]
    text = []
    for name in ("tinyshakespeare.txt", "wikitext2_valid.txt"):
        data = (root / "text" / name).read_bytes()
        for i, part in enumerate(chunks(data, DEFAULT_CHUNK["text"], at_newline=True)[0]):
            if held_out(name, i):
                cut = part.rfind(b"\n", 0, text_bytes)
                text.append((f"{name}#{i}", part[: cut + 1 if cut > 0 else text_bytes]))
    step = lambda xs: xs[:: max(1, len(xs) // per_modality)][:per_modality]  # noqa: E731 (spread over classes)
    return {"image": [(f"{p.parent.name}/{p.name} as PPM", ppm(p)) for p in step(images)],
            "audio": [(p.name, p.read_bytes()) for p in step(audio)],
            "text": step(text),
            "files": [(p.name, p.read_bytes()) for p in files[:per_modality]]}


def baselines(modality: str, data: bytes) -> dict[str, int]:
    """Compressed sizes of ``data`` by every general and modality codec whose library is installed."""
    out = {"gzip -9": len(gzip.compress(data, 9, mtime=0)), "xz -9": len(lzma.compress(data, preset=9))}
    try:
        import zstandard

        out["zstd -19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    except ImportError:  # optional: pip install mmbytes[bench]
        pass
    if modality == "image":
        try:
            from PIL import Image
        except ImportError:
            return out
        with Image.open(io.BytesIO(data)) as im:
            for fmt, kw in (("PNG", {"optimize": True}), ("WebP", {"lossless": True, "quality": 100, "method": 6})):
                buf = io.BytesIO()
                try:
                    im.save(buf, format=fmt, **kw)
                except (KeyError, OSError):  # Pillow built without this format
                    continue
                out[fmt] = len(buf.getvalue())
    if modality == "audio":
        try:
            import soundfile as sf
        except ImportError:
            return out
        samples, rate = sf.read(io.BytesIO(data), dtype="int16")
        buf = io.BytesIO()
        sf.write(buf, samples, rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
        out["FLAC"] = len(buf.getvalue())
    return out


COLUMNS = ["gzip -9", "xz -9", "zstd -19", "PNG", "WebP", "FLAC"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="the model (recipes/compression.yaml)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--per-modality", type=int, default=8, help="held-out files per modality")
    ap.add_argument("--text-bytes", type=int, default=8192, help="bytes kept of each held-out text chunk")
    ap.add_argument("--max-file", type=int, default=32768, help="largest mixed file taken")
    ap.add_argument("--chunk", type=int, help="chunk length (default: the model's training sequence length)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs (decompression on the same kind of device)")
    ap.add_argument("--modalities", default="image,audio,text,files", help="which sets to run, comma-separated")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model, description, seq_len = load(args.ckpt, args.device)
    modalities, image_options = trained_codecs(description)
    chunk = args.chunk or seq_len or 4096
    sets = select(args.data, args.per_modality, args.text_bytes, args.max_file)
    rows = []
    for modality, files in sets.items():
        if modality not in args.modalities.split(","):
            continue
        originals = [d for _, d in files]
        t0 = time.perf_counter()
        packed = compress_files(model, [(d, n) for n, d in files], chunk=chunk, batch=args.batch,
                                modalities=modalities, image_options=image_options)
        t1 = time.perf_counter()
        back = decompress_files(model, [(p, s["name"]) for p, s in packed])
        t2 = time.perf_counter()
        if back != originals:
            errors = [str(b)[:200] for b in back if isinstance(b, Exception)]
            raise SystemExit(f"{modality}: a round trip failed: {errors}")
        total = sum(map(len, originals))
        stats = [s for _, s in packed]
        bits = sum(s["model_bits"] for s in stats)
        size = sum(s["compressed"] for s in stats)
        base: dict[str, int] = {}
        for d in originals:
            for k, v in baselines(modality, d).items():
                base[k] = base.get(k, 0) + v
        row = {"modality": modality, "files": len(files), "bytes": total, "coded_bytes": sum(s["coded"] for s in stats),
               "modes": sorted({s["mode"] for s in stats}), "mmbytes": size / total,
               "model_bits_per_coded_byte": bits / max(1, sum(s["coded"] for s in stats)),
               "gap": size / (bits / 8) - 1, "payload_gap": sum(s["payload"] for s in stats) / (bits / 8) - 1,
               "header_share": (size - sum(s["payload"] for s in stats)) / size,
               "encode_bytes_s": total / (t1 - t0), "decode_bytes_s": total / (t2 - t1),
               **{k: v / total for k, v in base.items()}, "names": [n for n, _ in files]}
        row["best_other"] = min(base, key=base.get)
        row["loses"] = size > base[row["best_other"]]
        rows.append(row)
        print(f"{modality}: {len(files)} files, {total:,} bytes, done in {t2 - t0:.0f} s", flush=True)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    head = f"{'modality':9s} {'files':>5s} {'bytes':>8s} {'mmbytes':>8s} " + " ".join(f"{c:>8s}" for c in cols)
    head += f" {'gap':>6s} {'coder':>6s} {'header':>6s} {'enc B/s':>8s} {'dec B/s':>8s}  best other"
    print(head)
    for r in rows:
        line = f"{r['modality']:9s} {r['files']:5d} {r['bytes']:8,d} {r['mmbytes']:8.1%} "
        line += " ".join(f"{r[c]:8.1%}" if c in r else f"{'':8s}" for c in cols)
        line += f" {r['gap']:6.2%} {r['payload_gap']:6.2%} {r['header_share']:6.2%} {r['encode_bytes_s']:8.0f}"
        line += f" {r['decode_bytes_s']:8.0f}  {r['best_other']} ({'mmbytes loses' if r['loses'] else 'mmbytes wins'})"
        print(line)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "device": args.device,
                   "envelope": str(machine_envelope(model))}
        write_text(args.json, json.dumps({**stamp(), "ckpt": str(args.ckpt), "chunk": chunk, "batch": args.batch,
                                         "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
