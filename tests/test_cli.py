"""The LightningCLI end to end on the shipped samples: fit, validate, test, predict, sample; every recipe parses."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmbytes.cli import main, run_cli
from mmbytes.lit import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses_and_builds(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the project
    cli = run_cli(["--config", str(recipe)], run=False)
    assert cli.model.model.num_params() > 0
    assert cli.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_image_tiles_fit_the_model_patches_in_every_recipe(recipe):
    """A recipe's image tile bytes are a multiple or a divisor of its P, and its data aligns image windows to P."""
    import yaml

    from mmbytes.model.registry import config_from_name

    r = yaml.safe_load(recipe.read_text())
    init = r["model"]["init_args"]
    if "size" not in init:
        pytest.skip("not a byte model")
    config = config_from_name(init["size"], **(init.get("overrides") or {}))
    if getattr(config, "patching", "fixed") != "fixed":
        pytest.skip("patches follow the bytes (SpaceByte's words, BLT's entropy), not fixed tiles")
    P = config.patch_size
    data = r["data"]["init_args"]
    for s in data.get("sets", [data]):
        options = s.get("codec_options") or {}
        image = options.get("image", {}) if s.get("codec") == "auto" else options
        if s.get("codec") not in ("image", "idx", "auto") or image.get("order", "patch") != "patch":
            continue
        tile = image.get("tile", 4) ** 2 * (1 if s["codec"] == "idx" else image.get("channels", 3))
        assert tile % P == 0 or P % tile == 0, f"{tile}-byte tiles, P = {P}"
        assert s.get("patch_size", data.get("patch_size", 1)) == P  # 1: the datamodule's default


@pytest.mark.parametrize("recipe,size", [("transformer.yaml", "transformer-small"),
                                         ("spacebyte.yaml", "spacebyte-small"),
                                         ("spacebyte_fixed.yaml", "spacebyte-fixed-small")])
def test_architecture_recipes_differ_from_text_only_in_the_model(recipe, size):
    def load(name):
        import yaml

        return yaml.safe_load((ROOT / "recipes" / name).read_text())

    text, other = load("text.yaml"), load(recipe)
    assert text["data"] == other["data"]
    assert {k: v for k, v in text["trainer"].items() if k != "logger"} == \
           {k: v for k, v in other["trainer"].items() if k != "logger"}
    assert (text["model"]["init_args"]["size"], other["model"]["init_args"]["size"]) == ("small", size)


def test_blt_recipes_train_on_the_same_shards():
    import yaml

    entropy, blt = (yaml.safe_load((ROOT / "recipes" / n).read_text()) for n in ("blt_entropy.yaml", "blt.yaml"))
    assert entropy["data"]["init_args"]["data_dir"] == blt["data"]["init_args"]["data_dir"]
    assert entropy["data"]["init_args"]["sources"] == blt["data"]["init_args"]["sources"]
    assert "entropy_ckpt" in blt["model"]["init_args"]


def test_the_cli_overrides_no_private_lightning_method():
    """Private methods of LightningCLI change between releases without notice; only public hooks are overridden."""
    from lightning.pytorch.cli import LightningCLI

    from mmbytes.cli import MmbytesCLI

    private = [n for n in vars(MmbytesCLI) if n.startswith("_") and not n.startswith("__") and hasattr(LightningCLI, n)]
    assert private == []


