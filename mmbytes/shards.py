"""Files -> webdataset tar shards + ``manifest.json``.

    mmbytes shards samples/ ../shared/data/text --out data/mine --codec auto

Each sample is ``<key>.bin`` (the codec's bytes) and ``<key>.json`` (modality, codec, source, chunk, and what the
inverse needs). The train/validation split is a hash of the sample's source path and chunk index against the
validation fraction of its modality: a pure function of each sample, the same on every run, and adding files never
moves another sample. A modality may end up with no validation sample; the manifest and the command say so.
Shards are written under a temporary name and renamed only when complete, and the manifest is written last: an
interrupted run leaves nothing that a reader would take for data. Files that cannot be read or encoded are skipped,
counted and listed with their reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from mmbytes.codecs import CodecError, get_codec

DEFAULT_CHUNK = {"text": 65536}  # a big text is cut so it can be split between train and val; raw files stay whole


def list_files(sources: list[str | Path], out: Path | None = None) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Every file under the sources as (path, unique name: folder name + path inside it), sorted; and what is not
    a file. Files inside ``out`` are left out, so a rerun never reads its own shards."""
    files, skipped, seen = [], [], Counter()
    inside = out.resolve() if out is not None else None
    for src in map(Path, sources):
        if src.is_dir():
            root = src.resolve().name  # "." and ".." name the folder itself, not a path up
            found = [(p, f"{root}/{p.relative_to(src).as_posix()}") for p in sorted(src.rglob("*"))]
        elif src.is_file():
            found = [(src, src.name)]
        else:
            skipped.append({"path": str(src), "reason": "no such file or directory"})
            continue
        for p, name in found:
            if inside is not None and inside in p.resolve().parents:
                continue
            if p.is_dir():
                continue
            if not p.is_file():
                skipped.append({"path": str(p), "reason": "not a regular file"})
                continue
            seen[name] += 1  # two sources with the same folder name: later files get a suffix, keys stay unique
            files.append((p, name if seen[name] == 1 else f"{name}~{seen[name]}"))
    return files, skipped


def split_hash(key: str) -> float:
    return int(hashlib.sha1(f"split:{key}".encode()).hexdigest(), 16) / 2**160


def fraction_of(val_fraction: float | dict[str, float], modality: str) -> float:
    """The validation fraction of a modality: one for all, or per modality (``{audio: 0.2, default: 0.1}``)."""
    if isinstance(val_fraction, dict):
        return float(val_fraction.get(modality, val_fraction.get("default", 0.1)))
    return float(val_fraction)


def chunks(data: bytes, size: int, at_newline: bool) -> list[bytes]:
    if not size or len(data) <= size:
        return [data]
    out, start = [], 0
    while start < len(data):
        end = min(start + size, len(data))
        if at_newline and end < len(data):
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(data[start:end])
        start = end
    return out


class ShardWriter:
    """Size-capped tar shards ``<prefix>-000000.tar``, each renamed into place only once complete."""

    def __init__(self, out: Path, prefix: str, max_bytes: int) -> None:
        self.out, self.prefix, self.max_bytes = out, prefix, max_bytes
        self.names: list[str] = []
        self.samples = self.bytes = 0
        self._tar = self._tmp = None
        self._size = 0

    def write(self, key: str, data: bytes, meta: dict) -> None:
        if self._tar is not None and self._size + len(data) > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._tmp = self.out / f".{self.prefix}-{len(self.names):06d}.tar.partial"
            self._tar = wds.TarWriter(str(self._tmp))
            self._size = 0
        self._tar.write({"__key__": key, "bin": data, "json": meta})
        self._size += len(data) + 2048  # tar headers and the json member
        self.samples += 1
        self.bytes += len(data)

    def _finish(self) -> None:
        self._tar.close()
        name = f"{self.prefix}-{len(self.names):06d}.tar"
        os.replace(self._tmp, self.out / name)
        self.names.append(name)
        self._tar = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written; finished shards stay (whole and readable), though without a manifest."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def _encode(job: tuple[Path, str, Any, int]) -> tuple[list[tuple[bytes, dict]] | None, str | None]:
    """Runs in a worker process: ([(bytes, meta), ...], None), one item per sample the file holds, or (None, reason)."""
    path, _, codec, max_file_bytes = job
    try:
        size = path.stat().st_size
        if size == 0:
            return None, "empty file"
        if size > max_file_bytes:
            return None, f"larger than the {max_file_bytes:,}-byte limit ({size:,} bytes)"
        return (codec.encode_many(path) if hasattr(codec, "encode_many") else [codec.encode(path)]), None
    except CodecError as e:
        return None, str(e).removeprefix(f"{path}: ")
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    except Exception as e:  # a decoder's own error (e.g. Pillow's decompression bomb): one file, not the whole run
        return None, f"codec failed ({type(e).__name__}: {e})"


