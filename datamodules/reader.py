"""The one shard reader of the package: shard names -> shard locations -> tar samples -> checked (bytes, meta).

Every read of a shard goes through here, and every check of shard data is made here once:

- ``manifest_shards``: a manifest names files inside its own folder, nothing else. Each name must be a plain file
  name; it becomes an absolute local path, so no manifest entry ever reaches a URL scheme (webdataset's ``pipe:``
  runs a shell command). URLs (``https://``, ``pipe:``) come only from patterns the user typed (``pattern_shards``).
- ``pattern_shards``: brace patterns (``train-{000000..000099}.tar``, ``{a,b}``, several joined by ``::``) are
  counted before they are expanded and refused past ``MAX_NAMES``; local names that are missing or not regular files
  are summarised in one warning with their count.
- ``open_shard``: a local shard must be a regular file; it is opened without blocking (a FIFO would wait for a
  writer forever) and checked with ``fstat`` on the open descriptor.
- ``tar_samples``: members are streamed, and a member larger than the bound (the largest sample the manifest or
  the options allow; ``MAX_META_BYTES`` for metadata) stops the shard before anything is read into memory, so a
  small gzip shard holding a huge member costs no more than the bound.
- ``check_meta``: a sample's metadata must have the shape ``mmbytes shards`` writes (modality known, sizes positive
  whole numbers, an image's bytes equal to height x width x channels, tiles that divide it); a sample that does not
  is skipped and counted by the caller's handler, and training goes on.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator
from itertools import product
from pathlib import Path

from mmbytes.codecs import MODALITIES
from mmbytes.errors import ManifestError, NoDataError, OptionError

log = logging.getLogger(__name__)

MAX_NAMES = 100_000  # shard names one pattern may expand to
MAX_SAMPLE_BYTES = 256 * 2**20  # a sample read from shards named by URL (as ``mmbytes shards --max-file-mb``)
MAX_META_BYTES = 2**20  # a sample's JSON metadata
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # ``pipe:``, ``https:``, ... (two letters at least: not ``C:``)


class ShardReadError(ValueError):
    """A shard, member or sample that cannot be read; skipped and counted by the caller's handler."""


def is_url(name: str) -> bool:
    return SCHEME.match(name) is not None


# ---- where the shards are


def manifest_shards(manifest: dict, manifest_path: Path, split: str) -> tuple[list[str], int]:
    """The absolute local paths of the ``split`` shards a manifest names that are there as regular files, and the
    bound on one sample's bytes (the split's byte total the manifest states, else ``MAX_SAMPLE_BYTES``). A name that
    is not a plain file name (a path, a URL, ``pipe:...``) is refused; missing or non-regular files are summarised in
    one warning, or refused with ``NoDataError`` when none is left."""
    folder = manifest_path.parent.resolve()
    entry = manifest["splits"].get(split, {})
    names = entry.get("shards", [])
    if not names:
        raise ManifestError(f"{manifest_path}: the {split} split has no shards")
    for n in names:  # a manifest names files inside its own folder, nothing else
        if Path(n).name != n or n in (".", "..") or "\0" in n or "::" in n or is_url(n):
            raise ManifestError(f"{manifest_path}: shard {n!r} is not a file name inside {manifest_path.parent}; a "
                                "manifest names files in its own folder (give URLs as data.train_shards)")
    paths, missing = _present([str(folder / n) for n in names])
    if not paths:
        raise NoDataError(f"{manifest_path}: none of the {len(names)} {split} shards it names is there as a file "
                          f"({_some(missing)}); rebuild with `mmbytes shards`")
    if missing:
        log.warning("%s: %d of the %d %s shards it names are missing or not regular files and are skipped: %s",
                    manifest_path, len(missing), len(names), split, _some(missing))
    total = entry.get("bytes")
    bound = total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else MAX_SAMPLE_BYTES
    return paths, bound


