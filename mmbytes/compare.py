"""``mmbytes compare``: the byte model and a VQ system (VQ-VAE + prior over its codes) side by side on the same
validation files.

    mmbytes compare --byte-ckpt runs/cifar10/version_0/checkpoints/last.ckpt \
        --vq-ckpt runs/vq_cifar10/version_0/checkpoints/last.ckpt \
        --prior-ckpt runs/vq_prior_cifar10/version_0/checkpoints/last.ckpt --data data/cifar10 --out out/compare

Three figures, all in bits per original dimension (8-bit sub-pixel, 16-bit audio sample):

- byte model: its NLL of the validation bytes, lossless (distortion zero);
- VQ (lossy): the prior's NLL of the codes: the rate of a lossy code, paid together with the reconstruction's
  distortion (MSE, PSNR and SSIM for images; SNR and SI-SNR for audio);
- VQ + residual (lossless): the code bits plus the bits of the integer residual under a discretized Laplace with a
  scale fitted per image or clip (``mmbytes.vq.measures``): what the VQ system pays to be lossless as well.

Writes ``report.md``, ``report.csv``, ``rate_distortion.png`` (bits per dimension against MSE; the lossless points sit
at zero distortion), ``samples.png`` (originals, VQ reconstructions, VQ prior samples, byte model samples) and, for
audio, the same as WAV files. Nothing is written outside ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from mmbytes.io import atomic_path, write_text

LOSSLESS, LOSSY = "lossless", "lossy"
COLUMNS = ["system", "kind", "modality", "items", "dims", "bits_per_dim", "code_bits_per_dim", "residual_bits_per_dim",
           "mse", "psnr_db", "ssim", "snr_db", "si_snr_db", "codebook_usage", "code_perplexity", "params"]


def read_val(data_dir: Path, modality: str, max_items: int | None = None) -> list[tuple[np.ndarray, dict]]:
    """The validation samples of one modality in the shards of ``data_dir``: (bytes as uint8, meta), in shard order."""
    from datamodules.bytes import ByteDataModule

    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no shards here; build them with `mmbytes shards ... --out {data_dir}`")
    items = []
    for data, meta in ByteDataModule(data_dir=str(data_dir)).samples("val"):
        if meta.get("modality") == modality:
            items.append((data, meta))
            if max_items and len(items) >= max_items:
                break
    if not items:
        raise ValueError(f"{manifest}: no {modality} samples in the validation split")
    return items


@torch.no_grad()
def byte_bpd(model, items: list[tuple[np.ndarray, dict]], seq_len: int, batch_size: int, modality: str) -> float:
    """The byte model's bits per dimension over the items: consecutive windows of ``seq_len`` bytes, every byte
    scored once, as in validation."""
    from datamodules.bytes import consecutive_windows, stack
    from mmbytes.metrics import PER_DIM_NAME, BitsPerByte

    metric = BitsPerByte()
    windows = list(consecutive_windows(iter(items), seq_len))
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch_size):
        b = stack(windows[i : i + batch_size], seq_len)
        x, mask = b["x"].to(device), b["mask"].to(device)
        nats = model.nll(x, mask, modality=b["modality"].to(device))  # BLT: each modality's own thresholds
        metric.update(nats.sum(1).cpu(), mask.sum(1).cpu(), b["modality"])
    return metric.compute()[PER_DIM_NAME[modality]].item()


@torch.no_grad()
def vq_figures(vq, prior, items: list[tuple[np.ndarray, dict]], context: int | None, batch_size: int,
               crop: int | None = None) -> dict:
    """Rate, residual bits, distortion and code usage of the VQ system over the items, plus per-item originals and
    reconstructions (uint8 (C, H, W) or int16 (L,)). Audio with ``crop`` (the prior's training and validation crop)
    is encoded, scored and decoded in consecutive crops of that many samples, the last zero-padded and its padding
    masked, exactly as validation scores it; without, each clip is encoded whole and scored in windows of
    ``context`` codes."""
    from torchmetrics.audio import ScaleInvariantSignalNoiseRatio, SignalNoiseRatio
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    from datamodules.vq import sample_array
    from mmbytes.vq import measures as M
    from mmbytes.vq.lit import code_nats as nats_of_codes
    from mmbytes.vq.quantizer import usage_and_perplexity

    device = next(vq.parameters()).device
    arrays = [sample_array(d, m, m.get("source", "sample")) for d, m in items]
    counts = torch.zeros(vq.codebook_size, dtype=torch.float64)
    code_nats = res_bits = sq_err = 0.0
    dims = 0
    recons = []
    if vq.modality == "image":
        psnr = PeakSignalNoiseRatio(data_range=255.0, dim=(1, 2, 3))  # mean of per-image PSNR
        ssim = StructuralSimilarityIndexMeasure(data_range=255.0)
        for i in range(0, len(arrays), batch_size):
            chunk = arrays[i : i + batch_size]
            if len({a.shape for a in chunk}) > 1:
                raise ValueError("validation images differ in size; the VQ-VAE compares images of one size")
            orig = torch.from_numpy(np.stack(chunk)).to(device)  # (B, C, H, W) uint8
            idx = vq.encode(M.from_pixels(orig))  # (B, h, w)
            rec = M.to_pixels(vq.decode(idx))
            counts += torch.bincount(idx.flatten().cpu(), minlength=vq.codebook_size).double()
            code_nats += nats_of_codes(prior, idx.flatten(1))  # images: one window, the whole grid
            for o, r in zip(orig, rec, strict=True):
                res_bits += M.image_residual_bits(o.cpu(), r.cpu())
            sq_err += (orig.double() - rec.double()).pow(2).sum().item()
            dims += orig.numel()
            psnr.update(rec.float().cpu(), orig.float().cpu())
            ssim.update(rec.float().cpu(), orig.float().cpu())
            recons += list(rec.cpu().numpy())
        distortion = {"psnr_db": psnr.compute().item(), "ssim": ssim.compute().item()}
    else:
        snr, si_snr = SignalNoiseRatio(), ScaleInvariantSignalNoiseRatio()
        f = vq.downsample
        for a in arrays:  # one clip at a time: clips differ in length
            orig = torch.from_numpy(a.astype(np.int16)).to(device)
            x, step = M.from_samples(orig), crop or len(a) + (-len(a) % f)
            pieces = []
            for s in range(0, len(a), step):  # one piece (the whole clip, zeros up to a whole code) or crops
                n = min(step, len(a) - s)
                idx = vq.encode(torch.nn.functional.pad(x[s : s + n], (0, step - n))[None, None])[0]  # (step/f,)
                real = torch.arange(len(idx), device=device) * f < n  # codes with a real sample, as validation
                counts += torch.bincount(idx[real].cpu(), minlength=vq.codebook_size).double()
                if crop:
                    code_nats += prior.nll(idx[None], real[None]).sum().item()
                else:
                    code_nats += nats_of_codes(prior, idx[None], context)
                pieces.append(vq.decode(idx[None])[0, 0, :n])
            rec = M.to_samples(torch.cat(pieces))
            res_bits += M.audio_residual_bits(orig.cpu(), rec.cpu())
            sq_err += (orig.double() - rec.double()).pow(2).sum().item()
            dims += len(a)
            snr.update(M.from_samples(rec).cpu(), M.from_samples(orig).cpu())
            si_snr.update(M.from_samples(rec).cpu(), M.from_samples(orig).cpu())
            recons.append(rec.cpu().numpy())
        distortion = {"snr_db": snr.compute().item(), "si_snr_db": si_snr.compute().item()}
    usage, perplexity = usage_and_perplexity(counts)
    return {"rate": M.bits_per_dim(code_nats, dims), "residual": res_bits / dims, "mse": sq_err / dims, "dims": dims,
            "usage": usage, "perplexity": perplexity, "originals": arrays, "recons": recons, **distortion}


@torch.no_grad()
def vq_samples(vq, prior, shape: tuple[int, ...], num: int, temperature: float, seed: int) -> list[np.ndarray]:
    """``num`` prior samples decoded by the VQ-VAE: uint8 (C, H, W) images of ``shape`` or int16 (L,) clips."""
    from mmbytes.vq import measures as M

    device = next(prior.parameters()).device
    f = vq.downsample
    grid = (shape[1] // f, shape[2] // f) if vq.modality == "image" else (shape[0] // f,)
    g = torch.Generator(device).manual_seed(seed)
    codes = prior.generate(num, math.prod(grid), temperature=temperature, generator=g).view(num, *grid)
    out = vq.decode(codes)
    return list((M.to_pixels(out) if vq.modality == "image" else M.to_samples(out[:, 0])).cpu().numpy())


def byte_samples(model, meta: dict, num: int, num_bytes: int, temperature: float, seed: int) -> list[np.ndarray]:
    """``num`` samples of the byte model told ``meta``'s modality (BLT patches with its threshold; a conditioned
    model starts from its start state), decoded as ``meta`` says."""
    from datamodules.vq import sample_array
    from mmbytes.sample import sample_bytes

    out = sample_bytes(model, num, num_bytes, temperature=temperature, seed=seed, modality=meta["modality"])
    return [sample_array(np.frombuffer(b, dtype=np.uint8), meta, "byte model sample") for b in out]


def byte_meta(description: dict, modality: str, item_meta: dict) -> dict:
    """How the byte model's samples are decoded: the byte order, tile and sample rate of the data it was trained on
    (its data description), the size of the validation items it is compared on."""
    from mmbytes.data_description import codec_meta

    trained = {k: v for k, v in codec_meta(description, modality).items() if v is not None}
    if modality == "image":
        trained = {k: trained[k] for k in ("order", "tile") if k in trained}
    return {**item_meta, **trained, "modality": modality}


# -- pictures (matplotlib, the project's plotting library)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def image_grid(rows: list[tuple[str, list[np.ndarray]]], out: Path, scale: int) -> Path:
    """Labelled rows of (C, H, W) uint8 images, shown pixel for pixel (nearest neighbour) at ``scale``."""
    plt = _pyplot()
    C, H, W = next(a for _, imgs in rows for a in imgs).shape
    cols = max(len(imgs) for _, imgs in rows)
    dpi = 100
    side = max(H, W) * scale / dpi
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 + cols * side * 1.05, len(rows) * side * 1.1), dpi=dpi,
                             squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                pixels = imgs[c].transpose(1, 2, 0)  # (H, W, C)
                ax.imshow(pixels[..., 0] if C == 1 else pixels, cmap="gray" if C == 1 else None, vmin=0, vmax=255,
                          interpolation="nearest")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=1.5 / fig.get_figwidth(), right=0.99, top=0.98, bottom=0.02, wspace=0.05, hspace=0.1)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix[1:] or "png")
    plt.close(fig)
    return out


def wave_grid(rows: list[tuple[str, list[np.ndarray]]], out: Path) -> Path:
    """Labelled rows of int16 waveforms on a common -1..1 scale (full scale)."""
    plt = _pyplot()
    cols = max(len(clips) for _, clips in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 + 2.4 * cols, 0.8 * len(rows)), dpi=100, squeeze=False,
                             sharey=True)
    for r, (name, clips) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylim(-1, 1)
            if c < len(clips) and len(clips[c]):
                ax.plot(clips[c].astype(np.float64) / 32768.0, lw=0.5, color="tab:blue")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=1.5 / fig.get_figwidth(), right=0.99, top=0.97, bottom=0.03, wspace=0.05, hspace=0.15)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix[1:] or "png")
    plt.close(fig)
    return out


def rd_plot(points: list[tuple[str, float, float, str]], out: Path, ylabel: str, title: str) -> Path:
    """Rate (x: bits per dimension) against distortion (y); points (name, x, y, colour). 720 x 480 pixels."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=100)
    for name, x, y, colour in points:
        ax.scatter([x], [y], s=60, color=colour, edgecolors="black", zorder=3, clip_on=False,
                   label=f"{name}: {x:.3f} bpd, MSE {y:.3g}")
    ax.set_xlim(left=0, right=max(p[1] for p in points) * 1.1 or 1)
    ax.set_ylim(bottom=0, top=max(p[2] for p in points) * 1.1 or 1)
    ax.set_xlabel("rate: bits per dimension")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=Path(out).suffix[1:] or "png")
    plt.close(fig)
    return out


