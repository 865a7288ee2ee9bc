"""Faults: non-finite losses, crashes while saving, checkpoints of another model, SIGKILL and resume, hostile names."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds

from datamodules import ByteDataModule
from datamodules.bytes import EpochLoader, rotated_shards, shard_samples
from mmbytes.checkpoint import AtomicCheckpointIO, ConfigMismatchError, atomic_save, load_model
from mmbytes.lit import ByteLM, NonFiniteLossError
from mmbytes.model.megabyte_config import MegabyteConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    """Shards of the real Shakespeare text in samples/."""
    out = tmp_path_factory.mktemp("faults") / "shards"
    ByteDataModule(data_dir=str(out), sources=[str(SAMPLES / "text")], codec="text").prepare_data()
    return out


def datamodule(shards: Path, batches: int = 20) -> ByteDataModule:
    return ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, num_workers=0, shuffle_buffer=16,
                          train_batches_per_epoch=batches)


def trainer(tmp: Path, steps: int, **kw) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp, **kw)


class Watch(L.Callback):
    """The weights before and after every training step."""

    def __init__(self) -> None:
        self.steps = []

    @staticmethod
    def weights(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._before = self.weights(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append((self._before, self.weights(module), outputs))


def poison(module: ByteLM, bad_calls: set[int]) -> None:
    """The model's loss becomes NaN on the given training calls (0-based)."""
    real, calls = module.model.nll, {"n": 0}

    def nll(x, mask=None, *, modality=None):
        out = real(x, mask, modality=modality)
        if module.training:
            calls["n"] += 1
            if calls["n"] - 1 in bad_calls:
                return out * float("nan")
        return out

    module.model.nll = nll


def test_nonfinite_loss_skips_the_step_and_counts_it(text_shards, tmp_path):
    module = ByteLM(size="debug", warmup_steps=1, max_bad_steps=3)
    poison(module, {2, 4, 5})
    watch = Watch()
    t = trainer(tmp_path, 8, callbacks=[watch])
    t.fit(module, datamodule=datamodule(text_shards))
    assert len(watch.steps) == 8 and module.skipped_steps == 3
    for i, (before, after, out) in enumerate(watch.steps):
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (i in {2, 4, 5}), i  # skipped steps leave every weight as it was; the others move it
        assert (not out) == same  # Lightning passes {} for a step whose training_step gave None
        assert all(torch.isfinite(v).all() for v in after.values())
    assert t.callback_metrics["train/skipped_steps"].item() == 3
    assert module.bad_in_row == 0  # reset by the good steps after them


