"""``mmbytes study``: every model on the same shards at the same training-FLOP budget, scored on the same validation
bytes; bits per byte against training FLOPs, as in the MEGABYTE (section 5), SpaceByte (section 4) and BLT
(section 6) papers.

    mmbytes study --data data/text --budget 3e13 \\
        --models megabyte-small,spacebyte-small,blt-small,transformer-small,bpe-small --out runs/study --seeds 3

(``megabyte-small`` is MEGABYTE's ``small``: MEGABYTE's sizes carry no prefix in the registry, and the study accepts
one.) Every run trains with ``FlopBudget`` (FLOPs = the model's ``train_flops`` of every batch, counted as the model
runs it: realised patches, padding, tokens; the step count is planned from ``flops_per_byte(seq_len)``, the
learning-rate schedule ends there, and training stops where the budget is spent), validates a few times
on the way (the curve of ``bpb_vs_flops.png``) and once at the end (the table). Each run lives in
``OUT/runs/<model>/seed<k>/`` (TensorBoard logs, ``curve.json``, ``result.json``, ``checkpoints/last.ckpt``); a run
with a ``result.json`` is done and is not redone, and a run with only a checkpoint goes on from it, so a study
interrupted or extended with more models or seeds finishes the rest.

Every model readies itself for the study's data (``ByteModel.prepare``): the BPE baseline's tokenizer is trained once
per vocabulary size on the training split (kept in ``OUT/prepared/``) and stored in each run's checkpoint;
SpaceByte's cap on global positions is set for the study's sequence length; BLT calibrates its thresholds for its
mean patch size on windows drawn at random across the training split. A model that needs another trained first
(``ByteModel.requires``: BLT's entropy model) gets it trained on the same shards for ``--entropy-budget`` FLOPs
(``OUT/entropy/``), or takes ``--entropy-ckpt``. The entropy model's forward runs in every BLT training step and is
counted in its FLOPs, so the budget includes it; the entropy model's own training is not in the budget and is
reported separately.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmbytes.argtypes import at_most, count, fraction, model_rate, positive_float
from mmbytes.io import atomic_path, write_text
from mmbytes.model.registry import ALIASES

RECOMMENDED_LR = 1e-3
"""Peak learning rate of every architecture at the ``small`` sizes: the recipes' (``recipes/*.yaml``). ``debug``
sizes take ``DEBUG_LR``; ``--lr MODEL=LR`` replaces either."""
DEBUG_LR = 2e-3
"""The quickstart's learning rate, for the ``debug`` sizes."""
IDENTITY = ("data", "budget", "seq_len", "batch_size", "val_batches", "evals", "entropy_budget", "entropy_ckpt",
            "warmup", "precision", "preset")
"""Study settings that runs of one study must share (models and seeds may grow)."""
IDENTITY_DEFAULTS = {"precision": "32-true", "preset": None}
"""The value of a setting in a ``study.json`` written before the setting existed."""


def size_of(model: str) -> str:
    return ALIASES.get(model, model)


def recommended_lr(model: str, given: dict[str, float]) -> float:
    if model in given:
        return given[model]
    return DEBUG_LR if "debug" in model else RECOMMENDED_LR


class Curve(L.Callback):
    """Validation figures at each validation end, with the FLOPs and step they were reached at; also the run's
    training wall time so far (``wall_path``: earlier sessions' seconds plus this one's), so that a run interrupted
    and resumed reports the time of all its sessions."""

    def __init__(self, counter, path: Path, rows: list[dict] | None = None, wall_path: Path | None = None,
                 wall_before: float = 0.0) -> None:
        self.counter, self.path, self.rows = counter, path, list(rows or [])
        self.wall_path, self.wall_before, self.start = wall_path, wall_before, time.time()

    def wall(self) -> float:
        return self.wall_before + time.time() - self.start

    def write_wall(self, step: int, seconds: float | None = None) -> None:
        if self.wall_path is not None:
            write_text(self.wall_path, json.dumps({"s": self.wall() if seconds is None else seconds, "step": step}))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row = {"step": trainer.global_step, "flops": self.counter.flops, "bytes": self.counter.bytes}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self.rows = [r for r in self.rows if r["step"] != row["step"]] + [row]
        write_text(self.path, json.dumps(self.rows, indent=1))
        self.write_wall(trainer.global_step)


