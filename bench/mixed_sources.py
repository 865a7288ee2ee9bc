"""The mixed image + audio + text set of the mixed study (docs/study.md), as a folder of links into ``../shared/data``:
the first 150 CIFAR-10 images of each class (1,500), every sixth FSDD recording in name order (333) and
tinyshakespeare.txt. ``mmbytes shards`` splits by content (whole files by a hash of their bytes; the one text file
by its tail), so the split does not depend on the link names.

    python bench/mixed_sources.py data/mixed_src
    mmbytes shards data/mixed_src/image data/mixed_src/audio data/mixed_src/text --out data/mixed_shards
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    args = ap.parse_args()
    links = {}
    for cls in sorted((args.data / "images" / "cifar10_train_subset").iterdir()):
        for f in sorted(cls.glob("*.jpg"))[:150]:
            links[Path("image") / f"{cls.name}_{f.name}"] = f
    for f in sorted((args.data / "audio" / "fsdd").glob("*.wav"))[5::6]:
        links[Path("audio") / f.name] = f
    links[Path("text") / "tinyshakespeare.txt"] = args.data / "text" / "tinyshakespeare.txt"
    for name, target in links.items():
        (args.out / name).parent.mkdir(parents=True, exist_ok=True)
        (args.out / name).symlink_to(target.resolve())
    print(f"{args.out}: {len(links)} links")


if __name__ == "__main__":
    main()
