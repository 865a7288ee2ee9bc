"""The datamodule: batch format, exact validation coverage under workers and ranks, damaged shards."""

import json
from pathlib import Path

import pytest
import torch

from datamodules import ByteDataModule
from datamodules import bytes as dm_bytes
from mmbytes.codecs import MODALITIES

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "samples"
    dm = ByteDataModule(data_dir=str(out), sources=[str(SAMPLES)], codec="auto",
                        codec_options={"audio": {"sample_rate": 8000}})
    dm.prepare_data()
    return out


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches(shard_dir, workers):
    dm = ByteDataModule(data_dir=str(shard_dir), seq_len=256, batch_size=4, num_workers=workers,
                        train_batches_per_epoch=6)
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    for b in batches:
        assert b["x"].shape == (4, 256) and b["x"].dtype == torch.uint8
        assert b["mask"].dtype == torch.bool and b["modality"].shape == (4,)
        assert (b["x"][~b["mask"]] == 0).all()
    assert all(0 <= i < len(MODALITIES) for b in batches for i in b["modality"].tolist())
    again = list(ByteDataModule(data_dir=str(shard_dir), seq_len=256, batch_size=4, num_workers=workers,
                                train_batches_per_epoch=6).train_dataloader())
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, again, strict=True))  # same seed, same data


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_scores_every_byte_once(shard_dir, workers):
    dm = ByteDataModule(data_dir=str(shard_dir), seq_len=300, batch_size=3, num_workers=workers)
    batches = list(dm.val_dataloader())
    assert sum(b["mask"].sum().item() for b in batches) == manifest(shard_dir)["splits"]["val"]["bytes"]
    by_modality = {}
    for b in batches:
        for i, m in enumerate(b["modality"].tolist()):
            by_modality[MODALITIES[m]] = by_modality.get(MODALITIES[m], 0) + b["mask"][i].sum().item()
    expect = {m: s["bytes"] for m, s in manifest_val_by_modality(shard_dir).items()}
    assert by_modality == expect


def manifest_val_by_modality(d: Path) -> dict:
    import webdataset as wds

    out = {}
    names = manifest(d)["splits"]["val"]["shards"]
    for s in wds.WebDataset([str(d / n) for n in names], shardshuffle=False):
        m = json.loads(s["json"])["modality"]
        out.setdefault(m, {"bytes": 0})["bytes"] += len(s["bin"])
    return out