def _data(args: argparse.Namespace, seed: int, patch_size: int = 1):
    """The study's data; ``patch_size``: the model's window alignment (``window_alignment``), as the CLI links it."""
    from datamodules import ByteDataModule

    return ByteDataModule(data_dir=str(args.data), seq_len=args.seq_len, batch_size=args.batch_size,
                          num_workers=args.num_workers, train_batches_per_epoch=1000, seed=seed, patch_size=patch_size)


def train_run(size: str, seed: int, budget: float, run_dir: Path, args: argparse.Namespace, lr: float,
              model_kwargs: dict[str, Any] | None = None, estimate: torch.nn.Module | None = None,
              form: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run of one model: train to the budget (going on from ``run_dir``'s last checkpoint if there is one),
    validate, write ``result.json`` (with ``form``, the preset fields it was built with: ``form_of``); return the
    result."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from mmbytes.callbacks import FlopBudget
    from mmbytes.checkpoint import AtomicCheckpointIO
    from mmbytes.lit import ByteLM
    from mmbytes.model.registry import build

    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True, verbose=False)
    model_kwargs = dict(model_kwargs or {})
    estimate = estimate if estimate is not None else build(size)
    steps = max(1, math.ceil(budget / (estimate.flops_per_byte(args.seq_len) * args.seq_len * args.batch_size)))
    warmup = max(1, round(args.warmup * steps))
    lm = ByteLM(size=size, lr=lr, warmup_steps=warmup, prepare_dir=str(args.out / "prepared"), compile=args.compile,
                **model_kwargs)
    data = _data(args, seed, lm.model.config.window_alignment)
    counter = FlopBudget(budget)
    last = run_dir / "checkpoints" / "last.ckpt"
    curve_path = run_dir / "curve.json"
    rows = json.loads(curve_path.read_text()) if last.exists() and curve_path.exists() else []
    wall_path = run_dir / "wall.json"  # seconds trained so far, written at each validation (as often as checkpoints)
    wall_before = json.loads(wall_path.read_text())["s"] if last.exists() and wall_path.exists() else 0.0
    curve = Curve(counter, curve_path, rows, wall_path, wall_before)
    every = max(1, steps // max(1, args.evals))
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_epochs=1, gradient_clip_val=1.0,
        val_check_interval=every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_val_batches=args.val_batches or 1.0, log_every_n_steps=max(1, min(50, every)),
        logger=TensorBoardLogger(str(run_dir), name="", version="logs"),
        callbacks=[counter, curve, ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                                   every_n_train_steps=every)],
        plugins=[AtomicCheckpointIO()], enable_progress_bar=args.progress, enable_model_summary=False,
        precision=args.precision)
    trainer.fit(lm, data, ckpt_path=str(last) if last.exists() else None)
    wall = curve.wall()
    trainer.save_checkpoint(last, weights_only=False)  # the full state: a study run again finds it done
    curve.write_wall(trainer.global_step, wall)
    trainer.validate(lm, data, verbose=False)  # the final weights; Curve records the point
    val = {k: v for k, v in curve.rows[-1].items() if k.startswith("val/")}
    model = lm.model
    result = {
        "model": size, "seed": seed, "lr": lr, "warmup_steps": warmup, "params": model.num_params(),
        "flops_per_byte": counter.flops_per_byte, "flops_per_byte_counted": counter.counted_flops_per_byte,
        "steps": trainer.global_step, "bytes": counter.bytes, "flops": counter.flops, "wall_s": wall, **val,
        "patch_size": counter.mean_patch, **({"form": form} if form is not None else {}),
    }
    write_text(run_dir / "result.json", json.dumps(result, indent=1))
    return result


def form_of(size: str, config: Any) -> dict[str, Any]:
    """The fields a preset of ``size``'s architecture sets (``registry.presets``), as ``config`` has them: the form a
    run of the study is trained in, recorded in its ``result.json``."""
    from mmbytes.model.registry import config_to_dict, presets

    keys = sorted({k for fields in presets(size).values() for k in fields})
    return json.loads(json.dumps({k: v for k, v in config_to_dict(config).items() if k in keys}))


def done_result(run_dir: Path, size: str, form: dict[str, Any]) -> dict[str, Any] | None:
    """The ``result.json`` of a done run in ``run_dir``, None if there is none; refused in one line when the run was
    trained in another form than ``size`` has now (a named size adopted another preset), since its result would join
    the table under that name. The stored form is the result's, else (a run written before the form was recorded)
    its checkpoint's config's. A run going on from a checkpoint is checked as it loads (``ByteLM``)."""
    from mmbytes.checkpoint import checkpoint_config, load_checkpoint

    result, last = run_dir / "result.json", run_dir / "checkpoints" / "last.ckpt"
    if not result.exists():
        return None
    done = json.loads(result.read_text())
    stored = done.get("form")
    if stored is None and last.exists():
        config = checkpoint_config(load_checkpoint(last))
        stored = form_of(size, config) if config is not None else None
    differ = {k: (stored.get(k), v) for k, v in form.items() if stored is not None and stored.get(k) != v}
    if differ:
        raise SystemExit(f"{run_dir} was trained in another form than {size} has now {differ} (stored, now); "
                         "use another --out, or delete that run to train it again")
    return done


