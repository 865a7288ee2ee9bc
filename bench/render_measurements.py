"""Render docs/measurements.md from measurement files: nothing in that page is typed by hand.

Two kinds of input:

- study folders (``docs/study_*/``): ``report.csv`` as ``mmbytes study`` writes it, ``stamp.json`` (title, commit,
  machine, command, data) and any other ``*.json`` a bench wrote there (e.g. ``word_starts.json``);
- result files (``docs/measurements/*.json``, or any folder given with ``--results``): a bench's ``--json`` output.
  A result file is a JSON object with ``rows`` (a list of objects, or of lists when ``columns`` names them) or a
  JSON list of row objects. Optional keys: ``title``, ``group`` (the section it goes under), ``command``,
  ``machine``, ``commit``, ``versions`` (or all of these inside ``stamp``), ``commands_in`` (a docs page listing
  the commands, when one line cannot hold them), ``formats`` (one format spec per column,
  ``null`` for the default), ``notes`` (Markdown), ``transcribed`` (true when the rows were copied from an earlier
  document rather than written by the bench). Every other scalar key is listed as a setting.

    python bench/render_measurements.py                  # writes docs/measurements.md
    python bench/render_measurements.py --check          # exit 1 if docs/measurements.md is not up to date
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mmbytes.io import write_text

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

STAMP_KEYS = ("commit", "machine", "command", "versions")
RESERVED = {"title", "group", "columns", "formats", "rows", "notes", "transcribed", "stamp", "data",
            "extra_commands", "commands_in", *STAMP_KEYS}
STUDY_ORDER = ("study_text", "study_mixed")  # the headline studies come first, the others by name
GROUPS = {  # section order and titles of docs/measurements.md
    "architectures": "Architectures and their forms",
    "training": "Training, validation and distribution",
    "throughput": "Speed and memory",
    "compression": "Compression",
    "baselines": "Baselines",
}
# how a study row's model name is introduced: registry-name prefix -> architecture (longest prefix first)
ARCH_LABELS = (("transformer-", "byte Transformer"), ("spacebyte-fixed-", "SpaceByte fixed patches"),
               ("spacebyte-", "SpaceByte"), ("blt-nohash-", "BLT without hash n-grams"),
               ("blt-fixed-", "BLT fixed patches"), ("blt-", "BLT entropy patches"), ("bpe-", "BPE Transformer"),
               ("", "MEGABYTE"))
MODALITY_COLUMNS = (("val/bpb_text", "text"), ("val/bpb_image", "image"), ("val/bpb_audio", "audio"),
                    ("val/bpb_raw", "raw"))


def arch_label(name: str) -> str:
    return next(label for prefix, label in ARCH_LABELS if name.startswith(prefix))


def cell(value, fmt: str | None = None) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    if fmt:
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def table(columns: list[str], rows: list[list], formats: list | None = None) -> list[str]:
    formats = formats or [None] * len(columns)
    out = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    out += ["| " + " | ".join(cell(v, f) for v, f in zip(row, formats, strict=True)) + " |" for row in rows]
    return out


def stamp_lines(meta: dict) -> list[str]:
    stamp = {**{k: meta[k] for k in STAMP_KEYS if k in meta}, **meta.get("stamp", {})}
    lines = []
    if "commit" in stamp:
        recorded = " (the commit that recorded these figures)" if meta.get("transcribed") else ""
        lines.append(f"- commit: `{stamp['commit']}`{recorded}")
    machine = stamp.get("machine", "not recorded")
    if isinstance(machine, dict):  # bench/stamp.py's form
        machine = ", ".join(f"{k} {v}" for k, v in machine.items())
    lines.append(f"- machine: {machine}")
    if stamp.get("versions"):
        versions = stamp["versions"]
        text = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else str(versions)
        lines.append(f"- versions: {text}")
    if "command" in stamp:
        lines.append(f"- command: `{stamp['command']}`")
    if meta.get("commands_in"):  # a docs page (relative to docs/) that lists the several commands of a measurement
        lines.append(f"- commands: [{meta['commands_in']}]({meta['commands_in']})")
    if meta.get("data"):
        lines.append(f"- data: {meta['data']}")
    if meta.get("transcribed"):
        lines.append("- rows copied from the README of that commit; rerun the command to replace this file with the "
                     "bench's own JSON")
    return lines


def result_table(meta: dict) -> list[str]:
    rows = meta.get("rows", [])
    columns = meta.get("columns")
    if rows and isinstance(rows[0], dict):
        columns = columns or list(dict.fromkeys(k for r in rows for k in r))
        rows = [[r.get(c) for c in columns] for r in rows]
    if not columns:
        return ["(no rows)"]
    lines = table(columns, rows, meta.get("formats"))
    settings = {k: v for k, v in meta.items() if k not in RESERVED and not isinstance(v, (dict, list))}
    if settings:
        lines += ["", "Settings: " + ", ".join(f"`{k}` = {cell(v)}" for k, v in settings.items()) + "."]
    return lines


def load_result(path: Path) -> dict:
    data = json.loads(path.read_text())
    if isinstance(data, list):
        data = {"rows": data}
    data.setdefault("title", path.stem.replace("_", " "))
    return data


def mean_std(row: dict, key: str) -> str:
    if not row.get(key):
        return ""
    std = row.get(key + "_std")
    return f"{float(row[key]):.3f}" + (f" ± {float(std):.3f}" if std else "")


def study_section(folder: Path) -> list[str]:
    meta = json.loads((folder / "stamp.json").read_text()) if (folder / "stamp.json").exists() else {}
    with open(folder / "report.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["val/bpb"]))
    rel = folder.relative_to(DOCS).as_posix()
    lines = [f"### {meta.get('title', folder.name)}", "", f"Source: [`{rel}/`]({rel}/) (`report.md`, `report.csv`, "
             "`runs.csv`)", ""]
    lines += stamp_lines(meta)
    budget = next((line for line in (folder / "report.md").read_text().splitlines() if "budget" in line), "")
    if budget:
        lines += ["- settings: " + budget.split(", ", 1)[-1].rstrip(".")]
    strided = any(r.get("val/bpb_strided") for r in rows)
    modalities = [(k, name) for k, name in MODALITY_COLUMNS if any(r.get(k) for r in rows)]
    counted = any(r.get("flops_per_byte_counted") for r in rows)  # studies that count FLOPs as each batch runs
    columns = ["model", "parameters", "FLOPs/byte planned" if counted else "FLOPs/byte"]
    columns += ["FLOPs/byte counted"] if counted else []
    columns += ["steps", "bytes seen", "val bpb"]
    columns += ["val bpb, strided"] if strided else []
    columns += [name for _, name in modalities] if len(modalities) > 1 else []
    columns += ["mean patch (bytes)", "bytes per token"]
    body = []
    for r in rows:
        line = [f"{arch_label(r['model'])} `{r['model']}`", f"{float(r['params']) / 1e6:.2f}M",
                f"{float(r['flops_per_byte']) / 1e6:.3f}M"]
        line += [f"{float(r['flops_per_byte_counted']) / 1e6:.3f}M"] if counted else []
        line += [f"{float(r['steps']):.0f}", f"{float(r['bytes']) / 1e6:.2f}M", mean_std(r, "val/bpb")]
        line += [mean_std(r, "val/bpb_strided")] if strided else []
        line += [mean_std(r, k) for k, _ in modalities] if len(modalities) > 1 else []
        line += [f"{float(r['patch_size']):.2f}" if r.get("patch_size") else "",
                 f"{float(r['bytes_per_token']):.2f}" if r.get("bytes_per_token") else ""]
        body.append(line)
    lines += ["", "Mean ± sample standard deviation over seeds, bits per byte on every validation byte, sorted by "
              "val bpb:", ""] + table(columns, body)
    if (folder / "bpb_vs_flops.png").exists():
        lines += ["", f"![validation bits per byte against training FLOPs: {meta.get('title', folder.name)}]"
                      f"({rel}/bpb_vs_flops.png)"]
    for extra in sorted(folder.glob("*.json")):
        if extra.name == "stamp.json":
            continue
        sub = load_result(extra)
        command = meta.get("extra_commands", {}).get(extra.name)
        lines += ["", f"`{extra.name}`" + (f" (`{command}`)" if command else "") + ":", ""] + result_table(sub)
    return lines + [""]


def render(studies: list[Path], results: list[Path]) -> str:
    lines = ["# Measurements", "",
             "<!-- generated by `python bench/render_measurements.py` from docs/study_*/ and docs/measurements/*.json;"
             " do not edit by hand -->", "",
             "Every table below is rendered from a file in the repository, with the commit, machine and command that "
             "produced it. Tables marked as copied were measured before the benches stamped their JSON output; the "
             "command reproduces them.", "", "## Compute-matched studies", ""]
    for folder in studies:
        lines += study_section(folder)
    by_group: dict[str, list[tuple[Path, dict]]] = {}
    for path in results:
        meta = load_result(path)
        by_group.setdefault(meta.get("group", "other"), []).append((path, meta))
    for group in [*GROUPS, *sorted(set(by_group) - set(GROUPS))]:
        if group not in by_group:
            continue
        lines += [f"## {GROUPS.get(group, group.capitalize())}", ""]
        for path, meta in by_group[group]:
            try:
                source = path.resolve().relative_to(DOCS).as_posix()
            except ValueError:
                source = path.name
            lines += [f"### {meta['title']}", "", f"Source: [`{source}`]({source})", ""]
            lines += stamp_lines(meta) + [""] + result_table(meta)
            if meta.get("notes"):
                lines += ["", meta["notes"]]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=Path, default=DOCS, help="folder holding study_*/report.csv")
    ap.add_argument("--results", type=Path, action="append",
                    help="folder of bench JSON files (repeatable; default docs/measurements)")
    ap.add_argument("--out", type=Path, default=DOCS / "measurements.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    args = ap.parse_args(argv)
    first = {name: i for i, name in enumerate(STUDY_ORDER)}
    studies = sorted((p.parent for p in args.studies.glob("study_*/report.csv")),
                     key=lambda p: (first.get(p.name, len(first)), p.name))
    results = sorted(p for folder in (args.results or [DOCS / "measurements"]) for p in folder.glob("*.json"))
    text = render(studies, results)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not up to date: run python bench/render_measurements.py", file=sys.stderr)
            return 1
        return 0
    write_text(args.out, text)
    print(f"wrote {args.out}: {len(studies)} studies, {len(results)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
