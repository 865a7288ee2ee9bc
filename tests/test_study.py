"""Compute-matched study: the FLOP budget callback, the BPE baseline, ``mmbytes study``."""

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from datamodules import ByteDataModule
from mmbytes.callbacks import FlopBudget
from mmbytes.lit import ByteLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of 48 KiB of real text cut into 2 KiB samples (some go to validation)."""
    from mmbytes.shards import write_shards

    tmp = tmp_path_factory.mktemp("study_data")
    src = tmp / "src"
    src.mkdir()
    (src / "shakespeare.txt").write_bytes((ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()[:48_000])
    write_shards([src], tmp / "shards", codec="text", chunk_bytes=2048, progress=False)
    return tmp / "shards"


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     limit_val_batches=0, **kw)


def test_flop_budget_counts_flops_per_byte_times_bytes_and_ends_the_schedule_there(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, train_batches_per_epoch=3)
    model = ByteLM(size="debug", warmup_steps=1)
    fpb = model.model.flops_per_byte(64)
    budget = fpb * 64 * 2 * 4.5  # pays for 4.5 steps: 5 are run, the last one crosses the budget
    counter = FlopBudget(budget)
    trainer = _trainer(tmp_path, [counter], max_epochs=1)  # the budget lifts max_epochs (3 batches an epoch)
    trainer.fit(model, data)
    assert trainer.global_step == counter.steps == 5
    assert counter.bytes == 5 * 2 * 64
    assert counter.flops == pytest.approx(fpb * counter.bytes, rel=1e-12) and counter.flops >= budget
    assert float(trainer.callback_metrics["train/flops"]) == pytest.approx(counter.flops, rel=1e-6)
    # the learning-rate schedule was planned for those 5 steps: it ends at min_lr_ratio
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.lr_lambdas[0](5) == pytest.approx(model.hparams.min_lr_ratio)
    assert sched.lr_lambdas[0](4) > model.hparams.min_lr_ratio


def test_the_learning_rate_decay_ends_where_the_budget_runs_out_when_steps_cost_more_than_planned(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, train_batches_per_epoch=20)
    model = ByteLM(size="debug", warmup_steps=1)
    real = model.model.train_flops
    model.model.train_flops = lambda x, mask=None, *, modality=None: 2 * real(x, mask, modality=modality)
    budget = model.model.flops_per_byte(64) * 64 * 2 * 8  # planned: 8 steps; each costs twice that as run
    counter = FlopBudget(budget)
    trainer = _trainer(tmp_path, [counter], max_epochs=1)
    trainer.fit(model, data)
    assert trainer.global_step == 4
    sched = trainer.lr_scheduler_configs[0].scheduler
    # the rate the schedule reached after the last step: its minimum, not the middle of an 8-step cosine
    assert sched.get_last_lr()[0] == pytest.approx(model.hparams.lr * model.hparams.min_lr_ratio)


def test_flop_budget_without_budget_only_counts(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, train_batches_per_epoch=3)
    model = ByteLM(size="transformer-debug")
    counter = FlopBudget()
    _trainer(tmp_path, [counter], max_steps=2).fit(model, data)
    assert counter.flops == pytest.approx(model.model.flops_per_byte(64) * 2 * 2 * 64, rel=1e-12)
    assert math.isfinite(counter.flops)


# -- the BPE baseline


@pytest.fixture(scope="module")
def tokenizer():
    from mmbytes.model.bpe_tokenizer import train_tokenizer

    text = (ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()[:100_000]
    return train_tokenizer([text], 512)


def test_an_untrained_bpe_model_draws_only_tokens_its_tokenizer_has_bytes_for():
    from mmbytes.model import build

    torch.manual_seed(0)
    model = build("bpe-debug").eval()  # untrained: a 256-token byte tokenizer under a 512-id head
    assert len(model.tokenizer.token_bytes) < model.config.vocab_size
    prompt = torch.tensor([list((ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()[:32])])
    with torch.no_grad():
        out = model.generate_bytes(prompt, 64, lambda logits: torch.distributions.Categorical(logits=logits).sample())
    assert out.shape == (1, 96) and torch.equal(out[:, :32], prompt)


def test_bpe_bits_per_byte_equal_a_hand_computation_on_a_short_text(tokenizer):
    from tokenizers import Tokenizer

    from mmbytes.model.bpe_tokenizer import to_chars

    lm = ByteLM(size="bpe-debug")
    model = lm.model
    model.set_tokenizer(*tokenizer)
    texts = ["First Citizen:\nWe are accounted poor citizens, the patricians good.", "Caf\u00e9 \u00e0 deux\x00\xff"]
    rows = [t.encode("utf-8") if i == 0 else t.encode("utf-8") + b"\xfe\x80" for i, t in enumerate(texts)]
    T = max(map(len, rows)) + 3
    x = torch.zeros(2, T, dtype=torch.uint8)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(list(r))
        mask[i, : len(r)] = True
    got = lm.predict_step({"x": x, "mask": mask, "modality": torch.zeros(2, dtype=torch.long)}, 0)
    hf = Tokenizer.from_str(tokenizer[0])
    with torch.no_grad():
        for i, r in enumerate(rows):
            ids = hf.encode(to_chars(r), add_special_tokens=False).ids
            assert model.tokenizer.decode(ids) == r  # byte level: every byte is covered, non-UTF-8 included
            assert len(ids) < len(r)  # merges were learned
            inputs = torch.tensor([[model.bos, *ids[:-1]]])
            logp = model.head(model.transformer(model.embed(inputs))).log_softmax(-1)[0]  # (N, V)
            nats = -sum(float(logp[j, t]) for j, t in enumerate(ids))
            assert float(got["nats"][i]) == pytest.approx(nats, rel=1e-5)
            assert int(got["count"][i]) == len(r)
            assert float(got["bpb"][i]) == pytest.approx(nats / len(r) / math.log(2), rel=1e-5)
            # each token's nats sit at its last byte; padding and the other bytes of a token get none
            per_byte = model.nll(x, mask)[i]
            ends = torch.tensor([len(model.tokenizer.decode(ids[: j + 1])) - 1 for j in range(len(ids))])
            assert set(per_byte.nonzero().squeeze(1).tolist()) == set(ends.tolist())
    assert model.flops_per_byte(1024) == pytest.approx(
        build_flops_per_token(model, 1024 / tokenizer[1]) / tokenizer[1], rel=1e-12)


def build_flops_per_token(model, n_tokens: float) -> float:
    """Training FLOPs per token of the token Transformer at n_tokens per window, written out."""
    c = model.config
    d, hidden = c.d_model, int(c.d_model * c.mlp_ratio)
    per_layer = 2 * 4 * d * d + 2 * 2 * d * hidden + 4 * n_tokens * d
    return 3 * (c.n_layer * per_layer + 2 * d * c.vocab_size)


def test_bpe_trains_its_tokenizer_on_the_training_split_keeps_it_in_the_checkpoint_and_samples_bytes(shards, tmp_path):
    from mmbytes.checkpoint import load_model
    from mmbytes.sample import sample_bytes

    data = ByteDataModule(data_dir=str(shards), seq_len=128, batch_size=2, train_batches_per_epoch=2)
    lm = ByteLM(size="bpe-debug", warmup_steps=1)
    assert not lm.model.trained_tokenizer and lm.model.bytes_per_token == 1.0
    trainer = _trainer(tmp_path, [FlopBudget()], max_steps=2)
    trainer.fit(lm, data)
    assert lm.model.trained_tokenizer and 1.5 < lm.model.bytes_per_token < 4
    assert 1.5 < float(trainer.callback_metrics["train/bytes_per_token"]) < 4
    trainer.save_checkpoint(tmp_path / "bpe.ckpt")
    model, _ = load_model(tmp_path / "bpe.ckpt")
    assert model.tokenizer.json == lm.model.tokenizer.json and model.bytes_per_token == lm.model.bytes_per_token
    samples = sample_bytes(model, 2, 40, b"First", seed=1)
    assert [len(s) for s in samples] == [40, 40] and all(s.startswith(b"First") for s in samples)


def test_the_flop_budget_counts_the_trained_tokenizers_bytes_per_token(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=128, batch_size=2, train_batches_per_epoch=2)
    lm = ByteLM(size="bpe-debug")
    counter = FlopBudget()
    _trainer(tmp_path, [counter], max_steps=1).fit(lm, data)
    assert lm.model.bytes_per_token > 1.5
    assert counter.flops_per_byte == pytest.approx(lm.model.flops_per_byte(128), rel=1e-12)


# -- mmbytes study


def _study_args(shards, out, models: str, budget: str = "2e8") -> list[str]:
    """``mmbytes study`` arguments (``[1:]`` for ``study.main``)."""
    return ["study", "--data", str(shards), "--budget", budget, "--models", models, "--out", str(out),
            "--seq-len", "64", "--batch-size", "2", "--evals", "1", "--val-batches", "4"]


def test_a_tiny_study_writes_its_report_and_a_resumed_study_trains_only_the_rest(shards, tmp_path):
    import csv

    from PIL import Image

    from mmbytes import study

    out = tmp_path / "study"
    first = study.main(_study_args(shards, out, "debug")[1:])
    assert first["trained"] == ["debug/seed0"]
    done = out / "runs" / "debug" / "seed0" / "result.json"
    stamp = done.stat().st_mtime_ns
    second = study.main(_study_args(shards, out, "debug,bpe-debug")[1:])
    assert second["trained"] == ["bpe-debug/seed0"]  # the finished run is read, not redone
    assert done.stat().st_mtime_ns == stamp
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["model"] for r in rows] == ["debug", "bpe-debug"]
    for r in rows:
        assert 0 < float(r["val/bpb"]) < 9 and float(r["val/bpb"]) == pytest.approx(float(r["val/bpb_text"]))
        per_step = float(r["flops_per_byte_counted"]) * 64 * 2
        assert 2e8 <= float(r["flops"]) < 2e8 + 1.5 * per_step  # the budget is spent, by less than one step more
        assert float(r["flops"]) == pytest.approx(float(r["flops_per_byte_counted"]) * float(r["bytes"]), rel=1e-9)
    # MEGABYTE's fixed patches run as planned; the BPE model's tokens per window are its own
    assert float(rows[0]["flops_per_byte_counted"]) == pytest.approx(float(rows[0]["flops_per_byte"]), rel=1e-9)
    assert 1.5 < float(rows[1]["patch_size"]) < 4 and float(rows[0]["patch_size"]) == 4  # BPE: bytes per token
    report = (out / "report.md").read_text()
    assert "| debug |" in report and "| bpe-debug |" in report and "bpb_vs_flops.png" in report
    assert "FLOPs/byte planned" in report and "FLOPs/byte counted" in report
    assert "`bits_per_sample_audio`" in report and "bpd_audio" not in report  # the metric's own name
    assert Image.open(out / "bpb_vs_flops.png").size[0] > 300
    assert list((out / "runs" / "bpe-debug" / "seed0" / "logs").glob("events.out.tfevents.*"))
    with pytest.raises(SystemExit, match="other settings"):  # another budget in the same folder is refused
        study.main(_study_args(shards, out, "debug", budget="3e8")[1:])


def test_a_study_with_strided_scores_megabyte_both_ways_and_a_resumed_run_keeps_its_earlier_wall_time(shards,
                                                                                                  tmp_path):
    import csv
    import json

    from mmbytes import study

    out = tmp_path / "study"
    study.main(_study_args(shards, out, "debug,transformer-debug")[1:] + ["--strided"])
    rows = {r["model"]: r for r in csv.DictReader((out / "report.csv").open())}
    plain, strided = float(rows["debug"]["val/bpb"]), float(rows["debug"]["val/bpb_strided"])
    assert strided != plain and abs(strided - plain) < 0.5  # a second pass that scores the same bytes differently
    assert rows["transformer-debug"]["val/bpb_strided"] == ""  # no patches, no strided inference
    assert "rule `paper`" in (out / "report.md").read_text()
    # an interrupted run: its checkpoint and the wall time its earlier session wrote at its last validation are
    # there, its result is not
    run = out / "runs" / "debug" / "seed0"
    (run / "result.json").unlink()
    curve = study.Curve(FlopBudget(), tmp_path / "curve.json", wall_path=run / "wall.json", wall_before=999.0)
    curve.on_validation_end(SimpleNamespace(sanity_checking=False, global_step=3, callback_metrics={}), None)
    assert json.loads((run / "wall.json").read_text())["s"] > 999
    again = study.main(_study_args(shards, out, "debug,transformer-debug")[1:] + ["--strided"])
    assert again["trained"] == ["debug/seed0"]
    assert 999 < json.loads((run / "result.json").read_text())["wall_s"] < 999 + 120


@pytest.mark.slow
def test_a_study_of_every_architecture_trains_blts_entropy_model_first(shards, tmp_path):
    import csv

    from mmbytes.cli import main

    out = tmp_path / "study"
    main(_study_args(shards, out, "transformer-debug,spacebyte-debug,blt-debug,blt-fixed-debug", budget="2e8")
         + ["--seeds", "2"])
    rows = {r["model"]: r for r in csv.DictReader((out / "report.csv").open())}
    assert set(rows) == {"transformer-debug", "spacebyte-debug", "blt-debug", "blt-fixed-debug"}
    assert all(r["seeds"] == "2" and r["val/bpb_std"] for r in rows.values())
    # thresholds calibrated on random training windows for a mean patch of 4.5 bytes; FLOPs counted at the patches run
    assert float(rows["blt-debug"]["patch_size"]) == pytest.approx(4.5, rel=0.25)
    assert float(rows["blt-debug"]["flops_per_byte_counted"]) > 0
    assert (out / "entropy" / "blt-entropy-debug" / "result.json").exists()
    assert "entropy model `blt-entropy-debug`" in (out / "report.md").read_text()


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_bpe_flops_per_byte_match_the_flop_counter(tokenizer, mlp):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmbytes.model import build

    model = build("bpe-debug", mlp=mlp).train()
    model.set_tokenizer(*tokenizer)
    T = 1024
    x = torch.tensor(list((ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()[5000 : 5000 + T]))[None]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.nll(x).sum().backward()
    n_tokens = int(model.tokenize(x)[2].sum())
    model.bytes_per_token = T / n_tokens  # this window's own bytes per token
    assert model.flops_per_byte(T) == pytest.approx(counter.get_total_flops() / T, rel=0.10)


def test_a_resumed_bpe_run_goes_on_counting_and_plans_the_rest_of_the_budget_from_its_running_mean(shards,
                                                                                                  tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=128, batch_size=2, train_batches_per_epoch=50)
    lm = ByteLM(size="bpe-debug")
    first = FlopBudget(1.0)  # one step
    trainer = _trainer(tmp_path, [first], max_epochs=1)
    trainer.fit(lm, data)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    one = first.flops
    assert trainer.global_step == 1 and first.batches == 1 and lm.model.bytes_per_token > 1.5
    assert first.flops_per_byte == pytest.approx(lm.model.flops_per_byte(128))
    more = FlopBudget(one * 3.5)  # about 3.5 steps at the first step's counted FLOPs
    more_model = ByteLM(size="bpe-debug")
    resumed = _trainer(tmp_path, [more], max_epochs=1)
    resumed.fit(more_model, data, ckpt_path=tmp_path / "one.ckpt")
    assert more.flops_per_byte == first.flops_per_byte  # the planned figure of the tokenizer it was trained with
    assert more.batches == resumed.global_step >= 3 and more.flops >= one * 3.5
    assert more.flops - one * 3.5 < more.flops / more.batches * 1.5  # it stopped at the step that crossed the budget


class Recorder(L.Callback):
    """Each training batch's ``train_flops`` and patch starts, summed as the model reports them."""

    def __init__(self) -> None:
        self.flops, self.real, self.starts, self.batches = 0.0, 0, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m, x, mask = pl_module.model, batch["x"], batch["mask"]
        self.flops += m.train_flops(x, mask, modality=batch["modality"])
        self.starts += int((m.patch_starts(x, mask, modality=batch["modality"]) & mask).sum())
        self.real += int(mask.sum())
        self.batches += 1