# -- what some models need first: the BPE tokenizer, BLT's entropy model


def study_data(args: argparse.Namespace):
    """What a model may know of the study's data before its run (``ModelData``): the window, the training samples
    and the folder where prepared things are kept (the BPE tokenizer per vocabulary size)."""
    from mmbytes.entropy import split_items
    from mmbytes.model.protocol import ModelData

    dm = _data(args, 0)
    return ModelData(seq_len=args.seq_len, train_samples=lambda: (data.tobytes() for data, _ in split_items(dm)),
                     cache_dir=args.out / "prepared")


def companion_for(key: str, name: str, args: argparse.Namespace, log: list[str]) -> tuple[str, dict]:
    """What a model ``requires`` (``key``: a ``ByteLM`` argument, ``name``: the named size that provides it): the
    given ``--entropy-ckpt``, else that size trained on the study's shards (once per size); its checkpoint path and
    training record."""
    if key != "entropy_ckpt":
        raise SystemExit(f"the study cannot provide {key} ({name}) for a model")
    if args.entropy_ckpt:
        return str(args.entropy_ckpt), {"entropy_model": str(args.entropy_ckpt), "flops": None}
    run_dir = args.out / "entropy" / name
    result_path = run_dir / "result.json"
    if not result_path.exists():
        log.append(f"training entropy model {name}")
        train_run(name, 0, args.entropy_budget, run_dir, args, recommended_lr(name, args.lr))
    record = json.loads(result_path.read_text())
    return str(run_dir / "checkpoints" / "last.ckpt"), {"entropy_model": name, "flops": record["flops"],
                                                          "params": record["params"], "val/bpb": record.get("val/bpb")}


# -- the report


