"""BLT: entropy patches, hash n-grams, per-patch cross-attention, causality, cached generation, thresholds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_check import cached_equals_reference, condition
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmbytes.codecs import MODALITIES
from mmbytes.model import build, patching
from mmbytes.model.blt_layers import entropy_of, ngram_ids
from mmbytes.model.generate import generate

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
TEXT_ID, IMAGE_ID = MODALITIES.index("text"), MODALITIES.index("image")
MODALITY = torch.tensor([IMAGE_ID, TEXT_ID])  # rows' start states, in order


def real_bytes(n: int, folder: str = "text") -> torch.Tensor:
    blob = b"".join(p.read_bytes() for p in sorted((SAMPLES / folder).rglob("*")) if p.is_file())
    assert len(blob) >= n
    return torch.tensor(list(blob[:n]))


def blt(name: str = "blt-debug", patch: float = 3.0, **kw):
    """A float64 model in eval mode whose (random) entropy model cuts real text into patches of ``patch`` bytes on
    average, so that patches of many lengths occur, and a latent start state per modality with random offsets
    (``condition``)."""
    m = condition(build(name, **kw).double().eval())
    if m.entropy_model is not None:
        h = m.entropies(real_bytes(600).view(4, 150))
        theta, _ = patching.calibrate_threshold(list(h), patch, m.config.patching, m.config.max_patch_len)
        m.theta.fill_(theta)
    return m


def leaks(m, x: torch.Tensor) -> tuple[list[int], int]:
    """Positions t where changing byte t changes a logit at a position <= t, and how many of the changes moved a
    later patch boundary. Each row from its modality's start state (``MODALITY``)."""
    modality = MODALITY[: x.shape[0]]
    with torch.no_grad():
        base, starts = m(x, modality=modality), m.starts(x, modality)
        bad, moved = [], 0
        for t in range(x.shape[1]):
            y = x.clone()
            y[:, t] = torch.where(y[:, t] == 32, 101, 32)  # a space for a letter and back
            moved += not torch.equal(m.starts(y, modality), starts)
            if not torch.allclose(m(y, modality=modality)[:, : t + 1], base[:, : t + 1], atol=1e-10, rtol=0):
                bad.append(t)
    return bad, moved


# -- entropy and patch rules


def test_entropies_of_a_row_do_not_depend_on_the_other_rows():
    m = blt()
    x = real_bytes(400).view(4, 100)
    together = m.entropies(x)
    for i in range(4):
        torch.testing.assert_close(m.entropies(x[i : i + 1])[0], together[i], atol=1e-12, rtol=0)
    other = x.clone()
    other[1:] = torch.randint(0, 256, (3, 100))
    torch.testing.assert_close(m.entropies(other)[0], together[0], atol=1e-12, rtol=0)


ENTROPY = build("blt-entropy-debug").double().eval()


def _entropy(x):
    with torch.no_grad():
        return entropy_of(ENTROPY(x))


_H = _entropy(real_bytes(600).view(4, 150))
_MID, _RISE = float(_H.median()), float((_H[:, 1:] - _H[:, :-1]).quantile(0.7))  # thresholds that cut real text
RULES = {
    "entropy": lambda x: patching.entropy_starts(_entropy(x), _MID),
    "monotonic": lambda x: patching.monotonic_starts(_entropy(x), _RISE),
    "entropy-max-len": lambda x: patching.entropy_starts(_entropy(x), float(_H.quantile(0.9)), max_len=4),
    "space-max-len": lambda x: patching.limit_length(patching.spacelike_starts(x), 5),
}


@pytest.mark.parametrize("rule", RULES)
def test_entropy_rules_are_incremental_on_random_and_real_bytes(rule):
    f = RULES[rule]
    for x in (torch.randint(0, 256, (3, 40)), real_bytes(120).view(3, 40)):
        whole = f(x)
        assert bool(whole[:, 0].all()) and 3 < int(whole.sum()) < whole.numel()  # the rule cuts, not everywhere
        for t in range(1, x.shape[1] + 1):
            assert torch.equal(f(x[:, :t]), whole[:, :t]), t


