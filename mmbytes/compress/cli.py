"""``mmbytes compress`` / ``mmbytes decompress``: files and folders in, ``.mmbz`` files (or the originals) out.

    mmbytes compress --ckpt runs/x/checkpoints/last.ckpt photo.ppm speech.wav notes.txt --out packed/
    mmbytes decompress --ckpt runs/x/checkpoints/last.ckpt packed/*.mmbz --out restored/

Nothing is written outside ``--out``; each output is written atomically, and only once it is known to be exact
(decompress: the original's checksum; compress --verify: a full decode).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from mmbytes.compress.coder import compress_files, decompress_files
from mmbytes.compress.container import SUFFIX, CompressionError
from mmbytes.compress.plans import trained_codecs


def atomic_write(path: Path, data: bytes, root: Path) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over it (a link at ``path`` is replaced, not
    followed). Refuses a folder on the way that leads outside ``root`` (a link left in the output folder)."""
    root.mkdir(parents=True, exist_ok=True)
    existing = path.parent
    while not existing.exists():  # check before making folders: mkdir would follow a link out of ``root``
        existing = existing.parent
    if not existing.resolve().is_relative_to(root.resolve()):
        raise CompressionError(f"{path}: its folder leads outside {root}; not written")
    from mmbytes.io import write_atomically

    write_atomically(path, lambda f: f.write(data))


def walk(sources: list[Path], suffix: str | None = None) -> list[tuple[Path, Path]]:
    """(file, path relative to the output folder): a file given directly keeps its name; a folder's files keep their
    path inside it, under the folder's name. With ``suffix`` only files with that suffix are taken from folders."""
    out = []
    for src in sources:
        if src.is_dir():
            root = Path(src.resolve().name)
            out += [(p, root / p.relative_to(src)) for p in sorted(src.rglob("*"))
                    if p.is_file() and (suffix is None or p.name.endswith(suffix))]
        elif src.is_file():
            out.append((src, Path(src.name)))
        else:
            raise CompressionError(f"{src}: no such file or folder")
    return out


def load(ckpt: Path, device: str, describe: bool = True) -> tuple[nn.Module, dict | None, int | None]:
    """The model, the data description it was trained on (``mmbytes.data_description``: modalities, image order
    and tile; None unless ``describe``) and its training window (the default chunk)."""
    from mmbytes.checkpoint import load_checkpoint, load_model
    from mmbytes.data_description import of_checkpoint

    model, _ = load_model(ckpt, map_location=device)
    stored = load_checkpoint(ckpt)
    description = of_checkpoint(stored, ckpt, lambda line: print(f"mmbytes: {line}", file=sys.stderr)) \
        if describe else None
    return model, description, (stored.get("datamodule_hyper_parameters") or {}).get("seq_len")


def written(target: Path, data: bytes, out: Path, command: str) -> bool:
    """Write ``data`` to ``target`` inside ``out`` atomically; a refusal is one line on stderr and False."""
    try:
        atomic_write(target, data, out)
    except CompressionError as e:
        print(f"mmbytes {command}: {e}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None, command: str = "compress") -> None:
    from mmbytes.argtypes import at_most
    from mmbytes.compress.container import MAX_CHUNK, MAX_ROWS

    decompress = command == "decompress"
    ap = argparse.ArgumentParser(
        prog=f"mmbytes {command}",
        description="Decompress .mmbz files with the model that compressed them." if decompress else
        "Compress files losslessly with a trained model (arithmetic coding of its next-byte distributions).",
        allow_abbrev=False)
    ap.add_argument("--ckpt", required=True, type=Path, help="a checkpoint written by `mmbytes fit`")
    ap.add_argument("inputs", nargs="+", type=Path,
                    help=".mmbz files or folders holding them" if decompress else "files and folders")
    ap.add_argument("--out", required=True, type=Path, help="output folder; nothing is written outside it")
    if not decompress:
        ap.add_argument("--chunk", type=at_most(int, 1, MAX_CHUNK),
                        help="bytes per independently coded chunk (default: the model's training sequence length, "
                        "else 4096); longer chunks give more context, shorter ones more rows to code in parallel")
        ap.add_argument("--batch", type=at_most(int, 1, MAX_ROWS), default=16,
                        help="rows coded together (chunks of one or many files)")
        ap.add_argument("--raw", action="store_true", help="code every file as stored (no pixel or sample mode)")
        ap.add_argument("--verify", action="store_true",
                        help="decompress every file before writing it and write only those that come back exact "
                        "(twice the time)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs; decompress on the kind of device the files were compressed on")
    if decompress:
        ap.add_argument("--force", action="store_true",
                        help="decode files whose recorded torch version, kernels, dtype or device differ from this "
                        "machine's (refused otherwise); the checksum still decides what is written")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        files = walk(args.inputs, SUFFIX if decompress else None)
    except CompressionError as e:
        sys.exit(f"mmbytes {command}: {e}")
    model, description, seq_len = load(args.ckpt, args.device, describe=not decompress)
    failed = 0
    if decompress:
        targets = [args.out / (rel.with_name(rel.name[: -len(SUFFIX)]) if rel.name.endswith(SUFFIX) else rel)
                   for _, rel in files]
        if len(set(targets)) < len(targets):
            twice = sorted({str(t) for t in targets if targets.count(t) > 1})
            sys.exit(f"mmbytes decompress: two inputs would be written to the same file: {', '.join(twice)}")
        items = [(p.read_bytes(), str(p)) for p, _ in files]
        results = decompress_files(model, items, force=args.force, progress=not args.quiet)
        for (p, _), target, result in zip(files, targets, results, strict=True):
            if isinstance(result, CompressionError):
                print(f"mmbytes decompress: {result}", file=sys.stderr)
                failed += 1
                continue
            if not written(target, result, args.out, command):
                failed += 1
                continue
            print(f"{p} -> {target} ({len(result):,} bytes)")
    else:
        modalities, image_options = trained_codecs(description)
        items = [(p.read_bytes(), str(p), args.out / rel.with_name(rel.name + SUFFIX)) for p, rel in files]
        targets = [target for _, _, target in items]
        if len(set(targets)) < len(targets):
            twice = sorted({str(t) for t in targets if targets.count(t) > 1})
            sys.exit(f"mmbytes compress: two inputs would be written to the same file: {', '.join(twice)}")
        results = compress_files(model, [(data, name) for data, name, _ in items], chunk=args.chunk or seq_len or 4096,
                                 batch=args.batch, modalities=modalities, image_options=image_options,
                                 raw_only=args.raw, progress=not args.quiet)
        checked = decompress_files(model, [(p, s["name"]) for p, s in results], progress=not args.quiet) \
            if args.verify else [data for data, _, _ in items]
        for (data, name, target), (packed, stats), back in zip(items, results, checked, strict=True):
            if back != data:
                print(f"mmbytes compress: {name}: did not decompress to the original ({back}); not written",
                      file=sys.stderr)
                failed += 1
                continue
            if not written(target, packed, args.out, command):
                failed += 1
                continue
            rate = f", {stats['compressed'] / stats['original']:.1%}" if stats["original"] else ""
            print(f"{name} -> {target} ({stats['mode']}: {stats['original']:,} -> {stats['compressed']:,} bytes"
                  f"{rate})")
    if failed:
        sys.exit(f"mmbytes {command}: {failed} of {len(files)} files refused")


def main_decompress(argv: list[str] | None = None) -> None:
    main(argv, "decompress")