def test_nonfinite_losses_in_a_row_stop_training_with_a_clear_error(text_shards, tmp_path):
    module = ByteLM(size="debug", warmup_steps=1, max_bad_steps=4)
    poison(module, set(range(3, 100)))
    watch = Watch()
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite in 4 steps in a row \(max_bad_steps=4"):
        trainer(tmp_path, 20, callbacks=[watch]).fit(module, datamodule=datamodule(text_shards))
    assert len(watch.steps) == 3 + 3  # three good steps, three skipped; the fourth bad one raised
    last_good = watch.steps[2][1]
    final = Watch.weights(module)
    assert all(torch.equal(last_good[k], final[k]) for k in final)  # no NaN reached the weights


def poison_gradients(module: ByteLM, bad_calls: set[int]) -> None:
    """The gradient of the first weight becomes non-finite on the given backward passes (0-based); the loss stays
    finite."""
    weight, calls = next(module.model.parameters()), {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] - 1 in bad_calls else grad

    weight.register_hook(hook)


def test_nonfinite_gradients_of_a_finite_loss_skip_the_step_and_count_it(text_shards, tmp_path):
    module = ByteLM(size="debug", warmup_steps=1, max_bad_steps=3)
    poison_gradients(module, {1, 4})
    watch = Watch()
    t = trainer(tmp_path, 6, callbacks=[watch], gradient_clip_val=1.0)  # clipping would spread the NaN everywhere
    t.fit(module, datamodule=datamodule(text_shards))
    assert len(watch.steps) == 6 and module.skipped_steps == 2
    for i, (before, after, _) in enumerate(watch.steps):
        assert all(torch.equal(before[k], after[k]) for k in before) == (i in {1, 4}), i
        assert all(torch.isfinite(v).all() for v in after.values())
    assert module.bad_in_row == 0


def test_nonfinite_gradients_in_a_row_stop_training_with_a_clear_error(text_shards, tmp_path):
    module = ByteLM(size="debug", warmup_steps=1, max_bad_steps=3)
    poison_gradients(module, set(range(2, 100)))
    watch = Watch()
    with pytest.raises(NonFiniteLossError, match=r"loss or its gradients were NaN or infinite in 3 steps in a row"):
        trainer(tmp_path, 20, callbacks=[watch]).fit(module, datamodule=datamodule(text_shards))
    final = Watch.weights(module)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert all(torch.equal(watch.steps[1][1][k], final[k]) for k in final)  # unchanged since the last good step


def test_the_skip_decision_is_the_one_all_ranks_agree_on(text_shards, tmp_path, monkeypatch):
    """Another rank's NaN makes this rank skip too (the reduced flag decides, not the local loss)."""
    module = ByteLM(size="debug", warmup_steps=1)
    t = trainer(tmp_path, 4)
    calls = []

    def reduce(decision, all=True):
        calls.append(decision)
        return decision and len(calls) != 3  # "another rank" had a NaN loss on the second step

    monkeypatch.setattr(t.strategy, "reduce_boolean_decision", reduce)
    t.fit(module, datamodule=datamodule(text_shards))
    # per step: the loss decision, then the gradients' (none after a skipped loss)
    assert calls == [True] * 7 and module.skipped_steps == 1


@pytest.fixture(scope="module")
def saved(text_shards, tmp_path_factory) -> Path:
    """A checkpoint of a debug model with patch_size=8, d_local=24 after two steps, written by the atomic IO."""
    tmp = tmp_path_factory.mktemp("saved")
    module = ByteLM(size="debug", overrides={"patch_size": 8, "d_local": 24})
    t = trainer(tmp, 2, plugins=[AtomicCheckpointIO()])
    t.fit(module, datamodule=datamodule(text_shards))
    t.save_checkpoint(tmp / "model.ckpt")
    return tmp / "model.ckpt"


def test_a_crash_while_saving_leaves_the_old_checkpoint_whole(saved, tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(saved.read_bytes())
    old = torch.load(path, weights_only=True)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):  # writes half of the file, then the disk "fills up"
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    new = {**old, "global_step": 999, "state_dict": {k: v + 1 for k, v in old["state_dict"].items()}}
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint(new, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    back = torch.load(path, weights_only=True)
    assert back["global_step"] == old["global_step"]
    torch.testing.assert_close(back["state_dict"], old["state_dict"])
    atomic_save(new, path)  # and a save that completes replaces it
    assert torch.load(path, weights_only=True)["global_step"] == 999 and os.listdir(tmp_path) == ["last.ckpt"]


def test_the_cli_writes_checkpoints_atomically(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.precision import Precision

    from mmbytes.cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(["--config", str(ROOT / "recipes" / "quickstart.yaml")], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    cli = run_cli(["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.plugins",
                   "lightning.pytorch.plugins.precision.Precision"], run=False)  # other plugins keep it too
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert type(cli.trainer.precision_plugin) is Precision


MISMATCH = r"checkpoint has patch_size=8, d_local=24; this run has patch_size=4, d_local=32"


def test_a_checkpoint_of_another_config_is_refused_by_name(saved, text_shards, tmp_path):
    debug = MegabyteConfig.from_name("debug")
    with pytest.raises(ConfigMismatchError, match=MISMATCH):
        load_model(saved, expect=debug)
    model, _ = load_model(saved, expect=MegabyteConfig.from_name("debug", patch_size=8, d_local=24))
    assert model.config.patch_size == 8
    # resuming training: refused before any tensor meets the model
    with pytest.raises(ConfigMismatchError, match=MISMATCH):
        trainer(tmp_path, 4).fit(ByteLM(size="debug"), datamodule=datamodule(text_shards), ckpt_path=saved)
    with pytest.raises(ConfigMismatchError, match=MISMATCH):
        ByteLM.load_from_checkpoint(saved, overrides={})
    # runtime options may change
    ByteLM.load_from_checkpoint(saved, overrides={"patch_size": 8, "d_local": 24, "checkpointing": True})


@pytest.mark.parametrize("device, dtype", [("meta", None), ("cpu", torch.float64), ("meta", torch.bfloat16)])
def test_load_model_puts_the_parameters_on_the_requested_device_and_dtype(saved, device, dtype):
    model, _ = load_model(saved, map_location=device, dtype=dtype)
    stored = torch.load(saved, weights_only=True)["state_dict"]["model.head.weight"].dtype
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device, dtype or stored)}
    assert not model.training


def test_the_cli_refuses_to_resume_another_config(saved, text_shards, tmp_path, monkeypatch):
    from mmbytes.cli import run_cli

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--data.data_dir", str(text_shards), "--data.seq_len", "64", "--trainer.max_steps", "3",
            "--trainer.logger", "false", "--ckpt_path", str(saved)]
    with pytest.raises(ConfigMismatchError, match=MISMATCH):
        run_cli([*args, "--model.overrides", '{"d_global": 16}'])
    cli = run_cli(args)  # no architecture asked for: it comes from the checkpoint, and training goes on
    assert cli.model.config.patch_size == 8 and cli.trainer.global_step == 3


PAUSE = '''
import os, time
from pathlib import Path
import lightning as L

class PauseAt(L.Callback):
    """Stops the run at a step (after its update, before its checkpoint) so the test can SIGKILL it there."""
    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(300)
'''


def fit_command(tmp: Path, shards: Path, name: str, pause: int | None = None, resume: bool = False) -> list[str]:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp / name), "every_n_train_steps": 1, "save_last": True}}]
    if pause is not None:
        callbacks.append({"class_path": "pause.PauseAt", "init_args": {"step": pause, "marker": str(tmp / "paused")}})
    config = {
        "seed_everything": 0,
        "model": {"init_args": {"size": "debug", "warmup_steps": 3, "lr": 3e-3}},
        "data": {"init_args": {"data_dir": str(shards), "seq_len": 64, "batch_size": 2, "num_workers": 0,
                               "shuffle_buffer": 16, "train_batches_per_epoch": 5}},
        "trainer": {"max_steps": 12, "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp / name), "callbacks": callbacks},
    }
    (tmp / f"{name}.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "mmbytes.cli", "fit", "--config", str(tmp / f"{name}.json")]
    return cmd + (["--ckpt_path", "last"] if resume else [])


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(text_shards, tmp_path, monkeypatch):
    (tmp_path / "pause.py").write_text(PAUSE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    # killed at step 7 of 12 (epoch 1 of five-batch epochs, batch 2): its last checkpoint is step 6, mid-epoch
    killed = subprocess.Popen(fit_command(tmp_path, text_shards, "killed", pause=7), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "paused").exists():
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL
    at_kill = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert at_kill["global_step"] == 6
    assert at_kill["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]

    # the resumed run and the uninterrupted one run in this process (saving two interpreter starts), on one thread
    # like the killed one so that every float sum is done in the same order
    from mmbytes.cli import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(fit_command(tmp_path, text_shards, "killed", resume=True)[3:])
        main(fit_command(tmp_path, text_shards, "whole")[3:])
    finally:
        torch.set_num_threads(threads)

    resumed = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 12
    assert not torch.equal(at_kill["state_dict"]["model.head.weight"], whole["state_dict"]["model.head.weight"])
    torch.testing.assert_close(resumed["state_dict"], whole["state_dict"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer_states"], whole["optimizer_states"], rtol=0, atol=0)
    assert resumed["lr_schedulers"] == whole["lr_schedulers"]
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.slow
def test_resuming_at_epoch_boundaries_and_mid_epoch_gives_the_same_weights(text_shards, tmp_path, monkeypatch):
    from mmbytes.cli import main

    monkeypatch.chdir(tmp_path)
    for name, keep in (("whole", -1), ("res", 1)):
        fit_command(tmp_path, text_shards, name)
        config = json.loads((tmp_path / f"{name}.json").read_text())
        config["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = keep
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    main(["fit", "--config", str(tmp_path / "whole.json")])
    whole = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    for step in (5, 10, 3):  # the end of epochs 0 and 1, and inside epoch 0
        start = next((tmp_path / "whole").glob(f"*step={step}.ckpt"))
        main(["fit", "--config", str(tmp_path / "res.json"), "--ckpt_path", str(start)])
        resumed = torch.load(tmp_path / "res" / "last.ckpt", weights_only=True)
        assert resumed["global_step"] == 12
        torch.testing.assert_close(resumed["state_dict"], whole["state_dict"], rtol=0, atol=0)


def test_training_windows_differ_by_epoch_and_repeat_by_seed(text_shards):
    loader = datamodule(text_shards, batches=3).train_dataloader()
    first = [b["x"] for b in loader]
    loader.set_epoch(1)
    second = [b["x"] for b in loader]
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    again = datamodule(text_shards, batches=3).train_dataloader()
    again.set_epoch(1)
    assert all(torch.equal(a["x"], b) for a, b in zip(again, second, strict=True))
    # resumed after one batch of epoch 1: the remaining two, the same as the uninterrupted epoch's
    resumed = datamodule(text_shards, batches=3).train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches": 1})
    assert [b["x"].tolist() for b in resumed] == [b.tolist() for b in second[1:]]
    assert resumed.state_dict() == {"epoch": 1, "batches": 3}


def test_each_epoch_is_fixed_by_the_seed_and_the_epoch(text_shards):
    """Epoch 2 is the same whether the loader went through epochs 0 and 1 or started there."""
    loader = datamodule(text_shards, batches=3).train_dataloader()
    for epoch in range(3):
        loader.set_epoch(epoch)
        went = [b["x"] for b in loader]
    direct = datamodule(text_shards, batches=3).train_dataloader()
    direct.set_epoch(2)
    assert all(torch.equal(a["x"], b) for a, b in zip(direct, went, strict=True))


def test_a_resume_replays_at_most_the_current_epoch(text_shards):
    """Resumed at batch 3 of epoch 5 (4 batches per epoch), the loader draws 4 batches, not 5 x 4 + 4."""
    dm = datamodule(text_shards, batches=4)
    drawn = {"n": 0}

    def count(batches):
        for batch in batches:
            drawn["n"] += 1
            yield batch

    def counted(epoch: int) -> wds.DataPipeline:
        return wds.DataPipeline(dm.train_pipeline(epoch), count)

    whole = EpochLoader(dm.train_pipeline, 4)
    whole.set_epoch(5)
    last = [b["x"] for b in whole][-1]
    resumed = EpochLoader(counted, 4)
    resumed.load_state_dict({"epoch": 5, "batches": 3})
    rest = [b["x"] for b in resumed]
    assert len(rest) == 1 and torch.equal(rest[0], last)  # the same batch as the uninterrupted epoch's
    assert drawn["n"] == 4 and resumed.replayed == 3


def test_each_epoch_starts_its_first_shard_at_a_random_sample_and_reads_it_whole(text_shards):
    url = str(text_shards / "train-000000.tar")
    order = [s["__key__"] for s in wds.tarfile_to_samples()(iter([{"url": url}]))]
    assert shard_samples(url) == len(order) > 10
    starts = set()
    for epoch in range(8):
        got = [s["__key__"] for s in rotated_shards(iter([{"url": url}]), seed=f"0/epoch{epoch}")]
        k = order.index(got[0])
        assert got == order[k:] + order[:k]  # every sample once, from a sample on and round to it
        starts.add(k)
    assert len(starts) > 1


# ---- output containment


def outside_files(root: Path, inside: Path) -> set[Path]:
    return {p for p in root.rglob("*") if inside not in p.parents and p != inside}


def test_hostile_source_names_stay_inside_out(tmp_path):
    from mmbytes.shards import write_shards

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "..x.txt").write_text("dots\n")
    with tarfile.open(work / "evil.tar", "w") as tar:  # members that would escape if anything extracted them
        for name in ("../../escape.txt", "/tmp/mmbytes_abs_escape.txt", "a/../../../up.txt"):
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    outside = tmp_path / "outside.txt"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".manifest.json.partial").symlink_to(outside)  # a link left where the manifest is staged
    before = outside_files(tmp_path, tmp_path / "out")
    # relative paths with "..", absolute paths and a tar are all read as sources, never followed for writing
    sources = [str(work / ".." / "b" / "..x.txt"), str((work / "evil.tar").resolve()), str(SAMPLES / "text")]
    m = write_shards(sources, tmp_path / "out" / ".." / "out", codec="auto", progress=False)
    assert m["files"] == 3
    assert outside_files(tmp_path, tmp_path / "out") == before and not outside.exists()
    assert not Path("/tmp/mmbytes_abs_escape.txt").exists()
    # the datamodule reads the shards (tar members included) without writing anything
    dm = ByteDataModule(data_dir=str(tmp_path / "out"), seq_len=64, batch_size=2, train_batches_per_epoch=2)
    assert len(list(dm.train_dataloader())) == 2 and list(dm.val_dataloader())
    assert outside_files(tmp_path, tmp_path / "out") == before


def test_a_shard_with_hostile_member_names_is_only_read(tmp_path, text_bytes):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-000000.tar", "w") as tar:
        meta = json.dumps({"modality": "text", "nbytes": 200}).encode()
        for name, data in (("../../../evil.bin", text_bytes[:200]), ("../../../evil.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (shards / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": ["train-000000.tar"]},
                                                                 "val": {"shards": ["../../elsewhere.tar"]}}}))
    before = set(tmp_path.rglob("*"))
    dm = ByteDataModule(data_dir=str(shards), seq_len=64, batch_size=2, train_batches_per_epoch=2)
    assert [b["x"].shape for b in dm.train_dataloader()] == [(2, 64)] * 2
    assert set(tmp_path.rglob("*")) == before
    with pytest.raises(ValueError, match="is not a file name inside"):  # a manifest points only into its folder
        dm.val_dataloader()


@pytest.mark.parametrize("stem", ["../up", "/tmp/abs", "a/b", ".."])
def test_sample_names_cannot_leave_the_output_folder(tmp_path, stem):
    from mmbytes.sample import write_samples

    with pytest.raises(ValueError, match="not a plain file name"):
        write_samples([b"hello"], "text", {}, tmp_path / "out", stem=stem)
    assert list(tmp_path.iterdir()) == []


def test_sample_command_with_a_hostile_prompt_name_writes_only_into_out(saved, tmp_path):
    from mmbytes.cli import main

    prompt = tmp_path / "p" / "..%2f..%2fevil"
    prompt.parent.mkdir()
    prompt.write_text("ROMEO:")
    before = outside_files(tmp_path, tmp_path / "out")
    main(["sample", "--ckpt", str(saved), "--modality", "text", "--num", "2", "--bytes", "8", "--prompt",
          str(prompt), "--out", str(tmp_path / "out")])
    assert outside_files(tmp_path, tmp_path / "out") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["text_000.txt", "text_001.txt"]


# ---- checkpoints that are damaged or hold a wrong inside: one line naming the file and the field, nothing built


def damaged_record(src: Path, dst: Path) -> str:
    """``src`` with one byte of one weight record changed after writing (the zip's CRC-32 no longer matches)."""
    import zipfile

    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40
    dst.write_bytes(bytes(data))
    return info.filename


def test_a_checkpoint_with_a_changed_weight_is_refused_by_its_crc(saved, tmp_path, capsys):
    from mmbytes.cli import main

    bad = tmp_path / "model.ckpt"
    record = damaged_record(saved, bad)
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--ckpt", str(bad), "--num", "1", "--bytes", "4", "--out", str(tmp_path / "out")],
             friendly=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1
    assert err[0].startswith(f"mmbytes: error: {bad}: damaged checkpoint: record {record} does not match its CRC-32")
    assert not (tmp_path / "out").exists()


def edited(saved: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(saved, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def set_config(**fields):
    def edit(ckpt):
        ckpt["mmbytes"]["config"].update(fields)
    return edit


WRONG_INSIDE = {
    "patch size edited": (set_config(patch_size=16),
                          r"state_dict tensor model\.\S+ has shape \([\d, ]+\), its config calls for \([\d, ]+\)"),
    "negative width": (set_config(d_local=-24), "config field d_local is -24; a model size is a whole number"),
    "huge config": (set_config(d_global=2**20, n_layer_global=4096),
                    r"its model config calls for more weights than its state_dict holds \(\d+ tensors\)"),
    "no state_dict": (lambda c: c.pop("state_dict"), r"no state_dict \(the weights\) in the checkpoint"),
    "text where a size goes": (set_config(patch_size="8"), "config field|not valid|does not describe a model"),
}


@pytest.mark.parametrize("case", sorted(WRONG_INSIDE))
def test_a_checkpoint_with_a_wrong_inside_is_refused_in_one_line_before_building(saved, tmp_path, capsys, case):
    import tracemalloc

    from mmbytes.cli import main

    edit, message = WRONG_INSIDE[case]
    bad = edited(saved, tmp_path / "model.ckpt", edit)
    started = time.time()
    tracemalloc.start()
    try:
        with pytest.raises(SystemExit) as stop:
            main(["sample", "--ckpt", str(bad), "--num", "1", "--bytes", "4", "--out", str(tmp_path / "out")],
                 friendly=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith(f"mmbytes: error: {bad}: ")
    assert re.search(message, err[0]), err[0]
    assert peak < 256 * 2**20 and time.time() - started < 30


class Payload:
    """Not a tensor or container: ``torch.load(weights_only=True)`` refuses to unpickle it."""


@pytest.mark.parametrize("command", ["sample", "fit"])
def test_a_pickle_payload_is_refused_by_weights_only_in_one_line(saved, text_shards, tmp_path, capsys, monkeypatch,
                                                                  command):
    from mmbytes.cli import main

    bad = edited(saved, tmp_path / "model.ckpt", lambda c: c.update(payload=Payload()))
    monkeypatch.chdir(tmp_path)
    args = (["sample", "--ckpt", str(bad), "--out", str(tmp_path / "out")] if command == "sample" else
            ["fit", "--data.data_dir", str(text_shards), "--data.seq_len", "64", "--trainer.max_steps", "3",
             "--trainer.logger", "false", "--ckpt_path", str(bad)])
    with pytest.raises(SystemExit) as stop:
        main(args, friendly=True)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert stop.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"mmbytes: error: {bad}: cannot load as a weights-only checkpoint")


@pytest.mark.parametrize("where", ["state_dict", "optimizer_states"])
def test_a_checkpoint_holding_nan_is_never_written_and_the_old_one_stays(saved, tmp_path, where):
    from mmbytes.errors import CheckpointError

    path = tmp_path / "last.ckpt"
    path.write_bytes(saved.read_bytes())
    ckpt = torch.load(saved, weights_only=True)
    if where == "state_dict":
        ckpt["state_dict"]["model.head.weight"][0, 0] = float("nan")
        named = "model.head.weight"
    else:
        state = ckpt["optimizer_states"][0]["state"]
        first = next(iter(state))
        state[first]["exp_avg"].view(-1)[0] = float("inf")
        named = f"optimizer_states[0].state.{first}.exp_avg"
    with pytest.raises(CheckpointError, match=f"not written: {re.escape(named)} holds NaN or infinite values"):
        AtomicCheckpointIO().save_checkpoint(ckpt, path)
    assert path.read_bytes() == saved.read_bytes() and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_second_run_writing_checkpoints_into_the_same_folder_is_refused(saved, tmp_path):
    from mmbytes.errors import CheckpointError

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")  # another run's lock_folder, as the kernel sees it
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        ckpt = torch.load(saved, weights_only=True)
        with pytest.raises(CheckpointError, match="another run is writing checkpoints into this folder"):
            AtomicCheckpointIO().save_checkpoint(ckpt, folder / "last.ckpt")
        assert os.listdir(folder) == []
    finally:
        holder.kill()
        holder.wait()
    AtomicCheckpointIO().save_checkpoint(ckpt, folder / "last.ckpt")  # the lock went with its process
    assert os.listdir(folder) == ["last.ckpt"]


PAUSE_IN_VALIDATION = '''
import os, time
from pathlib import Path
import lightning as L

class PauseInValidation(L.Callback):
    """Holds the run inside the validation after ``step`` so the test can signal it there."""
    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker
    def on_validation_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(300)
'''


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_run_signalled_mid_validation_resumes_from_last(text_shards, tmp_path, monkeypatch, sig):
    """SIGTERM or Ctrl-C to the process group while validation runs: the run stops with status 1 and no partial
    file, and ``--ckpt_path last`` then trains to the end with the weights of a run never stopped."""
    (tmp_path / "pause.py").write_text(PAUSE_IN_VALIDATION)
    for name in ("stopped", "whole"):
        fit_command(tmp_path, text_shards, name)
        config = json.loads((tmp_path / f"{name}.json").read_text())
        config["trainer"].update({"limit_val_batches": 2, "val_check_interval": 5, "num_sanity_val_steps": 0})
        if name == "stopped":
            config["trainer"]["callbacks"].append({"class_path": "pause.PauseInValidation",
                                                   "init_args": {"step": 10, "marker": str(tmp_path / "paused")}})
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "mmbytes.cli", "fit", "--config", str(tmp_path / "stopped.json")],
                           cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "paused").exists():
            assert run.poll() is None, run.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        os.killpg(run.pid, sig)
        assert run.wait(60) != 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert not [p for p in (tmp_path / "stopped").iterdir() if p.name.startswith(".")]

    from mmbytes.cli import main

    monkeypatch.chdir(tmp_path)
    config = json.loads((tmp_path / "stopped.json").read_text())
    config["trainer"]["callbacks"].pop()  # the resumed run is not held
    (tmp_path / "stopped.json").write_text(json.dumps(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["fit", "--config", str(tmp_path / "stopped.json"), "--ckpt_path", "last"])
        main(["fit", "--config", str(tmp_path / "whole.json")])
    finally:
        torch.set_num_threads(threads)
    resumed = torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)
    whole = torch.load(tmp_path / "whole" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 12
    torch.testing.assert_close(resumed["state_dict"], whole["state_dict"], rtol=0, atol=0)
