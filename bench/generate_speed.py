"""Generation speed: cached MEGABYTE against its full-forward reference and a cached byte-level Transformer.

All three decode ``--bytes`` bytes (batch 1, sampling at temperature 1) with models of equal parameter count, in
the same process. Running the reference decoder for all 8192 bytes would take most of an hour on a laptop CPU, so by
default its cost is measured as the time of one full forward pass at ``--ref-points`` lengths and integrated over
every length 1..N (piecewise linear); ``--ref-full`` runs it for real.

    python bench/generate_speed.py --json bench/generate_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmbytes import Megabyte, MegabyteConfig
from mmbytes.model.generate import generate, generate_reference


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cached_bytes_per_s(model: Megabyte, n: int, seed: int = 0) -> float:
    empty = torch.zeros(1, 0, dtype=torch.long)
    generate(model, empty, min(n, 256))  # warm up allocators and kernels
    g = torch.Generator().manual_seed(seed)
    return n / timed(lambda: generate(model, empty, n, generator=g))


@torch.no_grad()
def reference_bytes_per_s(model: Megabyte, n: int, points: list[int], full: bool) -> tuple[float, str]:
    if full:
        return n / timed(lambda: generate_reference(model, torch.zeros(1, 0, dtype=torch.long), n)), "measured"
    x = torch.randint(0, 256, (1, n))
    model(x[:, :64])
    lengths = sorted({1, *[p for p in points if p < n], n})
    per_call = [min(timed(lambda L=L: model(x[:, :L])) for _ in range(2)) for L in lengths]
    total = float(np.interp(np.arange(1, n + 1), lengths, per_call).sum())
    return n / total, f"integrated from forward passes at lengths {lengths}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=8192)
    ap.add_argument("--megabyte", default="small")
    ap.add_argument("--transformer", default="transformer-small")
    ap.add_argument("--ref-points", type=int, nargs="+", default=[256, 1024, 2048, 4096, 6144])
    ap.add_argument("--ref-full", action="store_true", help="run the reference decoder for every byte")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    mb = Megabyte(MegabyteConfig.from_name(args.megabyte)).eval()
    tf = Megabyte(MegabyteConfig.from_name(args.transformer)).eval()
    cached = cached_bytes_per_s(mb, args.bytes)
    transformer = cached_bytes_per_s(tf, args.bytes)
    reference, how = reference_bytes_per_s(mb, args.bytes, args.ref_points, args.ref_full)
    result = {"cached_bytes_per_s": cached, "reference_bytes_per_s": reference,
              "transformer_cached_bytes_per_s": transformer, "cache_speedup": cached / reference,
              "megabyte_vs_transformer": cached / transformer, "bytes": args.bytes,
              "megabyte_params": mb.num_params(), "transformer_params": tf.num_params(),
              "threads": torch.get_num_threads(), "reference_method": how}
    print(f"generating {args.bytes} bytes, batch 1, {torch.get_num_threads()} threads")
    print(f"{'decoder':38s} {'params':>8s} {'bytes/s':>10s}")
    print(f"{'MEGABYTE ' + args.megabyte + ', two-level KV cache':38s} {mb.num_params() / 1e6:7.2f}M {cached:10.1f}")
    print(f"{'MEGABYTE ' + args.megabyte + ', full forward per byte':38s} {mb.num_params() / 1e6:7.2f}M "
          f"{reference:10.2f}  ({how})")
    print(f"{args.transformer + ', KV cache':38s} {tf.num_params() / 1e6:7.2f}M {transformer:10.1f}")
    print(f"cache speedup {result['cache_speedup']:.1f}x, "
          f"MEGABYTE vs Transformer {result['megabyte_vs_transformer']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
