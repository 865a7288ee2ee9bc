"""Several processes on CPU (gloo): DDP trains and validates, and its figures equal one process's on the same weights
and data; validation windows are shared out exactly once with equal batch counts; FSDP2; shards from URL patterns."""

import json
import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules import ByteDataModule
from datamodules.bytes import val_batches
from mmbytes.codecs import MODALITIES
from mmbytes.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 512, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Every sample file, in ~120 KB shards: 2 validation shards (not a multiple of 4 processes) holding 385 windows
    of 512 bytes, so that 4 ranks x 3 workers get unequal shares that padding evens out."""
    out = tmp_path_factory.mktemp("dist") / "shards"
    # one audio clip, one raw file, two pictures and the Shakespeare's tail in validation (files by a content hash,
    # the long text contiguously)
    write_shards([ROOT / "samples"], out, "auto", {"audio": {"sample_rate": 8000}},
                 val_fraction={"raw": 0.4, "audio": 0.2, "default": 0.155}, max_shard_bytes=120_000, progress=False,
                 shuffle_seed=None, split="contiguous")  # path order: the shard counts above
    return out


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(shards: Path, out: Path, strategy: str, workers: int) -> list[dict]:
    """tests/ddp_script.py on 2 processes started together, as torchrun or srun would (Lightning sees LOCAL_RANK
    and joins them instead of spawning); each rank's report."""
    out.mkdir()
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_script.py"), "--shards", str(shards), "--out", str(out),
           "--strategy", strategy, "--workers", str(workers), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH)]
    common = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    procs = [subprocess.Popen(cmd, cwd=out, env={**common, "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errors = [p.communicate(timeout=400)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()  # a no-op for a process that has finished; ends the other rank if one failed and left it waiting
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def one_process_figures(ckpt: Path, shards: Path) -> dict[str, float]:
    """val/* of the checkpoint's weights, scored by hand in this process (plain model, no Lightning)."""
    from mmbytes.checkpoint import load_model

    model, _ = load_model(ckpt)
    nats = torch.zeros(len(MODALITIES), dtype=torch.float64)
    count = torch.zeros_like(nats)
    with torch.no_grad():
        for b in ByteDataModule(data_dir=str(shards), seq_len=SEQ_LEN, batch_size=BATCH).val_dataloader():
            nats.index_add_(0, b["modality"], model.nll(b["x"], b["mask"], modality=b["modality"]).sum(1).double())
            count.index_add_(0, b["modality"], b["mask"].sum(1).double())
    out = {"val/bpb": (nats.sum() / count.sum() / math.log(2)).item()}
    for i, m in enumerate(MODALITIES):
        if count[i] > 0:
            out[f"val/bpb_{m}"] = (nats[i] / count[i] / math.log(2)).item()
            if m == "image":
                out["val/bpd_image"] = out["val/bpb_image"]
            if m == "audio":
                out["val/bits_per_sample_audio"] = 2 * out["val/bpb_audio"]
    return out


def check_like_one_process(ranks: list[dict], out: Path, shards: Path) -> None:
    assert [r["steps"] for r in ranks] == [3, 3]  # both trained every step, nothing hung
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"]  # ranks stay in step
    assert all(r["val_bytes"] > 0 for r in ranks)
    assert sum(r["val_bytes"] for r in ranks) == manifest(shards)["splits"]["val"]["bytes"]  # each byte once
    expect = one_process_figures(out / "final.ckpt", shards)
    assert {"val/bpb_text", "val/bpd_image", "val/bpb_audio", "val/bits_per_sample_audio"} <= set(expect)
    for r in ranks:
        assert set(r["figures"]) == set(expect)
        for k, v in expect.items():
            assert r["figures"][k] == pytest.approx(v, rel=1e-6, abs=0), k


def test_ddp_two_processes_train_and_validate_like_one(shards, tmp_path):
    assert len(manifest(shards)["splits"]["val"]["shards"]) % 4 != 0
    ranks = launch(shards, tmp_path / "ddp", "ddp", workers=2)
    check_like_one_process(ranks, tmp_path / "ddp", shards)


def test_fsdp2_on_cpu_trains_and_validates_like_one(shards, tmp_path):
    ranks = launch(shards, tmp_path / "fsdp", "fsdp", workers=0)
    assert all(r["sharded"] for r in ranks)  # parameters are DTensor shards, so this really is FSDP
    check_like_one_process(ranks, tmp_path / "fsdp", shards)


def real_windows(batch: dict) -> list[tuple[bytes, int]]:
    return [(bytes(x[m].tolist()), int(mod)) for x, m, mod in zip(batch["x"], batch["mask"], batch["modality"],
                                                                  strict=True) if m.any()]


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2), (3, 2), (4, 3)])
def test_validation_windows_are_shared_once_and_ranks_run_equal_batches(shards, monkeypatch, world, workers):
    dm = ByteDataModule(data_dir=str(shards), seq_len=SEQ_LEN, batch_size=BATCH)
    windows = list(dm.val_windows())
    seen, per_rank, padding = Counter(), [], 0
    for rank in range(world):
        n = 0
        for worker in range(workers):  # what each DataLoader worker of each rank yields
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", str(workers))
            for b in val_batches(iter(windows), SEQ_LEN, BATCH, rank=rank, world=world):
                n += 1
                got = real_windows(b)
                padding += not got
                seen.update(got)
        per_rank.append(n)
    assert seen == Counter((bytes(w.tolist()), m) for w, m in windows)  # every window once, none dropped
    assert len(set(per_rank)) == 1, per_rank
    if (world, workers) == (4, 3):
        assert padding > 0  # 12 shares of the windows in batches of 8: some ranks are padded


def test_shards_from_brace_patterns_file_and_pipe_urls(shards):
    m = manifest(shards)
    ntrain, nval = len(m["splits"]["train"]["shards"]), len(m["splits"]["val"]["shards"])
    dm = ByteDataModule(data_dir=str(shards / "unused"), seq_len=SEQ_LEN, batch_size=BATCH,
                        train_batches_per_epoch=2,
                        train_shards=f"file://{shards}/train-{{000000..{ntrain - 1:06d}}}.tar",
                        val_shards=f"pipe:cat {shards}/val-{{000000..{nval - 1:06d}}}.tar")  # as `aws s3 cp URL -`
    assert sum(int(b["mask"].sum()) for b in dm.val_dataloader()) == m["splits"]["val"]["bytes"]
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["x"].shape == (BATCH, SEQ_LEN)
