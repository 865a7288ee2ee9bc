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
import errno
import hashlib
import json
import multiprocessing
import os
import random
import re
import stat
import sys
import tarfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from mmbytes.argtypes import count, fraction, positive_float, positive_int
from mmbytes.codecs import CodecError, decoded_limit, get_codec
from mmbytes.errors import ManifestError, OptionError, ShardsError

DEFAULT_CHUNK = {"text": 65536}  # a big text is cut so it can be split between train and val; raw files stay whole


def shown(path: str | Path) -> str:
    """A path as text that JSON and a terminal take: bytes of a name that are not UTF-8 become ``\\xNN``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
           stat.S_IFBLK: "a block device"}


def _stat_reason(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT and os.path.lexists(path):
        return "broken link (its target does not exist)"
    if e.errno == errno.ENOENT:
        return "no such file or directory"
    return f"unreadable ({e.strerror or e})"


def list_files(sources: list[str | Path], out: Path | None = None) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Every regular file under the sources as (path, unique name: folder name + path inside it), sorted; and
    everything else, listed with its reason: special files (FIFO, socket, device), broken links, symlink loops,
    links to folders (not followed: give the folder itself as a source), unreadable folders and names that are not
    UTF-8. Links to files are read. The output folder is left out, so a rerun never reads its own shards."""
    files, skipped, seen = [], [], Counter()
    out_id = None
    if out is not None and out.is_dir():
        st = os.stat(out)
        out_id = (st.st_dev, st.st_ino)
    inside = out.resolve() if out is not None else None

    def skip(p: Path, reason: str) -> None:
        skipped.append({"path": shown(p), "reason": reason})

    def add(p: Path, name: str) -> None:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return skip(p, "file name is not valid UTF-8 (rename the file)")
        seen[name] += 1  # two sources with the same folder name: later files get a suffix, keys stay unique
        files.append((p, name if seen[name] == 1 else f"{name}~{seen[name]}"))

    def entries(folder: Path, prefix: str) -> Iterator[tuple[os.DirEntry, str]]:
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skip(folder, f"unreadable folder ({e.strerror or e}); nothing in it was read")
            found = []
        return ((e, f"{prefix}/{e.name}") for e in found)

    def walk(folder: Path, prefix: str) -> None:
        stack = [entries(folder, prefix)]  # depth first in name order, without recursion (any depth)
        while stack:
            e, name = next(stack[-1], (None, None))
            if e is None:
                stack.pop()
                continue
            p = Path(e.path)
            try:
                link = e.is_symlink()
                st = e.stat(follow_symlinks=False)
                if link:
                    try:
                        st = os.stat(p)
                    except OSError as err:
                        skip(p, _stat_reason(p, err))
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        skip(p, "link to a folder, not followed (give the folder itself as a source)")
                        continue
                    if inside is not None and inside in p.resolve().parents:
                        continue
            except OSError as err:
                skip(p, _stat_reason(p, err))
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) != out_id:
                    stack.append(entries(p, name))
            elif stat.S_ISREG(st.st_mode):
                add(p, name)
            else:
                skip(p, f"not a regular file ({SPECIAL.get(stat.S_IFMT(st.st_mode), 'a special file')})")

    for src in map(Path, sources):
        try:
            st = os.stat(src)
        except OSError as e:
            skip(src, _stat_reason(src, e))
            continue
        if stat.S_ISDIR(st.st_mode):
            walk(src, src.resolve().name)  # "." and ".." name the folder itself, not a path up
        elif stat.S_ISREG(st.st_mode):
            add(src, src.name)
        else:
            skip(src, f"not a regular file ({SPECIAL.get(stat.S_IFMT(st.st_mode), 'a special file')})")
    return files, skipped


def split_hash(key: str) -> float:
    return int(hashlib.sha1(f"split:{key}".encode()).hexdigest(), 16) / 2**160


def fraction_of(val_fraction: float | dict[str, float], modality: str) -> float:
    """The validation fraction of a modality: one for all, or per modality (``{audio: 0.2, default: 0.1}``)."""
    if isinstance(val_fraction, dict):
        return float(val_fraction.get(modality, val_fraction.get("default", 0.1)))
    return float(val_fraction)


