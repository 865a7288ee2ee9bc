"""How close generated samples are to each modality's training bytes: the byte histogram of a training run's
samples at one step (``samples/step_<N>/``: PNG, WAV and text files written by ``SampleWriter``) against the
histograms of the real files they were trained on, as total variation (0: the same distribution, 1: disjoint).

    python bench/sample_histograms.py runs/quickstart/version_0 600 --json hist.json

Images are compared as the image codec's pixel bytes (patch order, 4x4 tiles, as the quickstart trains), audio as
16-bit little-endian samples at 8 kHz, text as bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from mmbytes.codecs import get_codec
from mmbytes.io import write_text
from mmbytes.stamp import ROOT, stamp


def histogram(data: bytes) -> np.ndarray:
    h = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(float)
    return h / max(1.0, h.sum())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder holding samples/step_<N>/")
    ap.add_argument("step", type=int)
    ap.add_argument("--samples", type=Path, default=ROOT / "samples", help="the real files it was trained on")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    image, audio = get_codec("image", order="patch", tile=4), get_codec("audio", sample_rate=8000)
    train = {"image": b"".join(image.encode(p)[0] for p in sorted((args.samples / "images").iterdir())),
             "audio": b"".join(audio.encode(p)[0] for p in sorted((args.samples / "audio").glob("*.wav"))),
             "text": b"".join(p.read_bytes() for p in sorted((args.samples / "text").glob("*.txt")))}
    d = args.run / "samples" / f"step_{args.step}"
    made = {"image": b"".join(np.asarray(Image.open(p).convert("RGB")).tobytes()
                              for p in sorted(d.glob("image_*.png")) if "sheet" not in p.name),
            "audio": b"".join(sf.read(p, dtype="int16")[0].astype("<i2").tobytes()
                              for p in sorted(d.glob("audio_*.wav"))),
            "text": b"".join(p.read_bytes() for p in sorted(d.glob("text_*")))}
    rows = [{"samples": m, **{f"tv_to_{k}": round(0.5 * float(np.abs(histogram(made[m]) - histogram(v)).sum()), 3)
                              for k, v in train.items()}} for m in made if made[m]]
    for r in rows:
        print(r)
    result = {**stamp(argv), "run": str(args.run), "step": args.step, "rows": rows}
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
