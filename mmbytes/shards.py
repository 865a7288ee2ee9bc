"""Files -> webdataset tar shards + ``manifest.json``.

    mmbytes shards samples/ ../shared/data/text --out data/mine --codec auto
    mmbytes shards train-images-idx3-ubyte.gz --val t10k-images-idx3-ubyte.gz --out data/mnist --codec idx

Each sample is ``<key>.bin`` (the codec's bytes) and ``<key>.json`` (modality, codec, source, chunk, and what the
inverse needs); the key is a hash of the file's content, the item inside it and the chunk, so it is unique however
the sources are named. The train/validation split:

- A file given with ``--val`` (or the ``t10k-*`` half of an official ``train-*``/``t10k-*`` pair, the MNIST naming)
  is validation, whole; the other files of a modality that has such files are training.
- Identical content is kept once (the first path in the validation sources, else in name order); the manifest lists
  the duplicates dropped. A file reached by several paths (``folder``, ``folder/``, ``folder/.``) is one file.
- Otherwise a whole file goes to one split by a hash of its content against the validation fraction of its modality,
  so renaming, moving or reordering sources moves nothing, and every chunk of a file stays in its file's split.
- A modality of one file (a corpus) is split contiguously: the last ``val_fraction`` of its bytes (of its pictures,
  for an IDX file) is validation and the rest training, nothing shared or interleaved, as enwik8 and nanoGPT's
  Shakespeare are split. ``--split contiguous`` applies this to every file of several samples.
- A modality of at least two samples always has a validation sample: when no file hashes into validation, the file
  of lowest hash is held out (the only rule that moves a file when files are added). A modality of one sample cannot
  be split; the manifest and the command say so.

Shards are written under a temporary name and renamed only when complete, and the manifest is written last: an
interrupted run leaves nothing that a reader would take for data. The manifest, and a journal while the run goes,
record the size and SHA-256 of every shard written: a rerun removes only files so recorded, and refuses a folder
holding anything else. Files that cannot be read or encoded are skipped, counted and listed with their reason;
decoder warnings (e.g. Pillow's) are counted in the manifest, not printed.
"""

from __future__ import annotations

import argparse
import codecs
import errno
import hashlib
import json
import multiprocessing
import os
import random
import re
import stat
import sys
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from mmbytes.argtypes import count, fraction, positive_float, positive_int
from mmbytes.codecs import CodecError, decoded_limit, get_codec
from mmbytes.errors import ManifestError, OptionError, ShardsError
from mmbytes.io import Staged, write_text

DEFAULT_CHUNK = {"text": 65536}  # a big text is cut into samples (its tail may be validation); raw files stay whole


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
    """Every regular file under the sources as (path, name: folder name + path inside it), sorted; and
    everything else, listed with its reason: special files (FIFO, socket, device), broken links, symlink loops,
    links to folders (not followed: give the folder itself as a source), unreadable folders and names that are not
    UTF-8. Links to files are read. The output folder is left out, so a rerun never reads its own shards."""
    files, skipped = [], []
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
        files.append((p, name))  # names are shown, never keys: two folders of one name may give the same name

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
    """A number in [0, 1) from ``key`` (a file's content hash): the file is validation when it is under the fraction."""
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


def tail_cut(data: bytes, val_fraction: float, text: bool) -> int:
    """Where the last ``val_fraction`` of ``data`` starts (at least one byte, never the whole): for text after the
    newline nearest before that point (if that at most doubles the tail, else the first one after), else at a UTF-8
    character boundary, so that the validation text starts a line."""
    n = len(data)
    target = min(n - 1, max(1, n - max(1, round(val_fraction * n))))
    if not text:
        return target
    before = data.rfind(b"\n", 0, target)
    if before >= 0 and before + 1 >= target - (n - target):
        return before + 1
    after = data.find(b"\n", target, n - 1)
    if after >= 0:
        return after + 1
    cut = target
    while cut > 1 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


SPLITS = ("auto", "files", "contiguous")
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")
PARTIAL_NAME = re.compile(r"\.(train|val)-\d{6}\.tar\.partial|\.manifest\.json\.partial")
JOURNAL = ".mmbytes-shards.journal"
WRITER = "mmbytes shards"
OFFICIAL = re.compile(r"(t10k|test)-(.+)")  # MNIST's naming (also Fashion-MNIST, KMNIST): t10k-* beside train-*