def test_warmup_then_cosine():
    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short quickstart run in a temporary folder."""
    tmp = tmp_path_factory.mktemp("run")
    args = ["--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--data.sources", json.dumps([str(ROOT / "samples")]), "--data.data_dir", str(tmp / "shards"),
            "--data.seq_len", "256", "--data.num_workers", "0", "--data.train_batches_per_epoch", "4",
            "--model.size", "debug", "--model.overrides", "{}",
            "--trainer.max_steps", "8", "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2"]
    main(["fit", *args])
    return tmp, args


def test_fit_logs_bits_per_byte_writes_checkpoints_and_samples(run):
    tmp, _ = run
    version = tmp / "runs" / "quickstart" / "version_0"
    ckpts = sorted((version / "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts)
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["hyper_parameters"]["size"] == "debug"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/bpb", "val/bpb", "val/bpb_text", "val/bpd_image", "val/bpb_audio", "val/bits_per_sample_audio"} \
        <= tags and "val/bpd_audio" not in tags
    val = events.Scalars("val/bpb")[-1].value
    assert 0 < val < 9
    # the sample callbacks wrote decodable files for every modality
    step_dirs = sorted((version / "samples").iterdir())
    assert step_dirs
    last = step_dirs[-1]
    assert len(list(last.glob("text_*.txt"))) == 2
    assert Image.open(next(last.glob("image_000.png"))).size == (32, 32)
    assert (last / "image_sheet.png").exists()
    import soundfile as sf

    info = sf.info(next(last.glob("audio_000.wav")))
    assert info.samplerate == 8000 and info.subtype == "PCM_16" and info.frames == 2000
    assert "samples/image" in events.Tags()["images"] and events.Tags()["audio"]


def test_validate_from_checkpoint_matches_a_hand_computation(run, tmp_path):
    tmp, args = run
    ckpt = tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    cli = run_cli(["validate", *args, "--ckpt_path", str(ckpt), "--model.strided_eval", "true",
                   "--trainer.callbacks", "[]"])
    figures = cli.trainer.callback_metrics
    assert {"val/bpb", "val/bpb_strided"} <= set(figures)
    # by hand: load the weights into a plain model and score the same validation windows
    from mmbytes.checkpoint import load_model

    model, _ = load_model(ckpt)
    nats = count = 0.0
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            nats += model.nll(batch["x"], batch["mask"]).sum().item()
            count += batch["mask"].sum().item()
    assert figures["val/bpb"].item() == pytest.approx(nats / count / math.log(2), rel=1e-4)


@pytest.mark.parametrize("given, rule", [("true", "paper"), ("paper", "paper"), ("later", "later")])
def test_validate_strided_eval_scores_with_the_chosen_rule(run, given, rule, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without a logger, validation writes its config.yaml into the working folder
    tmp, args = run
    ckpt = tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO"):
        cli = run_cli(["validate", *args, "--ckpt_path", str(ckpt), "--model.strided_eval", given,
                       "--trainer.callbacks", "[]", "--trainer.logger", "false"])
    assert cli.model.strided_rule == rule and f"rule {rule!r}" in caplog.text  # the rule used is logged
    from mmbytes.checkpoint import load_model

    model, _ = load_model(ckpt)
    nats = count = 0.0
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            nats += model.nll_strided(batch["x"], batch["mask"], rule=rule).sum().item()
            count += batch["mask"].sum().item()
    assert cli.trainer.callback_metrics["val/bpb_strided"].item() == pytest.approx(nats / count / math.log(2),
                                                                                   rel=1e-4)


def test_test_and_predict_subcommands(run):
    tmp, args = run
    ckpt = str(tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    cli = run_cli(["test", *args, "--ckpt_path", ckpt, "--trainer.callbacks", "[]"])
    assert "test/bpb" in cli.trainer.callback_metrics
    cli = run_cli(["predict", *args, "--ckpt_path", ckpt, "--trainer.callbacks", "[]"])
    assert cli.trainer.predict_loop.predictions[0]["bpb"].ndim == 1


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_sample_command_writes_valid_files(run, tmp_path, modality, capsys):
    tmp, _ = run
    ckpt = tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    extra = {"text": ["--bytes", "40", "--prompt", str(ROOT / "samples" / "files" /
                                                    "libpython3.11-stdlib_python3.11_this.py")],
             "image": ["--image-size", "16", "--prompt", str(ROOT / "samples" / "images" / "icon_devices_printer.png")],
             "audio": ["--seconds", "0.05"]}[modality]
    main(["sample", "--ckpt", str(ckpt), "--modality", modality, "--num", "2", "--out", str(out), *extra])
    files = sorted(out.iterdir())
    if modality == "image":
        assert [f.name for f in files] == ["image_000.png", "image_001.png", "image_sheet.png"]
        a, b = (Image.open(f) for f in files[:2])
        assert a.size == (16, 16)
        import numpy as np

        top = np.asarray(a)[:8]  # the prompt's top half is kept
        assert np.array_equal(top, np.asarray(b)[:8])
    elif modality == "audio":
        import soundfile as sf

        assert sf.info(files[0]).frames == 400 and sf.info(files[0]).samplerate == 8000
    else:
        prompt = (ROOT / "samples" / "files" / "libpython3.11-stdlib_python3.11_this.py").read_bytes()
        assert files[0].read_bytes()[: len(prompt)] == prompt
