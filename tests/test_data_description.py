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


# ---- compress and compare read the description alone, and tell the model each file's modality

DATA = ROOT / "tests" / "data"


def blt_told_modalities(monkeypatch):
    """A BLT whose thresholds differ per modality, loaded by the commands through ``load_model``, recording the
    modalities each cached batch and each scored batch is told (None: the model was not told)."""
    import torch

    from mmbytes import checkpoint
    from mmbytes.codecs import MODALITIES
    from mmbytes.model.registry import build

    torch.manual_seed(0)
    model = build("blt-debug").eval()
    model.theta.fill_(9.0)
    model.theta[MODALITIES.index("image")] = -1.0  # a patch at every pixel byte, one per window elsewhere
    told = []
    new_cache = model.new_cache

    def recording(*args, modality=None, **kw):
        told.append(None if modality is None else {MODALITIES[int(i)] for i in modality})
        return new_cache(*args, modality=modality, **kw)

    def nll(x, mask=None, *, modality=None):
        told.append(None if modality is None else {MODALITIES[int(i)] for i in modality})
        return type(model).nll(model, x, mask, modality=modality)

    model.new_cache, model.nll = recording, nll
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **kw: (model, None))
    return model, told


def saved_checkpoint(path: Path, model, **extra) -> Path:
    import torch

    from mmbytes.model.registry import config_to_dict

    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mmbytes": {"config": config_to_dict(model.config)}, **extra}, path)
    return path


def real_files(folder: Path) -> dict[str, Path]:
    """A 16x16 crop of a shipped icon as a binary PPM (its pixels as they are), a shipped WAV, a shipped text file."""
    from PIL import Image

    folder.mkdir()
    with Image.open(DATA / "images" / "icons_gnome48" / "actions_address-book-new.png") as im:
        im.convert("RGB").crop((16, 16, 32, 32)).save(folder / "icon.ppm", format="PPM")
    (folder / "tone.wav").write_bytes((SAMPLES / "audio" / "sound_icons_cembalo-10.wav").read_bytes())
    (folder / "a.py").write_bytes((DATA / "files" / "libpython3.11-stdlib_python3.11_antigravity.py").read_bytes())
    return {"image": folder / "icon.ppm", "audio": folder / "tone.wav", "text": folder / "a.py"}


IMAGE_AUDIO_TEXT = {"version": 1, "modalities": {
    "image": {"codec": "image", "height": 16, "width": 16, "channels": 3, "order": "patch", "tile": 4},
    "audio": {"codec": "audio", "sample_rate": 16000, "sample_width": 2}, "text": {"codec": "text"}}, "sets": []}


def test_compress_codes_files_as_the_description_says_and_tells_the_model_each_files_modality(tmp_path, monkeypatch,
                                                                                               capsys):
    from mmbytes.cli import main
    from mmbytes.compress import unpack

    model, told = blt_told_modalities(monkeypatch)
    # the recipe the checkpoint records says raw: only the description counts
    ckpt = saved_checkpoint(tmp_path / "m.ckpt", model, data_description=IMAGE_AUDIO_TEXT,
                            datamodule_hyper_parameters={"codec": "raw", "seq_len": 256})
    files = real_files(tmp_path / "in")
    for modality, path in files.items():
        told.clear()
        main(["compress", "--ckpt", str(ckpt), str(path), "--out", str(tmp_path / "z"), "--quiet", "--chunk", "256"])
        header, _ = unpack((tmp_path / "z" / (path.name + ".mmbz")).read_bytes(), path)
        assert header.mode == modality
        assert told and all(t == {modality} for t in told)  # every batch of the file, told its modality
        if modality == "image":
            assert (header.image["order"], header.image["tile"]) == ("patch", 4)
    assert "data description" not in capsys.readouterr().err


def test_compress_codes_a_modality_the_description_lacks_as_stored(tmp_path, monkeypatch):
    from mmbytes.cli import main
    from mmbytes.compress import unpack

    model, told = blt_told_modalities(monkeypatch)
    text_only = {"version": 1, "modalities": {"text": {"codec": "text"}}, "sets": []}
    ckpt = saved_checkpoint(tmp_path / "m.ckpt", model, data_description=text_only,
                            datamodule_hyper_parameters={"codec": "auto", "seq_len": 256})
    wav = real_files(tmp_path / "in")["audio"]
    main(["compress", "--ckpt", str(ckpt), str(wav), "--out", str(tmp_path / "z"), "--quiet", "--chunk", "256"])
    assert unpack((tmp_path / "z" / "tone.wav.mmbz").read_bytes(), "tone")[0].mode == "raw"
    assert told and all(t == {"raw"} for t in told)