def chunks(data: bytes, size: int, at_newline: bool) -> tuple[list[bytes], int]:
    """``data`` cut into pieces of at most ``size`` bytes (text at the last newline, else at the last UTF-8
    character boundary), and how many cuts fell inside a UTF-8 character (only when ``size`` is smaller than one)."""
    if not size or len(data) <= size:
        return [data], 0
    out, start, inside = [], 0, 0
    while start < len(data):
        end = min(start + size, len(data))
        if at_newline and end < len(data):
            cut = data.rfind(b"\n", start, end)
            if cut > start:
                end = cut + 1
            else:  # no newline in reach: never split a character
                back = end
                while back > start and data[back] & 0xC0 == 0x80:
                    back -= 1
                if back > start:
                    end = back
                elif data[end] & 0xC0 == 0x80:
                    inside += 1
        out.append(data[start:end])
        start = end
    return out, inside


SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")
STAGED_NAME = re.compile(r"\.(train|val)-\d{6}\.tar\.partial|\.manifest\.json\.partial")


class ShardWriter:
    """Size-capped tar shards ``<prefix>-000000.tar``, each renamed into place only once complete."""

    def __init__(self, out: Path, prefix: str, max_bytes: int) -> None:
        self.out, self.prefix, self.max_bytes = out, prefix, max_bytes
        self.names: list[str] = []
        self.samples = self.bytes = 0
        self._tar = self._tmp = self._file = None
        self._size = 0

    def write(self, key: str, data: bytes, meta: dict) -> None:
        if self._tar is not None and self._size + len(data) > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._tmp = self.out / f".{self.prefix}-{len(self.names):06d}.tar.partial"
            self._tmp.unlink(missing_ok=True)
            self._file = open(self._tmp, "xb")  # exclusive: never through a link planted under that name
            self._tar = wds.TarWriter(self._file)
            self._size = 0
        self._tar.write({"__key__": key, "bin": data, "json": meta})
        self._size += len(data) + 2048  # tar headers and the json member
        self.samples += 1
        self.bytes += len(data)

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        name = f"{self.prefix}-{len(self.names):06d}.tar"
        os.replace(self._tmp, self.out / name)
        self.names.append(name)
        self._tar = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self, remove_finished: bool = False) -> None:
        """Drop the shard being written; finished shards stay (whole and readable, though without a manifest)
        unless ``remove_finished``."""
        if self._tar is not None:
            for closing in (self._tar.close, self._file.close):
                try:
                    closing()
                except OSError:  # a full disk fails the last flush too: the file goes anyway
                    pass
            self._tmp.unlink(missing_ok=True)
            self._tar = None
        if remove_finished:
            for name in self.names:
                (self.out / name).unlink(missing_ok=True)


