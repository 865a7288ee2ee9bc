"""Generation speed: any models of the registry with their own caches, and the full-forward reference decoder.

Every model of ``--models`` decodes ``--bytes`` bytes (batch 1, sampling at temperature 1, freshly initialised
weights) with ``mmbytes.model.generate.generate``, in the same process; each model's bytes/s is also given as a
ratio to the first ``transformer-*`` model, if any. The reference decoder (``generate_reference``: a full forward
pass for every byte) is measured for the models of ``--ref-models`` (default: the first of ``--models``). Running it
for all 8192 bytes costs one forward pass per byte (most of an hour on a 2-core CPU), so by default its cost is
measured as the time of one full forward pass at ``--ref-points`` lengths and integrated over every length 1..N
(piecewise linear); ``--ref-full`` runs it for real.

    python bench/generate_speed.py --json bench/generate_speed.json
    python bench/generate_speed.py --models small,spacebyte-small,transformer-small --ref-models all
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmbytes.codecs import MODALITIES
from mmbytes.io import write_text
from mmbytes.model import SIZES, build
from mmbytes.model.generate import generate, generate_reference
from mmbytes.model.protocol import ModelData
from mmbytes.stamp import stamp


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cached_bytes_per_s(model: nn.Module, n: int, seed: int = 0, batch: int = 1, device=None) -> float:
    """Bytes generated per second over all ``batch`` rows."""
    device = torch.device(device or "cpu")
    empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
    generate(model, empty, min(n, 256))  # warm up allocators and kernels
    g = torch.Generator(device).manual_seed(seed)

    def run():
        generate(model, empty, n, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return batch * n / timed(run)


@torch.no_grad()
def reference_bytes_per_s(model: nn.Module, n: int, points: list[int], full: bool) -> tuple[float, str]:
    if full:
        return n / timed(lambda: generate_reference(model, torch.zeros(1, 0, dtype=torch.long), n)), "measured"
    x = torch.randint(0, 256, (1, n))
    model(x[:, :64])
    lengths = sorted({1, *[p for p in points if p < n], n})
    per_call = [min(timed(lambda L=L: model(x[:, :L])) for _ in range(2)) for L in lengths]
    total = float(np.interp(np.arange(1, n + 1), lengths, per_call).sum())
    return n / total, f"integrated from forward passes at lengths {lengths}"


def names_of(arg: str) -> list[str]:
    return [m.strip() for m in arg.split(",") if m.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=8192)
    ap.add_argument("--models", default="small,transformer-small,spacebyte-small,blt-small",
                    help=f"comma-separated registry names, of: {', '.join(SIZES)}")
    ap.add_argument("--ref-models", default=None,
                    help="comma-separated models of --models to run the reference decoder for, 'all', or 'none' "
                         "(default: the first of --models)")
    ap.add_argument("--ref-points", type=int, nargs="+", default=[256, 1024, 2048, 4096, 6144])
    ap.add_argument("--ref-full", action="store_true", help="run the reference decoder for every byte")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = names_of(args.models)
    unknown = [m for m in names if m not in SIZES]
    if not names or unknown:
        ap.error(f"unknown model {unknown}; known: {', '.join(SIZES)}")
    refs = names[:1] if args.ref_models is None else names if args.ref_models == "all" else \
        [] if args.ref_models == "none" else names_of(args.ref_models)
    if set(refs) - set(names):
        ap.error(f"--ref-models {sorted(set(refs) - set(names))} are not in --models")

    text = (Path(__file__).resolve().parents[1] / "samples" / "text" / "tinyshakespeare.txt").read_bytes()
    x = torch.tensor(list(text[: 4 * 2048])).view(4, 2048)
    windows = x, torch.ones_like(x, dtype=torch.bool), torch.full((4,), MODALITIES.index("text"))
    text_data = ModelData(seq_len=2048, train_samples=lambda: [text], draw_windows=lambda n, seq_len, seed: windows)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build(name).eval()
        model.prepare(text_data)  # readied for real text, as training readies it (BLT: its thresholds on it)
        row = {"model": name, "arch": type(model).__name__, "params": model.num_params(),
               "cached_bytes_per_s": cached_bytes_per_s(model, args.bytes)}
        if name in refs:
            ref, how = reference_bytes_per_s(model, args.bytes, args.ref_points, args.ref_full)
            row.update(reference_bytes_per_s=ref, cache_speedup=row["cached_bytes_per_s"] / ref, reference_method=how)
        rows.append(row)
    base = next((r for r in rows if r["model"].startswith("transformer-")), None)
    for r in rows:
        r["vs_transformer"] = r["cached_bytes_per_s"] / base["cached_bytes_per_s"] if base else None

    print(f"generating {args.bytes} bytes, batch 1, {torch.get_num_threads()} threads")
    vs = f"vs {base['model']}" if base else "vs transformer"
    print(f"{'decoder':44s} {'params':>8s} {'bytes/s':>10s} {vs:>22s}")
    for r in rows:
        ratio = f"{r['vs_transformer']:.2f}x" if base else "-"
        print(f"{r['model'] + ' (' + r['arch'] + '), KV cache':44s} {r['params'] / 1e6:7.2f}M "
              f"{r['cached_bytes_per_s']:10.1f} {ratio:>22s}")
        if "reference_bytes_per_s" in r:
            print(f"{r['model'] + ', full forward per byte':44s} {r['params'] / 1e6:7.2f}M "
                  f"{r['reference_bytes_per_s']:10.2f}  (cache speedup {r['cache_speedup']:.1f}x; "
                  f"{r['reference_method']})")
    if args.json:
        result = {"bytes": args.bytes, "threads": torch.get_num_threads(),
                  "baseline": base["model"] if base else None, "rows": rows}
        write_text(args.json, json.dumps({**stamp(), **result}, indent=2))


if __name__ == "__main__":
    main()