@pytest.mark.parametrize("recorded, said", [
    ({"datamodule_hyper_parameters": {"codec": "image", "codec_options": {"order": "raster"}}}, "from the recipe"),
    ({}, "assuming every modality")])
def test_a_checkpoint_without_a_description_is_compressed_with_a_one_line_notice(tmp_path, monkeypatch, capsys,
                                                                                 recorded, said):
    from mmbytes.cli import main
    from mmbytes.compress import unpack

    model, told = blt_told_modalities(monkeypatch)
    ckpt = saved_checkpoint(tmp_path / "old.ckpt", model, **recorded)
    ppm = real_files(tmp_path / "in")["image"]
    main(["compress", "--ckpt", str(ckpt), str(ppm), "--out", str(tmp_path / "z"), "--quiet", "--chunk", "256"])
    notice = [line for line in capsys.readouterr().err.splitlines() if "data description" in line]
    assert len(notice) == 1 and str(ckpt) in notice[0] and said in notice[0]
    header = unpack((tmp_path / "z" / "icon.ppm.mmbz").read_bytes(), "icon")[0]
    # the recipe's raster order; without one, the image codec's default (patch, 4x4 tiles)
    assert header.mode == "image" and header.image["order"] == ("raster" if recorded else "patch")
    assert all(t == {"image"} for t in told)


def test_compare_tells_the_byte_model_each_items_modality_and_decodes_as_its_description_says(monkeypatch):
    """The byte model in ``mmbytes compare``: scored and sampled told the modality; its samples decoded in the byte
    order of the data it was trained on (the description: patch), not of the validation shards' metadata (raster)."""
    import numpy as np

    from mmbytes.codecs.image import from_order
    from mmbytes.compare import byte_bpd, byte_meta, byte_samples
    from mmbytes.sample import sample_bytes

    model, told = blt_told_modalities(monkeypatch)
    icon = (DATA / "images" / "icons_gnome48" / "actions_address-book-new.png").read_bytes()
    item = {"modality": "image", "height": 8, "width": 8, "channels": 3, "order": "raster", "tile": 1}
    byte_bpd(model, [(np.frombuffer(icon[:192], dtype=np.uint8), item)], 96, 2, "image")
    assert told == [{"image"}]
    told.clear()
    meta = byte_meta(IMAGE_AUDIO_TEXT, "image", item)
    assert (meta["height"], meta["width"], meta["order"], meta["tile"]) == (8, 8, "patch", 4)
    (decoded,) = byte_samples(model, meta, 1, 192, temperature=1.0, seed=0)
    assert told == [{"image"}]
    (made,) = sample_bytes(model, 1, 192, seed=0, modality="image")
    expected = from_order(np.frombuffer(made, dtype=np.uint8), 8, 8, 3, "patch", 4).transpose(2, 0, 1)
    assert np.array_equal(decoded, expected)
    audio = byte_meta(IMAGE_AUDIO_TEXT, "audio", {"modality": "audio", "sample_rate": 8000, "sample_width": 2})
    assert audio["sample_rate"] == 16000  # the rate the byte model's audio was encoded at


def test_encoder_options_encode_a_file_as_the_description_says():
    """``mmbytes patches`` encodes a file with these: a shipped icon becomes the 16x16 patch-order image the model
    was trained on, a shipped WAV 16 kHz audio."""
    from mmbytes.codecs import get_codec
    from mmbytes.data_description import encoder_options

    options = encoder_options(IMAGE_AUDIO_TEXT, "auto")
    assert options == {"image": {"channels": 3, "order": "patch", "tile": 4, "size": [16, 16]},
                       "audio": {"sample_rate": 16000}}
    codec = get_codec("auto", **options)
    data, meta = codec.encode(DATA / "images" / "icons_gnome48" / "actions_address-book-new.png")
    assert (meta["height"], meta["width"], meta["order"], meta["tile"], len(data)) == (16, 16, "patch", 4, 768)
    assert codec.encode(SAMPLES / "audio" / "fsdd_0_george_1.wav")[1]["sample_rate"] == 16000
    assert encoder_options(IMAGE_AUDIO_TEXT, "text") == {}
