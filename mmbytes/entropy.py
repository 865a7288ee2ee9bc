"""BLT's entropy model at work: per-modality thresholds (``mmbytes calibrate``) and a picture of a file's entropy
curve and patch boundaries (``mmbytes patches``).

    mmbytes calibrate --ckpt runs/blt_entropy/version_0/checkpoints/last.ckpt \\
        --data data/mix-images data/mix-audio data/mix-text --patch-size 4.5 --out runs/blt_entropy/calibrated
    mmbytes patches --ckpt runs/blt_entropy/calibrated/entropy.ckpt samples/text/README.md --out out/

The entropy model is a flat byte Transformer trained with ``mmbytes fit`` whose predictions do not depend on the
modality (a ``blt-entropy-*`` size, or a ``transformer-*`` size with ``modality_start: false``). One threshold for all
data gives very different patch sizes on text, image bytes and audio bytes, so ``calibrate`` finds one per modality
(by bisection, for a target mean patch size on the training shards) and writes a copy of the checkpoint with them
stored (``mmbytes.calibration``); BLT takes it with ``--model.entropy_ckpt``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmbytes.codecs import MODALITIES
from mmbytes.io import atomic_path, write_text
from mmbytes.model import patching
from mmbytes.model.blt_layers import entropy_of


@torch.no_grad()
def entropies(model: nn.Module, windows: list[np.ndarray], batch_size: int = 16) -> list[Tensor]:
    """Next-byte entropy (nats, float32, on the CPU) at every position of each window, windows of equal length
    batched together (rows are independent, so batching changes nothing)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[Tensor | None] = [None] * len(windows)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(len(w), []).append(i)
    for idx in by_len.values():
        for j in range(0, len(idx), batch_size):
            part = idx[j : j + batch_size]
            x = torch.as_tensor(np.stack([windows[i] for i in part]), device=device).long()
            h = entropy_of(model(x)).float().cpu()
            for row, i in enumerate(part):
                out[i] = h[row]
    return out


def calibrate(per_modality: dict[str, list[Tensor]], target: float, rule: str = "entropy",
              max_patch_len: int = 0) -> dict:
    """Thresholds for a target mean patch size: one per modality given, and ``all`` (every window pooled), with the
    mean patch size each gives and the one the pooled threshold gives each modality (why one is not enough)."""
    pooled = [h for hs in per_modality.values() for h in hs]
    theta_all, size_all = patching.calibrate_threshold(pooled, target, rule, max_patch_len)
    fn = patching.ENTROPY_RULES[rule]
    report, thresholds = {}, {}
    for name, hs in per_modality.items():
        theta, size = patching.calibrate_threshold(hs, target, rule, max_patch_len)
        nbytes = sum(h.numel() for h in hs)
        with_pooled = nbytes / sum(int(fn(h[None], theta_all, max_patch_len).sum()) for h in hs)
        thresholds[name] = theta
        report[name] = {"windows": len(hs), "bytes": nbytes, "threshold": theta, "patch_size": size,
                        "patch_size_with_one_threshold": with_pooled,
                        "mean_entropy_bits": float(torch.cat(hs).mean()) / math.log(2)}
    for name in MODALITIES:  # modalities not seen in calibration take the pooled threshold
        thresholds.setdefault(name, theta_all)
    return {"rule": rule, "patch_size": target, "max_patch_len": max_patch_len, "thresholds": thresholds,
            "threshold_all": theta_all, "patch_size_all": size_all, "modalities": report}


def split_items(datamodule, split: str = "train") -> Iterator[tuple[np.ndarray, dict]]:
    """Every readable sample of a datamodule's split once, as (bytes as uint8, meta), in shard order, through the
    package's one shard reader (``ByteDataModule.samples``); a datamodule of several sets (``MixedDataModule``) gives
    each set's in turn."""
    for dm in getattr(datamodule, "children", None) or [datamodule]:
        yield from dm.samples(split)


