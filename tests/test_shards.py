"""Shards: real files in, the same bytes out; skipped files listed; atomic writes; deterministic split."""

import json
import os
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from mmbytes.codecs import get_codec
from mmbytes.shards import main, write_shards

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SHARED = Path(__file__).resolve().parent / "data"  # real files shipped for the tests (tests/data/MANIFEST.md)


def read_back(out: Path, split: str) -> dict[str, tuple[bytes, dict]]:
    names = json.loads((out / "manifest.json").read_text())["splits"][split]["shards"]
    if not names:
        return {}
    ds = wds.WebDataset([str(out / n) for n in names], shardshuffle=False)
    return {s["__key__"]: (s["bin"], json.loads(s["json"])) for s in ds}


def test_round_trip_exact_bytes(tmp_path):
    m = write_shards([SAMPLES / "files", SAMPLES / "images"], tmp_path / "s", codec="raw", progress=False)
    got = {**read_back(tmp_path / "s", "train"), **read_back(tmp_path / "s", "val")}
    assert len(got) == m["files"] == 12 and m["skipped"] == []
    for data, meta in got.values():
        src = SAMPLES / meta["source"]
        assert data == src.read_bytes() and meta["nbytes"] == len(data) and meta["modality"] == "raw"
    assert m["splits"]["val"]["samples"] >= 1 and m["splits"]["train"]["samples"] >= 1


def test_split_is_deterministic(tmp_path):
    a = write_shards([SAMPLES / "files"], tmp_path / "a", codec="raw", val_fraction=0.3, progress=False)
    b = write_shards([SAMPLES / "files"], tmp_path / "b", codec="raw", val_fraction=0.3, progress=False)
    assert read_back(tmp_path / "a", "val").keys() == read_back(tmp_path / "b", "val").keys()
    assert a["splits"] == b["splits"]


def splits_by_source(out: Path) -> dict[str, str]:
    return {meta["source"]: split for split in ("train", "val") for _, meta in read_back(out, split).values()}


def test_adding_files_moves_no_file_but_the_one_held_out_while_none_hashes_into_validation(tmp_path):
    import hashlib

    from mmbytes.shards import split_hash

    def h(p: Path) -> float:  # the split hash of a file: of its content, not its name
        return split_hash(hashlib.sha1(p.read_bytes()).hexdigest())

    # real files, added so that each new one hashes lowest so far: the file held out for validation (the lowest hash,
    # while no file hashes under the fraction) is the only one that may move, and it moves to training
    pool = sorted(sorted(p for p in (SHARED / "files").iterdir() if p.suffix == ".py")[:20], key=h, reverse=True)
    folder = tmp_path / "d"
    folder.mkdir()
    before: dict[str, str] = {}
    for i, src in enumerate(pool):  # add the real files one at a time, rewriting the shards after each
        shutil.copy(src, folder / src.name)
        if i < 4:
            continue
        write_shards([folder], tmp_path / "s", codec="raw", val_fraction=0.05, progress=False)
        now = splits_by_source(tmp_path / "s")
        hashes = {f"d/{p.name}": h(p) for p in pool[: i + 1]}
        lowest = min(hashes, key=hashes.get)
        hashed_val = {k for k, v in hashes.items() if v < 0.05}
        assert now == {k: "val" if k in hashed_val or (not hashed_val and k == lowest) else "train" for k in hashes}
        moved = [k for k in before if now[k] != before[k]]
        assert len(moved) <= 1 and all(before[k] == "val" and now[k] == "train" for k in moved)
        before = now


def test_validation_fraction_per_modality_and_modalities_without_validation_are_named(tmp_path):
    sources = [SAMPLES / "audio", SAMPLES / "files"]
    m = write_shards(sources, tmp_path / "a", codec="auto", val_fraction={"audio": 1.0, "default": 0.0},
                     codec_options={"audio": {"sample_rate": 8000}}, progress=False)
    split = {meta["modality"]: s for s in ("train", "val") for _, meta in read_back(tmp_path / "a", s).values()}
    assert m["modalities"]["audio"]["val_samples"] == 5 and split["audio"] == "val"
    assert not m["modalities"]["raw"].get("val_samples") and m["no_val"] == []  # a fraction of 0 asks for none
    m = write_shards(sources, tmp_path / "b", codec="auto", val_fraction={"raw": 0.0, "default": 0.001},
                     codec_options={"audio": {"sample_rate": 8000}}, progress=False)
    # no file hashes under 0.001: one file of each modality of several files is held out, so none is left without
    assert m["no_val"] == [] and m["modalities"]["audio"]["val_samples"] == 1 and m["modalities"]["text"]["val_samples"]


