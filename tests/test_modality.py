"""Modality-conditioned models: every architecture learns a start state per modality (``layers.ModalityStart``),
chosen by each row's modality in training, scoring and generation; configs stored without it load unconditioned."""

from pathlib import Path

import pytest
import torch
from generation_check import condition

from mmbytes.codecs import MODALITIES, get_codec
from mmbytes.lit import ByteLM
from mmbytes.model import SIZES, build
from mmbytes.model.generate import generate
from mmbytes.model.layers import ModalityStart
from mmbytes.model.registry import config_from_dict, config_to_dict

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
EVERY = ["debug", "debug-long", "transformer-debug", "spacebyte-debug", "spacebyte-fixed-debug", "blt-debug",
         "blt-fixed-debug", "bpe-debug"]
TEXT, IMAGE, AUDIO = (MODALITIES.index(m) for m in ("text", "image", "audio"))


def real_text(n: int) -> torch.Tensor:
    blob = (SAMPLES / "text" / "tinyshakespeare.txt").read_bytes()
    return torch.tensor(list(blob[:n]))


def test_every_named_size_learns_a_start_state_per_modality_except_blt_entropy_models():
    for name, config in SIZES.items():
        conditioned = not name.startswith("blt-entropy-")  # an entropy model scores bytes whatever the modality
        assert config.modality_start is conditioned, name
        with torch.device("meta"):
            assert build(name).capabilities.per_modality is conditioned, name


@pytest.mark.parametrize("name", EVERY)
def test_two_modalities_give_different_predictions_at_position_0_and_identical_shapes(name):
    m = condition(build(name).eval())
    x = real_text(64).view(2, 32)
    image, text = torch.full((2,), IMAGE), torch.full((2,), TEXT)
    with torch.no_grad():
        a, b = m(x, modality=image), m(x, modality=text)
    assert a.shape == b.shape
    assert not torch.allclose(a[:, 0], b[:, 0])  # the first prediction (the first token for BPE) knows the modality
    starts = [m.patch_starts(x, modality=image), m.patch_starts(x, modality=text)]
    assert starts[0] is starts[1] is None or torch.equal(*starts)  # None: the flat Transformer has no patches
    assert m.train_flops(x, modality=image) == m.train_flops(x, modality=text)


@pytest.mark.parametrize("name", EVERY)
def test_rows_without_a_modality_take_the_shared_start_state(name):
    m = condition(build(name).eval())
    x = real_text(64).view(2, 32)
    with torch.no_grad():
        conditioned = m(x, modality=torch.tensor([AUDIO, AUDIO]))
        shared = m(x)
        for t in m.modules():
            if isinstance(t, ModalityStart):
                t.reset_parameters()  # zero offsets: every modality is the shared start state
        assert torch.equal(m(x), shared)
        assert torch.equal(m(x, modality=torch.tensor([AUDIO, AUDIO])), shared)
    assert not torch.allclose(conditioned, shared)


@pytest.mark.parametrize("name", EVERY)
def test_a_config_stored_without_modality_start_loads_unconditioned_and_scores_the_same(name):
    torch.manual_seed(0)
    old = build(name, modality_start=False).eval()
    stored = config_to_dict(old.config)
    del stored["modality_start"]  # as saved before the field existed
    config = config_from_dict(stored)
    assert config.modality_start is False
    new = build(config).eval()
    new.load_state_dict(old.state_dict())  # strict: the same parameters, no start-state table
    assert not new.capabilities.per_modality or name.startswith("blt")  # BLT: its thresholds still are per modality
    x, modality = real_text(64).view(2, 32), torch.tensor([IMAGE, TEXT])
    with torch.no_grad():
        assert torch.equal(new.nll(x, modality=modality), old.nll(x, modality=modality))
        assert torch.equal(new.nll(x), old.nll(x, modality=modality))
        # an unconditioned state dict in a conditioned model: zero offsets, the same scores for every modality
        conditioned = build(name).eval()
        conditioned.load_state_dict(old.state_dict())
        assert torch.equal(conditioned.nll(x, modality=modality), old.nll(x))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_training_steps_reach_the_start_state_of_each_rows_modality_only():
    lm = ByteLM(size="debug")
    x = real_text(128).view(2, 64)
    batch = {"x": x, "mask": torch.ones_like(x, dtype=torch.bool), "modality": torch.tensor([IMAGE, TEXT])}
    lm.training_step(batch, 0).backward()
    grad = lm.model.modality_pad.offset.grad.view(len(MODALITIES), -1).abs().sum(1)
    assert grad[IMAGE] > 0 and grad[TEXT] > 0
    assert grad[MODALITIES.index("raw")] == 0 and grad[AUDIO] == 0