# -- the report


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return str(v)


def write_report(out: Path, rows: list[dict], info: dict) -> None:
    with atomic_path(out / "report.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    m = info["modality"]
    dim = "8-bit sub-pixel" if m == "image" else "16-bit sample"
    dist_cols = ["psnr_db", "ssim"] if m == "image" else ["snr_db", "si_snr_db"]
    head = ["system", "kind", "bits/dim", "code bits/dim", "residual bits/dim", "MSE", *dist_cols]
    lines = [
        f"# Byte model vs VQ tokens: {m}", "",
        f"{info['items']} validation {'image' if m == 'image' else 'clip'}{'s' if info['items'] != 1 else ''} from "
        f"`{info['data']}` ({info['dims']:,} dimensions, one {dim} each), "
        "the same files for every system. Bits per dimension (bpd) are bits per original "
        f"{dim}." + (" For audio that is two bytes: bits per byte (`val/bpb_audio` in `mmbytes validate`, the "
                     "paper's unit) are half these figures; validation logs these as `val/bits_per_sample_audio`."
                     if m == "audio" else ""), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for r in rows:
        vals = [r["system"], r["kind"], r["bits_per_dim"], r.get("code_bits_per_dim"), r.get("residual_bits_per_dim"),
                r["mse"], *(r.get(c) for c in dist_cols)]
        lines.append("| " + " | ".join(_fmt(v) if not isinstance(v, float) or math.isinf(v) else f"{v:.4g}"
                                        for v in vals) + " |")
    lines += [
        "",
        "How to read it:", "",
        "- **byte model**: the byte model's NLL of the validation bytes. Lossless: distortion zero (MSE 0, PSNR/SNR "
        "infinite).",
        "- **VQ (lossy)**: the prior's NLL of the VQ codes per original dimension: the rate of a *lossy* code. It buys "
        "only the reconstruction, at the distortion in its row; it is not comparable with a lossless bpd on its own.",
        "- **VQ + residual (lossless)**: the code bits plus the bits of the integer residual (original - "
        "reconstruction) under a discretized Laplace with one scale per item (the mean absolute residual, sent as a "
        "32-bit float; the tails beyond the residual's possible range folded into its end values). This is what the VQ "
        "system pays to be lossless, the figure to set beside the byte model's bpd. A better residual model would pay "
        "less, so it is an upper bound.",
        "",
        f"Codebook: {info['usage'] * 100:.1f}% of the {info['codebook_size']} codes used on these items, code "
        f"perplexity {info['perplexity']:.1f}. VQ-VAE downsampling {info['downsample']}x "
        f"({info['codes_per_item']}).",
        "",
        "| checkpoint | path | parameters | training steps |", "|---|---|---:|---:|",
        *(f"| {name} | `{info[key + '_ckpt']}` | {info[key + '_params']:,} | {info[key + '_steps']} |"
          for name, key in (("byte model", "byte"), ("VQ-VAE", "vq"), ("prior", "prior"))),
        "",
        "Files: `report.csv` (the table, one row per system), `rate_distortion.png` (bpd against MSE; the lossless "
        f"points at zero distortion), `samples.png` ({info['grid']})" + (", WAV files of the same" if m == "audio"
        else "") + ".", "",
        f"Took {info['seconds']:.1f} s on {info['device']}.", "",
    ]
    write_text(out / "report.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mmbytes compare", description="Byte model vs VQ-VAE + prior on the same "
                                 "validation files: report.md, report.csv, rate-distortion plot, sample grid.",
                                 allow_abbrev=False)
    ap.add_argument("--byte-ckpt", type=Path, required=True, help="a byte model checkpoint (`mmbytes fit`)")
    ap.add_argument("--vq-ckpt", type=Path, required=True, help="a VQ-VAE checkpoint (mmbytes.vq.VQVAEModule)")
    ap.add_argument("--prior-ckpt", type=Path, required=True, help="a prior checkpoint (mmbytes.vq.VQPriorModule)")
    ap.add_argument("--data", type=Path, required=True, help="the shard folder both were trained on (its val split)")
    ap.add_argument("--out", type=Path, required=True, help="output folder; nothing is written outside it")
    ap.add_argument("--max-items", type=int, help="score only the first N validation items")
    ap.add_argument("--byte-seq-len", type=int, help="byte model window (default: as trained, else 1024)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num", type=int, default=8, help="items and samples per row of the sample grid")
    ap.add_argument("--byte-samples", type=int, help="byte model samples in the grid (default --num; 0: none)")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of sampled audio")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from mmbytes.checkpoint import load_checkpoint, load_model
    from mmbytes.data_description import of_checkpoint
    from mmbytes.vq.lit import load_prior, load_vq

    start = time.time()
    vq, vq_hp = load_vq(args.vq_ckpt, args.device)
    prior, prior_hp = load_prior(args.prior_ckpt, args.device)
    byte_model, _ = load_model(args.byte_ckpt, args.device)
    if prior.codebook_size != vq.codebook_size:
        raise ValueError(f"{args.prior_ckpt}: a prior over {prior.codebook_size} codes; {args.vq_ckpt} has "
                         f"{vq.codebook_size}")
    modality = vq.modality
    items = read_val(args.data, modality, args.max_items)
    byte_ckpt = load_checkpoint(args.byte_ckpt)
    data_hp = byte_ckpt.get("datamodule_hyper_parameters") or {}  # its window (seq_len); how data was encoded: below
    description = of_checkpoint(byte_ckpt, args.byte_ckpt)
    steps = {"byte_steps": byte_ckpt.get("global_step", "?"), "vq_steps": load_checkpoint(args.vq_ckpt).get(
        "global_step", "?"), "prior_steps": load_checkpoint(args.prior_ckpt).get("global_step", "?")}
    del byte_ckpt
    seq_len = args.byte_seq_len or data_hp.get("seq_len") or 1024

    bpd = byte_bpd(byte_model, items, seq_len, args.batch_size, modality)
    crop = (load_checkpoint(args.prior_ckpt).get("datamodule_hyper_parameters") or {}).get("crop")
    vqf = vq_figures(vq, prior, items, prior_hp.get("context"), args.batch_size, crop if modality == "audio" else None)
    n = min(args.num, len(items))
    meta = items[0][1]
    if modality == "image":
        shape = vqf["originals"][0].shape
        num_bytes = math.prod(shape)
    else:
        sr = meta["sample_rate"]
        length = max(vq.downsample, int(args.seconds * sr) // vq.downsample * vq.downsample)
        shape, num_bytes = (length,), length * 2
    samples = vq_samples(vq, prior, shape, args.num, args.temperature, args.seed)
    nb = args.num if args.byte_samples is None else args.byte_samples
    bmeta = byte_meta(description, modality, meta)
    bsamples = byte_samples(byte_model, bmeta, nb, num_bytes, args.temperature, args.seed) if nb else []

    args.out.mkdir(parents=True, exist_ok=True)
    inf = math.inf
    common = {"modality": modality, "items": len(items), "dims": vqf["dims"]}
    lossless = {"mse": 0.0, **({"psnr_db": inf, "ssim": 1.0} if modality == "image" else
                               {"snr_db": inf, "si_snr_db": inf})}
    dist = {k: vqf[k] for k in ("psnr_db", "ssim", "snr_db", "si_snr_db") if k in vqf}
    codes = {"codebook_usage": vqf["usage"], "code_perplexity": vqf["perplexity"]}
    rows = [
        {"system": "byte model", "kind": LOSSLESS, **common, "bits_per_dim": bpd, **lossless,
         "params": sum(p.numel() for p in byte_model.parameters())},
        {"system": "VQ (lossy)", "kind": LOSSY, **common, "bits_per_dim": vqf["rate"],
         "code_bits_per_dim": vqf["rate"], "mse": vqf["mse"], **dist, **codes,
         "params": vq.num_params() + prior.num_params()},
        {"system": "VQ + residual (lossless)", "kind": LOSSLESS, **common,
         "bits_per_dim": vqf["rate"] + vqf["residual"], "code_bits_per_dim": vqf["rate"],
         "residual_bits_per_dim": vqf["residual"], **lossless, **codes,
         "params": vq.num_params() + prior.num_params()},
    ]
    colours = ["tab:blue", "tab:red", "tab:green"]
    rd_plot([(r["system"], r["bits_per_dim"], r["mse"], c) for r, c in zip(rows, colours, strict=True)],
            args.out / "rate_distortion.png",
            "distortion: MSE per dimension (" + ("0..255 pixels" if modality == "image" else "int16 samples") + ")",
            f"rate-distortion, {modality}: byte model vs VQ")
    shown = np.linspace(0, len(items) - 1, n).round().astype(int)  # spread over the split (often sorted by class)
    grid_rows = [("original", [vqf["originals"][i] for i in shown]),
                 ("VQ reconstruction", [vqf["recons"][i] for i in shown]),
                 ("VQ prior sample", samples)]
    if bsamples:
        grid_rows.append(("byte model sample", bsamples))
    if modality == "image":
        image_grid(grid_rows, args.out / "samples.png", scale=max(1, 64 // shape[1]))
    else:
        import soundfile as sf

        wave_grid(grid_rows, args.out / "samples.png")
        stems = {"original": "original", "VQ reconstruction": "vq_recon", "VQ prior sample": "vq_sample",
                 "byte model sample": "byte_sample"}
        for name, clips in grid_rows:
            for i, a in enumerate(clips):
                with atomic_path(args.out / f"{stems[name]}_{i:03d}.wav") as tmp:
                    rate = (bmeta if name == "byte model sample" else meta)["sample_rate"]
                    sf.write(str(tmp), a.astype(np.int16), rate, subtype="PCM_16", format="WAV")
    f = vq.downsample
    per_item = (f"{shape[1] // f}x{shape[2] // f} codes per {shape[2]}x{shape[1]} image" if modality == "image"
                else f"one code per {f} samples")
    info = {"modality": modality, "items": len(items), "dims": vqf["dims"], "data": str(args.data),
            "usage": vqf["usage"], "perplexity": vqf["perplexity"], "codebook_size": vq.codebook_size,
            "downsample": f, "codes_per_item": per_item, "byte_ckpt": str(args.byte_ckpt),
            "vq_ckpt": str(args.vq_ckpt), "prior_ckpt": str(args.prior_ckpt),
            "byte_params": rows[0]["params"], "vq_params": vq.num_params(), "prior_params": prior.num_params(),
            "grid": "rows: " + ", ".join(name for name, _ in grid_rows), "seconds": time.time() - start,
            "device": args.device, **steps}
    write_report(args.out, rows, info)
    for r in rows:
        print(f"{r['system']:28s} {r['bits_per_dim']:.4f} bpd  MSE {r['mse']:.4g}")
    print(f"wrote {args.out / 'report.md'}")
