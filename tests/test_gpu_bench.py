"""``bench/gpu.py --smoke``: every step of the one-command GPU bench runs (on CPU at toy sizes), so it never rots."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_every_step_and_writes_its_tables(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.main([str(tmp_path), "--smoke"])
    result = json.loads((tmp_path / "gpu.json").read_text())
    failed = {k: v["error"] for k, v in result["steps"].items() if not v["ok"]}
    assert not failed
    assert set(result["steps"]) == {"fit", "throughput", "generation", "sample_and_compress"}
    rows = result["throughput"]["rows"]
    assert {(r["model"], r["compiled"]) for r in rows} == {("debug", "eager"), ("debug", "aot_eager")}
    assert all(r["bytes_per_s"] > 0 for r in rows)
    assert {r["batch"] for r in result["generation"]} == {1, 16}
    assert result["sample_and_compress"]["exact"]
    assert result["commit"] and result["versions"]["torch"] == __import__("torch").__version__
    assert "| model | compiled |" in (tmp_path / "gpu.md").read_text()
