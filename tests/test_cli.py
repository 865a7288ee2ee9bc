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
        assert "patch_size" not in s and "patch_size" not in data  # the CLI sets it from the model


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "mixed.yaml", "cifar10.yaml", "spacebyte.yaml"])
def test_the_cli_sets_data_patch_size_from_the_model_s_window_alignment(recipe, tmp_path, monkeypatch):
    from mmbytes.model.registry import config_from_name

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["--config", str(ROOT / "recipes" / recipe)], run=False)
    init = cli.config.model.init_args
    align = config_from_name(init.size, init.preset, **dict(init.overrides or {})).window_alignment
    assert cli.datamodule.hparams.patch_size == align
    children = getattr(cli.datamodule, "children", [cli.datamodule])  # a MixedDataModule's sets take it too
    assert all(c.hparams.patch_size == align for c in children)


def test_a_data_patch_size_other_than_the_model_s_is_refused_naming_both(tmp_path, monkeypatch):
    from mmbytes.errors import OptionError

    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "quickstart.yaml"
    with pytest.raises(OptionError, match=r"^--data.patch_size 5: the model debug aligns windows to 8 bytes"):
        run_cli(["--config", str(recipe), "--data.patch_size", "5"], run=False)
    cli = run_cli(["--config", str(recipe), "--data.patch_size", "8"], run=False)  # the same value is fine
    assert cli.datamodule.hparams.patch_size == 8


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


def small_fit(tmp: Path, save_dir: str, *extra: str) -> list[str]:
    """A 6-step fit on the real Shakespeare text (3 batches per epoch, validated and sampled at each epoch end) with
    the quickstart's kinds of callbacks: ModelCheckpoint on val/bpb with last.ckpt, and text, image and audio
    sample writers."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/bpb", "save_last": True, "save_top_k": -1, "filename": "{step}"}},
        {"class_path": "mmbytes.callbacks.SampleWriter",
         "init_args": {"modality": "text", "num": 2, "num_bytes": 24, "prompt": "ROMEO:", "temperature": 0.8}},
        {"class_path": "mmbytes.callbacks.SampleWriter",
         "init_args": {"modality": "image", "num": 2, "meta": {"height": 4, "width": 4, "channels": 3,
                                                               "order": "patch", "tile": 2}}},
        {"class_path": "mmbytes.callbacks.SampleWriter",
         "init_args": {"modality": "audio", "num": 2, "num_bytes": 32, "meta": {"sample_rate": 8000}}},
    ]
    return ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--data.sources", json.dumps([str(ROOT / "samples" / "text")]), "--data.codec", "text",
            "--data.codec_options", "{}", "--data.data_dir", str(tmp / "shards"), "--data.seq_len", "64",
            "--data.batch_size", "2", "--data.num_workers", "0", "--data.train_batches_per_epoch", "3",
            "--data.shuffle_buffer", "16", "--model.size", "debug", "--model.overrides", "{}",
            "--model.warmup_steps", "2", "--trainer.max_steps", "6", "--trainer.limit_val_batches", "2",
            "--trainer.logger.init_args.save_dir", str(tmp / save_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1", "--trainer.callbacks", json.dumps(callbacks), *extra]


def test_ckpt_path_last_resumes_the_newest_run_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """Resumed with ``--ckpt_path last`` from a checkpoint written at an epoch's end (after its validation and with
    sample writers) and from one inside an epoch, training reaches the uninterrupted run's weights bit for bit."""
    import shutil

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inside = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # a checkpoint inside epoch 1 too
                  "init_args": {"every_n_train_steps": 4, "dirpath": str(tmp_path / "inside"), "filename": "{step}",
                                "save_top_k": -1}}
        main(small_fit(tmp_path, "whole", "--trainer.callbacks+", json.dumps(inside)))
        folder = tmp_path / "whole" / "quickstart" / "version_0" / "checkpoints"
        whole = torch.load(folder / "last.ckpt", weights_only=True)
        assert whole["global_step"] == 6 and (folder.parent / "samples" / "step_3" / "image_sheet.png").exists()
        # the end of epoch 0 (written after its validation and before its samples), and inside epoch 1
        for step, start in ((3, folder / "step=3.ckpt"), (4, tmp_path / "inside" / "step=4.ckpt")):
            cut = tmp_path / f"cut_{step}" / "quickstart"
            for version in (9, 10, 11):  # older runs, the newest with a last.ckpt, and one without
                (cut / f"version_{version}" / "checkpoints").mkdir(parents=True)
                if version < 11:
                    shutil.copy(start, cut / f"version_{version}" / "checkpoints" / "last.ckpt")
            assert torch.load(start, weights_only=True)["global_step"] == step
            capsys.readouterr()
            main(small_fit(tmp_path, f"cut_{step}", "--ckpt_path", "last"))
            chosen = cut / "version_10" / "checkpoints" / "last.ckpt"
            assert f"--ckpt_path last: {chosen}" in capsys.readouterr().err
            resumed = torch.load(cut / "version_12" / "checkpoints" / "last.ckpt", weights_only=True)
            assert resumed["global_step"] == 6
            torch.testing.assert_close(resumed["state_dict"], whole["state_dict"], rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_ckpt_path_last_without_an_earlier_run_is_refused_naming_where_it_looked(tmp_path):
    from mmbytes.errors import OptionError

    with pytest.raises(OptionError, match=r"no last.ckpt in .*nothing/quickstart/version_\*/checkpoints/last.ckpt"):
        run_cli(small_fit(tmp_path, "nothing", "--ckpt_path", "last"), run=True)


def test_abbreviated_options_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(small_fit(tmp_path, "runs", "--trainer.max_step", "10"))
    assert "unrecognized arguments: --trainer.max_step 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", "x.ckpt", "--out", str(tmp_path), "--mod", "text"])
    assert "unrecognized arguments: --mod text" in capsys.readouterr().err


