"""The study at GPU scale and a gallery, as one call on one GPU (about 9 minutes on an H200), or ``--smoke`` on CPU.

    python bench/gpu_study.py OUT_DIR --data-root DATA    # DATA holds text/gcide.dict.dz, images/mnist, audio/fsdd
    python bench/gpu_study.py OUT_DIR --data-root DATA --smoke

1. ``mmbytes shards`` of the GCIDE dictionary (one corpus file: its last tenth is validation), then ``mmbytes study``
   of every architecture at ``--budget`` training FLOPs each, bf16, one seed.
2. The gallery: MEGABYTE fitted for ``--gallery-minutes`` on MNIST (``recipes/mnist.yaml``) and on the spoken digits
   (``recipes/audio.yaml``), then ``mmbytes sample``: 64 digits (a contact sheet) and 8 utterances, with the
   validation bits per byte of the checkpoint that made them.
Every step is a plain mmbytes command (printed before it runs), so a user with a GPU can run each one alone.
Writes ``OUT_DIR/gpu_study.json`` (stamped) besides the study's report and the gallery files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmbytes.io import write_atomically, write_text
from mmbytes.stamp import ROOT, stamp

MODELS = "small,transformer-small,spacebyte-small,spacebyte-fixed-small,blt-small,blt-fixed-small,bpe-small"


def run(argv: list[str], log: list[dict]) -> None:
    from mmbytes.cli import main

    print("mmbytes " + " ".join(argv), flush=True)
    start = time.perf_counter()
    main(argv)
    log.append({"command": "mmbytes " + " ".join(argv), "s": time.perf_counter() - start})


def gallery(out: Path, name: str, recipe: str, sources: list[str], codec_options: str | None, minutes: float,
            device: str, sample_args: list[str], log: list[dict], smoke: bool) -> dict:
    data_args = ["--data.sources", json.dumps(sources), "--data.data_dir", str(out / f"{name}_shards")]
    if codec_options:
        data_args += ["--data.codec_options", codec_options]
    if smoke:
        data_args += ["--model.size", "debug", "--model.overrides", "{}"]
    limits = ["--trainer.max_steps", "2", "--data.train_batches_per_epoch", "2", "--data.batch_size", "2"] \
        if smoke else ["--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
         "--trainer.precision", "bf16-mixed", "--trainer.val_check_interval", "200",
         "--trainer.check_val_every_n_epoch", "null"]
    run(["fit", "--config", str(ROOT / "recipes" / recipe), *data_args, *limits, "--trainer.accelerator", device,
         "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.enable_progress_bar", "false"], log)
    ckpt = max((out / "runs" / Path(recipe).stem).glob("version_*/checkpoints/last.ckpt"),
               key=lambda p: p.stat().st_mtime)
    run(["validate", "--config", str(ROOT / "recipes" / recipe), *data_args, "--ckpt_path", str(ckpt),
         "--trainer.accelerator", device, "--trainer.logger", "false",
         "--trainer.default_root_dir", str(out / "runs" / f"{name}_validate")], log)  # its config.yaml and samples
    run(["sample", "--ckpt", str(ckpt), "--out", str(out / "gallery" / name), "--device", device, *sample_args], log)
    return {"ckpt": str(ckpt), "files": sorted(str(p) for p in (out / "gallery" / name).iterdir())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--budget", type=float, default=5e15, help="training FLOPs per study run")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--gallery-minutes", type=float, default=1.5, help="training time of each gallery model")
    ap.add_argument("--smoke", action="store_true", help="CPU, debug sizes, a tiny budget and a slice of the text")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    result = {**stamp(argv), "smoke": args.smoke, "budget": args.budget, "log": log}

    text = out / "gcide.txt"
    with gzip.open(args.data_root / "text" / "gcide.dict.dz") as f:
        write_atomically(text, lambda out_file: out_file.write(f.read(2**18) if args.smoke else f.read()))
    run(["shards", str(text), "--out", str(out / "text_shards"), "--codec", "text"], log)
    models = ",".join(m.replace("small", "debug") for m in args.models.split(",")) if args.smoke else args.models
    run(["study", "--data", str(out / "text_shards"), "--budget", "3e8" if args.smoke else f"{args.budget:g}",
         "--models", models, "--out", str(out / "study"), "--seq-len", "64" if args.smoke else "2048",
         "--batch-size", "2" if args.smoke else "32", "--evals", "1" if args.smoke else "4",
         "--val-batches", "4" if args.smoke else "64", "--accelerator", device,
         *([] if args.smoke else ["--precision", "bf16-mixed", "--num-workers", "4"])], log)

    mnist = args.data_root / "images" / "mnist" / "t10k-images-idx3-ubyte.gz"
    result["mnist"] = gallery(out, "mnist", "mnist.yaml", [str(mnist)], None, args.gallery_minutes, device,
                              ["--modality", "image", "--num", "4" if args.smoke else "64", "--image-size", "28",
                               "--channels", "1"], log, args.smoke)
    fsdd = out / "fsdd"
    if not fsdd.exists():
        fsdd.mkdir()
        for p in sorted((args.data_root / "audio" / "fsdd").glob("*.wav"))[: 40 if args.smoke else None]:
            write_atomically(fsdd / p.name, lambda f, p=p: f.write(p.read_bytes()))
    result["fsdd"] = gallery(out, "fsdd", "audio.yaml", [str(fsdd)], None, args.gallery_minutes, device,
                             ["--modality", "audio", "--num", "2" if args.smoke else "8", "--seconds",
                              "0.05" if args.smoke else "1.0"], log, args.smoke)
    write_text(out / "gpu_study.json", json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