def draw_windows(items: Iterable[tuple[np.ndarray, dict]], n: int, seq_len: int,
                 seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``n`` windows of each modality, drawn uniformly at random among all that modality's windows in ``items``
    (a sample of L bytes holds max(1, L // seq_len) of them), each at a random start aligned as training aligns it:
    one pass with a reservoir per modality (Vitter's algorithm R), so a whole split is covered without holding it and
    a rare modality gets its windows too. Returns x (N, seq_len) long bytes, mask (N, seq_len) of the real ones (a
    sample shorter than the window is one whole window) and modality ids (N,)."""
    import random

    from datamodules.bytes import align_of

    rng = random.Random(seed)
    chosen: dict[int, list[np.ndarray]] = {}
    seen: dict[int, int] = {}
    for data, meta in items:
        m = MODALITIES.index(meta.get("modality", "raw"))
        align = align_of(meta)
        mine = chosen.setdefault(m, [])
        for _ in range(max(1, len(data) // seq_len)):
            seen[m] = seen.get(m, 0) + 1
            slot = seen[m] - 1 if seen[m] <= n else rng.randrange(seen[m])
            if slot >= n:
                continue
            start = rng.randrange(0, (len(data) - seq_len) // align + 1) * align if len(data) > seq_len else 0
            window = np.array(data[start : start + seq_len])
            if slot == len(mine):
                mine.append(window)
            else:
                mine[slot] = window
    drawn = [(w, m) for m in sorted(chosen) for w in chosen[m]]
    if not drawn:
        from mmbytes.errors import NoDataError

        raise NoDataError("no readable training windows to draw from")
    x = torch.zeros(len(drawn), seq_len, dtype=torch.long)
    mask = torch.zeros(len(drawn), seq_len, dtype=torch.bool)
    for row, (window, _) in enumerate(drawn):
        x[row, : len(window)] = torch.from_numpy(window.astype(np.int64))
        mask[row, : len(window)] = True
    return x, mask, torch.tensor([m for _, m in drawn], dtype=torch.long)


def calibrate_main(argv: list[str] | None = None) -> None:
    from mmbytes.checkpoint import atomic_save, load_checkpoint, load_model

    ap = argparse.ArgumentParser(allow_abbrev=False, prog="mmbytes calibrate",
                                 description="Per-modality entropy thresholds for BLT, stored with the entropy model.")
    ap.add_argument("--ckpt", required=True, type=Path, help="the entropy model's checkpoint (`mmbytes fit`)")
    ap.add_argument("--data", required=True, nargs="+",
                    help="shard folders (`mmbytes shards`); their training splits are read")
    ap.add_argument("--out", required=True, type=Path, help="folder for entropy.ckpt and calibration.json")
    ap.add_argument("--patch-size", type=float, default=4.5, help="target mean patch size in bytes")
    ap.add_argument("--rule", choices=sorted(patching.ENTROPY_RULES), default="entropy")
    ap.add_argument("--max-patch-len", type=int, default=0, help="as the BLT model's max_patch_len (0: none)")
    ap.add_argument("--windows", type=int, default=256,
                    help="windows per modality, drawn at random across the training split")
    ap.add_argument("--seq-len", type=int, default=1024, help="bytes per window")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.patch_size < 1 or args.windows < 1 or args.seq_len < 2 or args.max_patch_len < 0:
        ap.error("--patch-size must be >= 1, --windows >= 1, --seq-len >= 2 and --max-patch-len >= 0")
    if args.max_patch_len and args.max_patch_len < args.patch_size:
        ap.error(f"--max-patch-len {args.max_patch_len} cannot give a mean patch size of {args.patch_size}")

    from datamodules.bytes import ByteDataModule

    model, _ = load_model(args.ckpt, map_location=args.device)
    windows: dict[str, list[np.ndarray]] = {}
    folders = [ByteDataModule(data_dir=folder, seq_len=args.seq_len) for folder in args.data]
    x, mask, modality = draw_windows((item for dm in folders for item in split_items(dm)), args.windows,
                                     args.seq_len, seed=0)
    for row, m in enumerate(modality.tolist()):
        if int(mask[row].sum()) > 1:
            windows.setdefault(MODALITIES[m], []).append(x[row, mask[row]].numpy().astype(np.uint8))
    result = calibrate({m: entropies(model, w) for m, w in windows.items()}, args.patch_size, args.rule,
                       args.max_patch_len)
    result["source"] = {"ckpt": str(args.ckpt), "data": args.data, "seq_len": args.seq_len}
    ckpt = load_checkpoint(args.ckpt)
    ckpt.setdefault("mmbytes", {})["calibration"] = {k: result[k] for k in
                                                    ("rule", "patch_size", "max_patch_len", "thresholds")}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, args.out / "entropy.ckpt")
    write_text(args.out / "calibration.json", json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {args.out / 'entropy.ckpt'} (give it to BLT: --model.entropy_ckpt) and "
          f"{args.out / 'calibration.json'}")


def format_table(result: dict) -> str:
    rows = [f"{'modality':9s} {'windows':>7s} {'bits/byte H':>11s} {'theta':>7s} {'patch':>6s} "
            f"{'patch @ one theta':>17s}"]
    for name, r in result["modalities"].items():
        rows.append(f"{name:9s} {r['windows']:7d} {r['mean_entropy_bits']:11.3f} {r['threshold']:7.3f} "
                    f"{r['patch_size']:6.2f} {r['patch_size_with_one_threshold']:17.2f}")
    rows.append(f"{'all':9s} {'':7s} {'':11s} {result['threshold_all']:7.3f} {result['patch_size_all']:6.2f}")
    return "\n".join(rows)


# -- the picture


def plot_patches(data: bytes, h: Tensor, starts: Tensor, theta: float, out: Path, title: str = "",
                 text: bool = True) -> Path:
    """Entropy of each byte's prediction, the threshold, and a line where each patch starts (the paper's figure 4);
    with ``text``, printable bytes are written under the curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data)
    fig, ax = plt.subplots(figsize=(max(8.0, n / 9), 3.2))
    ax.plot(range(n), (h / math.log(2)).tolist(), color="tab:blue", lw=1.2, marker=".", ms=3, label="entropy (bits)")
    ax.axhline(theta / math.log(2), color="tab:red", lw=0.8, ls="--", label=f"threshold {theta / math.log(2):.2f}")
    for t in starts.nonzero().flatten().tolist():
        ax.axvline(t - 0.5, color="0.6", lw=0.6)
    if text and n <= 400:
        ax.set_xticks(range(n))
        ax.set_xticklabels([chr(b) if 32 < b < 127 else "·" if b == 32 else "" for b in data], fontsize=6,
                           family="monospace")
    ax.set_xlim(-1, n)
    ax.set_ylim(0, 8.2)
    ax.set_ylabel("bits")
    ax.set_title(title or f"{n} bytes, {int(starts.sum())} patches (mean {n / max(1, int(starts.sum())):.2f} bytes)",
                 fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(out).suffix[1:] or "png")
    plt.close(fig)
    return out


def patches_main(argv: list[str] | None = None) -> None:
    from mmbytes.checkpoint import load_checkpoint, load_model
    from mmbytes.codecs import get_codec

    ap = argparse.ArgumentParser(allow_abbrev=False, prog="mmbytes patches",
                                 description="PNG of a file's next-byte entropy and BLT patch boundaries.")
    ap.add_argument("--ckpt", required=True, type=Path, help="an entropy model (best calibrated) or a BLT checkpoint")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path, help="output folder; one PNG per file")
    ap.add_argument("--codec", default="auto", help="how a file becomes bytes (auto: by its content)")
    ap.add_argument("--offset", type=int, default=0, help="first byte shown (after the codec)")
    ap.add_argument("--bytes", type=int, default=160, help="bytes shown")
    ap.add_argument("--threshold", type=float, help="theta in nats (default: the calibrated one of the modality)")
    args = ap.parse_args(argv)
    if args.bytes < 1 or args.offset < 0:
        ap.error("--bytes must be >= 1 and --offset >= 0")

    model, _ = load_model(args.ckpt)
    ckpt = load_checkpoint(args.ckpt)
    calibration = (ckpt.get("mmbytes") or {}).get("calibration")
    rule, max_len = (calibration["rule"], calibration.get("max_patch_len", 0)) if calibration else ("entropy", 0)
    if model.capabilities.entropy_patches:  # a BLT checkpoint: its own entropy model and thresholds
        rule, max_len = model.config.patching, model.config.max_patch_len
        thresholds = {m: float(model.theta[i]) for i, m in enumerate(MODALITIES)}
        model = model.entropy_model
    else:
        thresholds = calibration["thresholds"] if calibration else {}
    from mmbytes.data_description import encoder_options, of_checkpoint

    codec_options = encoder_options(of_checkpoint(ckpt, args.ckpt), args.codec)  # files encoded as in training
    for path in args.files:
        data, meta = get_codec(args.codec, **codec_options).encode(path)
        modality = meta.get("modality", "raw")
        theta = args.threshold if args.threshold is not None else thresholds.get(modality)
        if theta is None:
            raise SystemExit(f"{args.ckpt}: no calibrated threshold for {modality}; give --threshold")
        # entropies need the context before the shown bytes: the whole prefix goes through the model
        window = np.frombuffer(data[: args.offset + args.bytes], dtype=np.uint8)
        h = entropies(model, [window])[0]
        starts = patching.ENTROPY_RULES[rule](h[None], theta, max_len)[0]
        shown = slice(args.offset, args.offset + args.bytes)
        out = plot_patches(bytes(window[shown]), h[shown], starts[shown], theta, args.out / f"{path.name}.patches.png",
                           f"{path.name} ({modality}): bytes {args.offset}-{args.offset + len(window[shown])}, "
                           f"{int(starts[shown].sum())} patches", text=modality in ("text", "raw"))
        print(out)

