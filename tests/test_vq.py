"""VQ baselines: quantizer, VQ-VAE shapes, prior cache, rate and residual figures by hand, `mmbytes compare` end to
end on tiny models trained here on the shipped samples."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbytes.cli import main, run_cli
from mmbytes.metrics import PER_DIM_NAME
from mmbytes.vq import VQVAE, CodePrior, VectorQuantizer
from mmbytes.vq import measures as M
from mmbytes.vq.lit import code_nats
from mmbytes.vq.quantizer import usage_and_perplexity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only waits for the first."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def quantizer(codes, decay=0.5, threshold=0.0, commitment=0.25):
    q = VectorQuantizer(len(codes), 2, decay=decay, commitment=commitment, dead_threshold=threshold, eps=0.0)
    q.embedding.copy_(torch.tensor(codes))
    q.embed_avg.copy_(q.embedding)
    q.initialized.fill_(True)
    return q.train()


def test_ema_update_moves_each_code_to_the_decayed_mean_of_its_vectors():
    q = quantizer([[0.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0], [9.0, 9.0]])
    _, idx, _, counts = q(z)
    assert idx.tolist() == [0, 0, 1] and counts.tolist() == [2, 1]
    # by hand, decay 0.5 from count 1 at the old vector: (0.5 * e + 0.5 * sum) / (0.5 * 1 + 0.5 * n)
    torch.testing.assert_close(q.embedding[0], torch.tensor([0.5 * 1.0, 0.5 * 3.0]) / 1.5)
    torch.testing.assert_close(q.embedding[1], torch.tensor([5.0 + 4.5, 5.0 + 4.5]) / 1.0)
    before = q.embedding.clone()
    for _ in range(20):
        q(z)
    assert (q.embedding[0] - torch.tensor([0.5, 1.5])).norm() < (before[0] - torch.tensor([0.5, 1.5])).norm() < 1
    torch.testing.assert_close(q.embedding[1], torch.tensor([9.0, 9.0]), atol=1e-4, rtol=0)
    q.eval()
    q(z)  # evaluation leaves the codebook alone
    torch.testing.assert_close(q.embedding[1], torch.tensor([9.0, 9.0]), atol=1e-4, rtol=0)


def test_a_dead_code_restarts_at_an_encoder_output():
    q = quantizer([[0.0, 0.0], [100.0, -100.0]], decay=0.5, threshold=0.3)
    z = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, 0.5]])
    q(z)  # code 1 unused: count 1 -> 0.5
    assert q.restarts == 0
    q(z)  # 0.25 < 0.3: restarted
    assert q.restarts == 1
    assert torch.cdist(q.embedding[1:], z).min() < 1e-2
    _, idx, _, _ = q(z)
    assert 1 in idx.tolist()  # the restarted code is in use again


def test_straight_through_gradient_and_commitment_loss():
    q = quantizer([[0.0, 0.0], [4.0, 4.0]], commitment=0.25).eval()
    z = torch.tensor([[0.5, -0.5], [3.0, 5.0]], requires_grad=True)
    out, idx, commit, _ = q(z)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, 0.0], [4.0, 4.0]]))  # the codes themselves
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (out * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # passes straight through to the encoder
    assert commit.item() == pytest.approx(0.25 * (0.25 + 0.25 + 1 + 1) / 4)


def test_usage_and_perplexity():
    assert usage_and_perplexity(torch.tensor([2.0, 2.0, 0.0, 0.0])) == pytest.approx((0.5, 2.0))
    assert usage_and_perplexity(torch.ones(8)) == pytest.approx((1.0, 8.0))
    assert usage_and_perplexity(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx((1 / 3, 1.0))


@pytest.mark.parametrize("f", [4, 8])
def test_vqvae_shapes(f):
    img = VQVAE("image", channels=3, hidden=8, n_res=1, downsample=f, codebook_size=16, code_dim=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, idx, commit, counts = img(x)
    assert recon.shape == x.shape and idx.shape == (2, 32 // f, 32 // f) and counts.sum() == idx.numel()
    assert torch.equal(img.eval().encode(x), img(x)[1]) and img.decode(idx).shape == x.shape
    aud = VQVAE("audio", channels=1, hidden=8, n_res=1, downsample=f, codebook_size=16, code_dim=4)
    y = torch.rand(2, 1, 400) * 2 - 1
    recon, idx, _, _ = aud(y)
    assert recon.shape == y.shape and idx.shape == (2, 400 // f)
    with pytest.raises(ValueError, match="multiple of the downsampling"):
        aud(torch.zeros(1, 1, 401))
    with pytest.raises(ValueError, match="channels"):
        img(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="power of two"):
        VQVAE("image", downsample=3)


def test_prior_cached_sampling_equals_uncached_logits():
    p = CodePrior(codebook_size=16, d=16, n_layer=2, n_head=2).double()
    seen = {}
    g = torch.Generator().manual_seed(3)
    codes = p.generate(3, 12, temperature=1.0, generator=g, on_logits=lambda n, x: seen.__setitem__(n, x))
    full = p(codes)  # (3, 12, 16), teacher-forced on the sampled codes
    assert sorted(seen) == list(range(12))
    for n, logits in seen.items():
        torch.testing.assert_close(logits, full[:, n], atol=1e-10, rtol=0)
    again = p.generate(3, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(codes, again) and not torch.equal(codes[0], codes[1])


def test_bits_per_dimension_by_hand():
    """``code_nats`` is what `mmbytes compare` scores the codes with."""
    p = CodePrior(codebook_size=512, d=16, n_layer=1, n_head=2)
    codes = torch.randint(0, 512, (2, 64))  # two 8x8 grids for 32x32x3 images
    with torch.no_grad():  # in windows of 10 codes: 6 of 10 and one of 4, each scored on its own
        by_hand = sum(p.nll(codes[:, s : s + 10]).sum().item() for s in range(0, 64, 10))
    assert code_nats(p, codes, context=10) == pytest.approx(by_hand, rel=1e-6)
    assert code_nats(p, codes) == pytest.approx(p.nll(codes).sum().item(), rel=1e-6)
    torch.nn.init.zeros_(p.head.weight)  # uniform over 512 codes: 9 bits per code
    assert M.bits_per_dim(code_nats(p, codes), 2 * 32 * 32 * 3) == pytest.approx(64 * 9 / 3072, rel=1e-5)
    assert M.bits_per_dim(100 * math.log(2), 50) == pytest.approx(2.0)  # nats -> bits, per dimension
    with pytest.raises(ValueError):
        M.bits_per_dim(1.0, 0)


def test_residual_coding_cost_far_in_the_laplace_tail_is_computed_in_log_space():
    # residual 120 at scale 3: mass 0.5 exp(-119.5 / 3) (1 - exp(-1 / 3)), about 60.3 bits (not the 996.6 bits of a
    # probability rounded to zero); the same in the negative tail, and at the range's end (the tail beyond folded in)
    hand = -(math.log(0.5) - 119.5 / 3 + math.log1p(-math.exp(-1 / 3))) / math.log(2)
    for r in (120, -120):
        bits = M.residual_bits(torch.tensor([r]), torch.tensor([-255]), torch.tensor([255]), scale=3.0) - 32
        assert bits == pytest.approx(hand, rel=1e-9) and 60.2 < bits < 60.4
    end = M.residual_bits(torch.tensor([120]), torch.tensor([-255]), torch.tensor([120]), scale=3.0) - 32
    assert end == pytest.approx(-(math.log(0.5) - 119.5 / 3) / math.log(2), rel=1e-9)


def test_residual_coding_cost_by_hand():
    F = lambda x, b: 0.5 * math.exp(x / b) if x < 0 else 1 - 0.5 * math.exp(-x / b)  # noqa: E731  Laplace CDF
    r = torch.tensor([0, 1, -2])
    bits = M.residual_bits(r, torch.full((3,), -10), torch.full((3,), 10), scale=1.0)
    hand = -sum(math.log2(F(v + 0.5, 1.0) - F(v - 0.5, 1.0)) for v in (0, 1, -2)) + 32
    assert bits == pytest.approx(hand, rel=1e-9)
    # the end values take the tails: the probabilities over the range sum to one
    values = torch.arange(-3, 4)
    total = sum(2 ** -(M.residual_bits(v[None], torch.tensor([-3]), torch.tensor([3]), scale=2.0) - 32)
                for v in values)
    assert total == pytest.approx(1.0, rel=1e-9)
    edge = M.residual_bits(torch.tensor([3]), torch.tensor([-3]), torch.tensor([3]), scale=2.0) - 32
    assert edge == pytest.approx(-math.log2(1 - F(2.5, 2.0)), rel=1e-9)
    # fitted scale = mean |r|; a perfect reconstruction costs only the scale
    assert M.laplace_scale(torch.tensor([2, -4, 0])) == pytest.approx(2.0)
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert M.image_residual_bits(img, img) == pytest.approx(32, abs=1e-6)
    worse = img.clone()
    worse[0, 0, 0] ^= 1
    assert M.image_residual_bits(img, worse) > 32
    with pytest.raises(ValueError, match="outside"):
        M.residual_bits(torch.tensor([5]), torch.tensor([0]), torch.tensor([3]))


def fit(recipe: str, tmp: Path, *extra: str) -> Path:
    save = tmp / "runs"
    main(["fit", "--config", str(ROOT / "recipes" / recipe), "--data.num_workers", "0",
          "--trainer.logger.init_args.save_dir", str(save), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1", *extra])
    name = {"quickstart.yaml": "quickstart"}.get(recipe, Path(recipe).stem)
    return save / name / "version_0" / "checkpoints" / "last.ckpt"


SETUPS = {
    "image": {"sources": ROOT / "samples" / "images", "codec": "image",
              "options": {"size": 16, "channels": 3, "order": "patch", "tile": 4}, "seq_len": 768,
              "vq": ["--model.downsample", "4"], "prior": [], "compare": [], "val_fraction": "0.3"},
    "audio": {"sources": ROOT / "samples" / "audio", "codec": "audio", "options": {"sample_rate": 8000},
              "seq_len": 1600, "vq": ["--data.crop", "800", "--model.downsample", "8"],
              "prior": ["--data.crop", "800", "--model.context", "100"], "compare": ["--seconds", "0.05"],
              "val_fraction": "0.75"},  # the split is a hash of each sample: one of the 5 clips hashes below 0.75
}


@pytest.fixture(scope="module", params=["image", "audio"])
def compared(request, tmp_path_factory):
    """Tiny byte model, VQ-VAE and prior trained a few steps on the same shards, then `mmbytes compare`."""
    modality, s = request.param, SETUPS[request.param]
    tmp = tmp_path_factory.mktemp(f"compare_{modality}")
    data = tmp / "shards"
    common = ["--data.sources", json.dumps([str(s["sources"])]), "--data.data_dir", str(data),
              "--data.codec", s["codec"], "--data.codec_options", json.dumps(s["options"]),
              "--data.val_fraction", s["val_fraction"], "--data.batch_size", "4", "--data.train_batches_per_epoch", "4",
              "--trainer.max_steps", "4"]
    byte_args = [*common, "--data.seq_len", str(s["seq_len"]), "--model.size", "debug", "--model.overrides", "{}",
                 "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                     "init_args": {"save_last": True}}])]
    byte_ckpt = fit("quickstart.yaml", tmp, *byte_args)
    small = ["--model.codebook_size", "32"]
    vq_ckpt = fit(f"vq_{'cifar10' if modality == 'image' else 'audio'}.yaml", tmp, *common, *small, *s["vq"],
                  "--model.hidden", "16", "--model.code_dim", "8", "--model.n_res", "1", "--model.lr", "3e-3",
                  "--model.warmup_steps", "1")
    prior_recipe = f"vq_prior_{'cifar10' if modality == 'image' else 'audio'}.yaml"
    prior_args = [*common, *small, *s["prior"], "--model.vq_ckpt", str(vq_ckpt), "--model.d", "32",
                  "--model.n_layer", "1", "--model.n_head", "2", "--model.warmup_steps", "1"]
    prior_ckpt = fit(prior_recipe, tmp, *prior_args)
    out = tmp / "out"
    main(["compare", "--byte-ckpt", str(byte_ckpt), "--vq-ckpt", str(vq_ckpt), "--prior-ckpt", str(prior_ckpt),
          "--data", str(data), "--out", str(out), "--num", "3", "--byte-samples", "2", *s["compare"]])
    return {"modality": modality, "out": out, "data": data, "byte": (byte_ckpt, byte_args),
            "prior": (prior_ckpt, prior_recipe, prior_args)}


def test_compare_writes_report_plot_and_samples(compared):
    out, modality = compared["out"], compared["modality"]
    for name in ("report.md", "report.csv", "rate_distortion.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    from PIL import Image

    assert Image.open(out / "rate_distortion.png").size == (720, 480)
    assert Image.open(out / "samples.png").size[1] > 4 * 16  # four labelled rows
    if modality == "audio":
        import soundfile as sf

        for stem in ("original", "vq_recon", "vq_sample", "byte_sample"):
            info = sf.info(out / f"{stem}_000.wav")
            assert info.samplerate == 8000 and info.subtype == "PCM_16"
        assert sf.info(out / "vq_sample_000.wav").frames == 400  # 0.05 s
    md = (out / "report.md").read_text()
    assert "VQ + residual (lossless)" in md and "byte model" in md


def test_compare_figures_are_consistent(compared):
    rows = {r["system"]: r for r in csv.DictReader(open(compared["out"] / "report.csv"))}
    byte, vq, total = rows["byte model"], rows["VQ (lossy)"], rows["VQ + residual (lossless)"]
    assert (byte["kind"], vq["kind"], total["kind"]) == ("lossless", "lossy", "lossless")
    assert float(byte["mse"]) == 0 and float(total["mse"]) == 0 and float(vq["mse"]) > 0
    for r in rows.values():
        assert float(r["bits_per_dim"]) > 0 and int(r["dims"]) > 0
    assert 0 < float(byte["bits_per_dim"]) < 17  # an untrained-ish model: about 8 bits per byte
    assert float(total["bits_per_dim"]) == pytest.approx(float(vq["code_bits_per_dim"]) +
                                                         float(total["residual_bits_per_dim"]), rel=1e-5)
    assert float(total["bits_per_dim"]) > float(vq["bits_per_dim"])
    # codes: at most log2(32) bits per code, spread over the dimensions of an item
    per_code_dims = {"image": 4 * 4 * 3, "audio": 8}[compared["modality"]]
    assert float(vq["bits_per_dim"]) <= 5 / per_code_dims * 1.05
    if compared["modality"] == "image":
        assert math.isinf(float(byte["psnr_db"])) and float(byte["ssim"]) == 1
        assert 0 < float(vq["psnr_db"]) < 60 and -1 <= float(vq["ssim"]) <= 1
    else:
        assert math.isinf(float(byte["snr_db"])) and math.isfinite(float(vq["si_snr_db"]))
    assert 0 < float(vq["codebook_usage"]) <= 1 and 1 <= float(vq["code_perplexity"]) <= 32


def test_compare_uses_the_same_validation_files_as_validation(compared, tmp_path, monkeypatch):
    """The byte model's bpd and the prior's rate in the report equal what `mmbytes validate` logs for each."""
    monkeypatch.chdir(tmp_path)  # validation writes its config.yaml into the working folder
    rows = {r["system"]: r for r in csv.DictReader(open(compared["out"] / "report.csv"))}
    m = compared["modality"]
    ckpt, args = compared["byte"]
    cli = run_cli(["validate", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--data.num_workers", "0",
                   *args, "--trainer.logger", "false", "--trainer.callbacks", "[]", "--ckpt_path", str(ckpt)])
    per_dim = PER_DIM_NAME[m]  # val/bpd_image, val/bits_per_sample_audio
    assert cli.trainer.callback_metrics[f"val/{per_dim}"].item() == pytest.approx(
        float(rows["byte model"]["bits_per_dim"]), rel=1e-4)
    ckpt, recipe, args = compared["prior"]
    cli = run_cli(["validate", "--config", str(ROOT / "recipes" / recipe), "--data.num_workers", "0", *args,
                   "--trainer.logger", "false", "--trainer.callbacks", "[]", "--ckpt_path", str(ckpt)])
    # images whole both ways; audio in the prior's 0.1 s crops both ways
    assert cli.trainer.callback_metrics[f"val/{per_dim}"].item() == pytest.approx(
        float(rows["VQ (lossy)"]["bits_per_dim"]), rel=1e-4)


def test_compare_refuses_a_wrong_checkpoint_naming_it(compared, tmp_path):
    ckpt = compared["byte"][0]
    with pytest.raises(ValueError, match=str(ckpt)):
        main(["compare", "--byte-ckpt", str(ckpt), "--vq-ckpt", str(ckpt), "--prior-ckpt", str(ckpt),
              "--data", str(compared["data"]), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_vq_datamodule_gives_back_the_original_samples(compared):
    """Images: patch-order shard bytes decode to the shipped files' pixels. Audio: validation crops cover every
    validation sample exactly once, padding masked."""
    from datamodules.vq import VQDataModule

    data = compared["data"]
    if compared["modality"] == "image":
        from mmbytes.codecs.image import ImageCodec

        batch = next(iter(VQDataModule(data_dir=str(data), modality="image", batch_size=64).val_dataloader()))["x"]
        pixels = M.to_pixels(batch).numpy().transpose(0, 2, 3, 1)  # (B, H, W, C)
        codec = ImageCodec(size=16, order="patch", tile=4)
        originals = [codec.pixels(p) for p in sorted((ROOT / "samples" / "images").iterdir())]
        assert len(pixels) == json.loads((data / "manifest.json").read_text())["splits"]["val"]["samples"]
        for p in pixels:  # every validation image is one of the shipped files, pixel for pixel
            assert any(np.array_equal(p, o) for o in originals)
    else:
        dm = VQDataModule(data_dir=str(data), modality="audio", crop=700, batch_size=2)
        batches = list(dm.val_dataloader())
        real = sum(b["mask"].sum().item() for b in batches)
        assert real == json.loads((data / "manifest.json").read_text())["splits"]["val"]["bytes"] // 2
        assert all((b["x"][~b["mask"]] == 0).all() for b in batches) and batches[0]["x"].shape[1:] == (1, 700)
        train = next(iter(dm.train_dataloader()))
        assert train["x"].shape == (2, 1, 700) and train["x"].abs().max() <= 1
