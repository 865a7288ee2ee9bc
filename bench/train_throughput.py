"""Training throughput: MEGABYTE against a byte-level Transformer of equal parameter count, same process.

Each step is forward + backward + AdamW step at sequence length T on real bytes. Model FLOPs are counted by
``torch.utils.flop_counter`` (matmuls and attention, forward and backward) and divided by the fp32 matmul peak this
script measures itself on the same machine, so MFU is relative to what this machine's BLAS can actually do.

    python bench/train_throughput.py --json bench/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmbytes import Megabyte, MegabyteConfig

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def real_bytes(n: int, root: Path) -> torch.Tensor:
    """n bytes of the real files under root, repeated if needed."""
    blob = b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())
    blob = (blob * (n // len(blob) + 1))[:n]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(name: str, x: torch.Tensor, steps: int, warmup: int) -> dict:
    config = MegabyteConfig.from_name(name)
    model = Megabyte(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1)

    def step() -> None:
        loss = model.nll(x).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        model.nll(x).mean().backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    t = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    return {"model": name, "params": model.num_params(), "step_s": t, "bytes_per_s": x.numel() / t,
            "gflops_per_step": flops / 1e9, "achieved_gflops": flops / t / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--megabyte", default="small")
    ap.add_argument("--transformer", default="transformer-small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", type=Path, default=SAMPLES, help="folder of real files to train on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    x = real_bytes(args.batch * args.seq_len, args.data).view(args.batch, args.seq_len)
    peak = matmul_peak_gflops()
    rows = [measure(args.megabyte, x, args.steps, args.warmup), measure(args.transformer, x, args.steps, args.warmup)]
    peak = max(peak, matmul_peak_gflops())  # measured again after the runs: the best the machine showed
    for r in rows:
        r["mfu"] = r["achieved_gflops"] / peak
    mb, tf = rows
    print(f"T={args.seq_len} batch={args.batch} threads={torch.get_num_threads()} fp32 matmul peak {peak:.1f} GFLOP/s")
    header = ("model", "params", "step s", "bytes/s", "GFLOP/step", "GFLOP/s", "MFU")
    print("{:20s} {:>8s} {:>8s} {:>10s} {:>11s} {:>8s} {:>6s}".format(*header))
    for r in rows:
        print(f"{r['model']:20s} {r['params'] / 1e6:7.2f}M {r['step_s']:8.3f} {r['bytes_per_s']:10.0f} "
              f"{r['gflops_per_step']:11.1f} {r['achieved_gflops']:8.1f} {r['mfu']:6.1%}")
    speedup = mb["bytes_per_s"] / tf["bytes_per_s"]
    print(f"speedup (MEGABYTE / Transformer bytes per second): {speedup:.2f}x")
    if args.json:
        result = {"megabyte_bytes_per_s": mb["bytes_per_s"], "transformer_bytes_per_s": tf["bytes_per_s"],
                  "speedup": speedup, "megabyte_mfu": mb["mfu"], "matmul_peak_gflops": peak,
                  "seq_len": args.seq_len, "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
