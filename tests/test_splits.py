"""Train/validation splits on real files: by content, contiguous for a corpus, official splits kept, never leaking;
and an output folder whose files are replaced only when a manifest proves mmbytes wrote them."""

import gzip
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from mmbytes.errors import ShardsError
from mmbytes.shards import main, write_shards

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
DATA = ROOT / "tests" / "data"  # real files shipped for the tests (tests/data/MANIFEST.md)
SHAKESPEARE = SAMPLES / "text" / "tinyshakespeare.txt"
MNIST = DATA / "images" / "mnist" / "t10k-images-idx3-ubyte-first1000.gz"
ICONS = DATA / "images" / "icons_palette"  # palette PNGs with transparency in bytes, and one without


def samples(out: Path, split: str) -> list[tuple[str, bytes, dict]]:
    """(key, bytes, metadata) of every sample of a split, in shard order."""
    names = json.loads((out / "manifest.json").read_text())["splits"][split]["shards"]
    ds = wds.WebDataset([str(out / n) for n in names], shardshuffle=False) if names else []
    return [(s["__key__"], s["bin"], json.loads(s["json"])) for s in ds]


def joined(out: Path, split: str) -> bytes:
    return b"".join(d for _, d, _ in sorted(samples(out, split), key=lambda s: s[2]["chunk"]))


def split_of_content(out: Path) -> dict[str, str]:
    """Each file's content hash -> the split its samples are in (a file in both splits fails the test)."""
    seen: dict[str, str] = {}
    for split in ("train", "val"):
        for _, _, meta in samples(out, split):
            assert seen.setdefault(meta["content"], split) == split, f"{meta['source']} is in both splits"
    return seen


# ---- one corpus: its tail is validation


def test_a_single_text_is_split_contiguously_its_tail_is_validation(tmp_path):
    data = SHAKESPEARE.read_bytes()
    m = write_shards([SHAKESPEARE], tmp_path / "s", codec="text", val_fraction=0.1, progress=False)
    train, val = joined(tmp_path / "s", "train"), joined(tmp_path / "s", "val")
    assert train + val == data  # the head is training, the tail validation: nothing shared, nothing interleaved
    assert abs(len(val) - 0.1 * len(data)) < 200 and train.endswith(b"\n")  # the tail starts a line
    assert m["modalities"]["text"]["val_samples"] == 2 and m["no_val"] == []
    assert m["modalities"]["text"]["split"].startswith("contiguous")
    chunks = [meta["chunk"] for _, _, meta in samples(tmp_path / "s", "train")]
    assert max(chunks) < min(meta["chunk"] for _, _, meta in samples(tmp_path / "s", "val"))


def test_a_single_file_asked_to_be_all_validation_goes_there_whole(tmp_path):
    m = write_shards([SHAKESPEARE], tmp_path / "s", codec="text", val_fraction={"text": 1.0, "default": 0.1},
                     progress=False)
    assert m["splits"]["train"]["samples"] == 0 and joined(tmp_path / "s", "val") == SHAKESPEARE.read_bytes()


def test_one_text_file_gives_a_validation_split_the_datamodule_reads(tmp_path, capsys):
    from datamodules import ByteDataModule

    main([str(SHAKESPEARE), "--out", str(tmp_path / "x"), "--codec", "text", "--workers", "0"])
    assert "no validation sample" not in capsys.readouterr().err
    assert joined(tmp_path / "x", "val") == SHAKESPEARE.read_bytes()[-len(joined(tmp_path / "x", "val")):]
    dm = ByteDataModule(data_dir=str(tmp_path / "x"), seq_len=256, batch_size=4, shuffle_buffer=4,
                        train_batches_per_epoch=1)
    read = b"".join(bytes(b["x"][b["mask"]].numpy()) for b in dm.val_dataloader())
    assert len(read) > 100_000 and read == joined(tmp_path / "x", "val")  # the tail, every byte of it, in order


