"""Peak resident memory and time of one training step (forward + backward + AdamW) as the sequence grows.

    python bench/memory.py --json memory.json
    python bench/memory.py --sizes 16384 65536 --models long transformer-small

Each (model, T) runs in its own process, so its peak RSS (from the kernel's ru_maxrss) is its own. The parent watches
each child's resident memory and stops it above --limit-gb, or after --timeout seconds; such a case is reported as
"over memory" or "timeout" with what was reached. "step GB" is the peak minus the resident memory once the model
is built (the imported libraries and the weights): what the step itself needs, and the figure whose growth is shown.
Batch 1, random bytes (memory and time do not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from mmbytes.io import write_text
from mmbytes.stamp import stamp

GiB = 2**30


def one(size: str, T: int, steps: int) -> None:
    """Child process: build the model, run `steps` training steps, print one JSON line per step."""
    import resource

    import torch

    from mmbytes.model import build

    torch.manual_seed(0)
    model = build(size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (1, T))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(steps):
        start = time.perf_counter()
        model.nll(x).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - start
        print(json.dumps({"step_s": step_s, "base_rss": base, "params": model.num_params()}), flush=True)


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(size: str, T: int, steps: int, limit: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", size, str(T), str(steps)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    start, watched, status = time.monotonic(), 0, "ok"
    while True:  # os.wait4 rather than Popen.poll: it returns the child's own resource usage
        pid, code, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        watched = max(watched, rss(child.pid))
        if watched > limit:
            status = "over memory"
        elif time.monotonic() - start > timeout:
            status = "timeout"
        if status != "ok":
            child.kill()
            _, code, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.1)
    code = os.waitstatus_to_exitcode(code)
    lines = [json.loads(line) for line in child.stdout.read().splitlines() if line.startswith("{")]
    if status == "ok" and code != 0:
        status = f"failed ({code})"
    peak = max(usage.ru_maxrss * 1024, watched)
    out = {"model": size, "T": T, "status": status, "peak_rss_gb": peak / GiB, "elapsed_s": time.monotonic() - start}
    if lines:  # the last step: the first one also pays for allocating the optimizer state
        out.update(step_s=lines[-1]["step_s"], base_rss_gb=lines[-1]["base_rss"] / GiB, params=lines[-1]["params"])
        out["step_gb"] = out["peak_rss_gb"] - out["base_rss_gb"]  # what the step itself added to the process
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["long", "transformer-small"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[2**14, 2**16, 2**18, 2**20])
    ap.add_argument("--steps", type=int, default=2, help="steps per case; the last is timed (1 at T >= 2**18)")
    ap.add_argument("--limit-gb", type=float, default=20.0, help="stop a case whose resident memory passes this")
    ap.add_argument("--timeout", type=float, default=900.0, help="stop a case after this many seconds")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), int(args.one[2]))
        return

    rows = []
    print(f"{'model':18s} {'T':>9s} {'status':>30s} {'peak RSS GB':>11s} {'step GB':>8s} {'step s':>8s} "
          f"{'GB/2x T':>8s} {'s/2x T':>7s}")
    for size in args.models:
        prev = None
        for T in args.sizes:
            if prev is not None and prev["status"].startswith("skipped"):
                row = {**prev, "T": T}
            elif prev is not None and prev["status"] != "ok":  # a larger T will not fit either
                row = {"model": size, "T": T, "status": f"skipped ({prev['status']} at T={prev['T']})"}
            else:
                row = run_case(size, T, args.steps if T < 2**18 else 1, args.limit_gb * GiB, args.timeout)
            if prev is not None and row.get("step_s") and prev.get("step_s"):
                doublings = math.log2(T / prev["T"])  # growth per doubling of T, whatever the spacing of --sizes
                row["mem_growth_per_2x"] = (row["step_gb"] / prev["step_gb"]) ** (1 / doublings)
                row["time_growth_per_2x"] = (row["step_s"] / prev["step_s"]) ** (1 / doublings)
            rows.append(row)
            print(f"{size:18s} {T:9d} {row['status']:>30s} {row.get('peak_rss_gb', float('nan')):11.2f} "
                  f"{row.get('step_gb', float('nan')):8.2f} "
                  f"{row.get('step_s', float('nan')):8.2f} {row.get('mem_growth_per_2x', float('nan')):8.2f} "
                  f"{row.get('time_growth_per_2x', float('nan')):7.2f}", flush=True)
            prev = row
    if args.json:
        write_text(args.json, json.dumps({**stamp(), "limit_gb": args.limit_gb, "timeout_s": args.timeout,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
