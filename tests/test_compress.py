"""Lossless compression (``mmbytes compress`` / ``decompress``): exact round trips on every architecture of the
registry, on real files of every modality and on edge cases; refusal of another model's, truncated and corrupt
files; compressed size against the model's NLL."""

import io
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmbytes.compress import (
    ROW_INDEPENDENT,
    CompressionError,
    compress_files,
    decompress_files,
    plan_file,
    unpack,
)
from mmbytes.model.registry import SIZES, build

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# every byte architecture's test size (a new one joins by name); token models have no next-byte distributions
DEBUG_SIZES = [name for name in SIZES if "debug" in name and SIZES[name].arch != "bpe"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared CPU: one thread avoids waiting on busy cores at every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def real(name: str) -> bytes:
    return next(SAMPLES.rglob(name)).read_bytes()


def cifar_pixels() -> Image.Image:
    with Image.open(SAMPLES / "images" / "cifar10_cat_0000.jpg") as im:
        return im.convert("RGB")


def saved(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def round_trip(model, files: dict[str, bytes], **kw) -> list[dict]:
    packed = compress_files(model, [(data, name) for name, data in files.items()], **kw)
    out = decompress_files(model, [(p, s["name"]) for p, s in packed])
    for (name, data), back in zip(files.items(), out, strict=True):
        assert back == data, f"{name}: {back!r}"[:200]
    return [s for _, s in packed]


EDGES = {"empty": b"", "one byte": b"\x07", "all 256 values": bytes(range(256))[::-1]}


@pytest.mark.parametrize("name", DEBUG_SIZES)
def test_round_trip_on_every_architecture(name):
    model = build(name).eval()
    text = real("libpython3.11-stdlib_python3.11_antigravity.py")  # 500 bytes: longer than the 192-byte chunk
    stats = round_trip(model, {"text": text, **EDGES}, chunk=192, batch=8)
    assert [s["mode"] for s in stats] == ["text", "raw", "text", "raw"]


def test_round_trip_real_files_of_every_modality():
    model = build("debug").eval()
    pixels = cifar_pixels()
    files = {
        "wav": real("sound_icons_cembalo-10.wav"),  # 16-bit mono PCM: samples coded, RIFF header stored
        "ppm": saved(pixels, "PPM"),  # the CIFAR-10 cat's pixels in an uncompressed container
        "bmp": saved(pixels, "BMP"),
        "tiff": saved(pixels, "TIFF"),
        "png": real("icon_devices_printer.png"),  # compressed containers: coded as stored
        "jpeg": real("cifar10_cat_0000.jpg"),
        "gzip": real("alsa-utils_man_man1_aconnect.1.gz"),
        "pdf": real("pypdf_008-reportlab-inline-image_inline-image.pdf"),
    }
    stats = round_trip(model, files, chunk=1024, batch=24, image_options={"order": "patch", "tile": 4})
    assert [s["mode"] for s in stats] == ["audio", "image", "image", "image", "raw", "raw", "raw", "raw"]
    assert [s["container"] for s in stats[:4]] == [44, *(len(files[k]) - 3072 for k in ("ppm", "bmp", "tiff"))]


def test_plans_keep_the_container_and_code_samples_and_pixels_in_the_model_order():
    from mmbytes.codecs.image import to_order

    wav = real("fsdd_3_jackson_5.wav")
    plan = plan_file(wav, {"audio"}, {})
    samples = wav[44:]
    assert plan.mode == "audio" and plan.body == samples and plan.prefix == wav[:44]
    # a chunk after the samples stays in the container; the samples are still coded
    extra = wav[:4] + struct.pack("<I", len(wav) - 8 + 12) + wav[8:] + b"LIST" + struct.pack("<I", 4) + b"abcd"
    plan = plan_file(extra, {"audio"}, {})
    assert plan.body == samples and plan.suffix == b"LIST\x04\x00\x00\x00abcd"
    pixels = np.asarray(cifar_pixels())
    plan = plan_file(saved(cifar_pixels(), "PPM"), {"image"}, {"order": "patch", "tile": 4})
    assert plan.mode == "image" and plan.body == to_order(pixels, "patch", 4).tobytes()
    # modalities the model was not trained on, and compressed containers, are coded as stored
    assert plan_file(wav, {"text", "raw"}, {}).mode == "raw"
    assert plan_file(saved(cifar_pixels(), "PNG"), {"image"}, {}).mode == "raw"
    stereo = io.BytesIO()
    import soundfile as sf

    sf.write(stereo, np.zeros((100, 2), dtype=np.int16), 8000, format="WAV", subtype="PCM_16")
    assert plan_file(stereo.getvalue(), {"audio"}, {}).mode == "raw"


def test_row_independence_of_architectures_that_share_batches():
    """A row's logits do not depend on what the other rows hold (batch size and row fixed): files may share
    batches. Architectures without this property code each file in batches of its own."""
    text = real("tinyshakespeare.txt")[:4000]
    for name in DEBUG_SIZES:
        model = build(name).eval()
        if model.config.arch not in ROW_INDEPENDENT:
            continue
        rows = [torch.tensor(list(text[i * 300 : i * 300 + 64])) for i in range(12)]
        logits = []
        for others in (rows[:6], rows[6:]):
            x = torch.stack([*others[:3], rows[11], *others[3:5]])  # (6, 64), row 3 the same
            cache = model.new_cache(6, 64, None, torch.float32)
            with torch.no_grad():
                steps = [model.prefill(x[:, :0], cache)] + [model.step(x[:, t], cache) for t in range(63)]
            logits.append(torch.stack(steps, 1)[3])
        assert torch.equal(logits[0], logits[1]), name


@pytest.fixture(scope="module")
def trained():
    """The debug MEGABYTE after 60 steps on the first half of tinyshakespeare: peaked distributions."""
    torch.manual_seed(0)
    text = torch.tensor(list(real("tinyshakespeare.txt")[:500_000]))
    model = build("debug")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(text) - 256, (8,))
        loss = model.nll(torch.stack([text[s : s + 256] for s in starts])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_compressed_size_is_the_model_nll(trained):
    held_out = real("tinyshakespeare.txt")[-2048:]
    (packed, stats), = compress_files(trained, [(held_out, "held-out")], chunk=2048, batch=4)
    with torch.no_grad():
        nll_bits = trained.nll(torch.tensor([list(held_out)])).sum().item() / math.log(2)
    header, streams = unpack(packed, "held-out")
    coded = sum(len(s) for s in streams)
    assert nll_bits < 0.7 * 8 * len(held_out)  # the model learned something: a real test of the coder
    assert abs(coded * 8 - nll_bits) <= 0.01 * nll_bits + 64  # within 1%, plus the coder's final 32-bit words
    assert len(packed) - coded < 40  # header and CRC
    assert decompress_files(trained, [(packed, "held-out")]) == [held_out]


@pytest.fixture(scope="module")
def packed_text(trained):
    data = real("libpython3.11-stdlib_python3.11_this.py")
    (packed, _), = compress_files(trained, [(data, "this.py")], chunk=512, batch=2)
    return data, packed


def test_another_models_file_is_refused(packed_text):
    _, packed = packed_text
    other = build("debug").eval()
    result, = decompress_files(other, [(packed, "x/this.py.mmbz")])
    assert isinstance(result, CompressionError)
    assert str(result).startswith("x/this.py.mmbz: compressed with another model")


def test_truncated_and_bit_flipped_files_are_refused_before_decoding(packed_text, trained):
    data, packed = packed_text
    items = [(packed[:n], f"cut{n}") for n in (0, 3, 4, 10, 30, len(packed) // 2, len(packed) - 1)]
    items += [(packed + b"\x00", "longer")]
    for pos in range(len(packed)):
        flipped = bytearray(packed)
        flipped[pos] ^= 1 << (pos % 8)
        items.append((bytes(flipped), f"flip{pos}"))
    results = decompress_files(trained, items)
    for (_, name), result in zip(items, results, strict=True):
        assert isinstance(result, CompressionError), name
        assert str(result).startswith(f"{name}: "), str(result)
        assert "\n" not in str(result)
    assert "truncated" in str(results[len(items) - len(packed) - 2])


def test_a_decoder_that_does_not_reproduce_the_distributions_writes_nothing(packed_text, trained, monkeypatch):
    data, packed = packed_text
    step = trained.step
    monkeypatch.setattr(trained, "step", lambda byte, cache: step(byte, cache) * 1.001)
    result, = decompress_files(trained, [(packed, "this.py.mmbz")])
    assert isinstance(result, CompressionError) and "do not match the original's checksum" in str(result)


def test_cli_compresses_and_decompresses_folders_and_refuses_damaged_files(tmp_path, trained, capsys):
    from mmbytes.cli import main
    from mmbytes.model.registry import config_to_dict

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()},
                "hyper_parameters": {"size": "debug"}, "mmbytes": {"config": config_to_dict(trained.config)},
                "datamodule_hyper_parameters": {"codec": "auto", "seq_len": 512,
                                                "codec_options": {"image": {"order": "patch", "tile": 4}}}}, ckpt)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_bytes(real("libpython3.11-stdlib_python3.11_antigravity.py"))
    (src / "tone.wav").write_bytes(real("sound_icons_cembalo-10.wav"))
    (src / "empty").write_bytes(b"")
    main(["compress", "--ckpt", str(ckpt), str(src), "--out", str(tmp_path / "z"), "--quiet", "--batch", "8",
          "--verify"])
    packed = sorted(p.relative_to(tmp_path / "z").as_posix() for p in (tmp_path / "z").rglob("*") if p.is_file())
    assert packed == ["in/empty.mmbz", "in/sub/a.txt.mmbz", "in/tone.wav.mmbz"]
    assert "(audio: 3,954 ->" in capsys.readouterr().out
    main(["decompress", "--ckpt", str(ckpt), str(tmp_path / "z" / "in"), "--out", str(tmp_path / "back"), "--quiet"])
    for p in src.rglob("*"):
        if p.is_file():
            assert (tmp_path / "back" / "in" / p.relative_to(src)).read_bytes() == p.read_bytes()
    bad = tmp_path / "z" / "in" / "sub" / "a.txt.mmbz"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(SystemExit, match="1 of 1 files refused"):
        main(["decompress", "--ckpt", str(ckpt), str(bad), "--out", str(tmp_path / "again"), "--quiet"])
    assert f"{bad}: truncated" in capsys.readouterr().err
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").rglob("*"))
    # a link left in the output folder does not lead the output outside it
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "sub").symlink_to(tmp_path / "elsewhere")  # where the folder sub/ would go
    with pytest.raises(SystemExit, match="refused"):
        main(["compress", "--ckpt", str(ckpt), str(src / "empty"), str(src / "sub"), "--out", str(tmp_path / "linked"),
              "--quiet"])
    assert "leads outside" in capsys.readouterr().err
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_token_model_is_refused_with_a_message():
    with pytest.raises(CompressionError, match="predicts tokens, not bytes"):
        compress_files(build("bpe-debug"), [(b"hello", "x.txt")])