def test_validation_is_deterministic_and_split_exactly_across_ranks(shard_dir, monkeypatch):
    def windows(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        dm = ByteDataModule(data_dir=str(shard_dir), seq_len=128, batch_size=2)
        return [(bytes(x[m].tolist())) for b in dm.val_dataloader() for x, m in zip(b["x"], b["mask"], strict=True)]

    single = windows()
    assert single == windows()
    rank0, rank1 = windows(RANK=0, WORLD_SIZE=2), windows(RANK=1, WORLD_SIZE=2)
    assert rank0 and rank1 and sorted(w for w in rank0 + rank1 if w) == sorted(single)  # less the padding windows


def test_audio_training_windows_start_on_whole_samples(tmp_path):
    dm = ByteDataModule(data_dir=str(tmp_path / "a"), sources=[str(SAMPLES / "audio")], codec="audio",
                        codec_options={"sample_rate": 8000}, seq_len=101 * 2, batch_size=1, train_batches_per_epoch=40,
                        val_fraction=0.0)
    dm.prepare_data()
    import webdataset as wds

    clips = [s["bin"] for s in wds.WebDataset(str(tmp_path / "a" / "train-000000.tar"), shardshuffle=False)]
    for b in dm.train_dataloader():
        window = bytes(b["x"][0].tolist())
        assert any(clip.find(window) % 2 == 0 for clip in clips if window in clip)


def test_image_training_windows_start_on_whole_tiles_and_whole_patches(tmp_path):
    # 2x2 RGB tiles (12 bytes) and P = 48: windows start on multiples of 48, where tiles and patches both begin
    dm = ByteDataModule(data_dir=str(tmp_path / "i"), sources=[str(SAMPLES / "images")], codec="image",
                        codec_options={"size": 32, "order": "patch", "tile": 2}, seq_len=480, batch_size=1,
                        train_batches_per_epoch=40, val_fraction=0.0, patch_size=48)
    dm.prepare_data()
    import webdataset as wds

    images = [s["bin"] for s in wds.WebDataset(str(tmp_path / "i" / "train-000000.tar"), shardshuffle=False)]
    assert all(len(im) == 3072 for im in images)  # longer than a window: every window is a crop
    for b in dm.train_dataloader():
        window = bytes(b["x"][0].tolist())
        starts = [i for im in images for i in range(0, len(im) - 479) if im[i : i + 480] == window]
        assert starts and any(i % 48 == 0 for i in starts)


def test_one_long_file_does_not_dominate_consecutive_training_windows():
    """A long file's windows are spread over the stream: in every run of 1,000 consecutive windows after the shuffle
    buffer, the 1.1 MB Shakespeare text (1,089 windows) makes at most a fifth, among 21 small real files."""
    import numpy as np

    shipped = Path(__file__).resolve().parents[1]  # real files shipped with the repository
    long = np.frombuffer((shipped / "samples" / "text" / "tinyshakespeare.txt").read_bytes(), dtype=np.uint8)
    others = [np.frombuffer(p.read_bytes(), dtype=np.uint8) for p in sorted((shipped / "tests" / "data" / "files")
                                                                              .iterdir())]
    from itertools import chain, cycle, islice

    # as in training, the stream of samples is endless: the long file, then the others over and over
    src = chain([(long, {"modality": "text"})], cycle([(o, {"modality": "raw"}) for o in others]))
    windows = list(islice(dm_bytes.shuffled(dm_bytes.random_windows(src, 1024, seed=0), 1000, seed=0), 24000))
    from_long = [np.shares_memory(w, long) for w, _ in windows]
    assert sum(from_long) == len(long) // 1024  # every window of the long file is still drawn, once per visit
    shares = [sum(from_long[i : i + 1000]) / 1000 for i in range(0, len(windows) - 999, 1000)]
    assert max(shares) <= 0.2, shares


def test_a_damaged_shard_is_skipped_counted_and_training_goes_on(shard_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    shard = broken / manifest(broken)["splits"]["train"]["shards"][0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of a member
    before = dm_bytes.skipped["errors"]
    dm = ByteDataModule(data_dir=str(broken), seq_len=65536, batch_size=4, train_batches_per_epoch=20)
    assert len(list(dm.train_dataloader())) == 20
    assert dm_bytes.skipped["errors"] > before


def test_missing_shards_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmbytes shards"):
        ByteDataModule(data_dir=str(tmp_path / "nothing")).train_dataloader()


def mixed_sets(tmp: Path) -> list[dict]:
    return [
        {"data_dir": str(tmp / "img"), "sources": [str(SAMPLES / "images")], "codec": "image",
         "codec_options": {"size": 16, "tile": 4}, "val_fraction": 0.3},
        {"data_dir": str(tmp / "aud"), "sources": [str(SAMPLES / "audio")], "codec": "audio",
         "codec_options": {"sample_rate": 8000}, "val_fraction": 0.75},  # one of the 5 clips hashes below 0.75
        {"data_dir": str(tmp / "txt"), "sources": [str(SAMPLES / "text")], "codec": "text"},
    ]


@pytest.mark.parametrize("mix", ["sample", "batch"])
def test_mixed_datamodule_mixes_by_weight(tmp_path, mix):
    from datamodules import MixedDataModule

    # mix=batch draws one set per batch: 120 draws keep the 3:1 share inside the bounds below
    dm = MixedDataModule(mixed_sets(tmp_path), weights=[3, 1, 0], mix=mix, seq_len=768, batch_size=8,
                         train_batches_per_epoch=40 if mix == "sample" else 120)
    dm.prepare_data()
    counts = {m: 0 for m in MODALITIES}
    for b in dm.train_dataloader():
        mods = {MODALITIES[i] for i in b["modality"].tolist()}
        if mix == "batch":
            assert len(mods) == 1  # one set per batch
        for i in b["modality"].tolist():
            counts[MODALITIES[i]] += 1
    assert counts["text"] == 0  # weight 0
    assert 2 < counts["image"] / counts["audio"] < 4.5  # weights 3:1
    if mix == "sample":
        assert any(len(set(b["modality"].tolist())) > 1 for b in dm.train_dataloader())


def test_mixed_validation_covers_every_set_exactly(tmp_path):
    from datamodules import MixedDataModule

    dm = MixedDataModule(mixed_sets(tmp_path), seq_len=512, batch_size=4)
    dm.prepare_data()
    seen = {}
    for b in dm.val_dataloader():
        for i, m in enumerate(b["modality"].tolist()):
            seen[MODALITIES[m]] = seen.get(MODALITIES[m], 0) + b["mask"][i].sum().item()
    expect = {s["codec"]: manifest(Path(s["data_dir"]))["splits"]["val"]["bytes"] for s in mixed_sets(tmp_path)}
    assert seen == {"image": expect["image"], "audio": expect["audio"], "text": expect["text"]}


@pytest.mark.parametrize("pattern", ["data/train-{000000..000011}.tar", "s-{a,b,c}-{0..3}.tar", "plain.tar",
                                     "x-{7..9}.tar::y-{00..02}.tar"])
def test_brace_patterns_name_the_shards_webdataset_names_and_are_counted_before_expansion(pattern):
    from webdataset.shardlists import expand_urls

    from datamodules.reader import count_names, expand_names

    parts = pattern.split("::")
    assert [n for p in parts for n in expand_names(p)] == expand_urls(pattern)
    assert sum(count_names(p) for p in parts) == len(expand_urls(pattern))
