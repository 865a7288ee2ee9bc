"""The one file writer of the package: every file ``mmbytes`` writes appears whole or not at all.

A file is written under a staging name beside its target (created exclusively, so never through a link planted
there), flushed to disk, given the permissions the umask allows, and renamed over the target: readers and a crash
at any moment see the old file or the new one, never half of one, and a link at the target is replaced, not written
through. The staging file goes if writing fails.

``Staged`` is the writer itself, for a file written over many calls (a shard); ``atomic_path`` (for writers that
take a path), ``write_atomically`` (a binary stream) and ``write_text`` wrap it. A caller that must name the staging
file before it exists (``mmbytes shards`` records it in its journal, so that a rerun may prove the file its own)
passes ``staging``; ``before_replace`` runs once the file is complete and on disk, just before the rename (the
journal records the finished file there, so a file under its final name is always recorded).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


class Staged:
    """One file being written under a staging name beside ``path``: ``file`` (binary, open for writing) until
    ``commit`` renames it over ``path`` or ``discard`` removes it. ``staging``: the staging file's name in
    ``path``'s folder (whatever is there is removed first); default a fresh unique ``.<name>.*.partial``."""

    def __init__(self, path: str | Path, staging: str | None = None) -> None:
        self.path = Path(path)
        if self.path.is_dir() and not self.path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way of the file", str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if staging is None:
            fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
            self.tmp = Path(name)  # mkstemp: O_EXCL, mode 0600
        else:
            if Path(staging).name != staging:
                raise ValueError(f"staging name {staging!r} is not a file name")
            self.tmp = self.path.parent / staging
            self.tmp.unlink(missing_ok=True)  # a link left under that name is removed, never written through
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self, before_replace: Callable[[Path], Any] | None = None) -> Path:
        """Flush the staging file to disk, call ``before_replace(staging path)``, rename it over ``path``."""
        try:
            if self.file.closed:  # a writer given the path may have replaced the file's content through its name
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
            else:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())
            if before_replace is not None:
                before_replace(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        _sync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and remove the staging file (errors on closing, a full disk's last flush, are ignored)."""
        try:
            self.file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, staging: str | None = None,
                before_replace: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """A staging path to write ``path``'s content to (by any writer that takes a path); renamed over ``path`` when
    the block ends without an error. A folder at ``path`` is refused."""
    staged = Staged(path, staging)
    staged.file.close()
    try:
        yield staged.tmp
    except BaseException:
        staged.discard()
        raise
    staged.commit(before_replace)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], Any], staging: str | None = None,
                     before_replace: Callable[[Path], Any] | None = None) -> None:
    """``write(f)`` into a binary file that becomes ``path`` whole (see ``Staged``)."""
    staged = Staged(path, staging)
    try:
        write(staged.file)
    except BaseException:
        staged.discard()
        raise
    staged.commit(before_replace)


def write_text(path: str | Path, text: str, staging: str | None = None) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, written atomically."""
    write_atomically(path, lambda f: f.write(text.encode()), staging)


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
