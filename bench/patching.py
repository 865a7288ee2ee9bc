"""Where SpaceByte's global blocks run on each modality: the share of bytes that open a patch under the spacelike
rule, the share that get a global position under the cap T_G = T/6, and the share of bytes that go on without a
fresh global position because the cap was reached (T = 8192 windows of real files from ../shared/data, each file
through the codec ``auto`` picks for it: text as UTF-8, images as 32x32 RGB pixels, WAV as 16-bit samples, the rest
as raw bytes).

    python bench/patching.py --json bench/patching.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from mmbytes.codecs import get_codec
from mmbytes.io import write_text
from mmbytes.model import patching
from mmbytes.stamp import stamp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = [["text/tinyshakespeare.txt", "text/wikitext2_valid.txt"],
           ["images/photos", "images/icons_gnome48", "images/cifar10_train_subset/airplane"],
           ["audio/fsdd", "audio/sound_icons"], ["files"]]


def modality_bytes(root: Path, sources: list[str], limit: int) -> dict[str, bytes]:
    codec = get_codec("auto", image={"size": 32}, audio={"sample_rate": 8000})
    out: dict[str, bytearray] = {}
    for src in sources:
        path = root / src
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if not f.is_file():
                continue
            try:
                data, meta = codec.encode(f)
            except Exception:  # files the codec refuses are left out, as `mmbytes shards` skips them
                continue
            buf = out.setdefault(meta["modality"], bytearray())
            if len(buf) < limit:
                buf += data[: limit - len(buf)]
    return {k: bytes(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--bytes", type=int, default=2**20, help="bytes per modality")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    T, cap = args.seq_len, math.ceil(args.seq_len / 6)
    rows = []
    print(f"T = {T}, cap T_G = {cap}")
    print(f"{'modality':10s} {'source':45s} {'MB':>5s} {'starts':>7s} {'global':>7s} {'overflow':>9s}")
    for sources in SOURCES:
        for modality, data in modality_bytes(args.data, sources, args.bytes).items():
            n = len(data) // T * T
            if n == 0:
                continue
            x = torch.frombuffer(bytearray(data[:n]), dtype=torch.uint8).long().view(-1, T)
            starts = patching.spacelike_starts(x)
            glob = patching.cap_starts(starts, cap)
            row = {"modality": modality, "sources": sources, "bytes": n,
                   "start_share": starts.float().mean().item(), "global_share": glob.float().mean().item(),
                   "overflow_share": patching.overflow_share(starts, glob).item()}
            rows.append(row)
            print(f"{modality:10s} {','.join(sources)[:45]:45s} {n / 1e6:5.2f} {row['start_share']:7.1%} "
                  f"{row['global_share']:7.1%} {row['overflow_share']:9.1%}")
    if args.json:
        write_text(args.json, json.dumps({**stamp(), "seq_len": T, "cap": cap, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