def is_our_shard(path: Path) -> bool:
    """A tar whose first members are ``<sha1>.bin`` / ``<sha1>.json`` with the metadata ``mmbytes shards`` writes."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a link or a FIFO (opening it would wait forever) is not ours
            return False
        with tarfile.open(path) as tar:
            members = [tar.next(), tar.next()]
            if any(m is None for m in members):
                return False
            names = sorted(m.name for m in members)
            if not re.fullmatch(r"[0-9a-f]{40}\.bin", names[0]) or names[1] != names[0][:-4] + ".json":
                return False
            meta = json.loads(tar.extractfile(next(m for m in members if m.name == names[1])).read())
            return isinstance(meta, dict) and {"modality", "source", "chunk", "nbytes"} <= meta.keys()
    except (OSError, tarfile.TarError, ValueError, StopIteration):
        return False


def prepare_out(out: Path, sources: list[str | Path]) -> None:
    """Check the output folder and remove what a previous run wrote there; refuse a folder that is a source or
    holds a source, or that holds anything ``mmbytes shards`` did not write (nothing of the user's is deleted)."""
    if out.exists() and not out.is_dir():
        raise ShardsError(f"{out}: --out is a file, not a folder; give a new or empty folder")
    target = out.resolve()
    for src in map(Path, sources):
        try:
            real = src.resolve()
        except (OSError, RuntimeError):  # a symlink loop: listed as skipped later
            continue
        if real == target:
            raise ShardsError(f"{out}: --out is also a source; write the shards to another folder")
        if target in real.parents:
            raise ShardsError(f"{out}: --out holds the source {src}; write the shards to another folder")
    out.mkdir(parents=True, exist_ok=True)
    names = set(os.listdir(out))
    owned = {n for n in names if STAGED_NAME.fullmatch(n)}
    if "manifest.json" in names:
        try:
            listed = [n for split in read_manifest(out / "manifest.json")["splits"].values() for n in split["shards"]]
            owned |= {"manifest.json"} | {n for n in listed if SHARD_NAME.fullmatch(n)}
        except ManifestError:  # not one mmbytes wrote: the user's
            pass
    owned |= {n for n in names - owned if SHARD_NAME.fullmatch(n) and is_our_shard(out / n)}  # an interrupted run
    foreign = sorted(names - owned)
    if foreign:
        shown_names = ", ".join(shown(n) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ShardsError(f"{out}: --out holds {len(foreign)} file(s) mmbytes shards did not write ({shown_names}); "
                          "give a new or empty folder (nothing was deleted)")
    # the old manifest goes first, so an interrupted rerun cannot leave it pointing at half-replaced shards
    (out / "manifest.json").unlink(missing_ok=True)
    for name in sorted(owned - {"manifest.json"}):
        (out / name).unlink(missing_ok=True)


def check_options(val_fraction: float | dict[str, float], max_shard_bytes: int, max_file_bytes: int,
                  chunk_bytes: int | None, workers: int) -> None:
    if isinstance(val_fraction, dict):  # one modality may go to validation whole; all of them may not
        if not all(0 <= v <= 1 for v in val_fraction.values()) or val_fraction.get("default", 0.1) >= 1:
            raise OptionError(f"val_fraction per modality must be in [0, 1] (the default in [0, 1)), not "
                              f"{val_fraction}")
    elif not 0 <= val_fraction < 1:
        raise OptionError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if max_shard_bytes < 1 or max_file_bytes < 1:
        raise OptionError(f"shard and file size limits must be positive, not {max_shard_bytes} and {max_file_bytes}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise OptionError(f"chunk_bytes must be a positive number of bytes, not {chunk_bytes}")
    if workers < 0:
        raise OptionError(f"workers must be 0 or more, not {workers}")


def _encode(job: tuple[Path, str, Any, int]) -> tuple[list[tuple[bytes, dict]] | None, str | None]:
    """Runs in a worker process: ([(bytes, meta), ...], None), one item per sample the file holds, or (None, reason)."""
    path, _, codec, max_file_bytes = job
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # replaced since it was listed
            return None, f"not a regular file ({SPECIAL.get(stat.S_IFMT(st.st_mode), 'a special file')})"
        if st.st_size == 0:
            with open(path, "rb") as f:
                if f.read(1):
                    return None, ("its size is unknown until read (a /proc or /sys pseudo-file); copy it to a regular"
                                  " file to include it")
            return None, "empty file"
        if st.st_size > max_file_bytes:
            return None, f"larger than the {max_file_bytes:,}-byte limit ({st.st_size:,} bytes)"
        with decoded_limit(max_file_bytes):
            items = codec.encode_many(path) if hasattr(codec, "encode_many") else [codec.encode(path)]
        if not items:
            return None, "holds no sample"
        return items, None
    except CodecError as e:
        return None, str(e).removeprefix(f"{path}: ")
    except MemoryError:
        return None, "decoding ran out of memory"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    except Exception as e:  # a decoder's own error (e.g. Pillow's decompression bomb): one file, not the whole run
        return None, f"codec failed ({type(e).__name__}: {e})"


DIED = "the decoding process died on this file (killed, e.g. for memory); the file is skipped"


def _encode_alone(job: tuple, ctx) -> tuple[list | None, str | None]:
    """One file in a process of its own: a process that dies names this file and nothing else."""
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return pool.submit(_encode, job).result()
        except BrokenProcessPool:
            return None, DIED


def encoded(jobs: list[tuple], workers: int) -> Iterator[tuple[list | None, str | None]]:
    """``_encode`` of every job, in order, on ``workers`` processes (0: here). When a worker dies (the kernel's OOM
    killer, a signal), the files it may have held are retried one process each, so only the file that kills its
    process is skipped and the run goes on."""
    if workers <= 0:
        yield from map(_encode, jobs)
        return
    # forkserver, not fork: forking a process whose BLAS/OpenMP threads are running can deadlock the children
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    if ctx.get_start_method() == "forkserver":  # workers (and retries after a death) fork with the codecs imported
        ctx.set_forkserver_preload(["mmbytes.shards"])
    pool, ahead, i = ProcessPoolExecutor(workers, mp_context=ctx), deque(), 0
    try:
        while i < len(jobs) or ahead:
            while i < len(jobs) and len(ahead) < 4 * workers:
                ahead.append((jobs[i], pool.submit(_encode, jobs[i])))
                i += 1
            job, future = ahead[0]
            try:
                result = future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                for job, future in ahead:  # results that came back before the pool broke are kept
                    done = future.done() and not future.cancelled() and future.exception() is None
                    yield future.result() if done else _encode_alone(job, ctx)
                ahead.clear()
                pool = ProcessPoolExecutor(workers, mp_context=ctx)
                continue
            ahead.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_shards(sources: list[str | Path], out: str | Path, codec: str = "raw", codec_options: dict | None = None,
                 val_fraction: float | dict[str, float] = 0.1, max_shard_bytes: int = 64 * 2**20,
                 max_file_bytes: int = 256 * 2**20, chunk_bytes: int | None = None, workers: int = 0,
                 progress: bool = True, shuffle_seed: int | None = 0) -> dict:
    """Write shards and the manifest into ``out``; return the manifest. ``val_fraction``: the share of samples held
    out for validation, one for all modalities or per modality (``{audio: 0.2, default: 0.1}``). ``max_file_bytes``
    also bounds what a file may decode to. Files are written in an order shuffled with ``shuffle_seed`` (None: sorted
    by path): training reads shards in order and shuffles only inside a buffer, so files written folder by folder
    would reach it one folder (often one modality) at a time. Which split a sample goes to does not depend on it."""
    out = Path(out)
    check_options(val_fraction, max_shard_bytes, max_file_bytes, chunk_bytes, workers)
    coder = get_codec(codec, **(codec_options or {}))  # bad codec options fail here, before any file is touched
    prepare_out(out, sources)
    files, skipped = list_files(sources, out)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    writers = {s: ShardWriter(out, s, max_shard_bytes) for s in ("train", "val")}
    modalities: dict[str, Counter] = {}
    chosen, converted, encoded_files = Counter(), [], 0
    jobs = [(p, name, coder, max_file_bytes) for p, name in files]
    results = encoded(jobs, workers)
    try:
        for (path, name), (items, reason) in tqdm(zip(files, results, strict=True), total=len(files), unit="file",
                                                  desc=f"shards -> {out}", disable=not progress):
            if items is None:
                skipped.append({"path": shown(path), "reason": reason})
                continue
            encoded_files += 1
            changes = []
            for item, (data, meta) in enumerate(items):
                modality = meta.get("modality", coder.modality)
                chosen[meta.get("codec", coder.name)] += 1
                changes += [c for c in meta.get("converted") or [] if c not in changes]
                size = DEFAULT_CHUNK.get(modality, 0) if chunk_bytes is None else chunk_bytes
                parts, inside = chunks(data, size if modality in ("text", "raw") else 0, at_newline=modality == "text")
                if inside:
                    changes.append(f"text cut inside a UTF-8 character at {inside} chunk boundaries (chunks of "
                                   f"{size} bytes are shorter than a character)")
                for i, part in enumerate(parts):
                    sample_name = f"{name}#{i}" if len(items) == 1 else f"{name}@{item}#{i}"
                    key = hashlib.sha1(sample_name.encode()).hexdigest()
                    meta_out = {**meta, "modality": modality, "codec": meta.get("codec", codec), "source": name,
                                "chunk": i, "nbytes": len(part)}
                    _write(writers, (split_hash(key), key, part, meta_out), fraction_of(val_fraction, modality),
                           modalities)
            if changes:
                converted.append({"path": shown(path), "converted": changes})
        if not any(w.samples for w in writers.values()):
            first = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) + ("; ..." * (len(skipped) > 3))
            raise ShardsError(f"no sample written to {out}: all {len(skipped)} files and sources were missing or "
                              f"skipped ({first}); no manifest was written")
        for w in writers.values():
            w.close()
        manifest = {
            "version": 1, "codec": codec, "codec_options": codec_options or {}, "sources": [shown(s) for s in sources],
            "val_fraction": val_fraction,
            "splits": {s: {"shards": w.names, "samples": w.samples, "bytes": w.bytes} for s, w in writers.items()},
            "files": encoded_files,
            "bytes": sum(w.bytes for w in writers.values()),
            "modalities": {m: dict(c) for m, c in modalities.items()},
            "codecs_chosen": dict(chosen), "converted": converted, "skipped": skipped,
            "no_val": sorted(m for m, c in modalities.items()
                             if not c.get("val_samples") and fraction_of(val_fraction, m)),
        }
        tmp = out / ".manifest.json.partial"
        tmp.unlink(missing_ok=True)  # a link left under that name would send the write outside ``out``
        with open(tmp, "x") as f:
            f.write(json.dumps(manifest, indent=1))
        os.replace(tmp, out / "manifest.json")
    except OSError as e:
        full = e.errno in OUT_OF_SPACE
        for w in writers.values():
            w.abort(remove_finished=full)
        (out / ".manifest.json.partial").unlink(missing_ok=True)
        if full:
            raise ShardsError(f"{out}: {os.strerror(e.errno)} while writing shards; this run's files were removed "
                              "and no manifest was written: free space or give another --out") from None
        raise
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return manifest


def _write(writers: dict, sample: tuple, val_fraction: float, modalities: dict) -> None:
    h, key, data, meta = sample
    split = "val" if h < val_fraction else "train"
    writers[split].write(key, data, meta)
    stats = modalities.setdefault(meta["modality"], Counter())
    stats["samples"] += 1
    stats["bytes"] += len(data)
    stats[f"{split}_samples"] += 1


def read_manifest(path: str | Path) -> dict:
    """A manifest written by ``mmbytes shards`` (a folder's ``manifest.json`` or the file itself), or a
    ``ManifestError`` naming the file: missing, unreadable, not JSON, or without a shard list per split."""
    path = Path(path)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # reading a FIFO would wait forever
            raise ManifestError(f"{path}: not a regular file; a manifest is a JSON file written by `mmbytes shards`")
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest; run `mmbytes shards SRC --out {path.parent}`") from None
    except OSError as e:
        raise ManifestError(f"{path}: unreadable manifest ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ManifestError(f"{path}: not a JSON manifest ({e}); rebuild it with `mmbytes shards`") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shards"), list) and all(isinstance(n, str) for n in v["shards"])
            for v in splits.values()):
        raise ManifestError(f"{path}: not a manifest written by `mmbytes shards` (no shard list per split); rebuild "
                            "it with `mmbytes shards`")
    return manifest