def checksum(path: Path) -> dict:
    """Size and SHA-256 of a file: what proves, on a rerun, that a shard is the one this command wrote."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def _write_json(path: Path, obj: dict, staging: str) -> None:
    """``obj`` written to ``path`` whole or not at all (``mmbytes.io``: the staging file ``staging``, a name the
    journal may record, renamed into place)."""
    write_text(path, json.dumps(obj, indent=1), staging)


class Journal:
    """The shards written so far, with size and SHA-256, and the partial files open: kept in ``out`` while a run
    goes, so that a rerun after an interruption can prove which files it may remove. Removed once the manifest
    (which records the same checksums) is written."""

    def __init__(self, out: Path) -> None:
        self.path = out / JOURNAL
        self.shards: dict[str, dict] = {}
        self.partial: set[str] = set()

    def save(self) -> None:
        _write_json(self.path, {"writer": WRITER, "shards": self.shards, "partial": sorted(self.partial)},
                    JOURNAL + ".partial")

    def opened(self, tmp: Path) -> None:
        self.partial.add(tmp.name)
        self.save()

    def finished(self, tmp: Path, name: str) -> None:
        """Record the complete shard ``tmp`` as ``name``; called before the rename (``Staged.commit``), so a shard
        under its final name is always in the journal."""
        self.shards[name] = checksum(tmp)
        self.save()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class ShardWriter:
    """Size-capped tar shards ``<prefix>-000000.tar``, each renamed into place only once complete."""

    def __init__(self, out: Path, prefix: str, max_bytes: int, journal: Journal) -> None:
        self.out, self.prefix, self.max_bytes, self.journal = out, prefix, max_bytes, journal
        self.names: list[str] = []
        self.samples = self.bytes = 0
        self._tar = self._staged = None
        self._size = 0

    def write(self, key: str, data: bytes, meta: dict) -> None:
        if self._tar is not None and self._size + len(data) > self.max_bytes:
            self._finish()
        if self._tar is None:
            staging = f".{self.prefix}-{len(self.names):06d}.tar.partial"
            self.journal.opened(self.out / staging)  # named in the journal before it exists
            self._staged = Staged(self.out / f"{self.prefix}-{len(self.names):06d}.tar", staging)
            self._tar = wds.TarWriter(self._staged.file)
            self._size = 0
        self._tar.write({"__key__": key, "bin": data, "json": meta})
        self._size += len(data) + 2048  # tar headers and the json member
        self.samples += 1
        self.bytes += len(data)

    def _finish(self) -> None:
        self._tar.close()  # the tar's end blocks; the file stays open for ``commit`` to flush to disk
        name = self._staged.path.name
        self._staged.commit(before_replace=lambda tmp: self.journal.finished(tmp, name))
        self.journal.partial.discard(self._staged.tmp.name)
        self.names.append(name)
        self._tar = self._staged = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self, remove_finished: bool = False) -> None:
        """Drop the shard being written; finished shards stay (whole and readable, though without a manifest, and
        listed in the journal so that a rerun may replace them) unless ``remove_finished``."""
        if self._tar is not None:
            try:
                self._tar.close()
            except (OSError, ValueError):  # a full disk fails the last flush too: the file goes anyway
                pass
            self._staged.discard()
            self.journal.partial.discard(self._staged.tmp.name)
            self._tar = self._staged = None
        if remove_finished:
            for name in self.names:
                (self.out / name).unlink(missing_ok=True)
                self.journal.shards.pop(name, None)


def _claims(path: Path) -> tuple[dict[str, dict], set[str]] | None:
    """The shards (name -> size and SHA-256) and partial files a manifest or journal written by this command
    records, or None for a file that is not one (hand-written, from another tool or an older version: no writer
    mark and no checksums)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("writer") != WRITER:
        return None
    shards = doc.get("shard_files", doc.get("shards"))  # the manifest's field, the journal's
    if not isinstance(shards, dict) or not all(
            isinstance(n, str) and SHARD_NAME.fullmatch(n) and isinstance(c, dict)
            and isinstance(c.get("bytes"), int) and isinstance(c.get("sha256"), str) for n, c in shards.items()):
        return None
    partial = doc.get("partial", [])
    partial = {n for n in partial if isinstance(n, str) and PARTIAL_NAME.fullmatch(n)} if isinstance(partial, list) \
        else set()
    return shards, partial