def aggregate(results: list[dict]) -> list[dict]:
    """One row per model: mean and spread (sample standard deviation) over seeds of every number."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        runs = [r for r in results if r["model"] == model]
        row: dict[str, Any] = {"model": model, "seeds": len(runs)}
        for key in runs[0]:
            values = [r.get(key) for r in runs]
            if key in ("model", "seed") or not all(isinstance(v, int | float) for v in values):
                continue
            mean = sum(values) / len(values)
            row[key] = mean
            if key.startswith("val/") and len(values) > 1:
                row[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        rows.append(row)
    return rows


def fmt(v: Any, key: str = "") -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if key in ("flops", "flops_per_byte", "flops_per_byte_counted", "bytes", "params") or abs(v) >= 1e5:
            return f"{v:.3g}"
        return f"{v:.4f}" if key.startswith("val/") else f"{v:.3g}"
    return str(v)


def write_report(out: Path, results: list[dict], settings: dict, entropy: dict[str, dict]) -> None:
    rows = aggregate(results)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/") and not k.endswith("_std")},
                      key=lambda k: (k != "val/bpb", k))
    columns = ["model", "seeds", "params", "flops_per_byte", "flops_per_byte_counted", "lr", "steps", "bytes", "flops",
               "wall_s", *val_keys, "patch_size"]
    with atomic_path(out / "report.csv") as tmp, open(tmp, "w", newline="") as f:
        std_cols = [f"{k}_std" for k in val_keys]
        w = csv.DictWriter(f, [*columns, *std_cols], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with atomic_path(out / "runs.csv") as tmp, open(tmp, "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in results for k in r))
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in results)

    def cell(r: dict, k: str) -> str:
        s = fmt(r.get(k), k)
        if k.startswith("val/") and f"{k}_std" in r:
            s += f" ± {r[f'{k}_std']:.4f}"
        return s

    heads = {"flops_per_byte": "FLOPs/byte planned", "flops_per_byte_counted": "FLOPs/byte counted",
             "wall_s": "wall s", "patch_size": "mean patch"}
    lines = [
        "# Compute-matched study", "",
        f"Data `{settings['data']}`, budget {settings['budget']:.3g} training FLOPs per run, "
        f"{settings['seq_len']}-byte windows, batch {settings['batch_size']}, precision "
        f"{settings.get('precision', '32-true')}, seeds {settings['seeds']}, validation on "
        + ("every validation byte" if not settings["val_batches"] else
           f"the first {settings['val_batches']} validation batches (the same bytes for every model)") + ".",
        "Each model trains at its own recommended peak learning rate (the `lr` column), warmup "
        f"{settings['warmup']:.0%} of its steps, then cosine decay ending at the budget. Bits per byte are over the "
        "same validation bytes for every model (mean ± sample standard deviation over seeds); `bpd_image` and "
        "`bits_per_sample_audio` are bits per 8-bit sub-pixel and per 16-bit sample. FLOPs are counted as each model "
        "runs each batch (realised patches, padding to a batch's longest row, tokens; BLT's entropy model's forward); "
        "FLOPs/byte planned is the model's figure at the window length that planned the steps. Mean patch: real "
        "bytes per patch over all of training (BPE: per token)."
        + (f" `*_strided`: MEGABYTE scored with strided inference (rule `{settings['strided']}`: a second pass offset "
           "by P/2, each byte from one of the two passes), twice the cost of plain scoring; the other columns are "
           "plain scoring." if settings.get("strided") else ""), "",
        "| " + " | ".join(heads.get(k, k) for k in columns) + " |",
        "|" + "|".join("---" if k == "model" else "---:" for k in columns) + "|",
        *("| " + " | ".join(cell(r, k) for k in columns) + " |" for r in rows), "",
        "![bits per byte against training FLOPs](bpb_vs_flops.png)", "",
    ]
    if entropy:
        lines += ["BLT: the entropy model's forward runs in every training step and is counted in its FLOPs, so the "
                  "budget includes it; the entropy model's own training is not in the budget:", ""]
        for name, e in entropy.items():
            lines.append(f"- `{name}`: entropy model `{e['entropy_model']}`, "
                         + ("given by path" if e.get("flops") is None else
                            f"{e['params'] / 1e6:.2f}M parameters, trained for {e['flops']:.3g} FLOPs "
                            f"on the same shards, val bpb {e['val/bpb']:.4f}"))
        lines.append("")
    tokenizers = sorted((out / "prepared").glob("bpe*.meta.json"))
    for meta in tokenizers:
        m = json.loads(meta.read_text())
        lines.append(f"BPE tokenizer `prepared/{meta.name.removesuffix('.meta.json')}.json`: byte-level BPE of at "
                     f"most {m['vocab_size']} tokens, trained on the training split, {m['bytes_per_token']:.3f} bytes "
                     "per token there.")
    lines += ["BPE: bits per byte of the original bytes (a window's token nats / its bytes / ln 2); FLOPs per byte "
              "= FLOPs per token / bytes per token." if tokenizers else "",
              "Per-run figures: `runs.csv`; logs: `runs/<model>/seed<k>/` (TensorBoard, `curve.json`)."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    plot(out / "bpb_vs_flops.png", out)


def plot(path: Path, out: Path) -> Path:
    """Validation bpb against training FLOPs: every validation of every run (seeds averaged per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for model_dir in sorted((out / "runs").iterdir()):
        curves = [json.loads(p.read_text()) for p in sorted(model_dir.glob("seed*/curve.json"))
                  if (p.parent / "result.json").exists()]
        if not curves:
            continue
        by_step: dict[int, list[dict]] = {}
        for c in curves:
            for r in c:
                if "val/bpb" in r:
                    by_step.setdefault(r["step"], []).append(r)
        steps = sorted(by_step)
        flops = [sum(r["flops"] for r in by_step[s]) / len(by_step[s]) for s in steps]
        bpb = [sum(r["val/bpb"] for r in by_step[s]) / len(by_step[s]) for s in steps]
        (line,) = ax.plot(flops, bpb, marker="o", ms=3, label=model_dir.name)
        ax.plot(flops[-1:], bpb[-1:], marker="o", ms=7, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits per byte")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("bits per byte against training FLOPs")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix[1:] or "png")
    plt.close(fig)
    return path


# -- the command


def parse_lr(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[size_of(name)] = float(value)
    return out


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Train what is not done yet and write the report; returns ``{"trained": [...], "results": [...]}``."""
    from mmbytes.model.registry import SIZES, build, config_from_name, presets

    models = [size_of(m.strip()) for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SIZES]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(SIZES)}")
    without = [m for m in models if args.preset and args.preset not in presets(m)]
    if without:
        raise SystemExit(f"--preset {args.preset}: no such preset for {without}")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in IDENTITY}
    stored = args.out / "study.json"
    if stored.exists():
        before = json.loads(stored.read_text())
        differ = {k: (before.get(k, IDENTITY_DEFAULTS.get(k)), settings[k]) for k in IDENTITY
                  if before.get(k, IDENTITY_DEFAULTS.get(k)) != settings[k]}
        if differ:
            raise SystemExit(f"{args.out} holds a study with other settings {differ} (stored, given); "
                             "use another --out")
    write_text(stored, json.dumps(settings, indent=1))
    log: list[str] = []
    trained, results, entropy = [], [], {}
    data = study_data(args)
    for size in models:
        kwargs: dict[str, Any] = {"preset": args.preset} if args.preset else {}
        estimate = build(config_from_name(size, args.preset))  # plans the steps: readied for the data as the runs
        estimate.prepare(data)
        for key, name in estimate.requires().items():
            kwargs[key], entropy[size] = companion_for(key, name, args, log)
        if args.strided and estimate.capabilities.strided:
            kwargs["strided_eval"] = args.strided
        form = form_of(size, estimate.config)
        for seed in range(args.seeds):
            run_dir = args.out / "runs" / size / f"seed{seed}"
            if (done := done_result(run_dir, size, form)) is not None:
                results.append(done)
                continue
            print(f"study: {size} seed {seed}", flush=True)
            results.append(train_run(size, seed, args.budget, run_dir, args, recommended_lr(size, args.lr), kwargs,
                                     estimate, form))
            trained.append(f"{size}/seed{seed}")
    write_report(args.out, results, {**settings, "seeds": args.seeds, "strided": args.strided}, entropy)
    return {"trained": trained, "results": results, "log": log}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="mmbytes study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="shard folder (`mmbytes shards`)")
    ap.add_argument("--budget", required=True, type=positive_float, help="training FLOPs per run")
    ap.add_argument("--models", required=True, help="comma-separated named sizes (e.g. small,transformer-small,"
                    "spacebyte-small,blt-small,bpe-small)")
    ap.add_argument("--out", required=True, type=Path, help="study folder: report.md, report.csv, bpb_vs_flops.png, "
                    "runs/")
    ap.add_argument("--seeds", type=at_most(int, 1, 1000), default=1, help="runs per model (seeds 0..N-1)")
    ap.add_argument("--seq-len", type=at_most(int, 1, 2**24), default=1024, help="bytes per window, for every model")
    ap.add_argument("--batch-size", type=at_most(int, 1, 2**16), default=8, help="windows per batch, for every model")
    ap.add_argument("--evals", type=at_most(int, 0, 10_000), default=4,
                    help="validations during each run (the curve), besides the last")
    ap.add_argument("--val-batches", type=count, default=0,
                    help="score the first N validation batches (0: every validation byte)")
    ap.add_argument("--warmup", type=fraction, default=0.05, help="warmup as a fraction of each run's steps")
    ap.add_argument("--lr", nargs="+", type=model_rate, default=[], metavar="MODEL=LR",
                    help="replace a model's recommended rate")
    ap.add_argument("--entropy-budget", type=positive_float, default=None,
                    help="training FLOPs of BLT's entropy model (default: a quarter of --budget)")
    ap.add_argument("--entropy-ckpt", type=Path, help="a calibrated entropy model for every BLT model instead")
    ap.add_argument("--strided", nargs="?", const="paper", choices=["paper", "later"],
                    help="MEGABYTE runs also score with strided inference (paper section 2.3.3; twice the validation "
                    "cost), reported as val/bpb_strided; the rule: paper (default) or later")
    ap.add_argument("--preset", default=None,
                    help="every model in this named form of its architecture (e.g. paper: each paper's form) instead "
                    "of the form its size is named in")
    ap.add_argument("--num-workers", type=at_most(int, 0, 1024), default=0)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true", "16-mixed"],
                    help="Lightning precision of every run (bf16-mixed on GPUs; the FLOP budget does not depend on it)")
    ap.add_argument("--compile", nargs="?", const=True, default=False,
                    help="compile each transformer block with torch.compile (optionally: the backend's name)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.budget <= 0 or args.seeds < 1:
        raise SystemExit("--budget must be positive and --seeds at least 1")
    if args.entropy_budget is None:
        args.entropy_budget = args.budget / 4
    args.lr = parse_lr(args.lr)
    done = run_study(args)
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.csv'}, {args.out / 'bpb_vs_flops.png'} "
          f"({len(done['trained'])} runs trained, {len(done['results']) - len(done['trained'])} already done)")
    return done
