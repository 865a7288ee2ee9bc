"""Lossless compression (``mmbytes compress`` / ``decompress``) with models: exact round trips on every architecture
of the registry, on real files of every modality and on edge cases, whatever thread count the caller runs torch at;
BLT told each file's modality; compressed size against the model's NLL; the CLI. The container and refusals made
before decoding: ``tests/test_compress_format.py``."""

import io
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmbytes.compress import (
    THREADS,
    compress_files,
    decompress_files,
    shares_batches,
    unpack,
)
from mmbytes.compress.container import pack
from mmbytes.model.registry import ALIASES, SIZES, build, config_from_name

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# every byte architecture's test size (a new one joins by name); token models have no next-byte distributions
DEBUG_SIZES = [name for name in SIZES if "debug" in name and SIZES[name].arch != "bpe" and name not in ALIASES]
ONE_PER_ARCH = list({SIZES[name].arch: name for name in reversed(DEBUG_SIZES)}.values())  # debug, transformer-debug..


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def test_row_independence_of_architectures_that_share_batches():
    """A row's logits do not depend on what the other rows hold (batch size and row fixed): files may share
    batches. Architectures without this property code each file in batches of its own."""
    text = real("tinyshakespeare.txt")[:4000]
    for name in DEBUG_SIZES:
        model = build(name).eval()
        if not shares_batches(model):
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


@pytest.mark.parametrize(("encode", "decode"), [(1, 2), (2, 1)])
@pytest.mark.parametrize("name", ONE_PER_ARCH)
def test_a_file_decodes_byte_for_byte_at_another_thread_count(name, encode, decode):
    """torch's CPU kernels split reductions by thread count (cached-step logits differ in the last bits between 1 and
    2 threads); the coder's model pass runs on one thread whatever the caller set."""
    torch.manual_seed(0)
    model = build(name).eval()
    text = real("tinyshakespeare.txt")[:512]
    with threads(encode):  # four chunks in one batch of four rows: enough work for torch to split between threads
        (packed, _), = compress_files(model, [(text, "t.txt")], chunk=128, batch=4)
    with threads(decode):
        assert decompress_files(model, [(packed, "t.txt.mmbz")]) == [text]


def test_the_python_api_round_trips_at_torchs_default_threads_and_leaves_them_as_it_found_them():
    model = build("debug").eval()
    default = torch.get_num_threads()
    files = {"wav": real("sound_icons_cembalo-10.wav")[:600], "text": real("tinyshakespeare.txt")[:300]}
    round_trip(model, files, chunk=256, batch=4)
    assert torch.get_num_threads() == default


def test_the_model_pass_runs_on_the_coders_thread_count_whatever_the_caller_set(monkeypatch):
    model = build("transformer-debug").eval()
    seen = set()
    step = model.step
    monkeypatch.setattr(model, "step", lambda byte, cache: seen.add(torch.get_num_threads()) or step(byte, cache))
    with threads(2):
        compress_files(model, [(b"threads", "t.txt")], chunk=8, batch=2)
        assert torch.get_num_threads() == 2
    assert seen == {THREADS}


def test_blt_patches_each_file_with_its_modalitys_threshold():
    """Untrained entropy model, thresholds far apart: the text threshold cuts a patch at every byte, the raw one
    (what a row told no modality gets) never. The model's bits while coding are its NLL under the text threshold."""
    from mmbytes.codecs import MODALITIES

    torch.manual_seed(0)
    # GELU MLPs, no token shift: there the untrained model's NLLs under the two thresholds lie far apart (in the named
    # size's `shift-swiglu` they differ by under 0.1 of 1,921 bits, too close to tell apart from rounding)
    model = build(config_from_name("blt-debug", preset="conditioned")).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # peaked distributions: the patching shows in the NLL
    model.theta.fill_(1e9)
    model.theta[MODALITIES.index("text")] = 0.0
    text = real("libpython3.11-stdlib_python3.11_this.py")[:160]
    stats = round_trip(model, {"text": text}, chunk=160, batch=1)
    x = torch.tensor([list(text)])
    with torch.no_grad():
        told, untold = (model.nll(x, modality=m).sum().item() / math.log(2)
                        for m in (torch.tensor([MODALITIES.index("text")]), None))
    assert stats[0]["mode"] == "text"
    assert abs(stats[0]["model_bits"] - told) < 1e-3 * abs(told - untold)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
def test_a_file_compressed_on_cuda_decodes_exactly_on_cuda_and_is_refused_on_cpu():
    torch.manual_seed(0)
    model = build("debug").eval().cuda()
    text = real("tinyshakespeare.txt")[:2048]
    (packed, _), = compress_files(model, [(text, "t.txt")], chunk=512, batch=4)
    assert unpack(packed, "t")[0].envelope.kernels.startswith(torch.cuda.get_device_name())
    assert decompress_files(model, [(packed, "t.txt.mmbz")]) == [text]
    result, = decompress_files(model.cpu(), [(packed, "t.txt.mmbz")])
    assert str(result).startswith("t.txt.mmbz: compressed with device cuda, this machine has device cpu;")


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
    assert len(packed) - coded < 80  # header (with its determinism envelope) and CRC
    assert decompress_files(trained, [(packed, "held-out")]) == [held_out]


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
    # another torch version's file: refused, then decoded with --force
    other = tmp_path / "z" / "in" / "sub" / "a.txt.mmbz"
    header, streams = unpack(other.read_bytes(), "a")
    other.write_bytes(pack(replace(header, envelope=replace(header.envelope, torch="2.0.0")), streams))
    with pytest.raises(SystemExit, match="1 of 1 files refused"):
        main(["decompress", "--ckpt", str(ckpt), str(other), "--out", str(tmp_path / "forced"), "--quiet"])
    refusal = f"{other}: compressed with torch 2.0.0, this machine has torch {torch.__version__};"
    assert refusal in capsys.readouterr().err
    main(["decompress", "--ckpt", str(ckpt), str(other), "--out", str(tmp_path / "forced"), "--quiet", "--force"])
    assert (tmp_path / "forced" / "a.txt").read_bytes() == (src / "sub" / "a.txt").read_bytes()
    bad = other
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