def test_rules_by_hand():
    h = torch.tensor([[0.1, 3.0, 0.5, 0.7, 2.5, 2.6, 0.1, 0.1, 0.1, 0.1]])
    assert patching.entropy_starts(h, 2.0)[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert patching.monotonic_starts(h, 0.15)[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert patching.entropy_starts(h, 2.0, max_len=3)[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 8]
    per_row = patching.entropy_starts(torch.cat([h, h]), torch.tensor([2.0, 2.55]))
    assert per_row[1].nonzero().flatten().tolist() == [0, 1, 5]


def test_max_patch_len_bounds_every_patch():
    m = blt("blt-debug", patch=12.0, max_patch_len=5)
    starts = m.starts(real_bytes(600).view(4, 150))
    idx = [row.nonzero().flatten().tolist() + [150] for row in starts]
    assert max(b - a for row in idx for a, b in zip(row, row[1:], strict=False)) == 5


def test_calibration_hits_the_target_mean_patch_size_per_modality():
    m = build("blt-debug").double().eval()
    sizes = {}
    for folder in ("text", "images", "audio"):
        h = list(m.entropies(real_bytes(1200, folder).view(4, 300)))
        theta, size = patching.calibrate_threshold(h, 4.5)
        assert size == pytest.approx(4.5, rel=0.05), folder
        sizes[folder] = theta
    assert len(set(sizes.values())) == 3  # each modality its own threshold


# -- hash n-gram embeddings


def test_hash_ngram_ids_depend_only_on_the_bytes_ending_there():
    x = real_bytes(200).view(2, 100)
    base = ngram_ids(x, (3, 4, 8), 4096)
    for t in (0, 10, 50, 99):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 256
        for n, a, b in zip((3, 4, 8), base, ngram_ids(y, (3, 4, 8), 4096), strict=True):
            changed = (a != b).any(0).nonzero().flatten().tolist()
            assert set(changed) <= set(range(t, t + n)) and t in changed, (n, t, changed)
    # an n-gram's id is the same wherever it occurs
    z = torch.tensor([list(b"the cat, the dog")])
    ids = ngram_ids(z, (4,), 1 << 20)[0][0]
    assert ids[3] == ids[12] and ids[3] != ids[7]


def test_hash_ngram_ids_are_the_same_in_another_process_with_another_hash_seed():
    code = ("import torch; from mmbytes.model.blt_layers import entropy_of, ngram_ids; "
            "x = torch.tensor([list(b'byte latent transformer')]); "
            "print([t.tolist() for t in ngram_ids(x, (3, 5, 8), 500)])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    here = [t.tolist() for t in ngram_ids(torch.tensor([list(b"byte latent transformer")]), (3, 5, 8), 500)]
    assert out.strip() == str(here)


def test_hash_embeddings_can_be_turned_off():
    m = build("blt-debug", hash_vocab=0)
    assert m.num_params("hash") == 0 and len(m.hash_embed) == 0
    assert build("blt-debug").num_params("hash") == 6 * 64 * 32
    assert m(torch.randint(0, 256, (1, 20))).shape == (1, 20, 256)


# -- the model


@pytest.mark.parametrize("name,kw", [("blt-debug", {}), ("blt-debug", {"patching": "monotonic"}),
                                     ("blt-debug", {"max_patch_len": 4}), ("blt-fixed-debug", {}),
                                     ("blt-fixed-debug", {"patching": "space"}),
                                     ("blt-debug", {"mlp": "swiglu", "token_shift": True}),
                                     ("blt-fixed-debug", {"mlp": "swiglu", "token_shift": True, "init": "fan_in"})])
def test_blt_is_strictly_causal_also_where_patch_boundaries_move(name, kw):
    m = blt(name, **kw)
    x = real_bytes(120).view(2, 60)
    bad, moved = leaks(m, x)
    assert bad == []
    assert moved > 0 or kw.get("patching") != "space" and name == "blt-fixed-debug"


def test_causality_check_catches_a_decoder_that_reads_its_own_patch(monkeypatch):
    """The one-patch shift: if bytes read the latent output of their own patch, the check must say so."""
    m = blt("blt-fixed-debug")
    decode = m.decode
    monkeypatch.setattr(m, "decode", lambda d, kv, pid, caches=None: decode(
        d, [(k[:, 1:], v[:, 1:]) for k, v in kv], pid.clamp(max=kv[0][0].shape[1] - 2)))
    bad, _ = leaks(m, real_bytes(40).view(1, 40))
    assert len(bad) > 10


@pytest.mark.parametrize("kw,prompt_len", [({}, 0), ({}, 1), ({}, 30), ({"patching": "monotonic"}, 5),
                                           ({"max_patch_len": 4}, 5), ({"hash_vocab": 0}, 5),
                                           ({"token_shift": True}, 0), ({"token_shift": True, "mlp": "swiglu"}, 5),
                                           ({"token_shift": True, "mlp": "swiglu", "init": "fan_in"}, 30)])
def test_blt_cached_logits_equal_the_reference_at_every_step(kw, prompt_len):
    m = blt(**kw)
    x = real_bytes(2 * prompt_len + 2)[: 2 * prompt_len].view(2, prompt_len)
    cached_equals_reference(m, x, 40, modality=MODALITY)


@pytest.mark.parametrize("name,kw", [("blt-fixed-debug", {}), ("blt-fixed-debug", {"patching": "space"}),
                                     ("blt-fixed-debug", {"token_shift": True, "mlp": "swiglu"})])
def test_static_patch_blt_cached_logits_equal_the_reference(name, kw):
    m = blt(name, **kw)
    cached_equals_reference(m, real_bytes(40).view(2, 20), 30, modality=MODALITY)


def test_identical_prompts_in_one_batch_decode_identically_while_rows_open_patches_at_different_steps():
    m = blt()
    text = real_bytes(90)
    prompts = torch.stack([text[:30], text[30:60], text[:30], text[60:90]])
    out = generate(m, prompts, 50, temperature=0)
    assert torch.equal(out[0], out[2])
    starts = m.starts(out)[:, 30:]
    assert not torch.equal(starts[0], starts[1]) or not torch.equal(starts[0], starts[3])


def test_each_row_uses_the_threshold_of_its_modality_in_training_and_generation():
    m = blt()
    x = real_bytes(200).view(2, 100)
    m.theta[IMAGE_ID] = 100.0  # no entropy reaches it: image rows are one patch
    modality = torch.tensor([TEXT_ID, IMAGE_ID])
    starts = m.starts(x, modality)
    assert int(starts[1].sum()) == 1 and int(starts[0].sum()) > 10
    assert not torch.allclose(m(x, modality=modality)[1], m(x)[1])  # without modality a row takes the raw threshold
    cached_equals_reference(m, x[:, :10], 30, modality=modality)


def test_padded_patches_give_no_nan_and_a_row_scores_the_same_alone_or_in_a_batch():
    m = blt()
    text = real_bytes(120)
    x = torch.stack([text[:60], torch.full((60,), 32)])  # text: many patches; repeated spaces: few
    counts = m.starts(x).sum(1)
    assert counts[0] != counts[1]
    m.train()
    nll = m.nll(x)
    nll.sum().backward()
    assert bool(torch.isfinite(nll).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None)
    m.eval()
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(m.nll(x[i : i + 1])[0], m.nll(x)[i], atol=1e-10, rtol=0)


def test_every_byte_value_is_data_for_blt():
    m = build("blt-fixed-debug").train()
    x = torch.arange(257).remainder(256).view(1, 257)  # every value is read by a later prediction
    m.nll(x).sum().backward()
    assert bool((m.embed.weight.grad.abs().sum(1) > 0).all())  # every byte's embedding gets a gradient
    logits = m(x)
    nll = m.nll(x)[0]
    assert torch.allclose(nll, torch.nn.functional.cross_entropy(logits[0], x[0], reduction="none"), atol=1e-5)


def test_the_entropy_model_is_frozen_and_stays_in_eval_mode():
    m = build("blt-debug", dropout=0.1).train()
    assert m.training and not m.entropy_model.training
    assert all(not p.requires_grad for p in m.entropy_model.parameters())
    assert m.num_params() == sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_flops_per_byte_matches_the_flop_counter_with_entropy_patches(mlp):
    m = build("blt-debug", mlp=mlp).train()
    for T in (256, 1024):
        x = torch.randint(0, 256, (1, T))
        theta, size = patching.calibrate_threshold(list(m.entropies(x)), m.config.patch_size)
        m.theta.fill_(theta)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m.nll(x).sum().backward()
        m.zero_grad(set_to_none=True)
        assert m.flops_per_byte(T) == pytest.approx(counter.get_total_flops() / T, rel=0.10), (T, size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blt_runs_in_low_precision_without_nan(dtype):
    m = build("blt-debug").to(dtype).train()
    x = real_bytes(128).view(2, 64)
    m.nll(x).sum().backward()
    assert bool(torch.isfinite(m.nll(x)).all())


def test_static_patch_blt_learns_real_text_and_decodes():
    torch.manual_seed(0)
    m = build("blt-fixed-debug")
    x = real_bytes(4 * 128).view(4, 128)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = m.nll(x).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.6 * first
    out = generate(m, x[:1, :16], 20, temperature=0)
    assert out.shape == (1, 36)


def test_small_blt_is_about_ten_million_parameters_without_its_hash_tables():
    m = build("blt-small")
    assert 9.5e6 < m.num_params() - m.num_params("hash") < 11.5e6
    assert m.num_params("hash") == 6 * 4096 * 256


@pytest.mark.parametrize("prompt_len", [0, 30])
def test_windowed_entropy_transformer_cached_logits_equal_the_reference_past_its_window(prompt_len):
    m = build("blt-entropy-debug").double().eval()
    assert m.config.window == 16
    x = real_bytes(2 * prompt_len + 2)[: 2 * prompt_len].view(2, prompt_len)
    cached_equals_reference(m, x, 30)
    # the window really limits what a position sees: a byte 16 positions back no longer matters
    y = real_bytes(40).view(1, 40)
    z = y.clone()
    z[0, 5] = (z[0, 5] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(m(y)[0, 21], m(z)[0, 21]) and torch.allclose(m(y)[0, 22], m(z)[0, 22], atol=1e-12)


# -- where users see it: entropy model -> calibrate -> BLT -> sample and picture, through the CLI


LAST_ONLY = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"save_last": True}}])


@pytest.fixture(scope="module")
def blt_run(tmp_path_factory):
    from mmbytes.cli import main, run_cli

    tmp = tmp_path_factory.mktemp("blt")

    def fit(name: str, size: str, *extra: str, steps: int = 3, validate: Path | None = None):
        if validate is not None:  # a checkpoint validated from the command line instead
            return run_cli(["validate", "--ckpt_path", str(validate), *args(name, size, steps), *extra])
        main(["fit", *args(name, size, steps), *extra])
        return max((tmp / "runs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))  # this run's

    def args(name: str, size: str, steps: int) -> list[str]:
        return ["--config", str(SAMPLES.parent / "recipes" / "quickstart.yaml"),
                "--data.sources", f"[{SAMPLES}]", "--data.data_dir", str(tmp / "shards"), "--data.seq_len", "256",
                "--data.num_workers", "0", "--data.train_batches_per_epoch", "3", "--model.size", size,
                "--model.overrides", "{}", "--trainer.max_steps", str(steps), "--trainer.callbacks", LAST_ONLY,
                "--trainer.logger.init_args.save_dir", str(tmp / "runs"), "--trainer.logger.init_args.name", name,
                "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]

    entropy = fit("entropy", "blt-entropy-debug") / "checkpoints" / "last.ckpt"
    main(["calibrate", "--ckpt", str(entropy), "--data", str(tmp / "shards"), "--windows", "16", "--seq-len", "256",
          "--patch-size", "3", "--out", str(tmp / "calibrated")])
    version = fit("blt", "blt-debug", "--model.entropy_ckpt", str(tmp / "calibrated" / "entropy.ckpt"))
    return tmp, version, fit


def test_calibrate_stores_per_modality_thresholds_with_the_entropy_model(blt_run):
    tmp, _, _ = blt_run
    report = json.loads((tmp / "calibrated" / "calibration.json").read_text())
    assert set(report["modalities"]) == {"text", "image", "audio", "raw"}  # the samples hold all four
    for r in report["modalities"].values():
        assert r["patch_size"] == pytest.approx(3, rel=0.1)
    ckpt = torch.load(tmp / "calibrated" / "entropy.ckpt", weights_only=True)
    assert ckpt["mmbytes"]["calibration"]["thresholds"] == {m: report["modalities"][m]["threshold"]
                                                            for m in MODALITIES}


def test_blt_trains_with_its_calibrated_entropy_model_and_logs_patch_sizes_per_modality(blt_run, tmp_path):
    tmp, version, fit = blt_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/bpb", "val/bpb", "val/bpb_text", "train/patch_size"} <= tags
    assert any(t.startswith("train/patch_size_") for t in tags)
    # the checkpoint carries the entropy model and the thresholds: it loads with the entropy file gone
    from mmbytes.checkpoint import load_model

    ckpt = version / "checkpoints" / "last.ckpt"
    (tmp / "calibrated" / "entropy.ckpt").rename(tmp_path / "moved.ckpt")
    try:
        model, _ = load_model(ckpt)
        cli = fit("blt", "blt-debug", "--model.entropy_ckpt", str(tmp / "calibrated" / "entropy.ckpt"),
                  validate=ckpt)  # Lightning takes the model arguments from the checkpoint's hyperparameters
    finally:
        (tmp_path / "moved.ckpt").rename(tmp / "calibrated" / "entropy.ckpt")
    assert "val/bpb" in cli.trainer.callback_metrics
    report = json.loads((tmp / "calibrated" / "calibration.json").read_text())
    assert model.theta.tolist() == pytest.approx([report["modalities"][m]["threshold"] for m in MODALITIES])
    trained = torch.load(tmp / "calibrated" / "entropy.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(model.entropy_model.head.weight, trained["model.head.weight"])  # frozen: unchanged


def test_blt_sample_and_patch_picture_commands(blt_run, tmp_path):
    from mmbytes.cli import main

    tmp, version, _ = blt_run
    main(["sample", "--ckpt", str(version / "checkpoints" / "last.ckpt"), "--modality", "text", "--num", "2",
          "--bytes", "40", "--out", str(tmp_path / "samples")])
    assert len(list((tmp_path / "samples").glob("text_*.txt"))) == 2
    files = [SAMPLES / "text" / "tinyshakespeare.txt", SAMPLES / "images" / "cifar10_cat_0000.jpg"]
    main(["patches", "--ckpt", str(tmp / "calibrated" / "entropy.ckpt"), *map(str, files), "--bytes", "80",
          "--out", str(tmp_path / "pictures")])
    from PIL import Image

    for f in files:
        assert Image.open(tmp_path / "pictures" / f"{f.name}.patches.png").size[0] > 500


def test_a_blt_run_resumes_from_its_checkpoint_with_its_entropy_model(blt_run):
    tmp, version, fit = blt_run
    last = version / "checkpoints" / "last.ckpt"
    resumed = fit("blt", "blt-debug", "--model.entropy_ckpt", str(tmp / "calibrated" / "entropy.ckpt"),
                  "--ckpt_path", str(last), steps=5)
    assert resumed != version
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_links_planted_in_the_out_folder_of_calibrate_and_patches_are_replaced_not_written_through(blt_run, tmp_path):
    from mmbytes.cli import main

    tmp, _, _ = blt_run
    victim = tmp_path / "victim.txt"
    victim.write_text("a file outside --out\n")
    out = tmp_path / "out"
    out.mkdir()
    text = sorted((SAMPLES / "text").glob("*.txt"))[0]
    planted = [out / "calibration.json", out / "entropy.ckpt", out / f"{text.name}.patches.png"]
    for link in planted:
        link.symlink_to(victim)
    main(["calibrate", "--ckpt", str(tmp / "calibrated" / "entropy.ckpt"), "--data", str(tmp / "shards"),
          "--windows", "4", "--seq-len", "256", "--patch-size", "3", "--out", str(out)])
    main(["patches", "--ckpt", str(tmp / "calibrated" / "entropy.ckpt"), str(text), "--out", str(out)])
    assert victim.read_text() == "a file outside --out\n"
    written = [p for p in out.iterdir() if p.is_file()]
    assert {p.name for p in planted} <= {p.name for p in written}
    assert not any(p.is_symlink() for p in out.iterdir())
