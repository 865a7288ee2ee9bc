"""Data pipeline throughput per modality: shard writing, and the training datamodule, against training speed.

For each modality, real files from ``--data`` (the shared data folder) are written to shards (``--workers``
decoding processes), then the training loader of ``ByteDataModule`` is read for ``--batches`` batches. The
``small`` model's training speed is measured in the same process (forward + backward + AdamW at the same T), so the
table says how many times faster than training the pipeline feeds bytes.

    python bench/data_throughput.py --data ../shared/data --json bench/data_throughput.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from datamodules import ByteDataModule
from mmbytes.io import write_text
from mmbytes.model import build
from mmbytes.shards import write_shards
from mmbytes.stamp import stamp

SETS = {  # modality: (codec, sources under --data, codec options, files at most)
    "image": ("image", ["images/cifar10_train_subset"], {"size": 32, "order": "patch", "tile": 4}, 2000),
    "audio": ("audio", ["audio/fsdd"], {"sample_rate": 8000}, 1000),
    "text": ("text", ["text/tinyshakespeare.txt", "text/wikitext2_valid.txt"], {}, None),
    "raw": ("raw", ["files"], {}, None),
}


def files_of(root: Path, sources: list[str], limit: int | None) -> list[Path]:
    out = []
    for s in sources:
        p = root / s
        out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return out[:limit] if limit else out


def train_bytes_per_s(seq_len: int, steps: int = 3) -> float:
    model = build("small").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (1, seq_len))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        model.nll(x).mean().backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - start)
    return seq_len / min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="shard-writing processes and loader workers")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    train = train_bytes_per_s(args.seq_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for modality, (codec, sources, options, limit) in SETS.items():
            files = files_of(args.data, sources, limit)
            out = Path(tmp) / modality
            start = time.perf_counter()
            m = write_shards(files, out, codec, options, val_fraction=0.05, workers=args.workers, progress=False)
            write_s = time.perf_counter() - start
            dm = ByteDataModule(data_dir=str(out), seq_len=args.seq_len, batch_size=args.batch,
                                num_workers=args.workers, train_batches_per_epoch=args.batches)
            loader = dm.train_dataloader()
            start, real = time.perf_counter(), 0
            for batch in loader:
                real += int(batch["mask"].sum())
            load_s = time.perf_counter() - start
            rows.append({"modality": modality, "files": m["files"], "bytes": m["bytes"],
                         "write_samples_per_s": m["files"] / write_s, "write_bytes_per_s": m["bytes"] / write_s,
                         "load_batches_per_s": args.batches / load_s, "load_bytes_per_s": real / load_s,
                         "load_vs_train": real / load_s / train})
    print(f"T={args.seq_len} batch={args.batch} workers={args.workers}; "
          f"small MEGABYTE trains at {train:,.0f} bytes/s here")
    head = ("modality", "files", "write files/s", "write MB/s", "load MB/s", "load / train")
    print("{:9s} {:>7s} {:>14s} {:>11s} {:>10s} {:>13s}".format(*head))
    for r in rows:
        print(f"{r['modality']:9s} {r['files']:7d} {r['write_samples_per_s']:14.0f} "
              f"{r['write_bytes_per_s'] / 1e6:11.2f} {r['load_bytes_per_s'] / 1e6:10.2f} {r['load_vs_train']:12.0f}x")
    if args.json:
        write_text(args.json, json.dumps({**stamp(), "train_bytes_per_s": train, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
