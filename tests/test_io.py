"""The one atomic writer (``mmbytes.io``): a file appears whole or not at all, never through a link, and a caller
that names its staging file (``mmbytes shards``' journal) finds it where it recorded it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbytes.io import Staged, atomic_path, write_atomically, write_text
from mmbytes.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "files"


def test_a_link_at_the_target_or_the_staging_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").symlink_to(victim)
    (tmp_path / "out" / ".report.md.partial").symlink_to(victim)
    write_text(tmp_path / "out" / "report.md", "new", staging=".report.md.partial")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "out" / "report.md").is_symlink() and (tmp_path / "out" / "report.md").read_text() == "new"
    assert sorted(os.listdir(tmp_path / "out")) == ["report.md"]


def test_before_replace_sees_the_whole_file_before_it_appears_under_its_name(tmp_path):
    data = (TEXT / "libpython3.11-stdlib_python3.11_this.py").read_bytes()
    seen = []
    staged = Staged(tmp_path / "a.py", ".a.py.partial")
    staged.file.write(data)
    staged.commit(lambda tmp: seen.append((tmp.name, tmp.read_bytes(), (tmp_path / "a.py").exists())))
    assert seen == [(".a.py.partial", data, False)] and (tmp_path / "a.py").read_bytes() == data


def test_a_failed_write_leaves_the_old_file_and_no_staging_file(tmp_path):
    write_text(tmp_path / "r.json", "old")

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "r.json", fails)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "r.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert os.listdir(tmp_path) == ["r.json"] and (tmp_path / "r.json").read_text() == "old"


def test_a_shards_run_killed_while_renaming_its_manifest_is_cleaned_up_by_a_rerun(tmp_path):
    """The manifest's staging file is the one the journal names, so a rerun may remove it."""
    out = tmp_path / "s"
    killed = ("import os, sys\nfrom mmbytes import io\nfrom mmbytes.shards import write_shards\n"
              "commit = io.Staged.commit\n"
              "def dies(self, before_replace=None):\n"
              "    if self.path.name == 'manifest.json':\n        os._exit(9)\n"
              "    return commit(self, before_replace)\n"
              "io.Staged.commit = dies\n"
              f"write_shards([{str(TEXT)!r}], {str(out)!r}, codec='text', progress=False)\n")
    run = subprocess.run([sys.executable, "-c", killed], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 9
    assert ".manifest.json.partial" in os.listdir(out) and "manifest.json" not in os.listdir(out)
    m = write_shards([TEXT], out, codec="text", progress=False)
    assert sorted(os.listdir(out)) == sorted(["manifest.json", *m["shard_files"]])
