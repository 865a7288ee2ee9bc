"""The model protocol (``mmbytes.model.protocol``): every architecture answers it, prepares itself for its data, and
the callers read its capabilities; and the defects found with it, each checked where it was."""

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_script import load_bench

from mmbytes.codecs import MODALITIES
from mmbytes.model import build
from mmbytes.model.protocol import ByteModel, Capabilities, ModelData

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # real files shipped for the tests (tests/data/MANIFEST.md)
TEXT = (ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()
EVERY = ["debug", "debug-long", "transformer-debug", "spacebyte-debug", "spacebyte-fixed-debug", "blt-debug",
         "blt-fixed-debug", "blt-nohash-debug", "blt-entropy-debug", "bpe-debug"]


@pytest.mark.parametrize("name", EVERY)
def test_every_architecture_answers_the_protocol_and_takes_a_modality_everywhere(name):
    m = build(name).eval()
    assert isinstance(m, ByteModel) and isinstance(m.capabilities, Capabilities)
    x = torch.tensor(list(TEXT[:96])).view(2, 48)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 40:] = False
    modality = torch.tensor([MODALITIES.index("text"), MODALITIES.index("raw")])
    with torch.no_grad():
        nats = m.nll(x, mask, modality=modality)
        logits = m(x, modality=modality)
    assert nats.shape == x.shape and bool((nats[1, 40:] == 0).all())
    assert logits.shape[-1] == 256 if m.capabilities.byte_logits else logits.shape[-1] == m.config.vocab_size
    if m.capabilities.cached:
        cache = m.new_cache(2, 60, modality=modality)
        assert m.prefill(x[:, :5], cache).shape == (2, 256)
    assert m.train_flops(x, mask, modality=modality) > 0 and m.flops_per_byte(48) > 0
    starts = m.patch_starts(x, mask, modality=modality)
    assert starts is None or (starts.shape == x.shape and bool(starts[:, 0].all()))
    assert isinstance(m.requires(), dict) and isinstance(m.caveats(), list)


def test_spacebyte_takes_its_global_cap_from_the_training_window():
    m = build("spacebyte-debug")  # context 64: a cap of 11 global positions
    m.prepare(ModelData(seq_len=1024))
    assert m.config.context == 1024 and m.config.max_global == math.ceil(1024 / 6)
    x = torch.tensor(list(TEXT[:2048])).view(2, 1024)  # prose: fewer word starts than the cap
    G = int(m.patch_starts(x).sum(1).max())
    assert 11 < G <= m.config.max_global  # the cap of the window, not of the named size's context


def test_strided_inference_is_a_capability_of_megabyte_only():
    assert build("debug").capabilities.strided and not build("transformer-debug").capabilities.strided
    assert not any(build(n).capabilities.strided for n in ("spacebyte-debug", "blt-fixed-debug", "bpe-debug"))


def test_bpe_tokenizer_is_made_by_the_main_process_and_shared():
    from mmbytes.model.bpe_tokenizer import train_tokenizer

    made = train_tokenizer([TEXT[:50_000]], 300)

    def never():
        raise AssertionError("only the main process reads the training samples")

    m = build("bpe-debug")
    m.prepare(ModelData(seq_len=128, train_samples=never, is_main=False, share=lambda obj: made))
    assert m.tokenizer.json == made[0] and m.bytes_per_token == made[1]
    shared = []
    main = build("bpe-debug")
    main.prepare(ModelData(seq_len=128, train_samples=lambda: [TEXT[:50_000]], share=lambda o: shared.append(o) or o,
                           options={"tokenizer_bytes": 50_000}))
    assert main.trained_tokenizer and len(shared) == 1 and shared[0][0] == main.tokenizer.json


def test_blt_calibrates_its_thresholds_per_modality_on_windows_drawn_across_the_split():
    from mmbytes.entropy import draw_windows

    png = sorted((DATA / "images" / "icons_gnome48").rglob("*.png"))[:40]
    items = [(np.frombuffer(TEXT[i : i + 20_000], dtype=np.uint8), {"modality": "text"})
             for i in range(0, 400_000, 20_000)]
    items += [(np.frombuffer(p.read_bytes(), dtype=np.uint8), {"modality": "raw"}) for p in png]
    x, mask, modality = draw_windows(items, 256, 64, seed=0)
    text, raw = MODALITIES.index("text"), MODALITIES.index("raw")
    assert int((modality == text).sum()) == 256 and int((modality == raw).sum()) == 256
    starts = {bytes(r[:8].tolist()) for r in x[modality == text]}
    assert len(starts) > 240  # windows from all over the text, not the first consecutive ones
    m = build("blt-debug")
    m.prepare(ModelData(seq_len=64, draw_windows=lambda n, seq_len, seed: draw_windows(items, n, seq_len, seed)))
    assert m.calibrated and float(m.theta[text]) != float(m.theta[raw])
    for i in (text, raw):
        rows = modality == i
        s = m.patch_starts(x[rows], mask[rows], modality=modality[rows])
        assert int(mask[rows].sum()) / int((s & mask[rows]).sum()) == pytest.approx(4.5, rel=0.1)