load_manifest = read_manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmbytes shards", description="Write webdataset shards + manifest from files.",
                                 allow_abbrev=False)
    ap.add_argument("sources", nargs="+", help="files and folders (walked recursively)")
    ap.add_argument("--out", required=True, type=Path, help="output folder; nothing is written outside it")
    ap.add_argument("--codec", default="raw", choices=["text", "raw", "image", "audio", "auto", "idx"],
                    help="idx: MNIST-style IDX image files, one sample per picture")
    ap.add_argument("--val-fraction", type=fraction, default=0.1, help="share held out for validation, in [0, 1)")
    ap.add_argument("--max-shard-mb", type=positive_float, default=64)
    ap.add_argument("--max-file-mb", type=positive_float, default=256,
                    help="larger files, and files that would decode to more, are skipped and listed")
    ap.add_argument("--chunk-bytes", type=positive_int,
                    help="cut text/raw samples longer than this (default: 64K text, raw whole)")
    ap.add_argument("--image-size", type=positive_int, help="resize + centre-crop images to this square size")
    ap.add_argument("--image-order", default="patch", choices=["patch", "raster"])
    ap.add_argument("--image-tile", type=positive_int, default=4,
                    help="tile side of the patch order (P = tile*tile*channels)")
    ap.add_argument("--grayscale", action="store_true")
    ap.add_argument("--sample-rate", type=positive_int, help="resample audio to this rate")
    ap.add_argument("--no-convert", action="store_true", help="refuse audio that is not mono 16-bit PCM at the rate")
    ap.add_argument("--workers", type=count, default=min(8, os.cpu_count() or 1), help="decoding processes")
    ap.add_argument("--shuffle-seed", type=int, default=0,
                    help="files are written in an order shuffled with this seed, so that training, which reads "
                    "shards in order, does not see one folder at a time")
    ap.add_argument("--sorted", action="store_true", help="write files in path order instead")
    args = ap.parse_args(argv)
    if args.image_size and args.image_order == "patch" and args.image_size % args.image_tile:
        ap.error(f"--image-size {args.image_size} does not split into --image-tile {args.image_tile} tiles; give a "
                 "multiple of the tile or --image-order raster")
    if int(args.max_shard_mb * 2**20) < 1 or int(args.max_file_mb * 2**20) < 1:
        ap.error("--max-shard-mb and --max-file-mb must be at least one byte")
    channels = 1 if args.grayscale else 3
    if args.image_size and args.image_size**2 * channels > args.max_file_mb * 2**20:
        ap.error(f"--image-size {args.image_size} makes images of {args.image_size**2 * channels:,} bytes, over "
                 f"--max-file-mb {args.max_file_mb:g}")
    image = {"size": args.image_size, "order": args.image_order, "tile": args.image_tile,
             "channels": 1 if args.grayscale else 3}
    audio = {"sample_rate": args.sample_rate, "convert": not args.no_convert}
    idx = {"order": args.image_order, "tile": args.image_tile}
    options = {"image": image, "audio": audio, "auto": {"image": image, "audio": audio}, "idx": idx}.get(args.codec, {})
    m = write_shards(args.sources, args.out, args.codec, options, args.val_fraction, int(args.max_shard_mb * 2**20),
                     int(args.max_file_mb * 2**20), args.chunk_bytes, args.workers,
                     shuffle_seed=None if args.sorted else args.shuffle_seed)
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
