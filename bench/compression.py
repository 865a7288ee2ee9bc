"""Lossless compression of held-out real files: ``mmbytes compress`` against gzip -9, xz -9, zstd -19, PNG (Pillow,
optimize) and WebP lossless for images, FLAC (soundfile, level 8) for audio.

The files are the validation samples of the shards ``recipes/compression.yaml`` trains on, read from their
``val-*.tar`` (so the model never saw them, whatever rule ``mmbytes shards`` split by): CIFAR-10 images (their pixels
in binary PPM files: an uncompressed container the model codes pixel by pixel and every codec starts from), FSDD
spoken digits (WAV as stored), the first ``--text-bytes`` of held-out text chunks, and other files as stored. Rates
are compressed bytes / original bytes over all files of a modality, every header included (the .mmbz header, gzip's,
PNG's, ...); the model itself is not counted. ``gap`` is the .mmbz size over the model's NLL of the coded bytes (the
ideal code length), ``coder`` the same for the coded streams alone, ``header`` the share of the .mmbz size that is
header and stored container bytes; ``enc``/``dec`` are coding speeds in original bytes per second (the coder's model
pass runs on one thread, its fixed thread policy), and ``best other`` names the smallest baseline, so the table says
plainly where the model loses. Baselines whose library is missing (zstandard, Pillow, soundfile) are left out.

    python bench/compression.py --ckpt runs/compression/version_0/checkpoints/last.ckpt --device cuda \
        --json bench/compression.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import time
from pathlib import Path

import torch

from mmbytes.compress import compress_files, decompress_files, load, machine_envelope, trained_codecs
from mmbytes.io import write_text
from mmbytes.shards import read_manifest
from mmbytes.stamp import stamp

SHARDS = [Path("data") / f"compression-{s}" for s in ("images", "audio", "text", "files")]
"""The shard sets of ``recipes/compression.yaml``, relative to the folder it ran in."""
LABEL = {"raw": "files"}


def ppm(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PPM")
        return buf.getvalue()


def validation_samples(shards: Path) -> list[dict]:
    """The metadata of every validation sample of a shard set (the split ``mmbytes shards`` made, not a rule re-derived
    here), read through ``datamodules.reader``, in (source, chunk) order; a text sample also carries its ``bytes``."""
    from datamodules.bytes import decode
    from datamodules.reader import manifest_shards, tar_samples

    path = shards / "manifest.json"
    urls, bound = manifest_shards(read_manifest(path), path, "val")
    metas = []
    for url in urls:
        for sample in tar_samples(url, lambda exn: False, bound):  # a damaged shard stops the bench, naming it
            data, meta = decode(sample)
            metas.append({**meta, "bytes": data.tobytes()} if meta["modality"] == "text" else meta)
    return sorted(metas, key=lambda m: (m["source"], m["chunk"]))


def select(shards: Path, per_modality: int, text_bytes: int, max_file: int) -> tuple[str, list[tuple[str, bytes]]]:
    """A shard set's modality and up to ``per_modality`` of its held-out files, spread over its validation samples:
    (name, bytes). Whole files are read from where the manifest's sources lie (images as PPM of their pixels, the
    rest as stored); text is each held-out chunk's first ``text_bytes``, cut at a newline."""
    manifest = read_manifest(shards)
    # a source's samples are named from the source's own name on (mmbytes.shards.list_files)
    roots = {Path(s).resolve().name: Path(s).resolve().parent for s in manifest["sources"] + manifest["val_sources"]}
    metas = validation_samples(shards)
    modality = {m["modality"] for m in metas}
    if len(modality) != 1:
        raise SystemExit(f"{shards}: {len(modality)} modalities in its validation split; the bench takes one per set")
    modality = modality.pop()
    if modality == "text":
        files = []
        for m in metas:
            cut = m["bytes"].rfind(b"\n", 0, text_bytes)
            files.append((f"{m['source']}#{m['chunk']}", m["bytes"][: cut + 1 if cut > 0 else text_bytes]))
    else:
        paths = [roots[m["source"].split("/")[0]] / m["source"] for m in metas if m["chunk"] == 0]
        if missing := [p for p in paths if not p.is_file()]:
            raise SystemExit(f"{missing[0]}: a held-out file of {shards} is not there (the manifest's sources are "
                             "relative to the folder `mmbytes shards` ran in: run the bench there)")
        if modality == "raw":
            paths = [p for p in paths if p.stat().st_size <= max_file]
        files = [(p.name, p) for p in paths]
    files = files[:: max(1, len(files) // per_modality)][:per_modality]  # spread over classes and speakers
    if modality == "image":
        files = [(f"{p.parent.name}/{p.name} as PPM", ppm(p)) for _, p in files]
    elif modality != "text":
        files = [(n, p.read_bytes()) for n, p in files]
    return LABEL.get(modality, modality), files


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
    ap.add_argument("--shards", type=Path, nargs="+", default=SHARDS,
                    help="the shard sets the model trained on, one modality each (default: the recipe's)")
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
    rows = []
    for shards in args.shards:
        modality, files = select(shards, args.per_modality, args.text_bytes, args.max_file)
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
        run = stamp()
        run["machine"] |= {"device": args.device, "envelope": str(machine_envelope(model))}
        write_text(args.json, json.dumps({**run, "ckpt": str(args.ckpt), "chunk": chunk, "batch": args.batch,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
