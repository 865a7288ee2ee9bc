import pytest
import torch
from generation_check import FORMS, cached_equals_reference, condition, in_form

from mmbytes import Megabyte, MegabyteConfig
from mmbytes.codecs import MODALITIES
from mmbytes.model.generate import generate, sample_next


def model(name: str, **form) -> Megabyte:
    if name == "four-stages":  # 16-byte patches, 8- and 2-byte sub-patches, bytes
        return Megabyte(MegabyteConfig.from_name("debug", patch_size=16, d_global=4, mid_patch_sizes=(8, 2),
                                                 d_mid=(8, 16), n_layer_mid=(1, 1), n_head_mid=(2, 2), d_local=16,
                                                 n_head_local=2, **form)).double().eval()
    return in_form(name, **form).double().eval()


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


def test_sample_writer_leaves_the_global_random_state_untouched(tmp_path):
    from types import SimpleNamespace

    from mmbytes.callbacks import SampleWriter

    module = SimpleNamespace(model=model("debug").float())
    trainer = SimpleNamespace(global_step=3, log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])
    before = torch.random.get_rng_state()
    SampleWriter(modality="text", num=2, num_bytes=12, temperature=1.0)._sample(trainer, module)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert len(list((tmp_path / "samples" / "step_3").iterdir())) == 2


def test_sample_writer_in_training_waits_for_the_next_batch_or_the_end_of_training(tmp_path):
    """In ``fit``, the samples of a validation are made at the next training batch or at the end of training, after
    ModelCheckpoint (which saves in the same hook, after every other callback) has written that step's checkpoint;
    an exception in between drops them."""
    from types import SimpleNamespace

    from mmbytes.callbacks import SampleWriter

    module = SimpleNamespace(model=model("debug").float())
    trainer = SimpleNamespace(global_step=5, log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[],
                              sanity_checking=False, state=SimpleNamespace(fn="fit"))
    writer = SampleWriter(modality="text", num=1, num_bytes=8)
    writer.on_validation_end(trainer, module)
    assert not (tmp_path / "samples").exists()
    writer.on_train_batch_start(trainer, module, None, 0)
    assert (tmp_path / "samples" / "step_5" / "text_000.txt").exists()
    trainer.global_step = 10
    writer.on_validation_end(trainer, module)
    writer.on_exception(trainer, module, KeyboardInterrupt())
    writer.on_train_end(trainer, module)
    assert not (tmp_path / "samples" / "step_10").exists()
    writer.on_validation_end(trainer, module)
    writer.on_train_end(trainer, module)
    assert (tmp_path / "samples" / "step_10" / "text_000.txt").exists()


def test_sample_writer_gives_up_at_its_time_budget_and_writes_nothing(tmp_path, recwarn):
    from types import SimpleNamespace

    from mmbytes.callbacks import SampleWriter

    module = SimpleNamespace(model=model("debug").float())
    trainer = SimpleNamespace(global_step=2, log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[])
    SampleWriter(modality="text", num=2, num_bytes=64, max_seconds=0.0)._sample(trainer, module)
    assert not (tmp_path / "samples" / "step_2").exists()
    said = [str(w.message) for w in recwarn if "max_seconds" in str(w.message)]
    assert len(said) == 1 and "1 of 64 bytes per sample made in the 0 s allowed" in said[0]


def test_sample_writer_decodes_with_the_data_description_of_the_datamodule(tmp_path):
    """Without ``meta``, audio of a MixedDataModule's 8 kHz set is written at 8 kHz."""
    from types import SimpleNamespace

    import soundfile as sf

    from mmbytes.callbacks import SampleWriter

    sets = [{"data_dir": str(tmp_path / "none"), "codec": "audio", "codec_options": {"sample_rate": 8000}},
            {"data_dir": str(tmp_path / "none2"), "codec": "text"}]
    module = SimpleNamespace(model=model("debug").float())
    trainer = SimpleNamespace(global_step=1, log_dir=str(tmp_path), default_root_dir=str(tmp_path), loggers=[],
                              datamodule=SimpleNamespace(hparams={"sets": sets, "seq_len": 64}), is_global_zero=True)
    writer = SampleWriter(modality="audio", num=1, num_bytes=16)
    writer.on_fit_start(trainer, module)
    writer._sample(trainer, module)
    assert sf.info(tmp_path / "samples" / "step_1" / "audio_000.wav").samplerate == 8000
