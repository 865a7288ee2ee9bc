"""Learning efficiency: forms of one named size (any architecture) trained on the same batches, scored on the same
held-out bytes.

Every variant sees the same training windows in the same order (one seeded draw per seed from the first 90% of a real
text file, or with ``--shards`` from a shard set's training samples) with the same AdamW settings (betas 0.9/0.98,
weight decay 0.1, clip 1.0, linear warmup then cosine to 10%), and is scored at the same steps on every whole window
of the last 10% of the file (``--shards``: of the validation samples). mmbytes variants use ``ByteLM``'s parameter
groups (no decay on norms, biases or padding vectors). When the MEGABYTE-pytorch package is installed (``pip install
MEGABYTE-pytorch==0.3.6``; not a dependency of mmbytes) the same shape built with it is trained alongside a MEGABYTE
size as the reference (``reference``), with plain AdamW on all its parameters.

A variant is a name of ``VARIANTS`` (MEGABYTE's fields, most over its paper form) or atoms joined by ``+`` applied
over the named size (``ATOMS``): ``shift`` (token shift), ``swiglu`` (SwiGLU MLP), ``fanin`` (fan-in init),
``embed1`` (embeddings N(0, 1)), ``paper`` (the ``paper`` preset of the size's architecture, first, whatever its
place) and ``default`` (nothing). A ``VARIANTS`` name whose
fields the size's config has takes its ``VARIANTS`` meaning: for a MEGABYTE size, ``shift`` is the paper form with
token shift; for the others it is the named size with token shift. The run prints each variant's overrides.

    python bench/learning.py --steps 150 --json bench/learning.json
    python bench/learning.py --steps 1000 --variants paper,default,reference --eval-every 250
    python bench/learning.py --steps 150 --variants reference,default --equal-wall
    python bench/learning.py --size spacebyte-small --variants default,shift,swiglu,shift+swiglu --seeds 0,1
    python bench/learning.py --size blt-small --variants default,fanin+embed1+shift+swiglu --shards data/mixed \
        --entropy-ckpt runs/entropy/last.ckpt

With ``--equal-wall`` the first variant trains ``--steps`` steps and every other one trains for the same training
time, measured in the same process: its step count (and so the end of its learning-rate schedule) is set from the
seconds per step of a 10-step probe of a throwaway copy, and the table gives its steps, seconds and final bpb.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from mmbytes import MegabyteConfig
from mmbytes.codecs import MODALITIES
from mmbytes.lit import load_entropy, model_config, param_groups, warmup_cosine
from mmbytes.model.megabyte_config import PRESETS
from mmbytes.model.protocol import ModelData
from mmbytes.model.registry import build as build_model
from mmbytes.model.registry import presets
from mmbytes.stamp import stamp

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"

# name -> (config overrides of `--size`, embeddings decayed); "reference" is MEGABYTE-pytorch
PAPER = PRESETS["paper"]
VARIANTS: dict[str, tuple[dict, bool]] = {
    "paper": (PAPER, True),
    "embed1": ({**PAPER, "embed_std": 1.0}, True),
    "shift": ({**PAPER, "token_shift": True}, True),
    "embed1+shift": ({**PAPER, "embed_std": 1.0, "token_shift": True}, True),
    "embed1+shift+nodecay": ({**PAPER, "embed_std": 1.0, "token_shift": True}, False),
    "embed1+shift+project": ({**PAPER, "embed_std": 1.0, "token_shift": True, "patch_embed": "project"}, True),
    "embed1+shift+full": ({**PAPER, "embed_std": 1.0, "token_shift": True, "global_to_local": "full"}, True),
    "seqshift": ({**PAPER, "local_shift": "sequence"}, True),
    "embed1+seqshift": ({**PAPER, "embed_std": 1.0, "local_shift": "sequence"}, True),
    "embed1+shift+seqshift": ({**PAPER, "embed_std": 1.0, "token_shift": True, "local_shift": "sequence"}, True),
    "embed1+fanin": ({**PAPER, "embed_std": 1.0, "init": "fan_in"}, True),
    "fanin+seqshift": ({**PAPER, "init": "fan_in", "local_shift": "sequence"}, True),
    # three fields of the named sizes (local_shift sequence, fan-in init, N(0, 1) embeddings) and two more (token
    # shift, projected patch embedding), each alone and together: "default" is the named size as the registry builds it
    "seq+fanin+embed1": ({**PAPER, "embed_std": 1.0, "init": "fan_in", "local_shift": "sequence"}, True),
    "seq+fanin+embed1+shift": ({**PAPER, "embed_std": 1.0, "init": "fan_in", "local_shift": "sequence",
                                "token_shift": True}, True),
    "seq+fanin+embed1+shift+full": ({**PAPER, "embed_std": 1.0, "init": "fan_in", "local_shift": "sequence",
                                     "token_shift": True, "global_to_local": "full"}, True),
    "default+full": ({"global_to_local": "full"}, True),  # every MEGABYTE-pytorch choice the options offer
    # also for other architectures (--size spacebyte-small): their init and embedding scale
    "token_shift": ({"token_shift": True}, True),
    "fanin+embed1": ({"init": "fan_in", "embed_std": 1.0}, True),
    "fanin+embed1+shift": ({"init": "fan_in", "embed_std": 1.0, "token_shift": True}, True),
    "default": ({}, True),  # whatever the named size is today
}

ATOMS: dict[str, dict] = {
    "default": {},
    "shift": {"token_shift": True},  # token shift in every block (Peng et al., 2023, RWKV)
    "swiglu": {"mlp": "swiglu"},  # SwiGLU MLP at equal parameters (Shazeer, 2020)
    "fanin": {"init": "fan_in"},  # PyTorch's fan-in initialisation of every linear layer
    "embed1": {"embed_std": 1.0},  # byte (token) embeddings and start units N(0, 1)
    "paper": {},  # the size's architecture's `paper` preset, applied first (``variant``)
}
"""Atoms of a variant name joined by ``+`` (``fanin+embed1+shift+swiglu``), applied over the named size."""


def variant(name: str, size: str) -> tuple[dict, bool]:
    """(config overrides of ``size``, embeddings decayed) of a variant name: its ``VARIANTS`` entry when the size's
    config has every field it sets, else its atoms. An unknown atom is a ``ValueError`` naming it."""
    config = model_config(size)
    known = {f.name for f in fields(config)}
    if name in VARIANTS and set(VARIANTS[name][0]) <= known:
        return VARIANTS[name]
    atoms = name.split("+")
    for atom in atoms:
        if atom not in ATOMS:
            raise ValueError(f"variant {name!r}: unknown atom {atom!r}; atoms are {', '.join(ATOMS)} (joined by +)"
                             + (", or one of VARIANTS" if isinstance(config, MegabyteConfig) else ""))
    out = dict(presets(size)["paper"]) if "paper" in atoms else {}
    for atom in atoms:
        out.update(ATOMS[atom])
    return out, True


def split_text(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 90% of a file's bytes (training) and the last 10% (held out), as uint8."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def shard_bytes(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard set's training samples and its validation samples (``mmbytes shards``), each split's samples
    concatenated in manifest order, as uint8; read through ``datamodules.reader``. A shard or sample that cannot be
    read stops the run with its name."""
    import numpy as np

    from datamodules.bytes import decode
    from datamodules.reader import manifest_shards, tar_samples
    from mmbytes.shards import read_manifest

    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; make the shards with `mmbytes shards SRC --out {folder}`")
    manifest = read_manifest(path)

    def split(name: str) -> torch.Tensor:
        urls, bound = manifest_shards(manifest, path, name)
        parts = [decode(sample)[0] for url in urls for sample in tar_samples(url, lambda exn: False, bound)]
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.uint8))

    return split("train"), split("val")