def write_shards(sources: list[str | Path], out: str | Path, codec: str = "raw", codec_options: dict | None = None,
                 val_fraction: float | dict[str, float] = 0.1, max_shard_bytes: int = 64 * 2**20,
                 max_file_bytes: int = 256 * 2**20, chunk_bytes: int | None = None, workers: int = 0,
                 progress: bool = True) -> dict:
    """Write shards and the manifest into ``out``; return the manifest. ``val_fraction``: the share of samples held
    out for validation, one for all modalities or per modality (``{audio: 0.2, default: 0.1}``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the old manifest goes first, so an interrupted rerun cannot leave it pointing at half-replaced shards
    (out / "manifest.json").unlink(missing_ok=True)
    for stale in [*out.glob(".*.tar.partial"), *out.glob("train-[0-9]*.tar"), *out.glob("val-[0-9]*.tar")]:
        stale.unlink()
    coder = get_codec(codec, **(codec_options or {}))
    files, skipped = list_files(sources, out)
    writers = {s: ShardWriter(out, s, max_shard_bytes) for s in ("train", "val")}
    modalities: dict[str, Counter] = {}
    chosen, converted, encoded = Counter(), [], 0
    jobs = [(p, name, coder, max_file_bytes) for p, name in files]
    # forkserver, not fork: forking a process whose BLAS/OpenMP threads are running can deadlock the children
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers > 0 else None
    results = pool.map(_encode, jobs, chunksize=8) if pool else map(_encode, jobs)
    try:
        for (path, name), (items, reason) in tqdm(zip(files, results, strict=True), total=len(files), unit="file",
                                                  desc=f"shards -> {out}", disable=not progress):
            if items is None:
                skipped.append({"path": str(path), "reason": reason})
                continue
            encoded += 1
            for item, (data, meta) in enumerate(items):
                modality = meta.get("modality", coder.modality)
                chosen[meta.get("codec", coder.name)] += 1
                if meta.get("converted"):
                    converted.append({"path": str(path), "converted": meta["converted"]})
                size = DEFAULT_CHUNK.get(modality, 0) if chunk_bytes is None else chunk_bytes
                parts = chunks(data, size if modality in ("text", "raw") else 0, at_newline=modality == "text")
                for i, part in enumerate(parts):
                    sample_name = f"{name}#{i}" if len(items) == 1 else f"{name}@{item}#{i}"
                    key = hashlib.sha1(sample_name.encode()).hexdigest()
                    meta_out = {**meta, "modality": modality, "codec": meta.get("codec", codec), "source": name,
                                "chunk": i, "nbytes": len(part)}
                    _write(writers, (split_hash(key), key, part, meta_out), fraction_of(val_fraction, modality),
                           modalities)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    for w in writers.values():
        w.close()
    manifest = {
        "version": 1, "codec": codec, "codec_options": codec_options or {}, "sources": [str(s) for s in sources],
        "val_fraction": val_fraction,
        "splits": {s: {"shards": w.names, "samples": w.samples, "bytes": w.bytes} for s, w in writers.items()},
        "files": encoded,
        "bytes": sum(w.bytes for w in writers.values()),
        "modalities": {m: dict(c) for m, c in modalities.items()},
        "codecs_chosen": dict(chosen), "converted": converted, "skipped": skipped,
        "no_val": sorted(m for m, c in modalities.items() if not c.get("val_samples") and fraction_of(val_fraction, m)),
    }
    tmp = out / ".manifest.json.partial"
    tmp.unlink(missing_ok=True)  # a link left under that name would send the write outside ``out``
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def _write(writers: dict, sample: tuple, val_fraction: float, modalities: dict) -> None:
    h, key, data, meta = sample
    split = "val" if h < val_fraction else "train"
    writers[split].write(key, data, meta)
    stats = modalities.setdefault(meta["modality"], Counter())
    stats["samples"] += 1
    stats["bytes"] += len(data)
    stats[f"{split}_samples"] += 1


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    path = path / "manifest.json" if path.is_dir() else path
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmbytes shards", description="Write webdataset shards + manifest from files.")
    ap.add_argument("sources", nargs="+", help="files and folders (walked recursively)")
    ap.add_argument("--out", required=True, type=Path, help="output folder; nothing is written outside it")
    ap.add_argument("--codec", default="raw", choices=["text", "raw", "image", "audio", "auto", "idx"],
                    help="idx: MNIST-style IDX image files, one sample per picture")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--max-shard-mb", type=float, default=64)
    ap.add_argument("--max-file-mb", type=float, default=256, help="larger files are skipped and listed")
    ap.add_argument("--chunk-bytes", type=int, 
                    help="cut text/raw samples longer than this (default: 64K text, raw whole)")
    ap.add_argument("--image-size", type=int, help="resize + centre-crop images to this square size")
    ap.add_argument("--image-order", default="patch", choices=["patch", "raster"])
    ap.add_argument("--image-tile", type=int, default=4, help="tile side of the patch order (P = tile*tile*channels)")
    ap.add_argument("--grayscale", action="store_true")
    ap.add_argument("--sample-rate", type=int, help="resample audio to this rate")
    ap.add_argument("--no-convert", action="store_true", help="refuse audio that is not mono 16-bit PCM at the rate")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    args = ap.parse_args(argv)
    image = {"size": args.image_size, "order": args.image_order, "tile": args.image_tile,
             "channels": 1 if args.grayscale else 3}
    audio = {"sample_rate": args.sample_rate, "convert": not args.no_convert}
    idx = {"order": args.image_order, "tile": args.image_tile}
    options = {"image": image, "audio": audio, "auto": {"image": image, "audio": audio}, "idx": idx}.get(args.codec, {})
    m = write_shards(args.sources, args.out, args.codec, options, args.val_fraction, int(args.max_shard_mb * 2**20),
                     int(args.max_file_mb * 2**20), args.chunk_bytes, args.workers)
    for split, s in m["splits"].items():
        print(f"{split}: {s['samples']} samples, {s['bytes']:,} bytes in {len(s['shards'])} shards")
    for modality, s in m["modalities"].items():
        print(f"  {modality}: {s['samples']} samples, {s['bytes']:,} bytes")
    if m["no_val"]:
        print(f"no validation sample of {', '.join(m['no_val'])}: the split is a hash of each sample, so a modality "
              "with few samples may have none; raise --val-fraction (or its share in data.val_fraction)",
              file=sys.stderr)
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} (listed in {args.out / 'manifest.json'}):", file=sys.stderr)
        for s in m["skipped"][:20]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
