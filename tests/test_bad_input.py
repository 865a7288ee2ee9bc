"""Bad input, built from real files: each kind is skipped and listed with its reason, recorded as a conversion, or
refused with one line naming the file; nothing hangs, nothing of the user's is deleted or written through."""

import gzip
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from datamodules import ByteDataModule
from mmbytes.codecs import CodecError, decoded_limit, get_codec
from mmbytes.errors import CheckpointError, ManifestError, NoDataError, OptionError, ShardsError
from mmbytes.metrics import BitsPerByte
from mmbytes.shards import DIED, write_shards

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
SHARED = ROOT / "tests" / "data"  # real files shipped for the tests (credits: tests/data/MANIFEST.md)
PHOTOS = SHARED / "images" / "photos"
MNIST = SHARED / "images" / "mnist" / "t10k-images-idx3-ubyte-first1000.gz"
ICON = SAMPLES / "images" / "icon_places_user-home.png"
WAV = SAMPLES / "audio" / "fsdd_0_george_1.wav"
TEXT = SAMPLES / "text" / "tinyshakespeare.txt"
GIFS = sorted((SHARED / "files").glob("*.gif"))
LIMIT = 2 * 2**20  # --max-file-mb 2: also the decoded-size limit
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of (H, W, 3) uint16 pixels (Pillow does not write 16-bit colour)."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    head = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def with_size(png: bytes, w: int, h: int) -> bytes:
    """A real PNG whose header claims another size (CRC fixed, so only the size lies)."""
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", w, h)
    return png[:8] + png_chunk(b"IHDR", bytes(ihdr)) + png[33:]


def wav_like(src: Path, dst: Path, rate: int | None = None, subtype: str | None = None, edit=None) -> np.ndarray:
    data, sr = sf.read(str(src), dtype="float32")
    data = edit(data.copy()) if edit else data
    sf.write(str(dst), data, rate or sr, subtype=subtype or "PCM_16", format="WAV")
    return data


# ---- one shards run over a tree of bad files (session-scoped: built and encoded once)