def train_batches(train: torch.Tensor, steps: int, batch: int, T: int, seed: int) -> torch.Tensor:
    """(steps, batch, T) random windows of the training bytes, one seeded draw shared by every variant."""
    if len(train) <= T:
        raise ValueError(f"{len(train)} training bytes: too few for windows of {T}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - T, (steps, batch), generator=g)
    return train[starts[..., None] + torch.arange(T)].long()


class Reference(torch.nn.Module):
    """MEGABYTE-pytorch at the shape of a mmbytes config, behind the same ``nll`` call."""

    def __init__(self, c: MegabyteConfig, T: int) -> None:
        super().__init__()
        from MEGABYTE_pytorch import MEGABYTE

        self.net = MEGABYTE(num_tokens=256, dim=(c.d_global_model, c.d_local), depth=(c.n_layer_global,
                            c.n_layer_local), max_seq_len=(T // c.patch_size, c.patch_size), dim_head=64,
                            heads=c.n_head_global, pad_id=-1)  # pad_id -1: no byte value is left out of the loss

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Its own training loss (mean nats over every byte of the batch), spread over (B, T) so that sums and means
        over windows of equal length are exact."""
        return self.net(x, return_loss=True).expand(x.shape)

    def caveats(self) -> list[str]:
        return []


def model_data(T: int, train: torch.Tensor, cache_dir: Path | None) -> ModelData:
    """What a model may know of the training bytes: its window, the bytes (a BPE tokenizer is trained on them, once,
    kept in ``cache_dir``) and random windows of them (BLT calibrates its thresholds on them, as ``raw`` bytes)."""
    def draw(n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = train_batches(train, 1, n, seq_len, seed)[0]
        return x, torch.ones_like(x, dtype=torch.bool), torch.full((n,), MODALITIES.index("raw"))

    return ModelData(seq_len=T, train_samples=lambda: [train.numpy().tobytes()], draw_windows=draw,
                     cache_dir=cache_dir)


def build(name: str, args, train: torch.Tensor) -> tuple[torch.nn.Module, list[dict] | None]:
    size, T = args.size, args.seq_len
    if name == "reference":
        return Reference(MegabyteConfig.from_name(size), T).to(args.device), None
    overrides, decay_embeddings = variant(name, size)
    entropy = load_entropy(str(args.entropy_ckpt)) if args.entropy_ckpt else None
    model = build_model(model_config(size, overrides, entropy))
    if entropy is not None:
        model.set_entropy(entropy["state"], entropy["calibration"], str(args.entropy_ckpt))
    # any size of the registry, readied for its data (SpaceByte: its global cap; BPE: its tokenizer; BLT: thresholds)
    model.prepare(model_data(T, train, args.cache_dir))
    model.to(args.device)
    return model, param_groups(model, 0.1, decay_embeddings)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, T: int, batch: int) -> float:
    model.eval()
    windows = val[: len(val) // T * T].view(-1, T)
    device = next(model.parameters()).device
    nats = sum(model.nll(w.to(device).long()).sum().item() for w in windows.split(batch))
    model.train()
    return nats / windows.numel() / math.log(2)


def clock(device: str) -> float:
    """Seconds, after the device's queued work is done (GPU steps run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def seconds_per_step(name: str, args, batches: torch.Tensor, train: torch.Tensor, probe: int = 10) -> float:
    """Training seconds per step of a throwaway copy of ``name`` (the first two steps are not timed)."""
    model, groups = build(name, args, train)
    opt = torch.optim.AdamW(groups if groups is not None else model.parameters(), lr=args.lr)
    for i, x in enumerate(batches[: probe + 2]):
        if i == 2:
            start = clock(args.device)
        model.nll(x.to(args.device)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (clock(args.device) - start) / probe


def run(name: str, args, batches: torch.Tensor, val: torch.Tensor, seed: int, train: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model, groups = build(name, args, train)
    for caveat in model.caveats():
        print(f"  {name}: {caveat}")
    opt = torch.optim.AdamW(groups if groups is not None else model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup, len(batches), 0.1))
    curve, train_s = {}, 0.0
    model.train()
    for step, x in enumerate(batches, start=1):
        start = clock(args.device)
        loss = model.nll(x.to(args.device)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += clock(args.device) - start
        if step % args.eval_every == 0 or step == len(batches):
            curve[step] = evaluate(model, val, args.seq_len, args.batch)
            print(f"  {name:24s} seed {seed} step {step:5d}  val bpb {curve[step]:.3f}  ({train_s / step:.2f} s/step)",
                  flush=True)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    overrides = None if name == "reference" else variant(name, args.size)[0]
    return {"variant": name, "overrides": overrides, "seed": seed, "params": params, "val_bpb": curve,
            "steps": len(batches), "train_s": train_s, "s_per_step": train_s / len(batches)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant names (default: every VARIANTS name and the reference for a "
                         "MEGABYTE size, else default,shift,swiglu,fanin+embed1,fanin+embed1+shift+swiglu)")
    ap.add_argument("--size", default="small", help="a named size of any architecture")
    ap.add_argument("--text", type=Path, default=TEXT, help="a real text file: first 90%% trains, last 10%% scores")
    ap.add_argument("--shards", type=Path, help="a shard folder (`mmbytes shards`): its training samples train, its "
                                                "validation samples score (instead of --text)")
    ap.add_argument("--entropy-ckpt", type=Path, help="BLT: its trained entropy model (`mmbytes fit` checkpoint)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="the seed when --seeds is not given")
    ap.add_argument("--seeds", help="comma-separated seeds: every variant trains once per seed (its batches and its "
                                    "initialisation); the table gives each seed and the mean")
    ap.add_argument("--equal-wall", action="store_true",
                    help="every variant after the first trains for the first one's training time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the models train (default: cuda when there is one)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    megabyte = isinstance(model_config(args.size), MegabyteConfig) and model_config(args.size).arch == "megabyte"
    default = [*VARIANTS, "reference"] if megabyte else ["default", "shift", "swiglu", "fanin+embed1",
                                                         "fanin+embed1+shift+swiglu"]
    names = args.variants.split(",") if args.variants else default
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    try:
        forms = {n: variant(n, args.size) for n in names if n != "reference"}
    except ValueError as e:
        raise SystemExit(f"bench/learning.py: {e}") from None
    if "reference" in names:
        why = None if megabyte else f"{args.size} is not a MEGABYTE size"
        if why is None:
            try:
                import MEGABYTE_pytorch  # noqa: F401
            except ImportError:
                why = "MEGABYTE-pytorch is not installed (pip install MEGABYTE-pytorch==0.3.6)"
        if why:
            print(f"no reference row: {why}")
            names.remove("reference")
    train, val = shard_bytes(args.shards) if args.shards else split_text(args.text)
    source = f"shards {args.shards}" if args.shards else args.text.name
    print(f"{source}: {len(train)} training bytes, {len(val) // args.seq_len * args.seq_len} held-out bytes; "
          f"size {args.size}, T={args.seq_len}, batch {args.batch}, lr {args.lr}, {args.steps} steps, "
          f"seeds {','.join(map(str, seeds))}, on {args.device}")
    for n, (overrides, decay) in forms.items():
        print(f"  {n}: {overrides or 'the named size'}" + ("" if decay else ", embeddings not decayed"))
    with tempfile.TemporaryDirectory(prefix="mmbytes-learning-") as cache:  # a BPE tokenizer, trained once
        args.cache_dir = Path(cache)
        if args.equal_wall:
            rows = equal_wall(args, names, seeds, train, val)
        else:
            rows = [run(name, args, train_batches(train, args.steps, args.batch, args.seq_len, seed), val, seed,
                        train) for seed in seeds for name in names]
            print_table(rows, seeds)
    write_json(args, rows, sys.argv[1:] if argv is None else argv)
    return rows


def print_table(rows: list[dict], seeds: list[int]) -> None:
    """Each variant at every scored step: one line per seed, and with several seeds their mean."""
    steps = sorted(rows[0]["val_bpb"])
    print(f"\n{'variant':28s} {'seed':>5s} {'params':>8s} {'s/step':>7s} "
          + " ".join(f"{'@' + str(s):>7s}" for s in steps))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        for r in mine:
            print(f"{name:28s} {r['seed']:5d} {r['params'] / 1e6:7.2f}M {r['s_per_step']:7.2f} "
                  + " ".join(f"{r['val_bpb'][s]:7.3f}" for s in steps))
        if len(seeds) > 1:
            mean = {s: sum(r["val_bpb"][s] for r in mine) / len(mine) for s in steps}
            print(f"{name:28s} {'mean':>5s} {mine[0]['params'] / 1e6:7.2f}M "
                  f"{sum(r['s_per_step'] for r in mine) / len(mine):7.2f} "
                  + " ".join(f"{mean[s]:7.3f}" for s in steps))


def write_json(args, rows: list[dict], argv: list[str]) -> None:
    """The runs (``runs``) and a table ``bench/render_measurements.py`` renders: a row per variant and seed, and a
    mean row per variant over several seeds, val bpb at every scored step."""
    if not args.json:
        return
    from mmbytes.io import write_text

    steps = sorted({s for r in rows for s in r["val_bpb"]})
    table = [[r["variant"], str(r["seed"]), f"{r['params'] / 1e6:.2f}M", r["steps"], r["s_per_step"],
              *(r["val_bpb"].get(s) for s in steps)] for r in rows]
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:
        for name in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == name]
            table.append([name, "mean", f"{mine[0]['params'] / 1e6:.2f}M", mine[0]["steps"],
                          sum(r["s_per_step"] for r in mine) / len(mine),
                          *(sum(r["val_bpb"][s] for r in mine) / len(mine) if all(s in r["val_bpb"] for r in mine)
                            else None for s in steps)])
    source = f"shards {args.shards}" if args.shards else Path(args.text).name
    settings = {k: str(v) for k, v in vars(args).items() if k != "cache_dir"}
    write_text(args.json, json.dumps({
        **stamp(), "title": f"Learning efficiency of `{args.size}`: its forms, {args.steps} steps on {source}",
        "group": "architectures", "command": " ".join(["python bench/learning.py", *argv]), "args": settings,
        "columns": ["variant", "seed", "parameters", "steps", "s/step", *(f"val bpb @{s}" for s in steps)],
        "formats": [None, None, None, "d", ".2f", *([".3f"] * len(steps))], "rows": table, "runs": rows}, indent=2))


def equal_wall(args, names: list[str], seeds: list[int], train: torch.Tensor, val: torch.Tensor) -> list[dict]:
    rows = []
    for seed in seeds:
        first = run(names[0], args, train_batches(train, args.steps, args.batch, args.seq_len, seed), val, seed,
                    train)
        rows.append(first)
        for name in names[1:]:
            steps = max(1, round(first["train_s"] / seconds_per_step(name, args, train_batches(
                train, 12, args.batch, args.seq_len, seed), train)))
            rows.append(run(name, args, train_batches(train, steps, args.batch, args.seq_len, seed), val, seed,
                            train))
        print(f"\nequal training time ({first['train_s']:.0f} s of {names[0]}, seed {seed})")
        print(f"{'variant':28s} {'params':>8s} {'steps':>6s} {'train s':>8s} {'s/step':>7s} {'val bpb':>8s}")
        for r in rows[-len(names):]:
            print(f"{r['variant']:28s} {r['params'] / 1e6:7.2f}M {r['steps']:6d} {r['train_s']:8.0f} "
                  f"{r['s_per_step']:7.2f} {r['val_bpb'][r['steps']]:8.3f}")
    return rows


if __name__ == "__main__":
    main()
