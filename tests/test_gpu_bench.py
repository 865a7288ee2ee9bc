"""``bench/gpu.py --smoke``: every step of the one-command GPU bench runs (on CPU at toy sizes), so it never rots."""

import json
from pathlib import Path

import pytest
from bench_script import load_bench

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_every_step_and_writes_its_tables(tmp_path):
    gpu = load_bench("gpu")
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


@pytest.mark.slow
def test_gpu_study_smoke_trains_every_architecture_and_writes_the_gallery_only_under_its_out_dir(tmp_path,
                                                                                           monkeypatch):
    """``bench/gpu_study.py --smoke``: the GPU study and gallery call at a toy budget on CPU, on a data root laid out
    as ``--data-root`` expects and made of files the repository ships (credits: tests/data/MANIFEST.md,
    samples/README.md): Shakespeare gzipped in GCIDE's place (the smoke reads its first 256 KiB), MNIST's first
    1,000 test digits, the four FSDD clips of ``samples/audio``."""
    import gzip
    import shutil

    gpu_study = load_bench("gpu_study")
    data = tmp_path / "data"
    for folder in ("text", "images/mnist", "audio/fsdd"):
        (data / folder).mkdir(parents=True)
    text = (ROOT / "samples/text/tinyshakespeare.txt").read_bytes()
    (data / "text" / "gcide.dict.dz").write_bytes(gzip.compress(text))
    shutil.copy(ROOT / "tests/data/images/mnist/t10k-images-idx3-ubyte-first1000.gz",
                data / "images/mnist/t10k-images-idx3-ubyte.gz")
    for clip in sorted((ROOT / "samples/audio").glob("fsdd_*.wav")):
        shutil.copy(clip, data / "audio/fsdd" / clip.name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    gpu_study.main([str(out), "--data-root", str(data), "--smoke"])
    assert list(cwd.iterdir()) == []  # nothing written where it was called from (Lightning's config.yaml, samples)
    report = (out / "study" / "report.md").read_text()
    assert all(f"| {m.replace('small', 'debug')} |" in report for m in gpu_study.MODELS.split(","))
    assert (out / "gallery" / "mnist" / "image_sheet.png").exists()
    assert len(list((out / "gallery" / "fsdd").glob("*.wav"))) == 2
