"""Learning efficiency: variants of MEGABYTE trained on the same batches, scored on the same held-out bytes.

Every variant sees the same training windows in the same order (one seeded draw from the first 90% of a real text
file) with the same AdamW settings (betas 0.9/0.98, weight decay 0.1, clip 1.0, linear warmup then cosine to 10%),
and is scored at the same steps on every whole window of the last 10% of the file. mmbytes variants use
``ByteLM``'s parameter groups (no decay on norms, biases or padding vectors). When the MEGABYTE-pytorch package is
installed (``pip install MEGABYTE-pytorch==0.3.6``; not a dependency of mmbytes) the same shape built with it is
trained alongside as the reference, with plain AdamW on all its parameters.

    python bench/learning.py --steps 150 --json bench/learning.json
    python bench/learning.py --steps 1000 --variants paper,default,reference --eval-every 250
    python bench/learning.py --steps 150 --variants reference,default --equal-wall

With ``--equal-wall`` the first variant trains ``--steps`` steps and every other one trains for the same training
time, measured in the same process: its step count (and so the end of its learning-rate schedule) is set from the
seconds per step of a 10-step probe of a throwaway copy, and the table gives its steps, seconds and final bpb.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mmbytes import MegabyteConfig
from mmbytes.lit import param_groups, warmup_cosine
from mmbytes.model.megabyte_config import PRESETS
from mmbytes.model.protocol import ModelData
from mmbytes.model.registry import build as build_model
from mmbytes.model.registry import config_from_name
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


def split_text(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def train_batches(train: torch.Tensor, steps: int, batch: int, T: int, seed: int) -> torch.Tensor:
    """(steps, batch, T) random windows of the training bytes, one seeded draw shared by every variant."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - T, (steps, batch), generator=g)
    return train[starts[..., None] + torch.arange(T)]


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


def build(name: str, size: str, T: int) -> tuple[torch.nn.Module, list[dict] | None]:
    if name == "reference":
        return Reference(MegabyteConfig.from_name(size), T), None
    overrides, decay_embeddings = VARIANTS[name]
    model = build_model(config_from_name(size, **overrides))
    model.prepare(ModelData(seq_len=T))  # any size of the registry, readied for T (SpaceByte: its global cap)
    return model, param_groups(model, 0.1, decay_embeddings)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, T: int, batch: int) -> float:
    model.eval()
    windows = val[: len(val) // T * T].view(-1, T)
    nats = sum(model.nll(w).sum().item() for w in windows.split(batch))
    model.train()
    return nats / windows.numel() / math.log(2)


def seconds_per_step(name: str, args, batches: torch.Tensor, probe: int = 10) -> float:
    """Training seconds per step of a throwaway copy of ``name`` (the first two steps are not timed)."""
    model, groups = build(name, args.size, args.seq_len)
    opt = torch.optim.AdamW(groups if groups is not None else model.parameters(), lr=args.lr)
    for i, x in enumerate(batches[: probe + 2]):
        if i == 2:
            start = time.perf_counter()
        model.nll(x).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / probe


def run(name: str, args, batches: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model, groups = build(name, args.size, args.seq_len)
    opt = torch.optim.AdamW(groups if groups is not None else model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.warmup, len(batches), 0.1))
    curve, train_s = {}, 0.0
    model.train()
    for step, x in enumerate(batches, start=1):
        start = time.perf_counter()
        loss = model.nll(x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - start
        if step % args.eval_every == 0 or step == len(batches):
            curve[step] = evaluate(model, val, args.seq_len, args.batch)
            print(f"  {name:24s} step {step:5d}  val bpb {curve[step]:.3f}  ({train_s / step:.2f} s/step)",
                  flush=True)
    params = sum(p.numel() for p in model.parameters())
    return {"variant": name, "params": params, "val_bpb": curve, "steps": len(batches), "train_s": train_s,
            "s_per_step": train_s / len(batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join([*VARIANTS, "reference"]))
    ap.add_argument("--size", default="small")
    ap.add_argument("--text", type=Path, default=TEXT, help="a real text file: first 90%% trains, last 10%% scores")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--equal-wall", action="store_true",
                    help="every variant after the first trains for the first one's training time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    train, val = split_text(args.text)
    batches = train_batches(train, args.steps, args.batch, args.seq_len, args.seed)
    names = args.variants.split(",")
    if "reference" in names:
        try:
            import MEGABYTE_pytorch  # noqa: F401
        except ImportError:
            print("MEGABYTE-pytorch is not installed: no reference row (pip install MEGABYTE-pytorch==0.3.6)")
            names.remove("reference")
    print(f"{args.text.name}: {len(train)} training bytes, {len(val) // args.seq_len * args.seq_len} held-out bytes; "
          f"size {args.size}, T={args.seq_len}, batch {args.batch}, lr {args.lr}, {args.steps} steps")
    if args.equal_wall:
        equal_wall(args, names, train, val)
        return
    rows = [run(name, args, batches, val) for name in names]
    steps = sorted(rows[0]["val_bpb"])
    print(f"\n{'variant':24s} {'params':>8s} {'s/step':>7s} " + " ".join(f"{'@' + str(s):>7s}" for s in steps))
    for r in rows:
        print(f"{r['variant']:24s} {r['params'] / 1e6:7.2f}M {r['s_per_step']:7.2f} "
              + " ".join(f"{r['val_bpb'][s]:7.3f}" for s in steps))
    write_json(args, rows)


def write_json(args, rows: list[dict]) -> None:
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({**stamp(), "args": settings, "rows": rows}, indent=2))


def equal_wall(args, names: list[str], train: torch.Tensor, val: torch.Tensor) -> None:
    first = run(names[0], args, train_batches(train, args.steps, args.batch, args.seq_len, args.seed), val)
    rows = [first]
    for name in names[1:]:
        steps = max(1, round(first["train_s"] / seconds_per_step(name, args, train_batches(
            train, 12, args.batch, args.seq_len, args.seed))))
        rows.append(run(name, args, train_batches(train, steps, args.batch, args.seq_len, args.seed), val))
    print(f"\nequal training time ({first['train_s']:.0f} s of {names[0]})")
    print(f"{'variant':24s} {'params':>8s} {'steps':>6s} {'train s':>8s} {'s/step':>7s} {'val bpb':>8s}")
    for r in rows:
        print(f"{r['variant']:24s} {r['params'] / 1e6:7.2f}M {r['steps']:6d} {r['train_s']:8.0f} "
              f"{r['s_per_step']:7.2f} {r['val_bpb'][r['steps']]:8.3f}")
    write_json(args, rows)


if __name__ == "__main__":
    main()
