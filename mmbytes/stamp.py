"""What every bench JSON carries: the commit, the machine and the software that produced it, and the command."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout (for the commit), when run from one


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def stamp(argv: list[str] | None = None) -> dict:
    """``{"commit", "dirty", "machine", "versions", "command"}`` of this run."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("lightning", "torchmetrics", "webdataset"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
        machine["gpus"] = torch.cuda.device_count()
        machine["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(status) if status is not None else None,
            "machine": machine, "versions": versions,
            "command": " ".join(["python", *(sys.argv if argv is None else argv)])}
