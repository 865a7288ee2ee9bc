"""Training throughput of any models of the registry (MEGABYTE, the byte-level Transformer, SpaceByte), same process.

Each step is forward + backward + AdamW step at sequence length T on real bytes. Model FLOPs per step are the
model's own analytic count, ``model.flops_per_byte(T) * bytes per step`` (every matmul and attention, forward and
backward), not ``torch.utils.flop_counter``: on CPU the counter counts no FLOPs for the fused
``scaled_dot_product_attention`` kernels, so it under-reports attention (the analytic count equals the counter's
when attention runs on the MATH backend; tests/test_architectures.py). MFU divides the achieved FLOP/s by the matmul
peak this script measures itself on the same device and dtype, so it is relative to what this machine can actually
do. Each model's bytes/s is also given as a ratio to the first ``transformer-*`` model of ``--models``, if any.

    python bench/train_throughput.py --json bench/train_throughput.json
    python bench/train_throughput.py --models small,spacebyte-small,spacebyte-fixed-small,transformer-small
    python bench/train_throughput.py --device cuda --dtype bfloat16 --batch 8   # bf16 through torch.autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from mmbytes.codecs import MODALITIES
from mmbytes.io import write_text
from mmbytes.model import SIZES, build
from mmbytes.model.protocol import ModelData
from mmbytes.stamp import stamp

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def real_bytes(n: int, root: Path) -> torch.Tensor:
    """n bytes of the real files under root, repeated if needed."""
    blob = b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())
    blob = (blob * (n // len(blob) + 1))[:n]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-reps n x n matmul rate on this device in this dtype (n = 8192 on a GPU, 2048 would not fill it)."""
    n = 8192 if device.type == "cuda" else n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure(name: str, x: torch.Tensor, steps: int, warmup: int, dtype: torch.dtype, compile: str | None = None
            ) -> dict:
    """One model's training step on x; ``compile``: a torch.compile backend for its blocks (``ByteLM(compile=)``)."""
    torch.manual_seed(0)
    model = build(name).to(x.device).train()
    if compile:
        from mmbytes.lit import compile_blocks

        compile_blocks(model, compile)
    # readied for these bytes, as training readies a model (BLT: thresholds for its mean patch size on them)
    ones, raw = torch.ones_like(x, dtype=torch.bool), torch.full((x.shape[0],), MODALITIES.index("raw"))
    model.prepare(ModelData(seq_len=x.shape[1], train_samples=lambda: [bytes(r.tolist()) for r in x.cpu()],
                            draw_windows=lambda n, seq_len, seed: (x, ones, raw)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1)
    autocast = (lambda: torch.autocast(x.device.type, dtype=dtype)) if dtype != torch.float32 else \
        contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = model.nll(x).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = model.train_flops(x)  # analytic, as run: the flop counter misses CPU attention kernels
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(x.device)
        start = time.perf_counter()
        step()
        sync(x.device)
        times.append(time.perf_counter() - start)
    t = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
    extra = {"planned_gflops_per_step": model.flops_per_byte(x.shape[1]) * x.numel() / 1e9}
    starts = model.patch_starts(x)
    if starts is not None:
        extra["patch_size"] = x.numel() / int(starts.sum())
    return {**extra, "model": name, "arch": type(model).__name__, "params": model.num_params(), "step_s": t,
            "bytes_per_s": x.numel() / t, "gflops_per_step": flops / 1e9, "achieved_gflops": flops / t / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--models", default="small,transformer-small,spacebyte-small,blt-small",
                    help=f"comma-separated registry names, of: {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="bfloat16: torch.autocast (meant for cuda), weights and optimizer state stay fp32")
    ap.add_argument("--data", type=Path, default=SAMPLES, help="folder of real files to train on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in SIZES]
    if not names or unknown:
        ap.error(f"unknown model {unknown}; known: {', '.join(SIZES)}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    x = real_bytes(args.batch * args.seq_len, args.data).view(args.batch, args.seq_len).to(device)
    peak = matmul_peak_gflops(device, dtype)
    rows = [measure(name, x, args.steps, args.warmup, dtype) for name in names]
    peak = max(peak, matmul_peak_gflops(device, dtype))  # measured again after the runs: the best the machine showed
    base = next((r for r in rows if r["model"].startswith("transformer-")), None)
    for r in rows:
        r["mfu"] = r["achieved_gflops"] / peak
        r["vs_transformer"] = r["bytes_per_s"] / base["bytes_per_s"] if base else None
    threads = torch.get_num_threads()
    print(f"T={args.seq_len} batch={args.batch} device={device} dtype={args.dtype} threads={threads} "
          f"matmul peak {peak:.1f} GFLOP/s")
    header = ("model", "params", "step s", "bytes/s", "GFLOP/step", "GFLOP/s", "MFU",
              f"vs {base['model'] if base else 'transformer'}")
    print("{:22s} {:>8s} {:>8s} {:>10s} {:>11s} {:>8s} {:>6s} {:>20s}".format(*header))
    for r in rows:
        ratio = f"{r['vs_transformer']:.2f}x" if base else "-"
        print(f"{r['model']:22s} {r['params'] / 1e6:7.2f}M {r['step_s']:8.3f} {r['bytes_per_s']:10.0f} "
              f"{r['gflops_per_step']:11.1f} {r['achieved_gflops']:8.1f} {r['mfu']:6.1%} {ratio:>20s}"
              + (f"  (mean patch {r['patch_size']:.2f} bytes)" if "patch_size" in r else "")
              + (f" entropy pass {r['entropy_s'] / r['step_s']:.0%} of the step time, "
                 f"{r['entropy_flops_share']:.0%} of its FLOPs" if "entropy_s" in r else ""))
    if args.json:
        result = {"seq_len": args.seq_len, "batch": args.batch, "device": str(device), "dtype": args.dtype,
                  "threads": threads, "matmul_peak_gflops": peak, "flops": "analytic model.flops_per_byte",
                  "baseline": base["model"] if base else None, "rows": rows}
        write_text(args.json, json.dumps({**stamp(), **result}, indent=2))


if __name__ == "__main__":
    main()