def one_line_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args, friendly=True)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmbytes: error:")]
    assert stop.value.code == 1 and len(err) == 1
    return err[0]


def test_an_unknown_model_size_is_one_line_naming_the_sizes(tmp_path, capsys):
    line = one_line_error(small_fit(tmp_path, "runs", "--model.size", "smal"), capsys)
    assert "unknown model size 'smal'; known: debug" in line and "small" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_unavailable_accelerator_is_one_line_naming_those_available(tmp_path, capsys):
    line = one_line_error(small_fit(tmp_path, "runs", "--trainer.accelerator", "cuda"), capsys)
    assert "--trainer.accelerator cuda: no such device on this machine" in line and "available here: auto, cpu" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_sample_on_cuda_without_cuda_says_so_before_reading_the_checkpoint(tmp_path, capsys):
    line = one_line_error(["sample", "--ckpt", str(tmp_path / "none.ckpt"), "--device", "cuda", "--out",
                           str(tmp_path / "out")], capsys)
    assert "--device cuda: CUDA is not available on this machine" in line and "none.ckpt" not in line


def test_threads_default_to_half_the_cpus_and_follow_the_flag(monkeypatch):
    import os

    from mmbytes.cli import default_threads, set_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_threads() == 8
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert set_threads(["fit", "--threads", "3", "--config", "x"], from_sys=False) == ["fit", "--config", "x"]
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
        set_threads(["fit"], from_sys=False)  # OMP_NUM_THREADS set: left as it is
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_fit_checkpoints_hold_the_data_description(run):
    tmp, _ = run
    ckpt = torch.load(tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    modalities = ckpt["data_description"]["modalities"]
    assert modalities["audio"] == {"codec": "audio", "sample_rate": 8000, "sample_width": 2}
    assert modalities["image"] == {"codec": "image", "height": 48, "width": 48, "channels": 3, "order": "patch",
                                   "tile": 4}
    assert set(modalities) == {"image", "audio", "text", "raw"}


def test_samples_are_written_after_the_checkpoint_of_their_step(run):
    tmp, _ = run
    version = tmp / "runs" / "quickstart" / "version_0"
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)
    written = (version / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    step = version / "samples" / f"step_{ckpt['global_step']}"
    assert min(p.stat().st_mtime_ns for p in step.iterdir()) >= written


def test_sample_decodes_audio_of_a_mixed_recipe_at_its_set_rate(run, tmp_path):
    """A MixedDataModule's audio set at 8 kHz (recipes/mixed.yaml): ``mmbytes sample`` writes 8 kHz WAVs, also from a
    checkpoint that holds no data description (then derived from the datamodule's sets)."""
    import soundfile as sf
    import yaml

    tmp, _ = run
    ckpt = torch.load(tmp / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    mixed = yaml.safe_load((ROOT / "recipes" / "mixed.yaml").read_text())["data"]["init_args"]
    rates = [s["codec_options"]["sample_rate"] for s in mixed["sets"] if s.get("codec") == "audio"]
    assert rates == [8000]
    ckpt.pop("data_description", None)
    ckpt["datamodule_hyper_parameters"] = {**mixed, "sets": [{**s, "data_dir": str(tmp_path / "none")}
                                                             for s in mixed["sets"]]}
    torch.save(ckpt, tmp_path / "mixed.ckpt")
    main(["sample", "--ckpt", str(tmp_path / "mixed.ckpt"), "--modality", "audio", "--num", "1", "--seconds",
          "0.01", "--out", str(tmp_path / "out")])
    info = sf.info(next((tmp_path / "out").glob("audio_*.wav")))
    assert info.samplerate == 8000 and info.frames == 80
