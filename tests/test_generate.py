import pytest
import torch
from generation_check import FORMS, cached_equals_reference, condition

from mmbytes import Megabyte, MegabyteConfig
from mmbytes.codecs import MODALITIES
from mmbytes.model.generate import generate, sample_next


def model(name: str, **form) -> Megabyte:
    if name == "four-stages":  # 16-byte patches, 8- and 2-byte sub-patches, bytes
        return Megabyte(MegabyteConfig.from_name("debug", patch_size=16, d_global=4, mid_patch_sizes=(8, 2),
                                                 d_mid=(8, 16), n_layer_mid=(1, 1), n_head_mid=(2, 2), d_local=16,
                                                 n_head_local=2, **form)).double().eval()
    return Megabyte(MegabyteConfig.from_name(name, **form)).double().eval()


@pytest.mark.parametrize("name", ["debug", "debug-long", "four-stages", "transformer-debug"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("prompt_len", [0, 1, 3, 4, 9, 27])  # empty, inside the first patch, whole patches, both
def test_cached_logits_equal_reference_at_every_step(name, form, prompt_len):
    m = condition(model(name, **FORMS[form]))  # each row from its modality's start state
    prompt = torch.randint(0, 256, (2, prompt_len))
    modality = torch.tensor([MODALITIES.index("image"), MODALITIES.index("audio")])
    out = cached_equals_reference(m, prompt, 13, modality=modality)  # logits at every step; greedy bytes identical
    assert torch.equal(out[:, :prompt_len], prompt)


def test_sampling_with_a_seed_is_reproducible_and_batched_samples_differ():
    m = model("debug")
    prompt = torch.zeros(3, 0, dtype=torch.long)
    runs = [generate(m, prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[0][1])
    other = generate(m, prompt, 20, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert p[0] < 0.8 < p[0] + p[1]
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, temperature=0).tolist()) == {0}


def test_generate_restores_training_mode():
    m = model("debug").train()
    generate(m, torch.zeros(1, 0, dtype=torch.long), 5)
    assert m.training


def test_nothing_to_generate_returns_the_prompt():
    prompt = torch.randint(0, 256, (1, 8))
    assert torch.equal(generate(model("debug"), prompt, 0), prompt)


def test_sample_writer_runs_on_rank_zero_and_leaves_the_module_in_its_mode(tmp_path):
    from types import SimpleNamespace

    from mmbytes.callbacks import SampleWriter

    module = SimpleNamespace(model=model("debug").float().train())
    trainer = SimpleNamespace(global_step=7, log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])
    SampleWriter(modality="text", num=2, num_bytes=10)._sample(trainer, module)
    assert module.model.training
    assert sorted(p.name for p in (tmp_path / "samples" / "step_7").iterdir()) == ["text_000.txt", "text_001.txt"]
    module.model.eval()
    image = {"height": 4, "width": 4, "channels": 3, "order": "patch", "tile": 2}
    SampleWriter(modality="image", num=2, meta=image)._sample(SimpleNamespace(**{**vars(trainer), "global_step": 8}),
                                                              module)
    assert not module.model.training
    assert (tmp_path / "samples" / "step_8" / "image_sheet.png").exists()


@pytest.mark.parametrize("seq_len, warns", [(1024, True), (4000, False)])
def test_sample_writer_warns_when_samples_are_longer_than_the_training_windows(seq_len, warns, recwarn):
    from types import SimpleNamespace

    from mmbytes.callbacks import SampleWriter

    writer = SampleWriter(modality="audio", num=2, num_bytes=4000, meta={"sample_rate": 8000})  # as in quickstart
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"seq_len": seq_len}), is_global_zero=True)
    writer.on_fit_start(trainer, None)
    said = [str(w.message) for w in recwarn if "trained on windows" in str(w.message)]
    assert len(said) == warns and (not warns or "4,000 bytes" in said[0] and "1,024 bytes" in said[0])
