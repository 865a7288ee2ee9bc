"""The ``.mmbz`` container and the per-file plans, apart from what a model computes: plans that keep the container
and code samples or pixels; refusal of another model's, truncated, bit-flipped and other machines' files before
anything is decoded; version-1 containers written by earlier releases; a token model refused."""

import io
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compress import cifar_pixels, saved  # the CIFAR-10 cat in uncompressed containers

from mmbytes.compress import (
    CompressionError,
    Envelope,
    compress_files,
    decompress_files,
    machine_envelope,
    plan_file,
    unpack,
)
from mmbytes.compress.container import pack
from mmbytes.model.registry import build

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
TEXT = (SAMPLES / "files" / "libpython3.11-stdlib_python3.11_this.py").read_bytes()[:600]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("debug").eval()


@pytest.fixture(scope="module")
def packed(model):
    (data, _), = compress_files(model, [(TEXT, "this.py")], chunk=256, batch=2)
    return data


def refuses_without_decoding(model, monkeypatch):
    """The model's cached path raises if reached: a refusal it lets through was made before decoding."""
    def fail(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(model, "prefill", fail)
    monkeypatch.setattr(model, "step", fail)


def with_envelope(packed: bytes, **fields) -> bytes:
    header, streams = unpack(packed, "x")
    return pack(replace(header, envelope=replace(header.envelope, **fields)), streams)


def test_plans_keep_the_container_and_code_samples_and_pixels_in_the_model_order():
    from mmbytes.codecs.image import to_order

    wav = (SAMPLES / "audio" / "fsdd_3_jackson_5.wav").read_bytes()
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


def test_the_header_records_the_machines_determinism_envelope(packed, model):
    header, _ = unpack(packed, "this.py")
    env = header.envelope
    assert header.version == 2 and env == machine_envelope(model)
    assert (env.device, env.torch, env.dtype, env.threads) == ("cpu", torch.__version__, "float32", 1)
    assert env.kernels.endswith(torch.backends.cpu.get_cpu_capability())


def test_another_models_file_is_refused(packed, monkeypatch):
    other = build("debug").eval()
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-6  # one weight differs
    refuses_without_decoding(other, monkeypatch)
    result, = decompress_files(other, [(packed, "x/this.py.mmbz")])
    assert isinstance(result, CompressionError)
    assert str(result).startswith("x/this.py.mmbz: compressed with another model")


@pytest.mark.parametrize(("field", "recorded", "label"), [
    ("torch", "2.0.0+cu118", "torch"),
    ("kernels", "aarch64 SVE256", "kernels"),
    ("dtype", "bfloat16", "dtype"),
    ("device", "cuda", "device"),
    ("threads", 8, "threads"),
])
def test_another_machines_file_is_refused_before_decoding_naming_both_values(packed, model, monkeypatch, field,
                                                                               recorded, label):
    ours = getattr(machine_envelope(model), field)
    refuses_without_decoding(model, monkeypatch)
    result, = decompress_files(model, [(with_envelope(packed, **{field: recorded}), "this.py.mmbz")])
    assert isinstance(result, CompressionError)
    assert str(result).startswith(f"this.py.mmbz: compressed with {label} {recorded}, this machine has {label} {ours};")
    assert "--force" in str(result) and "\n" not in str(result)


def test_force_decodes_another_torch_versions_file_and_blames_the_mismatch_when_the_checksum_fails(packed, model,
                                                                                                  monkeypatch):
    other = with_envelope(packed, torch="2.0.0")
    assert decompress_files(model, [(other, "this.py.mmbz")], force=True) == [TEXT]
    step = model.step
    monkeypatch.setattr(model, "step", lambda byte, cache: step(byte, cache) * 1.001)
    result, = decompress_files(model, [(other, "this.py.mmbz")], force=True)
    assert isinstance(result, CompressionError)
    assert "do not match the original's checksum" in str(result)
    assert f"decoded with --force despite torch 2.0.0 (compressed) against {torch.__version__}" in str(result)


def test_truncated_and_bit_flipped_files_are_refused_before_decoding(packed, model, monkeypatch):
    refuses_without_decoding(model, monkeypatch)
    items = [(packed[:n], f"cut{n}") for n in (0, 3, 4, 10, 30, len(packed) // 2, len(packed) - 1)]
    items += [(packed + b"\x00", "longer")]
    for pos in range(len(packed)):
        flipped = bytearray(packed)
        flipped[pos] ^= 1 << (pos % 8)
        items.append((bytes(flipped), f"flip{pos}"))
    results = decompress_files(model, items)
    for (_, name), result in zip(items, results, strict=True):
        assert isinstance(result, CompressionError), name
        assert str(result).startswith(f"{name}: "), str(result)
        assert "\n" not in str(result)
    assert "truncated" in str(results[len(items) - len(packed) - 2])


def test_a_decoder_that_does_not_reproduce_the_distributions_returns_nothing(packed, model, monkeypatch):
    step = model.step
    monkeypatch.setattr(model, "step", lambda byte, cache: step(byte, cache) * 1.001)
    result, = decompress_files(model, [(packed, "this.py.mmbz")])
    assert isinstance(result, CompressionError) and "do not match the original's checksum" in str(result)
    assert "on a machine that matches cpu, torch" in str(result)


def test_a_version_1_container_written_by_the_previous_release_is_read():
    """Written by the release before the envelope (``compress_files`` on ``debug``, chunk 256, batch 4)."""
    header, streams = unpack((ROOT / "tests" / "data" / "compress_v1_text.mmbz").read_bytes(), "v1.mmbz")
    assert (header.version, header.mode, header.length, header.chunk, header.rows) == (1, "text", 400, 256, 4)
    assert header.envelope == Envelope("cpu", "", "", "", 0) and header.modality is None
    assert [len(s) for s in streams] == header.sizes == [264, 152]


def test_a_version_1_container_decodes_at_any_caller_thread_count_and_names_its_missing_envelope(packed, model,
                                                                                                monkeypatch):
    header, streams = unpack(packed, "x")
    v1 = pack(replace(header, version=1, envelope=Envelope("cpu", "", "", "", 0)), streams)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert decompress_files(model, [(v1, "v1.mmbz")]) == [TEXT]
    finally:
        torch.set_num_threads(threads)
    step = model.step
    monkeypatch.setattr(model, "step", lambda byte, cache: step(byte, cache) * 1.001)
    result, = decompress_files(model, [(v1, "v1.mmbz")])
    assert isinstance(result, CompressionError) and "a version-1 file records no torch version" in str(result)


def test_an_unknown_version_is_refused_with_the_versions_read(packed):
    with pytest.raises(CompressionError, match=r"^x.mmbz: format version 9; this mmbytes reads versions 1, 2$"):
        unpack(packed[:4] + b"\x09" + packed[5:], "x.mmbz")


def test_a_token_model_is_refused_with_a_message():
    with pytest.raises(CompressionError, match="predicts tokens, not bytes"):
        compress_files(build("bpe-debug"), [(b"hello", "x.txt")])


def test_a_model_declaring_no_cached_byte_logits_is_refused():
    model = build("bpe-debug").eval()  # the BPE baseline: token logits, no cached byte steps
    assert not (model.capabilities.byte_logits or model.capabilities.cached)
    with pytest.raises(CompressionError, match="predicts tokens, not bytes"):
        compress_files(model, [(b"hello", "x.txt")])


@pytest.mark.parametrize("fields, message", [
    ({"length": 2**40}, "claims 1,099,511,627,776 bytes"),  # a million chunks promised by a file of a few hundred bytes
    ({"length": 2**40, "chunk": 2**40}, "invalid header"),  # one chunk of a terabyte: over the largest chunk
    ({"rows": 2**20}, "invalid header"),
])
def test_a_crafted_header_with_absurd_sizes_and_a_valid_crc_is_refused_before_anything_is_built(packed, fields,
                                                                                                 message):
    header, streams = unpack(packed, "x")
    crafted = pack(replace(header, **fields), streams)  # pack writes a CRC-32 that matches
    with pytest.raises(CompressionError, match=message):
        unpack(crafted, "crafted.mmbz")