def test_big_text_is_chunked_at_newlines_and_split(tmp_path):
    m = write_shards([SAMPLES / "text"], tmp_path / "t", codec="text", chunk_bytes=65536, progress=False)
    train, val = read_back(tmp_path / "t", "train"), read_back(tmp_path / "t", "val")
    assert len(val) >= 1 and len(train) >= 10
    chunks = sorted([*train.values(), *val.values()], key=lambda s: s[1]["chunk"])
    assert b"".join(d for d, _ in chunks) == (SAMPLES / "text" / "tinyshakespeare.txt").read_bytes()
    assert all(d.endswith(b"\n") for d, _ in chunks[:-1])
    assert m["modalities"]["text"]["bytes"] == (SAMPLES / "text" / "tinyshakespeare.txt").stat().st_size


def test_shards_are_size_capped(tmp_path):
    m = write_shards([SAMPLES / "text"], tmp_path / "c", codec="text", max_shard_bytes=200_000, progress=False)
    assert len(m["splits"]["train"]["shards"]) >= 4
    assert all((tmp_path / "c" / n).stat().st_size < 400_000 for n in m["splits"]["train"]["shards"])


def broken_tree(root: Path) -> Path:
    """Good real files among broken ones."""
    src = root / "src"
    (src / "good").mkdir(parents=True)
    good = [*(SAMPLES / "images").glob("*"), *(SAMPLES / "audio").glob("*"), SAMPLES / "text" / "tinyshakespeare.txt"]
    for p in good:
        shutil.copy(p, src / "good" / p.name)
    icon = (SAMPLES / "images" / "icon_places_user-home.png").read_bytes()
    (src / "truncated.png").write_bytes(icon[: len(icon) // 2])
    jpeg = next((SAMPLES / "images").glob("*.jpg")).read_bytes()
    (src / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "empty.bin").touch()
    (src / "not_audio.wav").write_bytes(next((SAMPLES / "files").glob("*.pdf")).read_bytes())
    wav = next((SAMPLES / "audio").glob("fsdd_*.wav")).read_bytes()
    (src / "header_only.wav").write_bytes(wav[:44])
    (src / "dir_like_image.png").mkdir()
    with open(src / "sparse_2gb.bin", "wb") as f:  # a 2 GB file that takes no disk space
        f.truncate(2 * 2**30)
    return src


def test_broken_files_are_skipped_listed_and_the_good_ones_written(tmp_path):
    src = broken_tree(tmp_path)
    m = write_shards([src], tmp_path / "out", codec="auto", max_file_bytes=2**30, progress=False)
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    # the directory named like an image is walked, not read; the PDF named .wav is read by content, as raw bytes
    assert set(reasons) == {"truncated.png", "cut.jpg", "empty.bin", "header_only.wav", "sparse_2gb.bin"}
    assert "not a readable image" in reasons["truncated.png"] and "not a readable image" in reasons["cut.jpg"]
    assert reasons["empty.bin"] == "empty file"
    assert reasons["header_only.wav"] == "no audio frames"
    assert "larger than" in reasons["sparse_2gb.bin"]
    good = len(list((src / "good").iterdir()))
    assert m["files"] == good + 1
    assert m["codecs_chosen"] == {"image": 8, "audio": 5, "text": 1, "raw": 1}
    assert any(c["converted"] == ["16000 Hz -> 8000 Hz"] for c in m["converted"]) is False  # no rate asked for


def test_cli_reports_skipped_files(tmp_path, capsys):
    src = broken_tree(tmp_path)
    main([str(src), "--out", str(tmp_path / "cli"), "--codec", "auto", "--sample-rate", "8000", "--workers", "2",
          "--max-file-mb", "64"])
    err = capsys.readouterr().err
    assert "skipped 5" in err and "truncated.png" in err
    m = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert any(c["converted"] == ["16000 Hz -> 8000 Hz"] for c in m["converted"])
    assert m["modalities"]["audio"]["samples"] == 5


def test_interrupted_run_leaves_no_readable_half_shard(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_encode = get_codec("raw").encode.__func__

    def flaky(self, path):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_encode(self, path)

    monkeypatch.setattr(type(get_codec("raw")), "encode", flaky)
    out = tmp_path / "int"
    with pytest.raises(KeyboardInterrupt):
        write_shards([SAMPLES], out, codec="raw", progress=False)
    assert not (out / "manifest.json").exists()
    assert list(out.glob("*.tar")) == [] and list(out.glob(".*")) == []
    monkeypatch.undo()
    m = write_shards([SAMPLES], out, codec="raw", progress=False)  # a rerun completes
    assert m["files"] == len([p for p in SAMPLES.rglob("*") if p.is_file()])


def test_nothing_is_written_outside_out(tmp_path):
    src = tmp_path / "src"
    (src / "..evil").mkdir(parents=True)
    (src / "..evil" / "..%2f..%2fescape.txt").write_text("hello\n")
    before = set(os.listdir(tmp_path))
    write_shards([src], tmp_path / "out", codec="text", progress=False)
    assert set(os.listdir(tmp_path)) == before | {"out"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "train-000000.tar"]


def test_parallel_and_serial_encoding_agree(tmp_path):
    src = SHARED / "images" / "icons_gnome48"
    a = write_shards([src], tmp_path / "a", codec="image", workers=2, progress=False)
    b = write_shards([src], tmp_path / "b", codec="image", workers=0, progress=False)
    assert a["splits"] == b["splits"] and a["files"] + a["duplicates"]["files"] == len(list(src.iterdir()))
    assert read_back(tmp_path / "a", "train") == read_back(tmp_path / "b", "train")


def test_interrupted_rerun_leaves_no_stale_manifest_and_only_whole_shards_a_rerun_replaces(tmp_path, monkeypatch):
    out = tmp_path / "int"
    write_shards([SAMPLES / "text"], out, codec="text", max_shard_bytes=200_000, progress=False)
    real_encode = get_codec("text").encode.__func__
    calls = {"n": 0}

    def interrupted(self, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_encode(self, path)

    monkeypatch.setattr(type(get_codec("text")), "encode", interrupted)
    (tmp_path / "words").mkdir()  # a name after "text": files are read in name order
    shutil.copy(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py", tmp_path / "words" / "this.py")
    with pytest.raises(KeyboardInterrupt):  # the first file fills several shards before the second one fails
        write_shards([tmp_path / "words", SAMPLES / "text"], out, codec="text", max_shard_bytes=200_000,
                     val_fraction=0.0, progress=False, shuffle_seed=None)
    names = sorted(os.listdir(out))
    assert "manifest.json" not in names and not any(n.endswith(".partial") for n in names)  # no manifest, no partial
    shards = [n for n in names if n.endswith(".tar")]
    assert len(shards) >= 4 and names == sorted([*shards, ".mmbytes-shards.journal"])  # whole shards, recorded
    for n in shards:
        assert all(len(s["bin"]) == json.loads(s["json"])["nbytes"] for s in wds.WebDataset(str(out / n),
                                                                                            shardshuffle=False))
    monkeypatch.undo()
    m = write_shards([SAMPLES / "files"], out, codec="text", progress=False)  # the journal proves them ours
    assert sorted(os.listdir(out)) == sorted(["manifest.json", *m["shard_files"]])


def test_output_inside_a_source_and_folders_with_the_same_name(tmp_path):
    for d in ("a/text", "b/text"):
        (tmp_path / d).mkdir(parents=True)
        shutil.copy(SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py", tmp_path / d / "this.py")
    out = tmp_path / "a" / "text" / "shards"
    write_shards([tmp_path / "a" / "text", tmp_path / "b" / "text"], out, codec="text", progress=False)
    m = write_shards([tmp_path / "a" / "text", tmp_path / "b" / "text"], out, codec="text", progress=False)
    assert m["files"] == 1 and m["skipped"] == []  # the first run's shards are not read as sources
    got = {**read_back(out, "train"), **read_back(out, "val")}
    assert [meta["source"] for _, meta in got.values()] == ["text/this.py"]  # the same content twice: kept once
    assert m["duplicates"]["list"] == [{"path": str(tmp_path / "b" / "text" / "this.py"),
                                        "same_as": str(tmp_path / "a" / "text" / "this.py")}]


def test_files_are_written_in_a_shuffled_order_so_training_does_not_read_one_folder_at_a_time(tmp_path):
    """Training reads shards in order and shuffles only in a buffer: folders written one after another would reach
    it one modality at a time. The split of each sample does not depend on the order."""
    sources = [SAMPLES / "audio", SAMPLES / "images", SAMPLES / "text"]

    def order(out: Path, **kw) -> list[str]:
        write_shards(sources, out, codec="auto", val_fraction=0.0, progress=False, **kw)
        return [meta["modality"] for _, meta in read_back(out, "train").values()]

    def switches(modalities: list[str]) -> int:
        return sum(a != b for a, b in zip(modalities, modalities[1:], strict=False))

    in_path_order = order(tmp_path / "sorted", shuffle_seed=None)
    shuffled = order(tmp_path / "shuffled")
    assert switches(in_path_order) == 2  # audio, then images, then text
    assert switches(shuffled) > 4 and sorted(shuffled) == sorted(in_path_order)
    assert order(tmp_path / "again") == shuffled  # the same seed, the same order
    assert set(read_back(tmp_path / "sorted", "train")) == set(read_back(tmp_path / "shuffled", "train"))
