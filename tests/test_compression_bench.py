"""bench/compression.py codes held-out files only: the validation samples the shards recorded, not a split rule of
its own."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from bench_script import load_bench
from PIL import Image

from mmbytes.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_bench("compression")


def sources_of(shards: Path, split: str) -> set[str]:
    """The ``source`` of every sample in a split's shards, read here with tarfile."""
    manifest = json.loads((shards / "manifest.json").read_text())
    out = set()
    for name in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / name) as tar:
            out |= {json.load(tar.extractfile(m))["source"] for m in tar.getmembers() if m.name.endswith(".json")}
    return out


@pytest.mark.parametrize("source, codec, options, label", [
    (ROOT / "tests" / "data" / "files", "raw", {}, "files"),
    (ROOT / "tests" / "data" / "images" / "icons_gnome48", "image", {"order": "patch", "tile": 4}, "image"),
    (ROOT / "samples" / "audio", "audio", {"sample_rate": 8000}, "audio"),
])
def test_the_files_compressed_are_the_validation_samples_of_the_shards_and_no_training_file(
        bench, tmp_path, source, codec, options, label):
    shards = tmp_path / "shards"
    write_shards([source], shards, codec=codec, codec_options=options, val_fraction=0.3, progress=False)
    val, train = sources_of(shards, "val"), sources_of(shards, "train")
    assert val and train  # both splits hold files, so picking from the wrong one would show
    got_label, files = bench.select(shards, per_modality=100, text_bytes=1 << 20, max_file=1 << 30)
    assert got_label == label
    names = {name.removesuffix(" as PPM") for name, _ in files}
    assert names == {f"{source.name}/{Path(s).name}" if codec == "image" else Path(s).name for s in val}
    for name, data in files:
        path = source / Path(name.removesuffix(" as PPM")).name
        if codec == "image":  # the pixels as binary PPM, the container every image codec starts from
            with Image.open(io.BytesIO(data)) as got, Image.open(path) as want:
                assert got.format == "PPM" and got.tobytes() == want.convert("RGB").tobytes()
        else:
            assert data == path.read_bytes()


def test_held_out_text_is_the_start_of_each_validation_chunk_cut_at_a_newline(bench, tmp_path):
    text = ROOT / "samples" / "text" / "tinyshakespeare.txt"
    shards = tmp_path / "shards"
    write_shards([text], shards, codec="text", chunk_bytes=16384, progress=False)
    data = text.read_bytes()
    label, files = bench.select(shards, per_modality=100, text_bytes=1000, max_file=1 << 30)
    assert label == "text" and files
    for name, piece in files:
        assert name.startswith("tinyshakespeare.txt#") and piece.endswith(b"\n") and 0 < len(piece) <= 1000
        assert piece in data
    # the pieces lie in the validation tail (split: auto keeps a single text file's last tenth), none in training
    assert all(data.index(piece) >= len(data) * 0.85 for _, piece in files)