def test_contiguous_split_holds_out_the_tail_of_a_long_file_among_short_ones(tmp_path):
    """--split contiguous: the corpus's tail is validation; each short file (one sample) goes whole by its hash."""
    m = write_shards([SAMPLES / "text", SAMPLES / "files"], tmp_path / "c", codec="text", split="contiguous",
                     progress=False)
    shakespeare = [s for split in ("train", "val") for s in samples(tmp_path / "c", split)
                   if s[2]["source"] == "text/tinyshakespeare.txt"]
    tail = [s for s in samples(tmp_path / "c", "val") if s[2]["source"] == "text/tinyshakespeare.txt"]
    head = [s for s in samples(tmp_path / "c", "train") if s[2]["source"] == "text/tinyshakespeare.txt"]
    val = b"".join(d for _, d, _ in sorted(tail, key=lambda s: s[2]["chunk"]))
    assert tail and head and len(shakespeare) == len(tail) + len(head)
    assert b"".join(d for _, d, _ in sorted(head, key=lambda s: s[2]["chunk"])) + val == SHAKESPEARE.read_bytes()
    assert m["split"] == "contiguous"


# ---- whole files by content


def test_a_duplicated_file_under_another_name_is_kept_once_in_one_split(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / "files", src)
    shutil.copy(src / "libpython3.11-stdlib_python3.11_this.py", src / "zen_copy.py")
    m = write_shards([src], tmp_path / "s", codec="raw", val_fraction=0.5, progress=False)
    placed = split_of_content(tmp_path / "s")
    this = hashlib.sha1((src / "zen_copy.py").read_bytes()).hexdigest()
    sources = [meta["source"] for split in ("train", "val") for _, _, meta in samples(tmp_path / "s", split)
               if meta["content"] == this]
    assert sources == ["src/libpython3.11-stdlib_python3.11_this.py"] and this in placed
    assert m["files"] == 4 and m["duplicates"] == {
        "files": 1, "bytes": (src / "zen_copy.py").stat().st_size,
        "list": [{"path": str(src / "zen_copy.py"), "same_as": str(src / "libpython3.11-stdlib_python3.11_this.py")}]}


def test_renaming_and_reordering_sources_moves_no_file(tmp_path):
    a, b = tmp_path / "images", tmp_path / "renamed_pictures"
    shutil.copytree(SAMPLES / "images", a)
    shutil.copytree(SAMPLES / "images", b)
    for p in sorted(b.iterdir())[:3]:
        p.rename(p.with_name("x_" + p.name))
    write_shards([a, SAMPLES / "files"], tmp_path / "one", codec="raw", val_fraction=0.3, progress=False)
    write_shards([SAMPLES / "files", b], tmp_path / "two", codec="raw", val_fraction=0.3, progress=False)
    assert split_of_content(tmp_path / "one") == split_of_content(tmp_path / "two")
    keys = [{k for split in ("train", "val") for k, _, _ in samples(tmp_path / out, split)} for out in ("one", "two")]
    assert keys[0] == keys[1]


def test_one_folder_reached_three_ways_is_one_file(tmp_path):
    src = tmp_path / "folder"
    shutil.copytree(SAMPLES / "text", src)
    os.chdir(tmp_path)
    m = write_shards(["folder", "folder/", "folder/."], tmp_path / "s", codec="text", chunk_bytes=20_000,
                     progress=False)
    got = samples(tmp_path / "s", "train") + samples(tmp_path / "s", "val")
    assert len(got) == len({k for k, _, _ in got}) == m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"]
    assert joined(tmp_path / "s", "train") + joined(tmp_path / "s", "val") == SHAKESPEARE.read_bytes()  # once
    assert m["files"] == 1 and m["duplicates"]["files"] == 2


def test_two_sources_with_the_same_folder_name_give_distinct_keys(tmp_path):
    for parent, folder in (("a", SAMPLES / "files"), ("b", SAMPLES / "images")):
        shutil.copytree(folder, tmp_path / parent / "data")
    shutil.copy(SAMPLES / "text" / "tinyshakespeare.txt", tmp_path / "b" / "data" / "input.txt")
    shutil.copy(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_antigravity.py", tmp_path / "b" / "data" /
                "input.py")  # also in a/data under another name: kept once
    m = write_shards([tmp_path / "a" / "data", tmp_path / "b" / "data"], tmp_path / "s", codec="raw",
                     progress=False)
    keys = [k for split in ("train", "val") for k, _, _ in samples(tmp_path / "s", split)]
    assert len(keys) == len(set(keys)) == m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"]
    assert m["files"] == 4 + 8 + 1 and m["duplicates"]["files"] == 1


# ---- every modality of two samples or more has validation; one that cannot be split is named