SKIPPED = {  # name -> the exact reason listed in the manifest
    "caf\\xe9.txt": "file name is not valid UTF-8 (rename the file)",
    "loop_a": "symlink loop",
    "loop_self": "symlink loop",
    "dangling.txt": "broken link (its target does not exist)",
    "linked_folder": "link to a folder, not followed (give the folder itself as a source)",
    "fifo": "not a regular file (a FIFO)",
    "socket": "not a regular file (a socket)",
    "empty.txt": "empty file",
    "sparse.bin": f"larger than the {LIMIT:,}-byte limit (3,000,000 bytes)",
    "claims_8000x8000.png": f"a 8000x8000 image would decode to 256,000,000 bytes, over the {LIMIT:,}-byte limit",
    "direct_fifo": "not a regular file (a FIFO)",
    "null": "not a regular file (a character device)",
    "status": "its size is unknown until read (a /proc or /sys pseudo-file); copy it to a regular file to include it",
    "missing.txt": "no such file or directory",
}
CONVERTED = {  # name -> the exact conversions listed in the manifest
    "icon_rgba.png": ["RGBA -> RGB (alpha dropped)", "48x48 -> 32x32 (scaled, centre-cropped)"],
    "gray16.png": ["I;16 16-bit -> 8-bit (divided by 257)", "L -> RGB", "512x512 -> 32x32 (scaled, centre-cropped)"],
    "rgb16.png": ["RGB 16-bit -> 8-bit (high byte)", "512x512 -> 32x32 (scaled, centre-cropped)"],
    "palette.gif": ["P -> RGB", "43x64 -> 32x32 (scaled, centre-cropped)"] if GIFS else None,
    "three_frames.gif": ["first frame of 3 kept", "P -> RGB", "48x48 -> 32x32 (scaled, centre-cropped)"],
    "one_row_20000x1.png": ["L -> RGB", "20000x1 -> 32x32 (scaled, centre-cropped)"],
    "rate_16001.wav": ["16001 Hz -> 8000 Hz"],
}


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    src = root / "src"
    (src / "folder").mkdir(parents=True)
    shutil.copy(TEXT, src / "folder" / "inside_linked_folder.txt")
    shutil.copy(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py", src / "good.py")
    os.symlink(src / "folder", src / "linked_folder")
    os.symlink(src / "good.py", src / "linked_file.py")  # a link to a file is read
    os.symlink(src / "loop_b", src / "loop_a")
    os.symlink(src / "loop_a", src / "loop_b")
    os.symlink("loop_self", src / "loop_self")
    os.symlink(root / "gone.txt", src / "dangling.txt")
    (src / os.fsdecode(b"caf\xe9.txt")).write_bytes((SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py")
                                                   .read_bytes())
    os.mkfifo(src / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "socket"))
    (src / "empty.txt").touch()
    with open(src / "sparse.bin", "wb") as f:
        f.truncate(3_000_000)
    icon = ICON.read_bytes()
    (src / "cut.png").write_bytes(icon[: len(icon) // 2])
    (src / "claims_8000x8000.png").write_bytes(with_size(icon, 8000, 8000))
    shutil.copy(ICON, src / "icon_rgba.png")
    camera = np.asarray(Image.open(PHOTOS / "camera.png"))
    Image.fromarray(camera.astype(np.uint16) * 257).save(src / "gray16.png")
    astronaut = np.asarray(Image.open(PHOTOS / "astronaut.png").convert("RGB"))
    (src / "rgb16.png").write_bytes(png16_rgb(astronaut.astype(np.uint16) * 257))
    if GIFS:
        shutil.copy(SHARED / "files" / "libtk8.6_tcltk_tk8.6_images_logo64.gif", src / "palette.gif")
    icons = [Image.open(p).convert("RGB").convert("P") for p in sorted((SHARED / "images" / "icons_gnome48")
                                                                          .glob("*.png"))[:3]]
    icons[0].save(src / "three_frames.gif", save_all=True, append_images=icons[1:])
    Image.fromarray(camera.reshape(-1)[:20000].reshape(1, 20000)).save(src / "one_row_20000x1.png")
    nan = wav_like(WAV, src / "nan_inf.wav", subtype="FLOAT",
                   edit=lambda d: np.concatenate([d[:100], [np.nan] * 10, [np.inf] * 3, [-np.inf] * 2, d[100:]]))
    loud = wav_like(WAV, src / "too_loud.wav", subtype="FLOAT", edit=lambda d: d * 40)
    odd = wav_like(WAV, src / "rate_16001.wav", rate=16001)
    one_hz = wav_like(WAV, src / "one_hz.wav", rate=1)
    os.mkfifo(root / "direct_fifo")
    sources = [src, root / "direct_fifo", "/dev/null", "/proc/self/status", root / "missing.txt"]
    started = time.time()
    m = write_shards(sources, root / "out", codec="auto", codec_options={"image": {"size": 32},
                                                                          "audio": {"sample_rate": 8000}},
                     max_file_bytes=LIMIT, progress=False)
    seconds = time.time() - started
    sock.close()
    return {"root": root, "src": src, "manifest": m, "seconds": seconds, "nan": nan, "odd": odd, "one_hz": one_hz,
            "loud": loud}


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {Path(e["path"]).name: e for e in entries}


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_odd_files_are_skipped_and_listed_with_their_reason(tree, name):
    assert by_name(tree["manifest"]["skipped"])[name]["reason"] == SKIPPED[name]


def test_a_truncated_image_is_skipped_as_unreadable(tree):
    assert by_name(tree["manifest"]["skipped"])["cut.png"]["reason"].startswith("not a readable image")


def test_every_file_is_in_the_shards_or_in_skipped(tree):
    from mmbytes.shards import shown

    m, src = tree["manifest"], tree["src"]
    skipped = by_name(m["skipped"])
    assert set(skipped) == set(SKIPPED) | {"cut.png", "one_hz.wav", "loop_b"}
    encoded = {"good.py", "icon_rgba.png", "gray16.png", "rgb16.png", "three_frames.gif",
               "one_row_20000x1.png", "nan_inf.wav", "too_loud.wav", "rate_16001.wav"} | ({"palette.gif"} if GIFS
                                                                                          else set())
    assert m["files"] == len(encoded) + 1  # and folder/inside_linked_folder.txt, read once, from the real folder
    assert m["duplicates"]["list"] == [{"path": str(src / "linked_file.py"), "same_as": str(src / "good.py")}]
    listed = {shown(p.name) for p in src.iterdir()} - {"folder"}
    assert listed == encoded | {"linked_file.py"} | (set(skipped) & listed)
    assert tree["seconds"] < 60  # a 20000x1 picture and a 16001 Hz file cost no gigabytes, no minutes


@pytest.mark.parametrize("name", sorted(k for k, v in CONVERTED.items() if v))
def test_lossy_conversions_are_listed(tree, name):
    assert by_name(tree["manifest"]["converted"])[name]["converted"] == CONVERTED[name]


def test_nan_and_infinite_audio_is_zeroed_and_recorded(tree):
    assert by_name(tree["manifest"]["converted"])["nan_inf.wav"]["converted"] == [
        "FLOAT -> PCM_16", "15 NaN or infinite values -> 0"]


def test_audio_beyond_full_scale_is_clipped_and_recorded(tree):
    data = tree["loud"].astype(np.float64)
    n = int(((np.round(data * 32768) < -32768) | (np.round(data * 32768) > 32767)).sum())
    assert n > 0
    assert by_name(tree["manifest"]["converted"])["too_loud.wav"]["converted"] == [
        "FLOAT -> PCM_16", f"{n} samples beyond full scale clipped"]


def test_audio_cut_to_max_seconds_is_recorded():
    data, meta = get_codec("audio", max_seconds=0.1).encode(WAV)
    frames = sf.info(str(WAV)).frames
    assert len(data) == 2 * 800 and meta["converted"] == [f"first 800 of {frames:,} frames kept (max_seconds=0.1)"]


def test_a_1_hz_wav_is_refused_before_it_is_resampled(tree):
    frames = len(tree["one_hz"])
    assert by_name(tree["manifest"]["skipped"])["one_hz.wav"]["reason"] == (
        f"1 Hz -> 8000 Hz would decode to {frames * 8000 * 2:,} bytes, over the {LIMIT:,}-byte limit")


def test_the_non_utf8_name_is_listed_readably(tree):
    entry = by_name(tree["manifest"]["skipped"])["caf\\xe9.txt"]
    assert entry["path"].endswith("src/caf\\xe9.txt")
    json.dumps(entry, ensure_ascii=False).encode("utf-8")  # no lone surrogate left in the manifest


# ---- images, audio and IDX: decoded size bounded, bit depth scaled


def test_16_bit_gray_png_is_scaled_not_clipped(tree):
    data, meta = get_codec("image", channels=1, order="raster").encode(tree["src"] / "gray16.png")
    camera = np.asarray(Image.open(PHOTOS / "camera.png"))
    assert data == camera.tobytes()  # v * 257 / 257: every pixel back, none saturated to white
    assert meta["converted"] == ["I;16 16-bit -> 8-bit (divided by 257)"]


def test_16_bit_rgb_png_keeps_its_pixels(tree):
    data, meta = get_codec("image", order="raster").encode(tree["src"] / "rgb16.png")
    assert data == np.asarray(Image.open(PHOTOS / "astronaut.png").convert("RGB")).tobytes()
    assert meta["converted"] == ["RGB 16-bit -> 8-bit (high byte)"]


def test_a_very_wide_image_is_resized_without_a_huge_intermediate(tree):
    import tracemalloc

    tracemalloc.start()
    data, meta = get_codec("image", size=32).encode(tree["src"] / "one_row_20000x1.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(data) == 32 * 32 * 3 and peak < 20 * 2**20  # resizing 20000x1 first would take 640000x32x3 bytes


def test_a_png_header_claiming_a_huge_size_is_refused_before_decoding(tmp_path):
    bad = tmp_path / "huge.png"
    bad.write_bytes(with_size(ICON.read_bytes(), 8000, 8000))
    with decoded_limit(LIMIT), pytest.raises(CodecError, match="huge.png: a 8000x8000 image would decode to"):
        get_codec("image").encode(bad)


def test_resampling_coprime_rates_is_fast_and_exact_in_length(tree):
    started = time.time()
    data, meta = get_codec("audio", sample_rate=8000).encode(tree["src"] / "rate_16001.wav")
    assert time.time() - started < 10
    assert len(data) == 2 * -(-len(tree["odd"]) * 8000 // 16001) and meta["sample_rate"] == 8000


@pytest.mark.parametrize(("name", "count", "h", "w", "gz", "match"), [
    ("billions_of_empty.idx", 4_000_000_000, 0, 0, False, "header promises 4000000000 images of 0x0: no pixels"),
    ("billion_digits.idx", 1_000_000_000, 28, 28, False, "a header promising 1,000,000,000 images of 28x28 would "
                                                         "decode to 784,000,000,000 bytes"),
    ("bomb.idx.gz", 100_000, 28, 28, True, "a header promising 100,000 images of 28x28 would decode to 78,400,000"),
])
def test_idx_headers_are_checked_before_anything_is_read(tmp_path, name, count, h, w, gz, match):
    real = gzip.open(MNIST).read()
    raw = real[:4] + struct.pack(">III", count, h, w) + real[16:]
    (tmp_path / name).write_bytes(gzip.compress(raw, 1) if gz else raw)
    started = time.time()
    with decoded_limit(LIMIT), pytest.raises(CodecError, match=match):
        get_codec("idx").encode_many(tmp_path / name)
    assert time.time() - started < 5


def test_text_chunks_never_split_a_character(tmp_path):
    text = "Élan vital — naïve café, 東京 and Zürich: ünïcödé ".encode() * 40  # one long line, no newline
    (tmp_path / "src").mkdir()
    this = (SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py").read_bytes()
    (tmp_path / "src" / "accents.txt").write_bytes(text + this)
    m = write_shards([tmp_path / "src"], tmp_path / "out", codec="text", chunk_bytes=64, progress=False)
    parts = read_all(tmp_path / "out")
    assert all(p.decode("utf-8") for p in parts) and m["converted"] == []
    m = write_shards([tmp_path / "src"], tmp_path / "out", codec="text", chunk_bytes=1, progress=False)
    cuts = by_name(m["converted"])["accents.txt"]["converted"]
    assert len(cuts) == 1 and cuts[0].startswith("text cut inside a UTF-8 character at ")
    assert cuts[0].endswith("chunk boundaries (chunks of 1 bytes are shorter than a character)")


def read_all(out: Path) -> list[bytes]:
    import webdataset as wds

    m = json.loads((out / "manifest.json").read_text())
    urls = [str(out / n) for s in m["splits"].values() for n in s["shards"]]
    samples = [(json.loads(s["json"]), s["bin"]) for s in wds.WebDataset(urls, shardshuffle=False)]
    return [b for _, b in sorted(samples, key=lambda s: s[0]["chunk"])]


# ---- the output folder: only what mmbytes wrote is removed


def user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "train-2023.tar", "w") as tar:
        tar.add(TEXT, arcname="shakespeare.txt")
    shutil.copy(folder / "train-2023.tar", folder / "val-1.tar")
    (folder / "manifest.json").write_text(json.dumps({"project": "someone else's", "files": 3}))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("keep", ["train-2023.tar", "val-1.tar", "manifest.json"])
def test_shards_never_delete_files_they_did_not_write(tmp_path, keep):
    before = user_files(tmp_path / "out")
    for name in set(before) - {keep}:
        (tmp_path / "out" / name).unlink()
    with pytest.raises(ShardsError, match="holds 1 file|not one mmbytes wrote"):
        write_shards([SAMPLES / "text"], tmp_path / "out", codec="text", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {keep: before[keep]}


def test_a_foreign_tar_with_a_shard_name_is_not_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(out / "train-000000.tar", "w") as tar:  # another tool's tar under an mmbytes name
        tar.add(TEXT, arcname="shakespeare.txt")
    data = (out / "train-000000.tar").read_bytes()
    with pytest.raises(ShardsError, match=r"holds 1 file\(s\) mmbytes shards did not write \(train-000000.tar\)"):
        write_shards([SAMPLES / "files"], out, progress=False)
    assert (out / "train-000000.tar").read_bytes() == data


@pytest.mark.parametrize("name", ["train-000000.tar", "manifest.json"])
def test_a_fifo_in_out_is_foreign_and_never_opened(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with pytest.raises(ShardsError, match=rf"holds 1 file\(s\) mmbytes shards did not write \({name}\)"):
        write_shards([SAMPLES / "text"], tmp_path, codec="text", progress=False)
    assert stat.S_ISFIFO(os.lstat(tmp_path / name).st_mode)


def test_a_fifo_manifest_is_refused_without_blocking(tmp_path):
    (tmp_path / "shards").mkdir()
    os.mkfifo(tmp_path / "shards" / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json: not a regular file"):
        datamodule(tmp_path / "shards").train_dataloader()


def test_a_rerun_replaces_only_the_files_its_manifest_proves_it_wrote(tmp_path):
    out = tmp_path / "out"
    first = write_shards([SAMPLES / "text"], out, codec="text", max_shard_bytes=200_000, progress=False)
    second = write_shards([SAMPLES / "files"], out, progress=False)  # sizes and checksums in the manifest match
    names = {*second["splits"]["train"]["shards"], *second["splits"]["val"]["shards"], "manifest.json"}
    assert set(os.listdir(out)) == names and len(first["splits"]["train"]["shards"]) > 1
    (out / "manifest.json").unlink()  # shards that nothing records: not provably this command's
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(ShardsError, match=r"holds \d file\(s\) mmbytes shards did not write \(train-000000.tar"):
        write_shards([SAMPLES / "files"], out, progress=False)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


@pytest.mark.parametrize("where", ["equal", "holds_source"])
def test_out_that_is_or_holds_a_source_is_refused(tmp_path, where):
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "text", src)
    out = src if where == "equal" else tmp_path
    match = "--out is also a source" if where == "equal" else "--out holds the source"
    with pytest.raises(ShardsError, match=match):
        write_shards([src], out, codec="text", progress=False)
    assert sorted(os.listdir(src)) == ["tinyshakespeare.txt"]


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_bytes(TEXT.read_bytes()[:100])
    with pytest.raises(ShardsError, match="out: --out is a file, not a folder"):
        write_shards([SAMPLES / "text"], tmp_path / "out", codec="text", progress=False)


def test_no_sample_at_all_is_an_error(tmp_path):
    with pytest.raises(ShardsError, match=r"no sample written to .*: all 2 files and sources were missing or skipped"):
        write_shards([tmp_path / "nothing", "/dev/null"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_unreadable_folder_is_listed(tmp_path):
    """Root reads every folder: where the tests run as root, the listing runs without the capabilities that let it
    (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    (tmp_path / "src" / "locked").mkdir(parents=True)
    shutil.copy(TEXT, tmp_path / "src" / "locked" / "hidden.txt")
    shutil.copy(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py", tmp_path / "src" / "this.py")
    (tmp_path / "src" / "locked").chmod(0)
    code = ("import json, sys; from mmbytes.shards import list_files; "
            "files, skipped = list_files([sys.argv[1]]); print(json.dumps([[str(p) for p, _ in files], skipped]))")
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: every folder is readable")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", code, str(tmp_path / "src")], env=ENV,
                              capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "src" / "locked").chmod(0o755)
    files, skipped = json.loads(done.stdout)
    assert [Path(p).name for p in files] == ["this.py"]
    assert skipped == [{"path": str(tmp_path / "src" / "locked"),
                        "reason": "unreadable folder (Permission denied); nothing in it was read"}]


def test_a_killed_worker_skips_only_its_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "files", src)
    shutil.copy(TEXT, src / "kill_me.py")  # content of its own: a copy of a file there would be kept once
    from bad_input_helpers import KillingCodec

    monkeypatch.setattr("mmbytes.shards.get_codec", lambda name, **kw: KillingCodec())
    m = write_shards([src], tmp_path / "out", workers=2, progress=False)
    assert m["skipped"] == [{"path": str(src / "kill_me.py"), "reason": DIED}]
    assert m["files"] == len(list((SAMPLES / "files").iterdir()))


def test_disk_full_while_writing_shards_is_one_line_and_leaves_nothing(tmp_path):
    """A real write error from the kernel: the file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) gives EFBIG, as a
    full disk gives ENOSPC."""
    import resource

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mmbytes.cli", "shards", str(SAMPLES / "text"), "--out", str(out),
                           "--codec", "text", "--workers", "0"], env=ENV, capture_output=True, text=True,
                          preexec_fn=small_disk, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "mmbytes: error" in line or "Traceback" in line]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"mmbytes: error: {out}: File too large while writing shards")
    assert os.listdir(out) == []  # no .partial, no shard, no manifest


# ---- options: refused by the parser before any work


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--chunk-bytes", "-1", "argument --chunk-bytes: must be 1 or more, not -1"),
    ("--chunk-bytes", "0", "argument --chunk-bytes: must be 1 or more, not 0"),
    ("--image-tile", "0", "argument --image-tile: must be 1 or more, not 0"),
    ("--image-size", "0", "argument --image-size: must be 1 or more, not 0"),
    ("--sample-rate", "-8000", "argument --sample-rate: must be 1 or more, not -8000"),
    ("--val-fraction", "2", "argument --val-fraction: must be at least 0 and less than 1, not 2.0"),
    ("--max-file-mb", "nan", "argument --max-file-mb: 'nan' is not a finite number"),
    ("--workers", "-2", "argument --workers: must be 0 or more, not -2"),
    ("--image-size", "30", "--image-size 30 does not split into --image-tile 4 tiles"),
    ("--image-size", "100000", "--image-size 100000 makes images of 30,000,000,000 bytes, over --max-file-mb 256"),
])
def test_bad_shards_options_stop_the_parser(tmp_path, capsys, option, value, message):
    from mmbytes.shards import main

    with pytest.raises(SystemExit) as stop:
        main([str(SAMPLES / "images"), "--out", str(tmp_path / "out"), "--codec", "image", option, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_codec_options_fail_before_the_output_folder_is_touched(tmp_path):
    with pytest.raises(OptionError, match="size 30x30 does not split into 4x4 tiles"):
        write_shards([SAMPLES / "images"], tmp_path / "out", codec="image", codec_options={"size": 30},
                     progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("seq_len", 0, "data.seq_len must be a whole number of at least 1, not 0"),
    ("batch_size", 0, "data.batch_size must be a whole number of at least 1, not 0"),
    ("train_batches_per_epoch", -1, "data.train_batches_per_epoch must be a whole number of at least 1, not -1"),
    ("num_workers", -1, "data.num_workers must be a whole number of at least 0, not -1"),
    ("val_fraction", 1.0, "data.val_fraction must be at least 0 and less than 1, not 1.0"),
])
def test_bad_data_options_are_refused_when_the_datamodule_is_built(good_shards, option, value, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        ByteDataModule(data_dir=str(good_shards), **{option: value})


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A debug-size checkpoint after one step on the real Shakespeare text."""
    import lightning as L

    from mmbytes.lit import ByteLM

    tmp = tmp_path_factory.mktemp("ckpt")
    dm = ByteDataModule(data_dir=str(tmp / "shards"), sources=[str(SAMPLES / "text")], codec="text", seq_len=64,
                        batch_size=2, train_batches_per_epoch=1, shuffle_buffer=4)
    dm.prepare_data()
    t = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    t.fit(ByteLM(size="debug"), datamodule=dm)
    t.save_checkpoint(tmp / "model.ckpt")
    return tmp / "model.ckpt"


@pytest.mark.parametrize(("args", "message"), [
    (["--num", "0"], "argument --num: must be 1 or more, not 0"),
    (["--num", "-1"], "argument --num: must be 1 or more, not -1"),
    (["--top-k", "0"], "argument --top-k: must be 1 or more, not 0"),
    (["--top-p", "0"], "argument --top-p: must be more than 0 and at most 1, not 0.0"),
    (["--temperature", "-1"], "argument --temperature: must be 0 or more, not -1.0"),
    (["--bytes", "0"], "argument --bytes: must be 1 or more, not 0"),
    (["--seconds", "0"], "argument --seconds: must be more than 0, not 0.0"),
    (["--modality", "image", "--image-size", "32", "--tile", "3"], "--image-size 32 does not split into --tile 3"),
])
def test_bad_sample_options_stop_the_parser_before_the_checkpoint_is_read(tmp_path, capsys, args, message):
    from mmbytes.sample import main

    with pytest.raises(SystemExit) as stop:  # the checkpoint does not even exist: it is never opened
        main(["--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out"), *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_tile_that_does_not_fit_the_trained_size_fails_before_sampling(ckpt, tmp_path):
    from mmbytes.sample import main

    started = time.time()
    with pytest.raises(OptionError, match="32x32 images do not split into 3x3 tiles"):
        main(["--ckpt", str(ckpt), "--modality", "image", "--tile", "3", "--out", str(tmp_path / "out")])
    assert time.time() - started < 30 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--bytes", str(2**30)], ["--modality", "audio", "--seconds", "1e6"],
                                  ["--modality", "image", "--image-size", "65536", "--tile", "4"]])
def test_a_sample_too_big_to_generate_is_refused_before_sampling(ckpt, tmp_path, args):
    from mmbytes.sample import main

    with pytest.raises(OptionError, match="bytes per sample asked for, over the 268,435,456-byte limit"):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_an_image_tile_that_no_patch_fits_is_named(ckpt, tmp_path):
    from mmbytes.sample import main

    with pytest.raises(OptionError, match=r"patch size 4 is not t\*t\*3 for any tile side t; give a tile side"):
        main(["--ckpt", str(ckpt), "--modality", "image", "--out", str(tmp_path / "out")])


def test_a_fifo_prompt_is_refused_without_blocking(tmp_path, capsys):
    from mmbytes.sample import main

    os.mkfifo(tmp_path / "prompt")
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt", str(tmp_path / "none.ckpt"), "--prompt", str(tmp_path / "prompt"), "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert f"{tmp_path / 'prompt'}: is not a regular file (a FIFO, socket or device)" in capsys.readouterr().err


def test_sample_never_writes_through_a_link_in_out(ckpt, tmp_path):
    from mmbytes.cli import main

    outside = tmp_path / "precious.txt"
    shutil.copy(TEXT, outside)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "text_000.txt").symlink_to(outside)
    main(["sample", "--ckpt", str(ckpt), "--num", "2", "--bytes", "8", "--out", str(tmp_path / "out")])
    assert outside.read_bytes() == TEXT.read_bytes()
    assert not (tmp_path / "out" / "text_000.txt").is_symlink()
    assert sorted(os.listdir(tmp_path / "out")) == ["text_000.txt", "text_001.txt"]


# ---- data that yields nothing: stop with the shards named, never hang or log 0


@pytest.fixture(scope="session")
def good_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "shards"
    write_shards([SAMPLES / "text"], out, codec="text", max_shard_bytes=300_000, progress=False)
    return out


def copy_shards(good: Path, dst: Path, edit) -> Path:
    shutil.copytree(good, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for split in m["splits"].values():
        for name in split["shards"]:
            edit(dst / name)
    return dst


def datamodule(path: Path, workers: int = 0) -> ByteDataModule:
    return ByteDataModule(data_dir=str(path), seq_len=64, batch_size=2, num_workers=workers, shuffle_buffer=4,
                          train_batches_per_epoch=2)


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:300])  # the first tar header and a few bytes: no whole member


def retag(p: Path) -> None:
    """Every sample's modality replaced by one that does not exist."""
    with tarfile.open(p) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(p, "w") as tar:
        for m, data in members:
            if m.name.endswith(".json"):
                data = json.dumps({**json.loads(data), "modality": "video"}).encode()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize(("edit", "workers", "match"), [
    (truncate, 0, r"no readable train sample in any of the \d+ train shards \(.*train-000000.tar: "),
    (truncate, 2, r"no readable train sample in any of the \d+ train shards"),
    (retag, 0, r"train-000000.tar: ShardReadError: sample [0-9a-f]+ in .*: unknown modality 'video'"),
    (lambda p: p.unlink(), 0, r"none of the \d+ train shards it names is there"),
])
def test_no_readable_training_shard_stops_within_seconds(good_shards, tmp_path, edit, workers, match):
    bad = copy_shards(good_shards, tmp_path / "bad", edit)
    started = time.time()
    with pytest.raises(NoDataError, match=match):
        next(iter(datamodule(bad, workers).train_dataloader()))
    assert time.time() - started < 30


def test_one_missing_shard_among_good_ones_is_named_and_training_goes_on(good_shards, tmp_path, caplog):
    bad = copy_shards(good_shards, tmp_path / "bad", lambda p: None)
    first = json.loads((bad / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    (bad / first).unlink()
    assert len(list(datamodule(bad).train_dataloader())) == 2
    assert "1 of the" in caplog.text and first in caplog.text


def test_a_damaged_validation_set_stops_with_its_shards_named(good_shards, tmp_path):
    bad = copy_shards(good_shards, tmp_path / "bad", truncate)
    with pytest.raises(NoDataError, match=r"no readable val sample in any of the \d+ val shards \(.*val-000000.tar"):
        list(datamodule(bad).val_dataloader())


def test_bits_per_byte_over_zero_bytes_is_not_a_number_to_log():
    metric = BitsPerByte()
    metric.update(torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.long))  # only masked padding
    assert metric.compute() == {}


def test_validation_that_scores_nothing_logs_no_bpb_and_warns(ckpt):
    from mmbytes.lit import ByteLM

    module = ByteLM.load_from_checkpoint(ckpt)
    module.bits["val"].update(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    logged = []
    module.log = lambda name, value, **kw: logged.append(name)
    with pytest.warns(UserWarning, match="no val byte was scored, so val/bpb is not logged"):
        module.on_validation_epoch_end()
    assert logged == []


@pytest.mark.parametrize(("text", "match"), [
    ("{not json", "manifest.json: not a JSON manifest"),
    ('{"version": 1}', r"manifest.json: not a manifest written by `mmbytes shards` \(no shard list per split\)"),
    ('{"splits": {"train": {"shards": "train-000000.tar"}}}', "not a manifest written by `mmbytes shards`"),
])
def test_a_corrupt_manifest_is_refused_by_name(good_shards, tmp_path, text, match):
    bad = copy_shards(good_shards, tmp_path / "bad", lambda p: None)
    (bad / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=match):
        datamodule(bad).train_dataloader()


# ---- the command: one line naming the file, --debug for the traceback


@pytest.mark.parametrize(("kind", "make", "match"), [
    ("random bytes", lambda p: p.write_bytes(ICON.read_bytes()),
     r"not a checkpoint \(a torch checkpoint is a zip archive\)"),
    ("a zip of text", lambda p: shutil.make_archive(str(p), "zip", SAMPLES / "text") and os.replace(f"{p}.zip", p),
     r"a zip archive, but not a torch checkpoint \(no data.pkl\)"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys, kind, make, match):
    from mmbytes.cli import main

    bad = tmp_path / "model.ckpt"
    make(bad)
    with pytest.raises(CheckpointError, match=match):
        main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "out")], friendly=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith(f"mmbytes: error: {bad}: ")


@pytest.mark.parametrize(("case", "line"), [
    ("foreign out", "--out holds 3 file(s) mmbytes shards did not write (manifest.json, train-2023.tar, val-1.tar)"),
    ("out is a file", "--out is a file, not a folder"),
    ("nothing to read", "no sample written to"),
    ("foreign manifest", "--out holds 1 file(s) mmbytes shards did not write (manifest.json)"),
    ("unwritable out", "Not a directory"),
])
def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch, case, line):
    from mmbytes.cli import main

    out = tmp_path / "out"
    sources = [str(SAMPLES / "text")]
    if case == "foreign out":
        user_files(out)
    elif case == "out is a file":
        out.write_bytes(b"x" * 10)
    elif case == "nothing to read":
        sources = [str(tmp_path / "missing")]
    elif case == "foreign manifest":
        out.mkdir()
        (out / "manifest.json").write_text('{"splits": []}')
    else:
        (tmp_path / "file").write_bytes(b"x")
        out = tmp_path / "file" / "out"
    with pytest.raises(SystemExit) as stop:
        main(["shards", *sources, "--out", str(out), "--workers", "0"], friendly=True)
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert stop.value.code == 1 and err[-1].startswith("mmbytes: error: ") and line in err[-1]
    assert not any("Traceback" in x for x in err)
    monkeypatch.setenv("MMBYTES_DEBUG", "1")  # the traceback, when asked for
    with pytest.raises((ShardsError, ManifestError, OSError)):
        main(["shards", *sources, "--out", str(out), "--workers", "0"], friendly=True)


def test_sigterm_stops_a_run_that_waits_for_data(tmp_path):
    """A user-typed ``pipe:`` shard whose command waits forever (``cat`` of a FIFO nobody writes): the loader blocks
    reading it. SIGTERM stops the run."""
    fifo = tmp_path / "train.tar"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "mmbytes.cli", "fit", "--model.size", "debug",
           "--data.train_shards", f"pipe:cat {fifo}", "--data.val_shards", f"pipe:cat {fifo}", "--data.seq_len", "64",
           "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--trainer.max_steps", "2", "--trainer.logger", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while True:  # wait until the run has the FIFO open for reading (blocked on its first batch)
            assert run.poll() is None and time.time() < deadline, run.stderr.read()[-3000:] if run.poll() else ""
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)
        started = time.time()
        run.send_signal(signal.SIGTERM)
        code = run.wait(60)
        os.close(writer)
        assert code != 0 and time.time() - started < 30
    finally:
        if run.poll() is None:
            run.kill()


def test_fit_on_a_corrupt_manifest_is_one_line(good_shards, tmp_path, capsys, monkeypatch):
    from mmbytes.cli import main

    bad = copy_shards(good_shards, tmp_path / "bad", lambda p: None)
    (bad / "manifest.json").write_text('{"splits": {"train": ')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.size", "debug", "--data.data_dir", str(bad), "--trainer.max_steps", "1",
              "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"], friendly=True)
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mmbytes: error")]
    assert stop.value.code == 1 and len(err) == 1
    assert err[0].startswith(f"mmbytes: error: {bad / 'manifest.json'}: not a JSON manifest")


def test_fit_with_workers_leaves_no_temp_folders(good_shards, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    cmd = [sys.executable, "-m", "mmbytes.cli", "fit", "--model.size", "debug", "--data.data_dir", str(good_shards),
           "--data.seq_len", "64", "--data.num_workers", "2", "--data.train_batches_per_epoch", "2",
           "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    done = subprocess.run(cmd, cwd=tmp_path, env={**ENV, "TMPDIR": str(temp)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in temp.iterdir() if p.name.startswith("pymp-")] == []


def test_a_vq_run_on_shards_without_its_modality_is_refused(good_shards):
    from datamodules.vq import VQDataModule

    dm = VQDataModule(data_dir=str(good_shards), modality="audio", batch_size=2, train_batches_per_epoch=1)
    with pytest.raises(NoDataError, match="manifest.json: no audio sample in the train split"):
        dm.train_dataloader()


def test_a_damaged_vq_sample_is_skipped_and_counted(tmp_path):
    from datamodules.bytes import skipped
    from datamodules.vq import VQDataModule

    out = tmp_path / "images"
    m = write_shards([SAMPLES / "images"], out, codec="image", codec_options={"size": 32}, val_fraction=0,
                     progress=False)
    shard = out / m["splits"]["train"]["shards"][0]
    with tarfile.open(shard) as tar:
        members = [(x, tar.extractfile(x).read()) for x in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for x, data in members:
            if x.name.endswith(".json"):  # every picture claims a height its bytes do not have
                data = json.dumps({**json.loads(data), "height": 31}).encode()
                x.size = len(data)
            tar.addfile(x, io.BytesIO(data))
    before = skipped["errors"]
    dm = VQDataModule(data_dir=str(out), modality="image", batch_size=2, train_batches_per_epoch=1, shuffle_buffer=2)
    with pytest.raises(NoDataError, match=r"no readable train sample in any of the 1 train shards \(.*ShardReadError: "
                                          r".*cannot be a 32x31x3 image"):
        next(iter(dm.train_dataloader()))
    assert skipped["errors"] > before


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path):
    from mmbytes.shards import list_files

    deep = tmp_path / "src"
    deep.mkdir()
    try:
        for _ in range(1200):  # one-letter folders: deeper than Python's recursion limit, within PATH_MAX
            deep = deep / "d"
            deep.mkdir()
        shutil.copy(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py", deep / "this.py")
        files, skipped = list_files([tmp_path / "src"])
        assert [name.count("/") for _, name in files] == [1201] and skipped == []
    finally:  # shutil.rmtree (and pytest's cleanup of old temp folders) recurses: remove it from the bottom up
        (deep / "this.py").unlink(missing_ok=True)
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


# ---- the one shard reader: manifests name files, reads are bounded, nothing blocks, metadata is checked once


def set_train_shards(folder: Path, names: list[str]) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["splits"]["train"]["shards"] = names
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("entry", ["pipe:touch MARKER;cat train-000000.tar", "file:train-000000.tar",
                                   "https://example.invalid/train-000000.tar", "../good/train-000000.tar"])
def test_a_manifest_entry_that_is_not_a_file_name_is_refused_and_never_run(good_shards, tmp_path, monkeypatch,
                                                                          entry):
    bad = copy_shards(good_shards, tmp_path / "bad", lambda p: None)
    set_train_shards(bad, [entry, "train-000000.tar"])
    monkeypatch.chdir(bad)  # data_dir "." : a bare name would reach webdataset as the URL itself
    with pytest.raises(ManifestError, match=re.escape(f"shard {entry!r} is not a file name inside")):
        next(iter(datamodule(Path(".")).train_dataloader()))
    assert not (bad / "MARKER").exists()


def test_a_pipe_url_typed_by_the_user_is_read(good_shards):
    first = good_shards / json.loads((good_shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    piped = list(ByteDataModule(train_shards=f"pipe:cat {first}").samples("train"))
    direct = list(ByteDataModule(train_shards=str(first)).samples("train"))
    assert piped and [d.tobytes() for d, _ in piped] == [d.tobytes() for d, _ in direct]


def test_shard_paths_from_a_manifest_are_absolute_local_files(good_shards, monkeypatch):
    monkeypatch.chdir(good_shards)
    urls = datamodule(Path(".")).urls("train")
    assert urls and all(Path(u).is_absolute() and Path(u).parent == good_shards.resolve() for u in urls)


def test_a_small_gzip_shard_holding_a_huge_member_is_refused_before_it_is_read(good_shards, tmp_path):
    """A 64 MiB member of zeros, gzipped to a few KB, in a split the manifest says holds under 2 MB."""
    from datamodules.bytes import skipped

    bad = copy_shards(good_shards, tmp_path / "bad", lambda p: None)
    m = json.loads((bad / "manifest.json").read_text())
    name = m["splits"]["train"]["shards"][0]
    assert m["splits"]["train"]["bytes"] < 2 * 2**20
    huge = 64 * 2**20
    with tarfile.open(bad / name) as tar:
        first = [(x, tar.extractfile(x).read()) for x in tar.getmembers()[:2]]
    with gzip.open(bad / name, "wb", compresslevel=1) as z, tarfile.open(fileobj=z, mode="w") as tar:
        for x, data in first:
            if x.name.endswith(".bin"):
                x.size, data = huge, None
            else:
                data = json.dumps({**json.loads(data), "nbytes": huge}).encode()
                x.size = len(data)
            tar.addfile(x, io.BytesIO(bytes(huge)) if data is None else io.BytesIO(data))
    assert (bad / name).stat().st_size < 2**20
    import tracemalloc

    before, started = skipped["errors"], time.time()
    tracemalloc.start()
    try:
        items = list(datamodule(bad).samples("train"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skipped["errors"] > before and peak < 16 * 2**20 and time.time() - started < 10
    assert items and all(len(data) < huge for data, _ in items)  # the other shards are read


def test_a_fifo_under_a_shard_name_is_refused_without_blocking(good_shards, tmp_path, caplog):
    from datamodules.reader import ShardReadError, open_shard

    bad = copy_shards(good_shards, tmp_path / "bad", lambda p: None)
    first = json.loads((bad / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    (bad / first).unlink()
    os.mkfifo(bad / first)
    signal.alarm(20)  # a blocking open would hang the test: fail it instead
    try:
        assert len(list(datamodule(bad).train_dataloader())) == 2  # the other shards train
        assert "1 of the" in caplog.text and "missing or not regular files" in caplog.text
        with pytest.raises(ShardReadError, match="not a regular file"):
            open_shard(str(bad / first))  # replaced by a FIFO after the listing
        with pytest.raises(NoDataError, match="none of the 1 shards it names is there as a file"):
            ByteDataModule(train_shards=str(bad / first)).urls("train")
    finally:
        signal.alarm(0)


def test_a_wide_brace_pattern_warns_once_with_a_count(good_shards, caplog):
    import logging

    from datamodules.reader import MAX_NAMES

    pattern = str(good_shards / "train-{000000..099999}.tar")
    present = len(json.loads((good_shards / "manifest.json").read_text())["splits"]["train"]["shards"])
    started = time.time()
    with caplog.at_level(logging.WARNING):
        urls = ByteDataModule(train_shards=pattern).urls("train")
    assert len(urls) == present and time.time() - started < 5
    lines = [r for r in caplog.records if "shards it names are missing" in r.getMessage()]
    assert len(lines) == 1 and f"{MAX_NAMES - present} of the {MAX_NAMES} shards" in lines[0].getMessage()


def test_a_pattern_of_a_billion_names_is_refused_before_it_is_expanded(good_shards):
    started = time.time()
    with pytest.raises(OptionError, match="the pattern names 1,000,000,000 shards, over the limit of 100,000"):
        ByteDataModule(train_shards=str(good_shards / "train-{000000000..999999999}.tar")).urls("train")
    assert time.time() - started < 1


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images") / "shards"
    write_shards([SAMPLES / "images"], out, codec="image", codec_options={"size": 16, "tile": 4}, val_fraction=0,
                 progress=False)
    return out


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("tile", 0, "tile 0 (a whole number of at least 1 is expected)"),
    ("tile", "4", "tile '4' (a whole number of at least 1 is expected)"),
    ("tile", 3, "tile 3 does not divide a 16x16 image"),
    ("channels", 0, "channels 0 (a whole number of at least 1 is expected)"),
    ("height", -16, "height -16"),
    ("width", 8, "cannot be a 8x16x3 image"),
    ("order", "spiral", "order 'spiral'"),
    ("sample_width", True, None),  # not read for images: the sample stays good
])
def test_image_metadata_of_the_wrong_shape_is_skipped_and_counted(image_shards, tmp_path, field, value, reason):
    from datamodules.bytes import decode, skipped
    from datamodules.reader import tar_samples

    bad = tmp_path / "bad"
    shutil.copytree(image_shards, bad)
    shard = bad / json.loads((bad / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    with tarfile.open(shard) as tar:
        members = [(x, tar.extractfile(x).read()) for x in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (x, data) in enumerate(members):
            if i == 1:  # the first sample's metadata only
                data = json.dumps({**json.loads(data), field: value}).encode()
                x.size = len(data)
            tar.addfile(x, io.BytesIO(data))
    first = next(tar_samples(str(shard), lambda e: False))
    if reason is None:
        assert decode(first)[1][field] is True
        return
    with pytest.raises(ValueError, match=re.escape(reason)):
        decode(first)
    before = skipped["errors"]
    dm = ByteDataModule(data_dir=str(bad), seq_len=48, batch_size=2, shuffle_buffer=2, train_batches_per_epoch=3,
                        patch_size=48)
    assert len(list(dm.train_dataloader())) == 3  # training goes on over the other samples
    assert skipped["errors"] > before


# ---- options out of range: the parser stops with the option named, before any file is read


@pytest.mark.parametrize(("command", "args", "message"), [
    ("sample", ["--seed", str(2**64)], "argument --seed: must be from 0 to 18,446,744,073,709,551,615 (a 64-bit seed)"),
    ("sample", ["--seed", "-1"], "argument --seed: must be from 0 to"),
    ("compress", ["--chunk", "0"], "argument --chunk: must be from 1 to 16,777,216, not 0"),
    ("compress", ["--chunk", str(2**40)], "argument --chunk: must be from 1 to 16,777,216"),
    ("compress", ["--batch", "0"], "argument --batch: must be from 1 to 65,536, not 0"),
    ("study", ["--budget", "nan"], "argument --budget: 'nan' is not a finite number"),
    ("study", ["--budget", "0"], "argument --budget: must be more than 0, not 0.0"),
    ("study", ["--budget", "1e12", "--lr"], "argument --lr: expected at least one argument"),
    ("study", ["--budget", "1e12", "--lr", "small"], "argument --lr: 'small' is not MODEL=LR"),
    ("study", ["--budget", "1e12", "--lr", "small=inf"], "argument --lr: 'inf' is not a finite number"),
    ("study", ["--budget", "1e12", "--seeds", "0"], "argument --seeds: must be from 1 to 1,000, not 0"),
    ("study", ["--budget", "1e12", "--seq-len", "0"], "argument --seq-len: must be from 1 to 16,777,216, not 0"),
    ("study", ["--budget", "1e12", "--batch-size", "0"], "argument --batch-size: must be from 1 to 65,536, not 0"),
    ("study", ["--budget", "1e12", "--warmup", "1.5"], "argument --warmup: must be at least 0 and less than 1"),
])
def test_options_out_of_range_stop_the_parser_before_any_file_is_read(tmp_path, capsys, command, args, message):
    from mmbytes.cli import main

    common = {"sample": ["--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out")],
              "compress": ["--ckpt", str(tmp_path / "none.ckpt"), str(TEXT), "--out", str(tmp_path / "out")],
              "study": ["--data", str(tmp_path / "none"), "--models", "debug", "--out", str(tmp_path / "out")]}
    with pytest.raises(SystemExit) as stop:
        main([command, *common[command], *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- YAML configs: unknown keys, wrong types and alias bombs are one line


def alias_bomb(depth: int = 9) -> str:
    """A "billion laughs": 9^depth strings from a dozen lines."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + f"\nhidden: *l{depth - 1}\n"


@pytest.mark.parametrize(("edit", "line"), [
    (lambda t: t.replace("    size: debug\n", "    size: debug\n    sizee: 3\n"),
     "Parser key \"model\": Problem with given class_path 'mmbytes.lit.ByteLM': Option 'sizee' is not accepted"),
    (lambda t: t.replace("    seq_len: 1024\n", "    seq_len: lots\n"),
     "Parser key \"seq_len\": Expected a <class 'int'>. Got value: lots"),
    (lambda t: alias_bomb() + t, "its YAML aliases expand to more than 100,000 values (an alias bomb?)"),
    (lambda t: t + "trainer: [unclosed\n", "not a YAML config"),
])
def test_a_bad_yaml_config_is_one_line(tmp_path, capsys, monkeypatch, edit, line):
    import resource

    from mmbytes.cli import main

    config = tmp_path / "recipe.yaml"
    config.write_text(edit((ROOT / "recipes" / "quickstart.yaml").read_text()))
    monkeypatch.chdir(tmp_path)
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--trainer.max_steps", "1"], friendly=True)
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert stop.value.code == 1 and len(err) == 1 and line in err[0], err
    assert time.time() - started < 60 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # KiB
    assert not (tmp_path / "data").exists()  # nothing was built
