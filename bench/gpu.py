"""One command for a GPU: the CUDA tests, a short bf16 fit of every architecture, training throughput (bytes/s, MFU,
peak memory; eager and compiled), cached generation speed, ``mmbytes sample`` and a compress round trip on the GPU.

    python bench/gpu.py OUT_DIR            # on one GPU, about 8 minutes (an H200)
    python bench/gpu.py OUT_DIR --smoke    # the same steps on CPU at toy sizes (part of the test suite)

Writes ``OUT_DIR/gpu.json`` (every figure, stamped with commit, GPU and versions) and ``OUT_DIR/gpu.md`` (tables).
MFU is model FLOPs (``model.flops_per_byte``, forward + backward) per second over the device's dense bf16 peak:
the datasheet figure of a known GPU (``PEAK_TFLOPS``) and, beside it, the best matmul rate measured here. Each
step is timed on its own; a failing step is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import cached_bytes_per_s  # noqa: E402
from train_throughput import matmul_peak_gflops, measure, real_bytes  # noqa: E402

from mmbytes.io import write_atomically, write_text
from mmbytes.stamp import ROOT, stamp

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "RTX 4090": 165.0, "B200": 2250.0}
"""Dense bf16 tensor-core peak by the datasheet (TFLOP/s, without sparsity), by a substring of the device name."""

FULL = {"fit": ["debug", "transformer-debug", "spacebyte-debug", "blt-fixed-debug", "bpe-debug"],
        "throughput": ["small", "base", "transformer-small", "transformer-base", "spacebyte-small",
                       "spacebyte-fixed-small", "blt-small", "blt-fixed-small"],
        "seq_len": 8192, "batch": 4, "steps": 5, "warmup": 3, "gen_bytes": 2048,
        "generate": ["small", "transformer-small", "spacebyte-small", "blt-small"], "compile": "inductor"}
SMOKE = {"fit": ["debug", "transformer-debug"], "throughput": ["debug"], "seq_len": 128,
         "batch": 1, "steps": 1, "warmup": 0, "gen_bytes": 16, "generate": ["debug"], "compile": "aot_eager"}


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def cuda_tests(out: Path) -> dict:
    """The tests marked ``cuda`` (they skip without a GPU)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    write_text(out / "cuda_tests.txt", r.stdout[-20000:] + r.stderr[-5000:])
    return {"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}


def fit_each(out: Path, names: list[str], device: str, steps: int) -> list[dict]:
    """``mmbytes fit`` of the quickstart recipe, bf16-mixed, ``steps`` steps, for each architecture."""
    from mmbytes.cli import main

    rows = []
    for name in names:
        start = time.perf_counter()
        main(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
              "--data.sources", json.dumps([str(ROOT / "samples")]), "--data.data_dir", str(out / "shards"),
              "--data.seq_len", "512", "--data.num_workers", "2", "--data.train_batches_per_epoch", str(steps),
              "--model.size", name, "--model.overrides", "{}", "--trainer.max_steps", str(steps),
              "--trainer.accelerator", device, "--trainer.precision", "bf16-mixed", "--trainer.callbacks", "[]",
              "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name", name,
              "--trainer.enable_progress_bar", "false"])
        ckpt = max((out / "runs" / name).glob("version_*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
        rows.append({"model": name, "steps": steps, "s": time.perf_counter() - start, "ckpt": str(ckpt)})
    return rows


def throughput(cfg: dict, device: torch.device, dtype: torch.dtype, data: Path) -> dict:
    x = real_bytes(cfg["batch"] * cfg["seq_len"], data).view(cfg["batch"], cfg["seq_len"]).to(device)
    measured = matmul_peak_gflops(device, dtype) / 1e3
    sheet = datasheet_peak(device)
    rows = []
    for name in cfg["throughput"]:
        for compiled in (None, cfg["compile"]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                r = measure(name, x, cfg["steps"], cfg["warmup"], dtype, compile=compiled)
            except Exception as e:  # a model that fails here is a row with its error, not the end of the run
                r = {"model": name, "error": f"{type(e).__name__}: {e}"}
            r["compiled"] = compiled or "eager"
            if device.type == "cuda":
                r["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if "achieved_gflops" in r:
                r["mfu_measured"] = r["achieved_gflops"] / 1e3 / measured
                r["mfu_datasheet"] = r["achieved_gflops"] / 1e3 / sheet if sheet else None
            rows.append(r)
    eager = {r["model"]: r for r in rows if r["compiled"] == "eager" and "bytes_per_s" in r}
    for r in rows:
        if r["compiled"] != "eager" and "bytes_per_s" in r and r["model"] in eager:
            r["vs_eager"] = r["bytes_per_s"] / eager[r["model"]]["bytes_per_s"]
    return {"seq_len": cfg["seq_len"], "batch": cfg["batch"], "dtype": str(dtype), "matmul_peak_tflops": measured,
            "datasheet_peak_tflops": sheet, "rows": rows}


def generation(names: list[str], n: int, device: torch.device) -> list[dict]:
    from mmbytes.model import build

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build(name).to(device).eval()
        for batch in (1, 16):
            rows.append({"model": name, "batch": batch,
                         "bytes_per_s": cached_bytes_per_s(model, n, batch=batch, device=device)})
    return rows


def sample_and_compress(out: Path, ckpt: str, device: str) -> dict:
    from mmbytes.cli import main

    start = time.perf_counter()
    main(["sample", "--ckpt", ckpt, "--out", str(out / "sample"), "--num", "4", "--bytes", "256",
          "--device", device])
    sample_s = time.perf_counter() - start
    text = out / "excerpt.txt"  # the first 16 KiB of the shipped text: a round trip, not a compression figure
    first = sorted((ROOT / "samples" / "text").glob("*.txt"))[0].read_bytes()[: 16 * 1024]
    write_atomically(text, lambda f: f.write(first))
    start = time.perf_counter()
    main(["compress", "--ckpt", ckpt, str(text), "--out", str(out / "mmbz"), "--device", device, "--quiet"])
    packed = sorted((out / "mmbz").glob("*.mmbz"))[0]
    main(["decompress", "--ckpt", ckpt, str(packed), "--out", str(out / "unpacked"), "--device", device, "--quiet"])
    back = sorted((out / "unpacked").iterdir())[0]
    return {"sample_s": sample_s, "compress_round_trip_s": time.perf_counter() - start,
            "exact": back.read_bytes() == text.read_bytes(), "ratio": packed.stat().st_size / text.stat().st_size}


def table(rows: list[dict], keys: list[str]) -> list[str]:
    def cell(v):
        return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            *("| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for gpu.json, gpu.md and the runs")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU in fp32: checks that every step runs")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here (--smoke runs the same steps on CPU)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {**stamp(argv), "smoke": args.smoke, "steps": {}}

    def step(name: str, fn):
        start = time.perf_counter()
        try:
            result[name] = fn()
            result["steps"][name] = {"ok": True, "s": time.perf_counter() - start}
        except Exception as e:
            result["steps"][name] = {"ok": False, "s": time.perf_counter() - start,
                                     "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"gpu.py: {name}: {'ok' if result['steps'][name]['ok'] else 'FAILED'} "
              f"({result['steps'][name]['s']:.0f} s)", flush=True)
        write_text(args.out / "gpu.json", json.dumps(result, indent=1, default=str))

    if not args.smoke:
        step("cuda_tests", lambda: cuda_tests(args.out))
    step("fit", lambda: fit_each(args.out, cfg["fit"], device.type, 1 if args.smoke else 3))
    step("throughput", lambda: throughput(cfg, device, dtype, ROOT / "samples"))
    step("generation", lambda: generation(cfg["generate"], cfg["gen_bytes"], device))
    if result.get("fit"):
        step("sample_and_compress", lambda: sample_and_compress(args.out, result["fit"][0]["ckpt"], device.type))
    lines = [f"# bench/gpu.py{' --smoke' if args.smoke else ''}", "",
             f"commit {result['commit']}, {result['machine'].get('gpu', result['machine']['cpu'])}, torch "
             f"{result['versions']['torch']} (CUDA {result['versions']['cuda']})", "",
             *table([{"step": k, **v} for k, v in result["steps"].items()], ["step", "ok", "s", "error"]), ""]
    if "throughput" in result:
        t = result["throughput"]
        lines += [f"Training, T = {t['seq_len']}, batch {t['batch']}, {t['dtype']}; peaks: datasheet "
                  f"{t['datasheet_peak_tflops']} TFLOP/s, measured matmul {t['matmul_peak_tflops']:.1f} TFLOP/s", "",
                  *table(t["rows"], ["model", "compiled", "params", "bytes_per_s", "mfu_datasheet", "mfu_measured",
                                     "peak_memory_gb", "vs_eager", "error"]), ""]
    if "generation" in result:
        lines += ["Cached generation", "", *table(result["generation"], ["model", "batch", "bytes_per_s"]), ""]
    if "sample_and_compress" in result:
        lines += ["Sample and compress", "", *table([result["sample_and_compress"]],
                                                    ["sample_s", "compress_round_trip_s", "exact", "ratio"])]
    write_text(args.out / "gpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