def test_flop_budget_sums_the_flops_as_run_of_every_batch_and_the_mean_patch_over_all_of_training(shards, tmp_path):
    data = ByteDataModule(data_dir=str(shards), seq_len=128, batch_size=2, train_batches_per_epoch=4)
    lm = ByteLM(size="spacebyte-debug", overrides={"global_ratio": 0.5})  # a cap of 64 that text does not reach
    counter, seen = FlopBudget(), Recorder()
    _trainer(tmp_path, [counter, seen], max_steps=4).fit(lm, data)
    assert lm.model.config.context == 128  # the cap is set for the training window
    assert seen.batches == counter.batches == 4
    assert counter.flops == pytest.approx(seen.flops, rel=1e-12)
    assert counter.mean_patch == pytest.approx(seen.real / seen.starts, rel=1e-12)
    assert counter.flops != pytest.approx(counter.flops_per_byte * counter.bytes, rel=1e-3)  # word starts vary


def test_a_study_runs_in_bf16_says_so_and_refuses_to_mix_precisions(shards, tmp_path):
    import json

    from mmbytes import study

    out = tmp_path / "study"
    study.main([*_study_args(shards, out, "debug")[1:], "--precision", "bf16-mixed"])
    assert "precision bf16-mixed" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="precision"):
        study.main(_study_args(shards, out, "debug")[1:])
    stored = json.loads((out / "study.json").read_text())
    del stored["precision"]  # a study written before the setting existed ran in 32-true
    (out / "study.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="precision"):
        study.main([*_study_args(shards, out, "debug")[1:], "--precision", "bf16-mixed"])


def test_a_done_run_trained_in_another_form_than_its_size_has_now_is_refused(shards, tmp_path, monkeypatch):
    import json
    from dataclasses import replace

    from mmbytes import study
    from mmbytes.model import registry

    out = tmp_path / "study"
    study.main(_study_args(shards, out, "debug")[1:])
    result = out / "runs" / "debug" / "seed0" / "result.json"
    mlp = registry.SIZES["debug"].mlp
    other = "gelu" if mlp == "swiglu" else "swiglu"
    assert json.loads(result.read_text())["form"]["mlp"] == mlp
    assert study.main(_study_args(shards, out, "debug")[1:])["trained"] == []  # the same form: read, not redone
    monkeypatch.setitem(registry.SIZES, "debug", replace(registry.SIZES["debug"], mlp=other))  # a new preset
    with pytest.raises(SystemExit, match=rf"seed0 was trained in another form than debug has now .*'mlp': "
                                         rf"\('{mlp}', '{other}'\)"):
        study.main(_study_args(shards, out, "debug")[1:])
    stored = json.loads(result.read_text())
    del stored["form"]  # a run written before the form was recorded: its checkpoint's config tells it
    result.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="another form"):
        study.main(_study_args(shards, out, "debug")[1:])