def _is_recorded(path: Path, claim: dict) -> bool:
    """``path`` is a regular file with the recorded size and SHA-256 (checked in that order: the size is free)."""
    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size == claim["bytes"] and checksum(path) == claim
    except OSError:
        return False


def prepare_out(out: Path, sources: list[str | Path]) -> None:
    """Check the output folder and remove what a previous run provably wrote there: files whose size and SHA-256 a
    manifest or journal of this command records, the partial files a journal names, and links under a staging name.
    Refuse a folder that is a source or holds a source, or that holds anything else (nothing of the user's is
    deleted or overwritten, even under a shard's name)."""
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
    owned, shards, partial = set(), {}, set()
    for doc in ("manifest.json", JOURNAL):
        claims = _claims(out / doc) if doc in names else None
        if claims is not None:
            owned.add(doc)
            shards.update(claims[0])
            partial |= claims[1]
    owned |= names & partial
    # a link under a staging name holds no data (its target stays); the staging write never goes through it
    owned |= {n for n in names if (PARTIAL_NAME.fullmatch(n) or n == JOURNAL + ".partial") and (out / n).is_symlink()}
    owned |= {n for n in names - owned if n in shards and _is_recorded(out / n, shards[n])}
    foreign = sorted(names - owned)
    if foreign:
        shown_names = ", ".join(shown(n) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        why = (" (a manifest without the writer mark and shard checksums, hand-written or from another tool or an "
               "older mmbytes, proves nothing)" if "manifest.json" in foreign else "")
        raise ShardsError(f"{out}: --out holds {len(foreign)} file(s) mmbytes shards did not write ({shown_names})"
                          f"{why}; give a new or empty folder (nothing was deleted)")
    # the old manifest goes first, so an interrupted rerun cannot leave it pointing at half-replaced shards; the
    # journal last, so that what is left is still provably this command's
    (out / "manifest.json").unlink(missing_ok=True)
    for name in sorted(owned - {"manifest.json", JOURNAL}):
        (out / name).unlink(missing_ok=True)
    (out / JOURNAL).unlink(missing_ok=True)


def check_options(val_fraction: float | dict[str, float], max_shard_bytes: int, max_file_bytes: int,
                  chunk_bytes: int | None, workers: int, split: str = "auto") -> None:
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
    if split not in SPLITS:
        raise OptionError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


def _encode(job: tuple[Path, str, Any, int]) -> tuple[list[tuple[bytes, dict]] | None, str | None, tuple]:
    """Runs in a worker process: ([(bytes, meta), ...], None, warnings), one item per sample the file holds, or
    (None, reason, warnings); warnings: (how many, the distinct messages). Warnings a decoder gives (e.g. Pillow's
    on palettes) are returned, never printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items, reason = _encode_file(job)
    said = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    return items, reason, (len(caught), said[:20])


def _encode_file(job: tuple[Path, str, Any, int]) -> tuple[list[tuple[bytes, dict]] | None, str | None]:
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


def _encode_alone(job: tuple, ctx) -> tuple[list | None, str | None, tuple]:
    """One file in a process of its own: a process that dies names this file and nothing else."""
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return pool.submit(_encode, job).result()
        except BrokenProcessPool:
            return None, DIED, (0, [])


def encoded(jobs: list[tuple], workers: int) -> Iterator[tuple[list | None, str | None, tuple]]:
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


def content_id(path: Path) -> str:
    """SHA-1 of a file's bytes: the identity of its samples (split, keys, duplicates), whatever its name."""
    h = hashlib.sha1()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never waits on a FIFO put in place of a listed file
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class File:
    path: Path
    name: str
    content: str | None
    given: bool = False
    """From the validation sources (``--val``, or the ``t10k-`` file of an official pair): validation, whole."""
    items: list = field(default_factory=list)
    modality: str = ""
    changes: list = field(default_factory=list)

    @property
    def hash(self) -> float:
        return split_hash(self.content)


def unique_files(val: list[tuple[Path, str]], train: list[tuple[Path, str]], max_file_bytes: int,
                 skipped: list[dict]) -> tuple[list[File], list[dict], int]:
    """The files to encode, each content once: validation sources first (identical content there wins), then the
    others in name order, so which copy is kept does not depend on the order of the sources. Returns the files, the
    duplicates dropped (``path``, ``same_as``) and their bytes. A file out of the size limits gets no content id
    (it is skipped with its reason when encoded)."""
    kept, dropped, dropped_bytes, first, ids = [], [], 0, {}, {}
    for given, listed in ((True, val), (False, sorted(train, key=lambda f: (f[1], str(f[0]))))):
        for path, name in listed:
            try:
                st = os.stat(path)
                inode = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if inode not in ids:
                    ids[inode] = content_id(path) if 0 < st.st_size <= max_file_bytes else None
                content = ids[inode]
            except OSError as e:
                skipped.append({"path": shown(path), "reason": _stat_reason(path, e) if e.errno == errno.ENOENT
                                else f"unreadable ({e.strerror or e})"})
                continue
            if content is not None and content in first:
                dropped.append({"path": shown(path), "same_as": shown(first[content])})
                dropped_bytes += st.st_size
                continue
            if content is not None:
                first[content] = path
            kept.append(File(path, name, content, given))
    return kept, dropped, dropped_bytes


def official_pairs(files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """The ``t10k-X`` (or ``test-X``) files among ``files`` that have a ``train-X`` beside them in the list: the
    held-out half of an official split by MNIST's naming."""
    names = {p.name for p, _ in files}
    return [(p, n) for p, n in files if (m := OFFICIAL.fullmatch(p.name)) and f"train-{m.group(2)}" in names]


def planned_modality(coder, path: Path) -> str | None:
    """The modality ``coder`` will most likely give ``path``, from its first bytes (64 KiB at most): what the split
    plans with before anything is encoded; encoding decides, and a wrong guess only changes where a file is written."""
    if coder.name != "auto":
        return coder.modality
    from mmbytes.codecs.auto import sniff

    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return None
    kind = sniff(head[:16])
    if kind != "text_or_raw":
        return coder.codecs[kind].modality
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "raw"
    return "raw" if b"\x00" in head else "text"


class Splitter:
    """Puts each encoded file in a split and writes its samples (rules in the module docstring).

    At most one file per modality is held in memory before it is written: the first file of a modality (under
    ``auto``, until a second one shows it is not the modality's only file) and then the lowest-hash training file
    while the modality has no validation sample (the one held out if none comes)."""

    def __init__(self, writers: dict, codec: str, val_fraction: float | dict[str, float], split: str,
                 chunk_bytes: int | None, expected: Counter | None = None) -> None:
        self.writers, self.codec, self.val_fraction, self.split, self.chunk_bytes = (writers, codec, val_fraction,
                                                                                     split, chunk_bytes)
        self.expected = expected or Counter()  # files per modality as predicted before encoding (``planned_modality``)
        self.files: Counter = Counter()
        self.held: dict[str, File] = {}
        self.has_val: set[str] = set()
        self.given: set[str] = set()
        self.rule: dict[str, str] = {}
        self.no_val: dict[str, str] = {}
        self.stats: dict[str, Counter] = {}
        self.converted: list[dict] = []

    def chunk_size(self, modality: str) -> int:
        if modality not in ("text", "raw"):
            return 0
        return DEFAULT_CHUNK.get(modality, 0) if self.chunk_bytes is None else self.chunk_bytes

    def pieces(self, data: bytes, modality: str, changes: list) -> list[bytes]:
        size = self.chunk_size(modality)
        parts, inside = chunks(data, size, at_newline=modality == "text")
        if inside:
            changes.append(f"text cut inside a UTF-8 character at {inside} chunk boundaries (chunks of {size} bytes "
                           "are shorter than a character)")
        return parts

    def samples(self, f: File) -> int:
        return sum(len(chunks(d, self.chunk_size(f.modality), f.modality == "text")[0]) for d, _ in f.items)

    def _write(self, f: File, split: str, item: int, chunk: int, part: bytes, meta: dict) -> None:
        modality = meta.get("modality", f.modality)
        key = hashlib.sha1(f"{f.content}@{item}#{chunk}".encode()).hexdigest()
        self.writers[split].write(key, part, {**meta, "modality": modality, "codec": meta.get("codec", self.codec),
                                              "source": f.name, "chunk": chunk, "nbytes": len(part),
                                              "content": f.content})
        stats = self.stats.setdefault(modality, Counter())
        stats["samples"] += 1
        stats["bytes"] += len(part)
        stats[f"{split}_samples"] += 1
        if split == "val":
            self.has_val.add(modality)

    def _done(self, f: File, changes: list) -> None:
        if changes:
            self.converted.append({"path": shown(f.path), "converted": changes})
        self.stats.setdefault(f.modality, Counter())["files"] += 1
        f.items = []  # the bytes are written: free them

    def emit(self, f: File, split: str) -> None:
        changes = list(f.changes)
        for item, (data, meta) in enumerate(f.items):
            for chunk, part in enumerate(self.pieces(data, meta.get("modality", f.modality), changes)):
                self._write(f, split, item, chunk, part, meta)
        self._done(f, changes)

    def emit_contiguous(self, f: File, fraction: float) -> None:
        """The last ``fraction`` of the file to validation: of its items (pictures of an IDX file), counted in
        bytes, at least one and never all; of a single item's bytes, cut by ``tail_cut`` and chunked on each side.
        A fraction of 1 (a modality asked to be all validation) sends the file whole."""
        if fraction >= 1:
            return self.emit(f, "val")
        changes = list(f.changes)
        if len(f.items) > 1:
            sizes = [len(d) for d, _ in f.items]
            total, tail, first_val = sum(sizes), 0, len(sizes)
            while first_val > 1 and (tail < fraction * total or first_val == len(sizes)):
                first_val -= 1
                tail += sizes[first_val]
            for item, (data, meta) in enumerate(f.items):
                for chunk, part in enumerate(self.pieces(data, meta.get("modality", f.modality), changes)):
                    self._write(f, "train" if item < first_val else "val", item, chunk, part, meta)
        else:
            (data, meta), = f.items
            cut = tail_cut(data, fraction, f.modality == "text")
            head = self.pieces(data[:cut], f.modality, changes)
            for chunk, part in enumerate([*head, *self.pieces(data[cut:], f.modality, changes)]):
                self._write(f, "train" if chunk < len(head) else "val", 0, chunk, part, meta)
        self._done(f, changes)

    def add(self, f: File) -> None:
        m, fraction = f.modality, fraction_of(self.val_fraction, f.modality)
        self.files[m] += 1
        if f.given:
            self.given.add(m)
            self.rule[m] = "given: validation from the validation sources, training from the others"
            return self.emit(f, "val")
        if m in self.given or not fraction:
            self.rule.setdefault(m, "none: validation fraction 0")
            return self.emit(f, "train")
        if self.split == "contiguous" and self.samples(f) >= 2:
            self.rule[m] = "contiguous: the last val_fraction of each file of several samples"
            self.emit_contiguous(f, fraction)
            if m in self.held:
                self.emit(self.held.pop(m), "train")
            return
        pending = [f, *([self.held.pop(m)] if m in self.held else [])]
        if self.split == "auto" and self.files[m] == 1:
            if self.expected[m] == 1 and self.samples(f) >= 2:
                # predicted to be the modality's only file: split at its tail now, in its place in the shuffled
                # order (held to the end, a corpus would close the training shard, out of reach of a short run)
                self.rule[m] = "contiguous: the modality's only file, its last val_fraction is validation"
                return self.emit_contiguous(f, fraction)
            self.held[m] = f  # the modality's only file so far: split contiguously if it stays the only one
            return
        self.rule.setdefault(m, "files: each file whole, by a hash of its content")
        rest = []
        for x in pending:
            if x.hash < fraction:
                self.emit(x, "val")
            else:
                rest.append(x)
        rest.sort(key=lambda x: x.hash)
        if m not in self.has_val and rest:
            self.held[m] = rest.pop(0)
        for x in rest:
            self.emit(x, "train")

    def finish(self) -> None:
        for m, f in sorted(self.held.items()):
            fraction, n = fraction_of(self.val_fraction, m), self.samples(f)
            if self.files[m] == 1 and self.split == "auto" and n >= 2:
                self.rule[m] = "contiguous: the modality's only file, its last val_fraction is validation"
                self.emit_contiguous(f, fraction)
            elif self.files[m] == 1:
                self.emit(f, "train")
                if n >= 2:
                    self.no_val[m] = (f"its only file {f.name} stays whole under --split files; use --split auto "
                                      "to hold out its tail, or give a validation source with --val")
                else:
                    size = self.chunk_size(m)
                    self.no_val[m] = (f"its only file {f.name} is a single sample"
                                      + (f" (under the {size:,}-byte chunk)" if size else "")
                                      + "; add files of it, or give a validation source with --val")
            else:
                self.rule[m] = (f"files: each file whole, by a hash of its content; no file hashed into validation, "
                                f"so {f.name}, of lowest hash, is held out")
                self.emit(f, "val")
        self.held.clear()
        for m in self.stats:
            if not self.stats[m].get("val_samples") and fraction_of(self.val_fraction, m) and m not in self.no_val:
                self.no_val[m] = "the validation sources hold none of it" if m in self.given else "no file of it"


def write_shards(sources: list[str | Path], out: str | Path, codec: str = "raw", codec_options: dict | None = None,
                 val_fraction: float | dict[str, float] = 0.1, max_shard_bytes: int = 64 * 2**20,
                 max_file_bytes: int = 256 * 2**20, chunk_bytes: int | None = None, workers: int = 0,
                 progress: bool = True, shuffle_seed: int | None = 0, val_sources: list[str | Path] | None = None,
                 split: str = "auto") -> dict:
    """Write shards and the manifest into ``out``; return the manifest. ``val_fraction``: the share held out for
    validation, one for all modalities or per modality (``{audio: 0.2, default: 0.1}``); ``val_sources``: files and
    folders that are the validation split, whole (the modalities they hold take no validation from ``sources``);
    ``split``: ``auto``, ``files`` or ``contiguous`` (module docstring). ``max_file_bytes`` also bounds what a file
    may decode to. Files are written in an order shuffled with ``shuffle_seed`` (None: sorted by name): training
    reads shards in order and shuffles only inside a buffer, so files written folder by folder would reach it one
    folder (often one modality) at a time. Which split a sample goes to does not depend on it."""
    out = Path(out)
    check_options(val_fraction, max_shard_bytes, max_file_bytes, chunk_bytes, workers, split)
    coder = get_codec(codec, **(codec_options or {}))  # bad codec options fail here, before any file is touched
    prepare_out(out, [*sources, *(val_sources or [])])
    listed, skipped = list_files(sources, out)
    val_listed, val_skipped = list_files(val_sources, out) if val_sources else ([], [])
    pairs = [] if val_sources else official_pairs(listed)
    if pairs:
        val_listed, listed = pairs, [f for f in listed if f not in pairs]
    skipped += val_skipped
    files, duplicates, duplicate_bytes = unique_files(val_listed, listed, max_file_bytes, skipped)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    files.sort(key=lambda f: not f.given)  # validation sources first: their modalities are known before the others
    journal = Journal(out)
    writers = {s: ShardWriter(out, s, max_shard_bytes, journal) for s in ("train", "val")}
    expected = Counter(planned_modality(coder, f.path) for f in files if not f.given)
    splitter = Splitter(writers, codec, val_fraction, split, chunk_bytes, expected)
    chosen, warned, warning_count, encoded_files = Counter(), [], 0, 0
    results = encoded([(f.path, f.name, coder, max_file_bytes) for f in files], workers)
    try:
        for f, (items, reason, (n_warnings, said)) in tqdm(zip(files, results, strict=True), total=len(files),
                                                           unit="file", desc=f"shards -> {out}", disable=not progress):
            if n_warnings:
                warning_count += n_warnings
                warned.append({"path": shown(f.path), "warnings": said})
            if items is not None and f.content is None:
                items, reason = None, "changed while being read (its size is now out of the limits)"
            if items is None:
                skipped.append({"path": shown(f.path), "reason": reason})
                continue
            encoded_files += 1
            f.items, f.modality = items, items[0][1].get("modality", coder.modality)
            for _, meta in items:
                chosen[meta.get("codec", coder.name)] += 1
                f.changes += [c for c in meta.get("converted") or [] if c not in f.changes]
            splitter.add(f)
        splitter.finish()
        if not any(w.samples for w in writers.values()):
            first = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) + ("; ..." * (len(skipped) > 3))
            raise ShardsError(f"no sample written to {out}: all {len(skipped)} files and sources were missing or "
                              f"skipped ({first}); no manifest was written")
        for w in writers.values():
            w.close()
        modalities = {m: {**dict(c), "split": splitter.rule.get(m, "")} for m, c in splitter.stats.items()}
        manifest = {
            "version": 2, "writer": WRITER, "codec": codec, "codec_options": codec_options or {},
            "sources": [shown(s) for s in sources], "val_sources": [shown(s) for s in val_sources or []],
            "official_split": [{"train": shown(p.with_name("train-" + OFFICIAL.fullmatch(p.name).group(2))),
                                "val": shown(p)} for p, _ in pairs],
            "val_fraction": val_fraction, "split": split,
            "splits": {s: {"shards": w.names, "samples": w.samples, "bytes": w.bytes} for s, w in writers.items()},
            "shard_files": dict(journal.shards),
            "files": encoded_files,
            "bytes": sum(w.bytes for w in writers.values()),
            "modalities": modalities,
            "duplicates": {"files": len(duplicates), "bytes": duplicate_bytes, "list": duplicates[:1000]},
            "codecs_chosen": dict(chosen), "converted": splitter.converted, "skipped": skipped,
            "warnings": {"count": warning_count, "files": warned[:1000]},
            "no_val": sorted(splitter.no_val), "no_val_reasons": dict(sorted(splitter.no_val.items())),
        }
        journal.partial.add(".manifest.json.partial")
        journal.save()
        _write_json(out / "manifest.json", manifest, ".manifest.json.partial")
        journal.remove()
    except OSError as e:
        full = e.errno in OUT_OF_SPACE
        _abort(out, writers, journal, remove_finished=full)
        if full:
            raise ShardsError(f"{out}: {os.strerror(e.errno)} while writing shards; this run's files were removed "
                              "and no manifest was written: free space or give another --out") from None
        raise
    except BaseException:
        _abort(out, writers, journal)
        raise
    return manifest


def _abort(out: Path, writers: dict, journal: Journal, remove_finished: bool = False) -> None:
    """Drop what is half written; the journal stays while it records finished shards (a rerun may replace them)."""
    for w in writers.values():
        w.abort(remove_finished=remove_finished)
    (out / ".manifest.json.partial").unlink(missing_ok=True)
    journal.partial.discard(".manifest.json.partial")
    try:
        journal.save() if journal.shards else journal.remove()
    except OSError:
        pass


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
    ap.add_argument("--val", action="append", metavar="DIR_OR_FILE", default=None,
                    help="the validation split, given (e.g. MNIST's t10k files; repeatable): validation, whole, "
                    "and the modalities they hold take no validation from the sources. Without it, an official "
                    "pair train-X / t10k-X among the sources is kept as given")
    ap.add_argument("--val-fraction", type=fraction, default=0.1,
                    help="share held out for validation, in [0, 1) (default 0.1)")
    ap.add_argument("--split", choices=SPLITS, default="auto",
                    help="how the validation share is taken (identical content is kept once in any case): files = "
                    "each file whole, by a hash of its content; contiguous = also the last val-fraction of the bytes "
                    "of every file of several samples (a corpus among small files); auto (default) = files, except "
                    "that a modality of one file is split contiguously")
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
                     shuffle_seed=None if args.sorted else args.shuffle_seed, val_sources=args.val, split=args.split)
    for split, s in m["splits"].items():
        print(f"{split}: {s['samples']} samples, {s['bytes']:,} bytes in {len(s['shards'])} shards")
    for modality, s in m["modalities"].items():
        print(f"  {modality}: {s['samples']} samples, {s['bytes']:,} bytes")
    for modality, stats in m["modalities"].items():
        if not stats.get("train_samples"):
            print(f"no training sample of {modality}: all of it is validation", file=sys.stderr)
    for modality, reason in m["no_val_reasons"].items():
        print(f"no validation sample of {modality}: {reason}", file=sys.stderr)
    if m["duplicates"]["files"]:
        print(f"kept once: {m['duplicates']['files']} file(s) with the content of another (listed in the manifest)",
              file=sys.stderr)
    if m["warnings"]["count"]:
        print(f"decoders gave {m['warnings']['count']} warning(s) on {len(m['warnings']['files'])} file(s) (listed "
              "in the manifest)", file=sys.stderr)
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} (listed in {args.out / 'manifest.json'}):", file=sys.stderr)
        for s in m["skipped"][:20]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
