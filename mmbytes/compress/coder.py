"""The coder: a byte model's next-byte distributions drive a range coder (Deletang et al., 2023, "Language Modeling
Is Compression", arXiv:2309.10668), so a file costs the model's negative log-likelihood in bits plus a few bytes. The
coder is ``constriction``'s range coder (32-bit words, 24-bit probabilities); each distribution is the float64
softmax of the model's logits, quantized by ``constriction``'s ``Categorical(perfect=False)``, which gives every byte
value a nonzero frequency.

Encoder and decoder must compute bit-identical distributions; three things fix them.

1. The batch layout. Both run the one cached incremental path of the model (``new_cache`` / ``prefill`` of an empty
   prompt / ``step``, as in ``mmbytes.model.generate``) over the same layout: a chunk is always coded in a batch of
   the same number of rows, in the same row, with caches sized for the same chunk length, and the model is told the
   chunk's modality (BLT patches each modality with its own entropy threshold). Batched kernels are not
   row-invariant (on CPU a row's logits change with its row index and the batch size; SpaceByte's global attention
   also changes with the other rows' bytes), so the layout is part of the format. Models whose rows are bit for bit
   independent of the other rows' bytes for a fixed batch shape (``shares_batches``; tested) share batches between
   files, unused rows holding zeros; every other model codes each file's chunks in batches of their own.
2. The thread policy. torch's CPU kernels split their reductions by the intra-op thread count, so a cached step's
   logits differ in the last bits between thread counts, which can move a quantized frequency. The model pass always
   runs on ``THREADS`` intra-op thread (``coding_policy``, which restores the caller's setting), with deterministic
   algorithms and no TF32: any caller, CLI or Python API, codes and decodes alike.
3. The determinism envelope (``machine_envelope``): torch version, CPU kernel family or GPU, dtype and thread policy,
   recorded in the header and compared before decoding; a mismatch is refused unless forced.

The decoder checks the original's checksum before anything is returned.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mmbytes.codecs import MODALITIES
from mmbytes.compress.container import DEVICES, MODES, CompressionError, Envelope, Header, pack, unpack
from mmbytes.compress.plans import Plan, plan_file, rebuild

THREADS = 1
"""Intra-op threads of the coder's model pass, whatever the caller's setting (the format's thread policy)."""


# -- the model


def model_hash(model: nn.Module) -> bytes:
    """SHA-256 of the model's config and weights (names, dtypes, shapes, values): the first 8 bytes go in the header."""
    from dataclasses import asdict, is_dataclass

    config = model.config
    h = hashlib.sha256(json.dumps(asdict(config) if is_dataclass(config) else repr(config), sort_keys=True,
                                  default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _can_code(model: nn.Module) -> bool:
    """Coding needs next-byte distributions from the cached byte path; a token model (the BPE baseline) has none."""
    return bool(model.capabilities.byte_logits and model.capabilities.cached)


def require_byte_model(model: nn.Module) -> None:
    if not _can_code(model):
        raise CompressionError(f"a {type(model).__name__} model predicts tokens, not "
                               "bytes: compress with a byte model (MEGABYTE, SpaceByte, BLT, the byte Transformer)")


def shares_batches(model: nn.Module) -> bool:
    """Whether files may share batches: a row's cached-step logits are bit for bit the same whatever the other rows
    hold (batch size and row fixed). ``tests/test_compress.py`` checks this bitwise for every model it admits."""
    return bool(model.capabilities.independent_rows)


def machine_envelope(model: nn.Module) -> Envelope:
    """The envelope of this machine running ``model`` where its parameters are."""
    p = next(model.parameters())
    if p.device.type == "cuda":
        kernels = f"{torch.cuda.get_device_name(p.device)}, CUDA {torch.version.cuda}"
    elif p.device.type == "cpu":
        kernels = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    else:
        kernels = p.device.type
    device = p.device.type if p.device.type in DEVICES else "other"
    return Envelope(device, torch.__version__, kernels, str(p.dtype).removeprefix("torch."), THREADS)


@contextmanager
def coding_policy() -> Iterator[None]:
    """The model pass of the coder: ``THREADS`` intra-op thread(s), deterministic algorithms, no TF32. The caller's
    settings come back on exit."""
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[3], prev[4]


# -- one batch


@dataclass
class Row:
    """One chunk in one batch row: ``length`` bytes, coded by ``coder`` (an encoder: its bytes known; or a decoder),
    with the model told ``modality`` (a ``MODALITIES`` name, or None: not told)."""

    length: int
    data: np.ndarray | None = None  # (length,) uint8: known when encoding, filled when decoding
    coder: object = None
    modality: str | None = None
    bits: float = 0.0  # the model's NLL of this chunk's bytes under the quantized-to-float64 distributions


@torch.no_grad()
def code_batch(model: nn.Module, rows: dict[int, Row], batch: int, chunk: int, encode: bool,
               on_step: Callable[[int], None] | None = None) -> None:
    """Run one batch of ``batch`` rows through the model's cached path, byte by byte, and encode (or decode) the
    chunk in each used row. Unused rows, and rows past their chunk's end, are fed zeros and told ``raw``: encoder and
    decoder feed the model the same bytes and modalities in the same rows at every step, so they see the same
    logits."""
    import constriction

    family = constriction.stream.model.Categorical(perfect=False)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    steps = max(r.length for r in rows.values())
    modality = None
    if any(r.modality is not None for r in rows.values()):
        modality = torch.full((batch,), MODALITIES.index("raw"), dtype=torch.long)
        for slot, row in rows.items():
            modality[slot] = MODALITIES.index(row.modality or "raw")
        modality = modality.to(device)
    cache = model.new_cache(batch, chunk, device, dtype, modality=modality)
    logits = model.prefill(torch.zeros(batch, 0, dtype=torch.long, device=device), cache)
    fed = np.zeros(batch, dtype=np.int64)
    for t in range(steps):
        probs = torch.softmax(logits.double(), dim=-1).cpu().numpy()  # (batch, 256)
        fed[:] = 0
        done = 0
        for slot, row in rows.items():
            if t >= row.length:
                continue
            p = probs[slot : slot + 1]
            if encode:
                sym = int(row.data[t])
                row.coder.encode(np.array([sym], dtype=np.int32), family, p)
            else:
                try:
                    sym = int(row.coder.decode(family, p)[0])
                except Exception:  # a stream that ends early or holds garbage: the checksum will refuse the file
                    sym = 0
                row.data[t] = sym
            row.bits -= float(np.log2(p[0, sym] / p[0].sum()))
            fed[slot] = sym
            done += 1
        if on_step is not None:
            on_step(done)
        if t + 1 < steps:
            logits = model.step(torch.from_numpy(fed).to(device), cache)


# -- files


@dataclass
class Job:
    """One file being compressed or decompressed: its name, header, chunks (one ``Row`` each) and, when compressing,
    its plan and bytes; ``index`` is its place in the caller's list."""

    name: str
    index: int
    header: Header | None = None
    rows: list[Row] = field(default_factory=list)
    plan: Plan | None = None
    original: bytes | None = None


def schedule(jobs: list[Job], batch: int, shared: bool) -> list[tuple[int, dict[int, Row]]]:
    """Batches as (rows, {row index: Row}). Shared: chunks of all files in their recorded rows of ``batch``, packed so
    that each batch holds at most one chunk per row index. Not shared: each file's chunks in batches of their own,
    ``rows`` at a time (the last batch of a file has only the rows it needs)."""
    groups = []
    if shared:
        queues: dict[int, list[Row]] = {}
        for job in jobs:
            for slot, row in zip(job.header.slots, job.rows, strict=True):
                queues.setdefault(slot, []).append(row)
        while any(queues.values()):
            groups.append((batch, {slot: q.pop(0) for slot, q in queues.items() if q}))
        return groups
    for job in jobs:
        rows = job.header.rows
        for g in range(0, len(job.rows), rows):
            part = job.rows[g : g + rows]
            groups.append((len(part), dict(enumerate(part))))
    return groups


def run_groups(model: nn.Module, groups: list[tuple[int, int, dict[int, Row]]], encode: bool, desc: str,
               progress: bool) -> None:
    from tqdm import tqdm

    total = sum(r.length for _, _, g in groups for r in g.values())
    with coding_policy(), tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for batch, chunk, rows in groups:
            code_batch(model, rows, batch, chunk, encode, on_step=bar.update)


def compress_files(model: nn.Module, inputs: list[tuple[bytes, str]], *, chunk: int = 4096, batch: int = 16,
                   modalities: Iterable[str] = MODES, image_options: dict | None = None, raw_only: bool = False,
                   progress: bool = False) -> list[tuple[bytes, dict]]:
    """Compress ``(data, name)`` items; returns ``(mmbz bytes, stats)`` per item. All chunks of all files
    are coded in batches of ``batch`` rows (of each file alone for models whose rows do not share batches)."""
    import constriction

    if chunk < 1 or batch < 1:
        raise ValueError(f"chunk ({chunk}) and batch ({batch}) must be at least 1")
    require_byte_model(model)
    mhash = model_hash(model)
    envelope = machine_envelope(model)
    shared = shares_batches(model)
    jobs = []
    for k, (data, name) in enumerate(inputs):
        plan = plan_file(data, set(modalities), image_options or {}, raw_only)
        job = Job(name, k, plan=plan, original=data)
        body = np.frombuffer(plan.body, dtype=np.uint8)
        job.rows = [Row(min(chunk, len(body) - i), body[i : i + chunk], constriction.stream.queue.RangeEncoder(),
                        plan.mode) for i in range(0, len(body), chunk)]
        n = len(job.rows)
        job.header = Header(plan.mode, mhash, len(data), hashlib.sha256(data).digest(), envelope, chunk,
                            batch if shared else min(batch, max(n, 1)), shared, plan.image, plan.prefix,
                            plan.suffix, [i % batch for i in range(n)])
        jobs.append(job)
    if shared:  # longest chunks together, so short ones do not wait on long ones; rows assigned in that order
        order = sorted(((r.length, j, i) for j, job in enumerate(jobs) for i, r in enumerate(job.rows)), reverse=True)
        for k, (_, j, i) in enumerate(order):
            jobs[j].header.slots[i] = k % batch
        groups = [[jobs[j].rows[i] for _, j, i in order[g : g + batch]] for g in range(0, len(order), batch)]
        groups = [(batch, chunk, dict(enumerate(g))) for g in groups]
    else:
        groups = [(rows, chunk, g) for rows, g in schedule(jobs, batch, False)]
    run_groups(model, groups, True, "compress", progress)
    out = []
    for job in jobs:
        packed = pack(job.header, [r.coder.get_compressed().astype("<u4").tobytes() for r in job.rows])
        out.append((packed, {"name": job.name, "mode": job.plan.mode, "original": len(job.original),
                             "compressed": len(packed), "coded": len(job.plan.body),
                             "model_bits": sum(r.bits for r in job.rows), "payload": sum(job.header.sizes),
                             "container": len(job.plan.prefix) + len(job.plan.suffix)}))
    return out


def decompress_files(model: nn.Module, inputs: list[tuple[bytes, str]], *, force: bool = False,
                     progress: bool = False) -> list[bytes | CompressionError]:
    """Decompress ``(mmbz bytes, name)`` items: the original bytes, or the error that refused the item (another
    model, truncated, corrupt, written where the determinism envelope differs from this machine's, or decoded bytes
    whose checksum differs: nothing of such an item is returned). ``force`` decodes despite an envelope mismatch."""
    import constriction

    require_byte_model(model)
    mhash = model_hash(model)
    machine = machine_envelope(model)
    shared = shares_batches(model)
    results: list[bytes | CompressionError | None] = [None] * len(inputs)
    forced: dict[int, tuple[str, str, str]] = {}
    jobs = []
    for k, (data, name) in enumerate(inputs):
        try:
            h, streams = unpack(data, name)
            if h.model != mhash[:8]:
                raise CompressionError(f"{name}: compressed with another model (hash {h.model.hex()}); this "
                                       f"checkpoint's model is {mhash[:8].hex()}")
            if h.shared and not shared:
                raise CompressionError(f"{name}: coded with batches shared between files, which this model "
                                       f"({type(model).__name__}) cannot reproduce")
            if (diff := h.envelope.mismatch(machine)) is not None:
                if not force:
                    label, theirs, ours = diff
                    raise CompressionError(f"{name}: compressed with {label} {theirs}, this machine has {label} {ours}"
                                           "; refused before decoding (--force, or force=True, tries anyway)")
                forced[k] = diff
        except CompressionError as e:
            results[k] = e
            continue
        job = Job(name, k, header=h)
        job.rows = [Row(n, np.zeros(n, dtype=np.uint8),
                        constriction.stream.queue.RangeDecoder(np.frombuffer(s, dtype="<u4").astype(np.uint32)),
                        h.modality)
                    for n, s in zip(h.chunk_lengths(), streams, strict=True)]
        jobs.append(job)
    groups = []
    for (rows, chunk, sh, _), members in _by_layout(jobs).items():
        groups += [(n, chunk, g) for n, g in schedule(members, rows, sh)]
    run_groups(model, groups, False, "decompress", progress)
    for job in jobs:
        h = job.header
        body = b"".join(r.data.tobytes() for r in job.rows)
        try:
            data = rebuild(body, h.mode, h.prefix, h.suffix, h.image)
        except ValueError as e:
            results[job.index] = CompressionError(f"{job.name}: corrupt ({e})")
            continue
        if len(data) == h.length and hashlib.sha256(data).digest()[:8] == h.digest:
            results[job.index] = data
            continue
        if job.index in forced:
            label, theirs, ours = forced[job.index]
            why = (f"decoded with --force despite {label} {theirs} (compressed) against {ours} (this machine): the "
                   "forced mismatch is the likely cause")
        elif h.version < 2:
            why = ("a version-1 file records no torch version, kernels or thread count: it decodes only with the "
                   "torch, CPU and thread count that wrote it (the CLI's default was 1 thread)")
        else:
            why = f"the model's distributions were not reproduced bit for bit on a machine that matches {h.envelope}"
        results[job.index] = CompressionError(f"{job.name}: decoded bytes do not match the original's checksum; "
                                              f"nothing written; {why}")
    return results


def _by_layout(jobs: list[Job]) -> dict[tuple[int, int, bool, bool], list[Job]]:
    """Files that may share batches: same rows, chunk length, sharing, and modality rule (told, version 2, or not)."""
    out: dict[tuple[int, int, bool, bool], list[Job]] = {}
    for job in jobs:
        h = job.header
        out.setdefault((h.rows, h.chunk, h.shared, h.version >= 2), []).append(job)
    return out
