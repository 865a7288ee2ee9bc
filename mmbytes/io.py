"""The one file writer of the package: every file ``mmbytes`` writes appears whole or not at all.

A file is written under a temporary name beside its target (created exclusively, so never through a link planted
there), flushed to disk, given the permissions the umask allows, and renamed over the target: readers and a crash
at any moment see the old file or the new one, never half of one, and a link at the target is replaced, not written
through. The temporary file goes if writing fails.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to (by any writer that takes a path); renamed over ``path`` when
    the block ends without an error. A folder at ``path`` is refused."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a folder is in the way of the file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")  # O_EXCL, mode 0600
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle: flush the file to disk here
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a binary file that becomes ``path`` whole (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, written atomically."""
    write_atomically(path, lambda f: f.write(text.encode()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
