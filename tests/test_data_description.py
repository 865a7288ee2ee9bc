"""The data description (modalities, codec and decoding options) derived from the shards' manifests, and the
datamodule's check of existing shards against its recipe."""

import json
from pathlib import Path

import pytest

from datamodules import ByteDataModule, MixedDataModule
from mmbytes.data_description import describe, of_checkpoint, of_datamodule
from mmbytes.errors import OptionError
from mmbytes.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_the_description_of_auto_shards_names_each_modality_with_its_decoding_options(tmp_path):
    write_shards([SAMPLES], tmp_path / "s", codec="auto", codec_options={"image": {"tile": 4},
                                                                         "audio": {"sample_rate": 8000}},
                 progress=False)
    d = describe([{"data_dir": str(tmp_path / "s")}])
    assert set(d["modalities"]) == {"text", "image", "audio", "raw"}
    # the image size was left open: it is the first image's own (48x48 icons or 32x32 CIFAR pictures)
    image = d["modalities"]["image"]
    assert (image["channels"], image["order"], image["tile"]) == (3, "patch", 4) and image["height"] in (32, 48)
    assert d["modalities"]["audio"] == {"codec": "audio", "sample_rate": 8000, "sample_width": 2}


def test_a_mixed_datamodule_is_described_by_its_sets(tmp_path):
    sets = [{"data_dir": str(tmp_path / "a"), "sources": [str(SAMPLES / "audio")], "codec": "audio",
             "codec_options": {"sample_rate": 8000}},
            {"data_dir": str(tmp_path / "t"), "sources": [str(SAMPLES / "text")], "codec": "text"}]
    dm = MixedDataModule(sets=sets, seq_len=64, batch_size=2)
    before = of_datamodule(dm)  # no shards yet: from the recipe
    dm.prepare_data()
    after = of_datamodule(dm)  # from the manifests
    for d in (before, after):
        assert d["modalities"] == {"audio": {"codec": "audio", "sample_rate": 8000, "sample_width": 2},
                                   "text": {"codec": "text"}}
    assert of_checkpoint({"datamodule_hyper_parameters": dict(dm.hparams)}) == after
    assert of_checkpoint({"data_description": before, "datamodule_hyper_parameters": {}}) == before


def test_unchanged_shards_are_kept(tmp_path):
    args = {"data_dir": str(tmp_path / "s"), "sources": [str(SAMPLES / "text")], "codec": "text"}
    ByteDataModule(**args).prepare_data()
    first = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    ByteDataModule(**args).prepare_data()
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == first


def test_shards_the_datamodule_built_are_rebuilt_when_the_recipe_changes(tmp_path):
    args = {"data_dir": str(tmp_path / "s"), "sources": [str(SAMPLES / "audio")], "codec": "audio",
            "codec_options": {"sample_rate": 8000}}
    ByteDataModule(**args).prepare_data()
    assert manifest(tmp_path / "s")["codec_options"] == {"sample_rate": 8000}
    ByteDataModule(**{**args, "codec_options": {"sample_rate": 16000}}).prepare_data()
    assert manifest(tmp_path / "s")["codec_options"] == {"sample_rate": 16000}
    assert of_datamodule(ByteDataModule(**args))["modalities"]["audio"]["sample_rate"] == 16000  # what the shards hold
    ByteDataModule(**{**args, "codec_options": {"sample_rate": 16000}, "val_fraction": 0.5}).prepare_data()
    assert manifest(tmp_path / "s")["val_fraction"] == 0.5


@pytest.mark.parametrize("change, field", [({"val_fraction": 0.3}, "val_fraction"), ({"codec": "raw"}, "codec"),
                                           ({"sources": [str(SAMPLES / "files")]}, "sources")])
def test_shards_built_elsewhere_are_refused_naming_the_field_that_differs(tmp_path, change, field):
    write_shards([str(SAMPLES / "text")], tmp_path / "s", codec="text", progress=False)
    args = {"data_dir": str(tmp_path / "s"), "sources": [str(SAMPLES / "text")], "codec": "text"}
    ByteDataModule(**args).prepare_data()  # the same recipe: used as they are
    with pytest.raises(OptionError, match=rf"manifest.json: shards built with {field} .*the recipe asks for"):
        ByteDataModule(**{**args, **change}).prepare_data()
    assert "built_by" not in manifest(tmp_path / "s")  # nothing rewritten


def test_codec_options_that_mean_the_same_keep_the_shards(tmp_path):
    """``{sample_rate: 8000}`` and ``{sample_rate: 8000, convert: true}`` (the default) build the same shards."""
    write_shards([str(SAMPLES / "audio")], tmp_path / "s", codec="audio", codec_options={"sample_rate": 8000},
                 progress=False)
    first = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    ByteDataModule(data_dir=str(tmp_path / "s"), sources=[str(SAMPLES / "audio")], codec="audio",
                   codec_options={"sample_rate": 8000, "convert": True}).prepare_data()
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == first
    with pytest.raises(OptionError, match="shards built with codec_options"):
        ByteDataModule(data_dir=str(tmp_path / "s"), sources=[str(SAMPLES / "audio")], codec="audio",
                       codec_options={"sample_rate": 16000}).prepare_data()