def test_blt_without_an_entropy_checkpoint_is_warned_about_at_construction():
    from mmbytes.lit import ByteLM

    with pytest.warns(UserWarning, match="no trained entropy model"):
        lm = ByteLM(size="blt-debug")
    assert lm.model.requires() == {"entropy_ckpt": "blt-entropy-debug"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ByteLM(size="blt-fixed-debug")  # fixed patches need no entropy model


# -- the BLT n-gram hash


@pytest.mark.parametrize("rows", [4096, 100_000, 500_002, 1_000_002])
def test_blt_hash_ids_of_real_text_spread_like_a_random_hash(rows):
    from mmbytes.model.blt_layers import ngram_ids

    x = torch.tensor(list(TEXT[:300_000]))[None]
    (ids,) = ngram_ids(x, (3,), rows)
    grams = x[0, :-2] * 65536 + x[0, 1:-1] * 256 + x[0, 2:]
    first = {}
    for g, i in zip(grams.tolist(), ids[0, 2:].tolist(), strict=True):
        first.setdefault(g, i)
    n = len(first)
    expected = rows * (1 - (1 - 1 / rows) ** n)  # distinct ids of n distinct 3-grams under a random hash
    assert len(set(first.values())) == pytest.approx(expected, rel=0.03), (n, expected)


def test_a_blt_config_stored_without_a_hash_version_keeps_its_old_ids():
    from mmbytes.model.blt_layers import ngram_ids
    from mmbytes.model.registry import config_from_dict, config_to_dict

    stored = config_to_dict(build("blt-debug").config)
    del stored["hash_version"]
    old = config_from_dict(stored)
    assert old.hash_version == 1 and build("blt-debug").config.hash_version == 2
    x = torch.tensor(list(TEXT[:200]))[None]
    (mine,) = ngram_ids(x, (3,), old.hash_vocab, old.hash_version)
    hand = torch.zeros(200, dtype=torch.long)  # the rolling hash reduced directly (version 1)
    for t in range(200):
        acc = sum((int(x[0, t - age]) + 1) * pow(1_000_003, age, 2**31 - 1) for age in range(3) if t - age >= 0)
        hand[t] = acc % (2**31 - 1) % old.hash_vocab
    assert torch.equal(mine[0], hand)


# -- defects found in the same review


def test_windowed_attention_applies_its_dropout_in_training():
    from mmbytes.model.layers import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2, dropout=0.5, window=4)
    x = torch.randn(1, 12, 16)
    cos, sin = torch.ones(12, 8), torch.zeros(12, 8)
    attn.train()
    assert not torch.allclose(attn(x, cos, sin), attn(x, cos, sin))  # two dropout masks
    attn.eval()
    assert torch.equal(attn(x, cos, sin), attn(x, cos, sin))


def test_every_test_file_a_source_cites_exists():
    cited = {m for p in (ROOT / "mmbytes").rglob("*.py") for m in re.findall(r"tests/\w+\.py", p.read_text())}
    assert cited and all((ROOT / c).exists() for c in cited), sorted(c for c in cited if not (ROOT / c).exists())


def test_word_starts_refuses_a_model_without_per_byte_losses(tmp_path):
    word_starts = load_bench("word_starts")
    assert not build("bpe-debug").capabilities.per_byte_nll
    with pytest.raises(SystemExit, match="not a byte's own loss"):
        word_starts.measure(tmp_path / "bpe.ckpt", str(tmp_path), 64, 1, model=build("bpe-debug"))


def test_compare_scores_blt_with_each_modality_s_own_thresholds():
    from mmbytes.compare import byte_bpd
    from mmbytes.metrics import BitsPerByte

    m = build("blt-debug").eval()
    m.theta.fill_(9.0)  # raw: one patch per window
    m.theta[MODALITIES.index("image")] = -1.0  # image: a patch at every byte
    png = (ROOT / "samples" / "images" / "icon_places_user-home.png").read_bytes()
    items = [(np.frombuffer(png[:512], dtype=np.uint8), {"modality": "image"})]
    x = torch.tensor(list(png[:512])).view(2, 256)
    with torch.no_grad():
        nats = m.nll(x, modality=torch.full((2,), MODALITIES.index("image"))).sum(1)
    metric = BitsPerByte()
    metric.update(nats, torch.full((2,), 256), torch.full((2,), MODALITIES.index("image")))
    assert byte_bpd(m, items, 256, 2, "image") == pytest.approx(metric.compute()["bpd_image"].item(), rel=1e-6)


def test_each_set_of_a_mixed_datamodule_draws_from_its_own_seed(tmp_path):
    from datamodules import MixedDataModule

    text = {"data_dir": str(tmp_path / "txt"), "sources": [str(ROOT / "samples" / "text")], "codec": "text"}
    dm = MixedDataModule([text, text], seq_len=256, batch_size=2)
    dm.prepare_data()
    first, second = ([w.tobytes() for (w, _), _ in zip(c.train_windows(), range(4), strict=False)] for c in dm.children)
    assert [len(w) for w in first] == [256] * 4 and first != second


@pytest.mark.slow
def test_on_mixed_data_bpe_trains_its_tokenizer_and_blt_calibrates_per_modality_at_fit(tmp_path):
    import lightning as L

    from datamodules import MixedDataModule
    from mmbytes.callbacks import FlopBudget
    from mmbytes.lit import ByteLM

    sets = [{"data_dir": str(tmp_path / "txt"), "sources": [str(ROOT / "samples" / "text")], "codec": "text"},
            {"data_dir": str(tmp_path / "img"), "sources": [str(ROOT / "samples" / "images")], "codec": "image",
             "codec_options": {"size": 16, "tile": 4}, "val_fraction": 0.3}]
    for size in ("bpe-debug", "blt-debug"):
        dm = MixedDataModule(sets, seq_len=128, batch_size=2, train_batches_per_epoch=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = ByteLM(size=size, tokenizer_bytes=200_000)
        counter = FlopBudget()
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, limit_val_batches=0, callbacks=[counter]).fit(lm, dm)
        assert counter.flops > 0 and counter.mean_patch > 1
        if size == "bpe-debug":
            assert lm.model.trained_tokenizer
        else:
            theta = lm.model.theta
            assert theta[MODALITIES.index("text")] != theta[MODALITIES.index("image")]