def test_every_modality_of_several_samples_has_a_validation_sample(tmp_path):
    m = write_shards([SAMPLES / "audio", SAMPLES / "images", SAMPLES / "files"], tmp_path / "s", codec="auto",
                     codec_options={"audio": {"sample_rate": 8000}}, val_fraction=0.01, progress=False)
    for modality, stats in m["modalities"].items():
        assert stats["samples"] >= 2 and stats["val_samples"] >= 1, modality
    assert m["no_val"] == []


def test_a_modality_of_one_short_file_is_named_with_the_reason(tmp_path, capsys):
    main([str(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py"), str(SAMPLES / "images"),
          "--out", str(tmp_path / "s"), "--codec", "auto", "--workers", "0"])
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["no_val"] == ["text"] and m["modalities"]["text"]["train_samples"] == 1
    assert ("no validation sample of text: its only file libpython3.11-stdlib_python3.11_this.py is a single sample "
            "(under the 65,536-byte chunk); add files of it, or give a validation source with --val\n") in err
    assert m["modalities"]["image"]["val_samples"] >= 1


def test_split_files_keeps_a_single_file_whole_and_says_why_there_is_no_validation(tmp_path):
    m = write_shards([SHAKESPEARE], tmp_path / "s", codec="text", split="files", progress=False)
    assert m["splits"]["val"]["samples"] == 0 and m["no_val"] == ["text"]
    assert m["no_val_reasons"]["text"] == ("its only file tinyshakespeare.txt stays whole under --split files; use "
                                           "--split auto to hold out its tail, or give a validation source with --val")


# ---- official splits


def idx_pair(folder: Path, train: int, total: int = 1000) -> tuple[Path, Path]:
    """The first ``total`` digits of the real MNIST t10k IDX file cut into two real IDX files: the first ``train`` as
    ``train-...``, the rest as ``t10k-...`` (the official names)."""
    raw = gzip.decompress(MNIST.read_bytes())
    _, h, w = struct.unpack(">III", raw[4:16])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, first, last in (("train", 0, train), ("t10k", train, total)):
        body = raw[16 + first * h * w: 16 + last * h * w]
        path = folder / f"{name}-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(raw[:4] + struct.pack(">III", last - first, h, w) + body, mtime=0))
        paths.append(path)
    return paths[0], paths[1]


@pytest.mark.parametrize("how", ["pair_by_name", "val_option"])
def test_an_official_train_test_pair_keeps_its_split(tmp_path, how):
    train, test = idx_pair(tmp_path / "mnist", 900)
    if how == "pair_by_name":
        m = write_shards([tmp_path / "mnist"], tmp_path / "s", codec="idx", progress=False)
        assert m["official_split"] == [{"train": str(train), "val": str(test)}]
    else:
        m = write_shards([train], tmp_path / "s", codec="idx", val_sources=[test], progress=False)
    assert m["splits"]["train"]["samples"] == 900 and m["splits"]["val"]["samples"] == 100
    digits = gzip.decompress(test.read_bytes())[16:]
    val = sorted(samples(tmp_path / "s", "val"), key=lambda s: s[2]["index"])
    assert [meta["index"] for _, _, meta in val] == list(range(100))
    assert {meta["source"] for _, _, meta in val} == {"mnist/" * (how == "pair_by_name") + test.name}
    import numpy as np

    from mmbytes.codecs.image import to_order

    first = np.frombuffer(digits[:784], np.uint8).reshape(28, 28, 1)
    assert val[0][1] == to_order(first, "patch", 4).tobytes()


def test_the_mnist_recipe_uses_the_official_split_when_both_files_are_there(tmp_path):
    from datamodules import ByteDataModule

    data = yaml.safe_load((ROOT / "recipes" / "mnist.yaml").read_text())["data"]["init_args"]
    names = [Path(s).name for s in data["sources"]]
    assert names == ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]
    args = {k: v for k, v in data.items() if k not in ("sources", "data_dir", "num_workers")}

    def built(folder: Path, out: Path) -> dict:
        dm = ByteDataModule(**args, sources=[str(folder / n) for n in names], data_dir=str(out), num_workers=0)
        dm.prepare_data()
        return json.loads((out / "manifest.json").read_text())

    idx_pair(tmp_path / "both", 900)
    m = built(tmp_path / "both", tmp_path / "official")
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (900, 100)
    assert m["modalities"]["image"]["split"].startswith("given")
    _, test = idx_pair(tmp_path / "only_test", 0)  # as in ../shared: test digits alone, split by their tail
    (tmp_path / "only_test" / names[0]).unlink()
    m = built(tmp_path / "only_test", tmp_path / "tail")
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (900, 100)
    assert m["skipped"][0]["path"].endswith(names[0]) and m["modalities"]["image"]["split"].startswith("contiguous")
    assert sorted(meta["index"] for _, _, meta in samples(tmp_path / "tail", "val")) == list(range(900, 1000))


