"""Word starts in trained models: SpaceByte's premise and BLT's patches.

- MEGABYTE (or any byte model): mean bits of word-initial bytes against the rest, on the validation windows. SpaceByte
  (Slagle, 2024, section 2) puts its global blocks at word starts because the first byte of a word is the hardest.
- A model with patches (BLT, SpaceByte, MEGABYTE): the share of its patch starts that are word starts, against the
  share of word starts among all bytes.
- The BPE baseline is refused: its per-position nats are a token's, put at the token's last byte.

A word-initial byte is one that is not spacelike (an ASCII letter or digit, or a UTF-8 lead or continuation byte)
right after a spacelike byte (``mmbytes.model.patching.spacelike``).

    python bench/word_starts.py --data data/text --ckpt runs/study/runs/debug/seed0/checkpoints/last.ckpt \\
        --ckpt runs/study/runs/blt-debug/seed0/checkpoints/last.ckpt --seq-len 512 --batches 40
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from datamodules import ByteDataModule
from mmbytes.checkpoint import load_model
from mmbytes.io import write_text
from mmbytes.model import patching
from mmbytes.stamp import stamp


def word_initial(x: torch.Tensor) -> torch.Tensor:
    """(B, T) True where byte t is not spacelike and byte t-1 is."""
    s = patching.spacelike(x)
    prev = torch.nn.functional.pad(s[:, :-1], (1, 0), value=False)
    return ~s & prev


@torch.no_grad()
def measure(ckpt: Path, data: str, seq_len: int, batches: int, model=None) -> dict:
    """Word-initial bits and patch starts of the checkpoint's model (or of ``model``, loaded already)."""
    model = load_model(ckpt)[0] if model is None else model
    if not model.capabilities.per_byte_nll:
        raise SystemExit(f"{ckpt}: a {type(model).__name__} model's per-position nats are not a byte's own loss "
                         "(a token's nats sit at its last byte): word-initial bits need a byte model")
    dm = ByteDataModule(data_dir=data, seq_len=seq_len, batch_size=8)
    nats = {"word": 0.0, "rest": 0.0}
    count = {"word": 0, "rest": 0}
    starts = {"patch": 0, "patch_at_word": 0, "bytes": 0, "words": 0}
    for i, batch in enumerate(dm.val_dataloader()):
        if i >= batches:
            break
        x, mask = batch["x"].long(), batch["mask"]
        modality = batch["modality"]
        nll = model.nll(x, mask, modality=modality)
        w = word_initial(x) & mask
        nats["word"] += float(nll[w].sum())
        nats["rest"] += float(nll[~w & mask].sum())
        count["word"] += int(w.sum())
        count["rest"] += int((~w & mask).sum())
        s = model.patch_starts(x, mask, modality=modality)
        if s is not None:  # where the model's patches start (fixed ones too: a baseline for the share)
            s = s & mask
            s[:, 0] = False  # every window starts a patch at byte 0
            starts["patch"] += int(s.sum())
            starts["patch_at_word"] += int((s & w).sum())
            starts["bytes"] += int(mask[:, 1:].sum())
            starts["words"] += int(w[:, 1:].sum())
    out = {"ckpt": str(ckpt), "arch": type(model).__name__,
           "bits_word_initial": nats["word"] / max(1, count["word"]) / math.log(2),
           "bits_rest": nats["rest"] / max(1, count["rest"]) / math.log(2),
           "word_initial_share": count["word"] / max(1, count["word"] + count["rest"])}
    if starts["patch"]:
        out["patch_starts_at_word_starts"] = starts["patch_at_word"] / starts["patch"]
        out["mean_patch"] = starts["bytes"] / starts["patch"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="shard folder; its validation split is read")
    ap.add_argument("--ckpt", required=True, action="append", type=Path, help="a checkpoint (repeatable)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, default=40, help="validation batches of 8 windows")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [measure(c, args.data, args.seq_len, args.batches) for c in args.ckpt]
    print(f"{'checkpoint':60s} {'bits word-initial':>18s} {'bits rest':>10s} {'word share':>10s} "
          f"{'patch starts at words':>22s}")
    for r in rows:
        at = f"{r['patch_starts_at_word_starts']:.3f}" if "patch_starts_at_word_starts" in r else ""
        print(f"{r['ckpt'][-60:]:60s} {r['bits_word_initial']:18.3f} {r['bits_rest']:10.3f} "
              f"{r['word_initial_share']:10.3f} {at:>22s}")
    if args.json:
        write_text(args.json, json.dumps({**stamp(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