def pattern_shards(pattern: str | list[str], what: str = "data.train_shards") -> list[str]:
    """The shard locations a user-typed pattern names: brace ranges and lists expanded (at most ``MAX_NAMES``),
    local names kept only if they are regular files (the others summarised in one warning), URLs kept as typed."""
    parts = [pattern] if isinstance(pattern, str) else list(pattern)
    parts = [p for part in parts for p in part.split("::")]
    total = sum(count_names(p) for p in parts)
    if total > MAX_NAMES:
        raise OptionError(f"{what}: the pattern names {total:,} shards, over the limit of {MAX_NAMES:,}; give a "
                          "narrower brace range")
    names = [name for p in parts for name in expand_names(p)]
    urls = [n for n in names if is_url(n)]
    paths, missing = _present([n for n in names if not is_url(n)])
    if not paths and not urls:
        raise NoDataError(f"{what}: none of the {len(names)} shards it names is there as a file ({_some(missing)})")
    if missing:
        log.warning("%s: %d of the %d shards it names are missing or not regular files and are skipped: %s", what,
                    len(missing), len(names), _some(missing))
    present = set(paths)
    return [n for n in names if is_url(n) or n in present]


def _present(paths: list[str]) -> tuple[list[str], list[str]]:
    """(paths that are regular files, the others) — checked by ``stat``, nothing opened."""
    good, bad = [], []
    for p in paths:
        try:
            ok = stat.S_ISREG(os.stat(p).st_mode)
        except (OSError, ValueError):
            ok = False
        (good if ok else bad).append(p)
    return good, bad


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


BRACE = re.compile(r"\{([^{}]*)\}")


def _alternatives(body: str) -> list[str] | tuple[range, int]:
    """``a..b`` -> (the numbers, the width of ``a``); ``x,y,z`` -> the strings."""
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        return range(a, b + 1), len(m.group(1))
    return body.split(",")


def count_names(pattern: str) -> int:
    """How many names a brace pattern expands to, computed without expanding it."""
    n = 1
    for body in BRACE.findall(pattern):
        alt = _alternatives(body)
        n *= len(alt[0]) if isinstance(alt, tuple) else len(alt)
    return n


def expand_names(pattern: str) -> Iterator[str]:
    """The names of a brace pattern, lazily, in order: ``{000..011}`` keeps the width of its first bound."""
    pieces = BRACE.split(pattern)  # literal, body, literal, body, ..., literal
    choices = []
    for body in pieces[1::2]:
        alt = _alternatives(body)
        if isinstance(alt, tuple):
            values, width = alt
            choices.append(map(lambda i, w=width: f"{i:0{w}d}", values))
        else:
            choices.append(alt)
    for combo in product(*choices):
        out = [pieces[0]]
        for value, literal in zip(combo, pieces[2::2], strict=True):
            out += [value, literal]
        yield "".join(out)


# ---- reading one shard