def histogram(data: bytes | list[int]) -> torch.Tensor:
    h = torch.bincount(torch.tensor(list(data)), minlength=256).double()
    return h / h.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def trained_on_images_and_text(name: str, steps: int, T: int = 64, rows: int = 16) -> tuple:
    """``name`` trained ``steps`` AdamW steps on windows of real image bytes (the image codec's pixels of
    samples/images) and real text, half of each batch each, every row told its modality; with the bytes of each."""
    images = [get_codec("image").encode(p)[0] for p in sorted((SAMPLES / "images").iterdir())]
    text = (SAMPLES / "text" / "tinyshakespeare.txt").read_bytes()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = build(name)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)

    def window(blob: bytes) -> list[int]:
        at = int(torch.randint(0, len(blob) - T, (1,), generator=g))
        return list(blob[at : at + T])

    modality = torch.tensor([IMAGE, TEXT] * (rows // 2))
    for _ in range(steps):
        x = torch.tensor([window(images[int(torch.randint(0, len(images), (1,), generator=g))]) if i == IMAGE
                          else window(text) for i in modality.tolist()])
        loss = m.nll(x, modality=modality).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), b"".join(images), text


def generated_histogram(m, modality: int, n: int = 4, num_bytes: int = 64) -> torch.Tensor:
    out = generate(m, torch.zeros(n, 0, dtype=torch.long), num_bytes, generator=torch.Generator().manual_seed(1),
                   modality=torch.full((n,), modality))
    return histogram(out.flatten().tolist())


def assert_generation_follows_the_start_state(name: str, steps: int) -> None:
    m, images, text = trained_on_images_and_text(name, steps)
    h_image, h_text = histogram(images), histogram(text)
    image, text_ = generated_histogram(m, IMAGE), generated_histogram(m, TEXT)
    # the same weights, no prompt: only the start state differs
    distances = {f"{told} from {data}": total_variation(h, ref) for told, h in (("image", image), ("text", text_))
                 for data, ref in (("images", h_image), ("text", h_text))}
    assert distances["image from images"] < distances["image from text"], distances
    assert distances["text from text"] < distances["text from images"], distances


def test_a_small_trained_model_generates_image_bytes_from_the_image_start_state():
    assert_generation_follows_the_start_state("debug", 120)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["debug", "transformer-debug", "spacebyte-debug", "blt-fixed-debug"])
def test_every_architecture_trained_generates_image_bytes_from_the_image_start_state(name):
    assert_generation_follows_the_start_state(name, 300)


def test_an_entropy_checkpoint_with_a_start_state_per_modality_is_refused_naming_the_field(tmp_path):
    from mmbytes.checkpoint import CheckpointError, load_entropy_model

    def saved(name: str, **overrides) -> Path:
        m = build(name, **overrides)
        path = tmp_path / f"{name}-{len(overrides)}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                    "hyper_parameters": {"size": name}, "mmbytes": {"config": config_to_dict(m.config)}}, path)
        return path

    with pytest.raises(CheckpointError, match="modality_start: false"):
        load_entropy_model(saved("transformer-debug"))
    assert load_entropy_model(saved("transformer-debug", modality_start=False))["config"]["modality_start"] is False
    assert load_entropy_model(saved("blt-entropy-debug"))["config"]["arch"] == "transformer"
    assert [build(n).capabilities.entropy_patches for n in ("blt-debug", "blt-fixed-debug", "debug")] == \
        [True, False, False]


@pytest.mark.parametrize("name", ["debug", "spacebyte-debug", "blt-fixed-debug", "bpe-debug"])
def test_a_checkpoint_naming_only_its_size_loads_its_unconditioned_weights_with_zero_offsets(name, tmp_path):
    """A checkpoint without its stored config is rebuilt from its size, now conditioned: the weights it has load,
    the offsets it lacks are zero, and it scores as the model that wrote it, for every modality."""
    from mmbytes.checkpoint import load_model

    torch.manual_seed(0)
    old = build(name, modality_start=False).eval()
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in old.state_dict().items()},
                "hyper_parameters": {"size": name}}, path)
    new, _ = load_model(path)
    assert new.config.modality_start
    x, modality = real_text(64).view(2, 32), torch.tensor([IMAGE, TEXT])
    with torch.no_grad():
        assert torch.equal(new.nll(x, modality=modality), old.nll(x))


def test_sample_bytes_generates_from_the_start_state_of_the_modality_asked_for():
    from mmbytes.sample import sample_bytes

    m = condition(build("debug").eval())

    def by_hand(modality: int) -> list[bytes]:
        out = generate(m, torch.zeros(3, 0, dtype=torch.long), 24, generator=torch.Generator().manual_seed(5),
                       modality=torch.full((3,), modality))
        return [bytes(row.tolist()) for row in out]

    assert sample_bytes(m, 3, 24, seed=5, modality="image") == by_hand(IMAGE)
    assert sample_bytes(m, 3, 24, seed=5, modality="text") == by_hand(TEXT) != by_hand(IMAGE)