# ---- the output folder: nothing that mmbytes cannot prove it wrote is removed or overwritten


def test_a_users_own_shard_beside_a_hand_written_manifest_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    write_shards([SAMPLES / "files"], tmp_path / "theirs", codec="raw", progress=False)
    out.mkdir()
    shutil.copy(tmp_path / "theirs" / "train-000000.tar", out / "train-000000.tar")  # a real shard, the user's now
    (out / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": ["train-000000.tar"]}}}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ShardsError) as e:
        main([str(SAMPLES / "text"), "--out", str(out), "--codec", "text", "--workers", "0"])
    assert "\n" not in str(e.value) and "manifest.json, train-000000.tar" in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_manifest_marked_as_ours_whose_checksum_does_not_match_replaces_nothing(tmp_path):
    out = tmp_path / "out"
    m = write_shards([SAMPLES / "text"], out, codec="text", progress=False)
    shard = m["splits"]["train"]["shards"][0]
    shutil.copy(SAMPLES / "files" / "pypdf_008-reportlab-inline-image_inline-image.pdf", out / shard)  # replaced
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ShardsError, match=rf"holds 1 file\(s\) mmbytes shards did not write \({shard}\)"):
        write_shards([SAMPLES / "files"], out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_manifest_records_writer_and_checksums_of_its_shards(tmp_path):
    m = write_shards([SAMPLES / "text"], tmp_path / "s", codec="text", max_shard_bytes=300_000, progress=False)
    names = [n for s in m["splits"].values() for n in s["shards"]]
    assert m["writer"] == "mmbytes shards" and sorted(m["shard_files"]) == sorted(names)
    for n in names:
        data = (tmp_path / "s" / n).read_bytes()
        assert m["shard_files"][n] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(os.listdir(tmp_path / "s")) == sorted([*names, "manifest.json"])  # the journal is gone


# ---- decoder warnings: counted, not printed


@pytest.mark.parametrize("workers", [0, 2])
def test_pillow_warnings_are_counted_in_the_manifest_not_printed(tmp_path, capfd, workers):
    src = tmp_path / "icons"
    src.mkdir()
    palettes = ["actions_zoom-in.png", "actions_zoom-out.png", "status_mail-read.png"]  # transparency in bytes
    for name in [*palettes, "actions_view-refresh.png"]:
        shutil.copy(ICONS / name, src / name)
    main([str(src), "--out", str(tmp_path / "s"), "--codec", "image", "--image-size", "32", "--workers",
          str(workers)])
    out, err = capfd.readouterr()
    assert "Palette images" not in out + err and "Warning" not in out + err
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["warnings"]["count"] == 3 and sorted(Path(f["path"]).name for f in m["warnings"]["files"]) == palettes
    assert all(f["warnings"][0].startswith("UserWarning: Palette images with Transparency expressed in bytes")
               for f in m["warnings"]["files"])


def test_a_modalitys_only_file_is_written_in_its_shuffled_place_not_after_every_other_file(tmp_path):
    """A corpus beside many images: its training chunks are not the end of the training shard (training reads shards
    in order, so a corpus written last is out of reach of a run shorter than an epoch), and its tail is validation."""
    import tarfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "tests" / "data" / "images" / "icons_gnome48", src / "image")
    shutil.copytree(ROOT / "tests" / "data" / "images" / "photos", src / "photos")
    (src / "text").mkdir()
    shutil.copy(ROOT / "samples" / "text" / "tinyshakespeare.txt", src / "text")
    m = write_shards([src], tmp_path / "out", codec="auto", progress=False)
    assert m["modalities"]["text"]["split"].startswith("contiguous")
    order = []
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                order.append(json.load(tar.extractfile(member))["modality"])
    last_text = max(i for i, mod in enumerate(order) if mod == "text")
    assert last_text < len(order) - 1, "every training sample of the corpus came after every other file's"