def open_shard(url: str):
    """A binary stream of one shard. A local path must be a regular file: it is opened with ``O_NONBLOCK`` (a FIFO
    never blocks the open) and refused unless ``fstat`` of the open descriptor says regular. A URL (``pipe:``,
    ``https://``) is opened by webdataset; only user-typed patterns produce URLs (``pattern_shards``)."""
    if is_url(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    fd = os.open(url, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
            raise ShardReadError(f"{url}: not a regular file ({kind}); a shard is a tar file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), as webdataset groups a sample's members."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def tar_samples(url: str, handler: Callable[[Exception], bool], max_sample_bytes: int = MAX_SAMPLE_BYTES,
                headers_only: bool = False) -> Iterator[dict]:
    """The samples of one tar shard (gzip and other compressions too), in order, as webdataset makes them:
    ``{"__key__", "__url__", ext: bytes, ...}``. Members larger than the bound stop the shard before their data is
    read; errors go to ``handler`` (which returns True to go on with the next shard). ``headers_only``: the samples
    carry their member sizes, not their bytes (counting samples)."""
    try:
        stream = open_shard(url)
    except Exception as exn:
        exn.args = (*exn.args, url) if not isinstance(exn, ShardReadError) else exn.args
        if handler(exn):
            return
        raise
    try:
        yield from _samples(stream, url, handler, max_sample_bytes, headers_only)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM, a consumer that stops): a command is not waited for
        proc = getattr(stream, "proc", None)  # webdataset's ``pipe:`` stream
        if proc is not None and proc.poll() is None:
            proc.kill()
            stream.ignore_errors = True
        raise
    finally:
        try:
            stream.close()  # a ``pipe:`` command's exit status is checked here
        except Exception as exn:
            if not handler(ShardReadError(f"{url}: {exn}")):
                raise


def _samples(stream, url: str, handler: Callable[[Exception], bool], max_sample_bytes: int,
             headers_only: bool) -> Iterator[dict]:
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if key is None or key.startswith("__") or ext is None:
                    continue
                bound = MAX_META_BYTES if ext == "json" else max_sample_bytes
                if member.size > bound:
                    raise ShardReadError(f"{url}: member {member.name} holds {member.size:,} bytes, over the "
                                         f"{bound:,} a sample may have here; the rest of the shard is skipped")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    raise ShardReadError(f"{url}: member {member.name} appears twice in one sample")
                if headers_only:
                    current[ext] = member.size
                else:
                    f = tar.extractfile(member)
                    current[ext] = f.read() if f is not None else b""
                    if len(current[ext]) != member.size:
                        raise ShardReadError(f"{url}: member {member.name} is cut short")
        if current is not None:
            yield current
    except Exception as exn:
        if not handler(exn if isinstance(exn, ShardReadError) else ShardReadError(f"{url}: {exn!r}")):
            raise


def count_samples(url: str, handler: Callable[[Exception], bool], max_sample_bytes: int = MAX_SAMPLE_BYTES) -> int:
    """Samples in one shard, from member headers (a local file's data is seeked over)."""
    return sum(1 for _ in tar_samples(url, handler, max_sample_bytes, headers_only=True))


# ---- one sample's metadata


def _whole(meta: dict, name: str, least: int = 1, default=None) -> int | None:
    value = meta.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ShardReadError(f"{name} {value!r} (a whole number of at least {least} is expected)")
    return value


def check_meta(meta: object, nbytes: int) -> dict:
    """``meta`` if it has the shape ``mmbytes shards`` writes for a sample of ``nbytes`` bytes, else a
    ``ShardReadError`` naming the field: the caller skips and counts the sample. Fields the readers use: modality;
    nbytes; audio sample_width and sample_rate; image height, width, channels, order and tile."""
    if not isinstance(meta, dict):
        raise ShardReadError("metadata is not a JSON object")
    modality = meta.get("modality", "raw")
    if modality not in MODALITIES:
        raise ShardReadError(f"unknown modality {modality!r} (known: {', '.join(MODALITIES)})")
    stated = _whole(meta, "nbytes", 0)
    if stated is not None and stated != nbytes:  # a member cut short in a damaged tar
        raise ShardReadError(f"{nbytes} bytes, {stated} expected (nbytes)")
    if modality == "audio":
        _whole(meta, "sample_width")
        _whole(meta, "sample_rate")
        _whole(meta, "channels")
    if modality == "image":
        h, w, c = (_whole(meta, k) for k in ("height", "width", "channels"))
        if None not in (h, w, c) and h * w * c != nbytes:
            raise ShardReadError(f"{nbytes} bytes cannot be a {w}x{h}x{c} image (height, width, channels)")
        order = meta.get("order", "raster")
        if order not in ("patch", "raster"):
            raise ShardReadError(f"order {order!r} (patch or raster expected)")
        tile = _whole(meta, "tile", 1, 1)
        if order == "patch" and None not in (h, w) and (h % tile or w % tile):
            raise ShardReadError(f"tile {tile} does not divide a {w}x{h} image")
    return meta
