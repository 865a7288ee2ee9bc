"""Codecs: exact inverses on real files, and clear refusals of broken ones."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmbytes.codecs import CodecError, get_codec
from mmbytes.codecs.image import tile_for_patch

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
DATA = Path(__file__).resolve().parent / "data"  # real files shipped for the tests (tests/data/MANIFEST.md)
ICON = SAMPLES / "images" / "icon_places_user-home.png"
JPEG = next((SAMPLES / "images").glob("cifar10_*.jpg"))
WAV = next((SAMPLES / "audio").glob("fsdd_*.wav"))
WAV16K = SAMPLES / "audio" / "sound_icons_cembalo-10.wav"
PDF = next((SAMPLES / "files").glob("*.pdf"))


@pytest.mark.parametrize("name", ["text", "raw"])
def test_text_and_raw_round_trip(name, tmp_path):
    src = SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py"
    data, meta = get_codec(name).encode(src)
    assert data == src.read_bytes()
    out = get_codec(name).decode(data, meta, tmp_path / "out")
    assert out.read_bytes() == src.read_bytes()


def test_raw_keeps_binary_files_exactly(tmp_path):
    data, meta = get_codec("raw").encode(PDF)
    assert data == PDF.read_bytes() and data.startswith(b"%PDF")


def test_text_refuses_binary_and_empty(tmp_path):
    with pytest.raises(CodecError, match=f"{PDF.name}.*not valid UTF-8"):
        get_codec("text").encode(PDF)
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(CodecError, match="empty.txt: empty file"):
        get_codec("text").encode(empty)


@pytest.mark.parametrize("order", ["patch", "raster"])
@pytest.mark.parametrize("src", [ICON, JPEG])
def test_image_round_trip_is_bit_exact(order, src, tmp_path):
    codec = get_codec("image", order=order, tile=4)
    data, meta = codec.encode(src)
    with Image.open(src) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert len(data) == pixels.size == meta["height"] * meta["width"] * 3
    out = codec.decode(data, meta, tmp_path / "out.png")
    assert np.array_equal(np.asarray(Image.open(out)), pixels)
    assert codec.encode(out)[0] == data


def test_patch_order_puts_a_tile_in_one_model_patch():
    assert tile_for_patch(12) == 2 and tile_for_patch(192) == 8 and tile_for_patch(48) == 4
    data, meta = get_codec("image", order="patch", tile=2).encode(JPEG)
    pixels = np.asarray(Image.open(JPEG).convert("RGB"))
    first_tile = pixels[:2, :2].reshape(-1)  # 2x2 RGB pixels of the top-left corner, row by row
    second_tile = pixels[:2, 2:4].reshape(-1)
    assert data[:12] == first_tile.tobytes() and data[12:24] == second_tile.tobytes()


def test_image_resize_center_crop_and_grayscale():
    data, meta = get_codec("image", size=16, channels=1).encode(ICON)
    assert (meta["height"], meta["width"], meta["channels"]) == (16, 16, 1) and len(data) == 256


def test_image_resize_and_centre_crop_is_pil_imageops_fit():
    from PIL import ImageOps

    photo = DATA / "images" / "photos"
    path = next(p for p in sorted(photo.iterdir()) if Image.open(p).size[0] != Image.open(p).size[1])  # not square
    pixels = get_codec("image", size=(24, 40), order="raster").pixels(path)
    expect = ImageOps.fit(Image.open(path).convert("RGB"), (40, 24), Image.Resampling.BICUBIC)
    assert np.array_equal(pixels, np.asarray(expect))


def test_audio_round_trip_is_bit_exact(tmp_path):
    codec = get_codec("audio")
    data, meta = codec.encode(WAV)
    samples, rate = sf.read(WAV, dtype="int16")
    assert data == samples.astype("<i2").tobytes() and meta["sample_rate"] == rate == 8000
    assert meta["converted"] == []
    out = codec.decode(data, meta, tmp_path / "out.wav")
    assert sf.info(out).subtype == "PCM_16"
    assert np.array_equal(sf.read(out, dtype="int16")[0], samples)


def test_audio_resamples_and_says_so():
    data, meta = get_codec("audio", sample_rate=8000).encode(WAV16K)
    assert meta["converted"] == ["16000 Hz -> 8000 Hz"] and meta["sample_rate"] == 8000
    assert len(data) == 2 * round(sf.info(WAV16K).frames / 2)


def _variant(tmp_path: Path, name: str, **kw) -> Path:
    """A real recording rewritten in another format (channels, bit depth)."""
    samples, rate = sf.read(WAV, dtype="float32")
    if kw.pop("stereo", False):
        samples = np.stack([samples, samples * 0.5], axis=1)
    path = tmp_path / name
    sf.write(path, samples, rate, **kw)
    return path


@pytest.mark.parametrize(("name", "kw", "change"), [
    ("u8.wav", {"subtype": "PCM_U8"}, "PCM_U8 -> PCM_16"),
    ("s24.wav", {"subtype": "PCM_24"}, "PCM_24 -> PCM_16"),
    ("float.wav", {"subtype": "FLOAT"}, "FLOAT -> PCM_16"),
    ("stereo.wav", {"subtype": "PCM_16", "stereo": True}, "2 channels -> mono"),
])
def test_audio_converts_or_refuses_other_formats(tmp_path, name, kw, change):
    path = _variant(tmp_path, name, **kw)
    data, meta = get_codec("audio").encode(path)
    assert change in meta["converted"] and len(data) == 2 * sf.info(path).frames
    with pytest.raises(CodecError, match=f"{name}: needs .*{change.split(' ')[0]}.* and conversion is off"):
        get_codec("audio", convert=False).encode(path)


def test_audio_refuses_non_audio_and_truncated(tmp_path):
    fake = tmp_path / "fake.wav"
    fake.write_bytes(PDF.read_bytes())
    with pytest.raises(CodecError, match="fake.wav: not readable audio"):
        get_codec("audio").encode(fake)
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(WAV.read_bytes()[:44])  # a header that promises data that is not there
    with pytest.raises(CodecError, match="header_only.wav"):
        get_codec("audio").encode(header_only)


def test_audio_with_a_lying_header_keeps_only_real_samples(tmp_path):
    raw = bytearray(WAV.read_bytes())
    liar = tmp_path / "liar.wav"
    liar.write_bytes(bytes(raw[: len(raw) // 2]))  # header says twice as many samples as the file holds
    data, _ = get_codec("audio").encode(liar)  # libsndfile reads the samples that are there
    assert len(data) == (len(raw) // 2 - 44) // 2 * 2  # whole samples after the 44-byte header


@pytest.mark.parametrize(("cut", "name"), [(0.5, "cut.png"), (0.6, "cut.jpg")])
def test_image_refuses_truncated_files(tmp_path, cut, name):
    src = ICON if name.endswith(".png") else JPEG
    bad = tmp_path / name
    raw = src.read_bytes()
    bad.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(CodecError, match=f"{name}: not a readable image"):
        get_codec("image").encode(bad)


def test_auto_picks_by_content_not_name(tmp_path):
    disguised = tmp_path / "notes.txt"
    disguised.write_bytes(ICON.read_bytes())
    auto = get_codec("auto")
    assert auto.encode(disguised)[1]["codec"] == "image"
    assert auto.encode(WAV)[1]["codec"] == "audio"
    assert auto.encode(PDF)[1]["codec"] == "raw"
    assert auto.encode(SAMPLES / "text" / "tinyshakespeare.txt")[1]["modality"] == "text"
    data, meta = auto.encode(ICON)
    out = auto.decode(data, meta, tmp_path / "back.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(ICON).convert("RGB")))


MNIST = DATA / "images" / "mnist"  # the first 1,000 test images (a valid IDX3 file) and all 10,000 labels


def test_idx_gives_one_image_per_digit_and_decodes(tmp_path):
    import gzip

    items = get_codec("idx", tile=4).encode_many(MNIST / "t10k-images-idx3-ubyte-first1000.gz")
    assert len(items) == 1_000 and all(len(d) == 784 for d, _ in items[:10])
    raw = gzip.open(MNIST / "t10k-images-idx3-ubyte-first1000.gz").read()
    first = np.frombuffer(raw, np.uint8, 784, offset=16).reshape(28, 28)
    out = get_codec("idx").decode(items[0][0], items[0][1], tmp_path / "digit.png")
    assert np.array_equal(np.asarray(Image.open(out)), first)
    with pytest.raises(CodecError, match="labels-idx1-ubyte.gz: not an IDX3 file"):
        get_codec("idx").encode_many(MNIST / "t10k-labels-idx1-ubyte.gz")
    cut = tmp_path / "cut-idx3-ubyte"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CodecError, match="cut-idx3-ubyte: header promises 1000 images"):
        get_codec("idx").encode_many(cut)


# ---- pictures and sounds recorded as they are: depth, orientation and container


PHOTO = DATA / "images" / "photos" / "astronaut.png"


def test_a_16_bit_ppm_is_scaled_to_8_bits_and_the_scaling_recorded(tmp_path):
    pixels = np.asarray(Image.open(PHOTO).convert("RGB"))
    h, w, _ = pixels.shape
    ppm = tmp_path / "deep.ppm"
    ppm.write_bytes(b"P6\n%d %d\n65535\n" % (w, h) + (pixels.astype(">u2") * 257).tobytes())
    data, meta = get_codec("auto", image={"order": "raster"}).encode(ppm)
    assert meta["codec"] == "image" and meta["converted"] == ["RGB 16-bit -> 8-bit (maximum 65535 scaled to 255)"]
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(h, w, 3), pixels)


@pytest.mark.parametrize(("orientation", "upright", "how"), [
    (6, lambda a: np.rot90(a, -1), ["EXIF orientation 6 applied (rotated 90 clockwise)"]),
    (3, lambda a: a[::-1, ::-1], ["EXIF orientation 3 applied (rotated 180)"]),
    (1, lambda a: a, []),
])
def test_exif_orientation_is_applied_and_recorded(tmp_path, orientation, upright, how):
    picture = Image.open(PHOTO).convert("RGB").crop((100, 50, 196, 114))  # 96 wide, 64 high
    exif = picture.getexif()
    exif[0x0112] = orientation
    picture.save(tmp_path / "camera.png", exif=exif)  # lossless: the pixels can be compared exactly
    data, meta = get_codec("image", order="raster").encode(tmp_path / "camera.png")
    expect = upright(np.asarray(picture))
    assert (meta["height"], meta["width"]) == expect.shape[:2]
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(expect.shape), expect)
    recorded = [c for c in meta.get("converted", []) if c.startswith("EXIF orientation")]
    assert recorded == how


@pytest.mark.parametrize("container", ["RF64", "WAV"])
def test_a_64_bit_wav_container_is_decoded_as_audio(tmp_path, container):
    samples, rate = sf.read(str(WAV), dtype="int16")
    path = tmp_path / "broadcast.wav"
    sf.write(str(path), samples, rate, format=container, subtype="PCM_16")
    data, meta = get_codec("auto").encode(path)
    assert meta["codec"] == "audio" and meta["sample_rate"] == rate and meta["converted"] == []
    assert np.array_equal(np.frombuffer(data, "<i2"), samples)
