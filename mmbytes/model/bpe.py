"""The subword baseline of the byte-level papers (MEGABYTE section 5, SpaceByte section 4, BLT section 6): a
byte-level BPE tokenizer (Hugging Face ``tokenizers``) and a causal token Transformer built from the project's blocks,
scored in bits per *byte* of the original data so it sits in one column with the byte models.

The model takes the same byte windows as every other architecture (``nll(x, mask)``, x (B, T) bytes) and tokenizes
each window's real bytes itself, so every architecture scores exactly the same validation bytes:

    window bytes (B, T) -> BPE tokens t_1 .. t_N per row (a token never crosses the window's edge)
      -> [BOS, t_1 .. t_{N-1}] -> embedding -> causal Transformer (rotary token positions) -> head -> V logits
      -> nats of t_i, written at the position of t_i's last byte; every other byte position gets 0

so the sum of ``nll`` over a window is the window's total nats and bits per byte = total nats / real bytes / ln 2,
the same reduction as for the byte models (``mmbytes.metrics.BitsPerByte``). The first token is predicted from BOS
alone, as the byte models predict the first byte from their start vector.

Byte level: every byte value maps to one printable character (GPT-2's table), so a token's string has exactly one
character per byte and any file, UTF-8 or not, is covered by the 256 single-byte tokens. Words are split before
BPE (a GPT-2-like rule on the mapped characters: letters, digits, other bytes, runs of spaces and newlines, each
with at most one leading space), so merges stay inside words, as in GPT-2's tokenizer.

The tokenizer is part of the model's state (``get_extra_state``: its JSON and its measured bytes per token), so a
checkpoint holds it and ``mmbytes sample`` decodes tokens back to bytes. An untrained model carries the 256
single-byte tokens only. FLOPs per byte divide the FLOPs per token by the tokenizer's bytes per token, measured on
the training data it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbytes.codecs import MODALITIES
from mmbytes.io import write_text
from mmbytes.model import flops
from mmbytes.model.bpe_tokenizer import (
    TOKENIZER_BYTES,
    ByteTokenizer,
    byte_tokenizer_json,
    bytes_per_token,
    train_tokenizer,
)
from mmbytes.model.common import chunked_nll
from mmbytes.model.layers import ModalityStart, Transformer, init_linear
from mmbytes.model.protocol import Capabilities, Complete, ModelData


@dataclass(frozen=True)
class BPEConfig:
    arch: Literal["bpe"] = "bpe"
    """Architecture name in checkpoints and the registry."""
    vocab_size: int = 4096
    """Tokens of the BPE vocabulary (at most; a tokenizer trained on little data may have fewer). A BOS token comes
    on top, as an input only."""
    d_model: int = 384
    """Width of the token Transformer."""
    n_layer: int = 6
    """Transformer blocks."""
    n_head: int = 6
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the block width."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Every block's MLP: ``gelu`` (GPT-2: d -> d * mlp_ratio -> d) or ``swiglu`` (Shazeer, 2020: SiLU-gated, three
    matrices of hidden width 2/3 of gelu's, rounded to a multiple of 8: about the same parameters; ``layers.MLP``)."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs in training."""
    rope_base: float = 10000.0
    """Base of the rotary position embeddings (token index)."""
    embed_std: float = 0.02
    """Initial standard deviation of the token embeddings."""
    token_shift: bool = False
    """Token shift (see ``MegabyteConfig.token_shift``) in every block, over token positions. Off by default."""
    init: Literal["gpt2", "fan_in"] = "gpt2"
    """Linear layers' initialisation (see ``MegabyteConfig.init``): ``gpt2`` (N(0, 0.02), residual projections
    depth-scaled) or ``fan_in`` (PyTorch's default), head included."""
    checkpointing: bool = False
    """Recompute each block in the backward pass instead of storing its activations."""
    modality_start: bool = False
    """A learned start state per modality (``layers.ModalityStart``): the BOS input is the shared BOS embedding plus
    an offset chosen by the row's modality (rows without one: the shared one). Off in configs stored before the field
    existed (``registry.migrate``); on in the named sizes."""

    def __post_init__(self) -> None:
        if self.vocab_size < 256:
            raise ValueError(f"vocab_size {self.vocab_size} < 256: byte-level BPE needs every byte as a token")
        if self.init not in ("gpt2", "fan_in"):
            raise ValueError(f"init must be 'gpt2' or 'fan_in', got {self.init!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"width {self.d_model} is not divisible by its {self.n_head} heads")

    @property
    def window_alignment(self) -> int:
        """Bytes that training windows of image data start on a multiple of (``data.patch_size``, set from this by
        the CLI): 1 (tokens follow the bytes' merges, not fixed tiles)."""
        return 1


PRESETS: dict[str, dict] = {
    "paper": dict(modality_start=False),
    "conditioned": dict(modality_start=True),
}
"""Named forms (field -> value) a size is built in. ``paper``: a plain GPT-2-style token Transformer, unconditioned.
``conditioned`` (the named sizes): with a learned start state per modality."""

SHAPES: dict[str, tuple[str, dict]] = {
    "bpe-debug": ("conditioned", dict(vocab_size=512, d_model=64, n_layer=2, n_head=2)),
    # ~10M parameters in the blocks (as transformer-small) + 3.1M in the embedding and head of 4,096 tokens
    "bpe-small": ("conditioned", dict()),
}
"""Each named size: (its preset, its shape)."""

SIZES: dict[str, BPEConfig] = {name: BPEConfig(**shape, **PRESETS[preset]) for name, (preset, shape) in SHAPES.items()}


class BPETransformer(Complete, nn.Module):
    """A causal token Transformer that reads and scores bytes: ``nll(x, mask)`` tokenizes each window itself (see
    the module docstring); ``forward(x)`` returns the token logits (B, N, V) of the windows' tokens."""

    @property
    def capabilities(self) -> Capabilities:
        """Token logits, sampled tokens; with ``modality_start`` conditioned on each row's modality."""
        return Capabilities(byte_logits=False, cached=False, independent_rows=False, per_byte_nll=False,
                            per_modality=self.config.modality_start)

    def __init__(self, config: BPEConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size + 1, c.d_model)  # the last id is BOS
        self.modality_bos = ModalityStart(c.d_model, len(MODALITIES)) if c.modality_start else None
        self.transformer = Transformer(c.d_model, c.n_layer, c.n_head, c.mlp_ratio, c.dropout, c.rope_base,
                                       checkpointing=c.checkpointing, token_shift=c.token_shift, mlp=c.mlp)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.stats: dict[str, float] = {}
        self.set_tokenizer(byte_tokenizer_json(), 1.0)
        self._memo: tuple | None = None  # (x, mask, tokens) of the last training ``nll``, for ``train_flops``
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.transformer.reset_parameters(self.config.init)
        init_linear(self.head, self.config.init)
        nn.init.normal_(self.embed.weight, std=self.config.embed_std)
        if self.modality_bos is not None:
            self.modality_bos.reset_parameters()

    @property
    def bos(self) -> int:
        return self.config.vocab_size

    def num_params(self, part: str = "all") -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the tokenizer, stored in the state dict

    def set_tokenizer(self, tokenizer_json: str, bytes_per_token: float) -> None:
        tokenizer = ByteTokenizer(tokenizer_json)
        if len(tokenizer.token_bytes) > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer.token_bytes)} tokens; the model "
                             f"{self.config.vocab_size}")
        self.tokenizer, self.bytes_per_token = tokenizer, float(bytes_per_token)

    @property
    def trained_tokenizer(self) -> bool:
        return len(self.tokenizer.tok.get_vocab()) > 256

    def get_extra_state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.json, "bytes_per_token": self.bytes_per_token}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.set_tokenizer(state["tokenizer"], state["bytes_per_token"])

    # -- scoring byte windows

    def tokenize(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's real bytes -> token ids (B, N), the byte position of each token's last byte (B, N) and which
        tokens are real (B, N); rows are padded to the longest."""
        B, T = x.shape
        mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        x_cpu, mask_cpu = x.detach().to("cpu", torch.uint8), mask.detach().cpu()
        where = [row_mask.nonzero().squeeze(1) for row_mask in mask_cpu]  # the real positions of each row
        rows = [bytes(x_cpu[i, where[i]].numpy().tobytes()) for i in range(B)]
        ids = self.tokenizer.encode(rows)
        N = max(1, max(len(r) for r in ids))
        tokens = torch.zeros(B, N, dtype=torch.long)
        ends = torch.zeros(B, N, dtype=torch.long)
        real = torch.zeros(B, N, dtype=torch.bool)
        lengths = torch.tensor([len(b) for b in self.tokenizer.token_bytes])
        for i, r in enumerate(ids):
            if not r:
                continue
            t = torch.tensor(r, dtype=torch.long)
            tokens[i, : len(r)] = t
            ends[i, : len(r)] = where[i][lengths[t].cumsum(0) - 1]
            real[i, : len(r)] = True
        n_bytes, n_tokens = sum(len(r) for r in rows), int(real.sum())
        if n_tokens:
            self.stats["bytes_per_token"] = n_bytes / n_tokens
        return tokens.to(x.device), ends.to(x.device), real.to(x.device)

    def embed_inputs(self, inputs: Tensor, modality: Tensor | None = None) -> Tensor:
        """Embeddings (B, N, D) of input ids (B, N) whose first is BOS: with ``modality_start`` the BOS input is the
        row's modality's start state."""
        e = self.embed(inputs)
        if self.modality_bos is None:
            return e
        first = self.modality_bos(self.embed.weight[self.bos], inputs.shape[0], modality, e.dtype)
        return torch.cat([first, e[:, 1:]], dim=1)

    def hidden(self, tokens: Tensor, modality: Tensor | None = None) -> Tensor:
        """Token ids (B, N) -> hidden states (B, N, D); position i has seen BOS and tokens < i."""
        inputs = torch.cat([torch.full_like(tokens[:, :1], self.bos), tokens[:, :-1]], dim=1)  # (B, N)
        return self.transformer(self.embed_inputs(inputs, modality))

    def forward(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> Tensor:
        tokens, _, _ = self.tokenize(x, mask)
        return self.head(self.hidden(tokens, modality))  # (B, N, V)

    def nll(self, x: Tensor, mask: Tensor | None = None, chunk: int = 32768, *,
            modality: Tensor | None = None) -> Tensor:
        """Nats (B, T): each token's nats at the position of its last byte, 0 elsewhere and where ``mask`` is False.
        Summed over a window: the window's total nats (per position it is not a byte's own loss:
        ``capabilities.per_byte_nll`` is False)."""
        tokens, ends, real = self.tokenize(x, mask)
        if self.training:
            self._memo = (x, mask, tokens, ends, real)
        nats = chunked_nll(self.head.weight, self.hidden(tokens, modality), tokens, real, chunk)  # (B, N)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(ends)
        out = torch.zeros(x.shape, dtype=nats.dtype, device=x.device)
        return out.index_put((rows[real], ends[real]), nats[real])

    def flops_per_byte(self, seq_len: int) -> float:
        """Training FLOPs per byte planned (forward + backward = 3 x forward) at ``seq_len`` bytes per window: a
        window of N = seq_len / bytes-per-token tokens (the tokenizer's, measured on its training data), every block
        with attention over all N keys (causal SDPA charged in full, as the byte models), and the head; FLOPs per
        token divided by bytes per token (``mmbytes.model.flops``)."""
        c = self.config
        n = max(1.0, seq_len / self.bytes_per_token)
        per_token = c.n_layer * (flops.block_dense(1, c.d_model, c.mlp_ratio, c.mlp)
                                 + flops.attention(1, n, c.d_model))
        per_token += flops.linear(1, c.d_model, c.vocab_size)
        return 3 * per_token / self.bytes_per_token

    def train_flops(self, x: Tensor, mask: Tensor | None = None, *, modality: Tensor | None = None) -> float:
        """FLOPs of one training step on x (B, T) as run: the token Transformer and the head over the most tokens of
        any row's real bytes (every row is padded to it)."""
        c, (B, N) = self.config, self._tokens(x, mask)[0].shape
        fwd = flops.blocks(B, N, c.d_model, c.n_layer, c.mlp_ratio, mlp=c.mlp)
        fwd += flops.linear(B * N, c.d_model, c.vocab_size)
        return 3 * fwd

    def _tokens(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``tokenize(x, mask)``: that of the last training ``nll`` when it ran on this very batch, else computed."""
        if self._memo is not None and self._memo[0] is x and self._memo[1] is mask:
            return self._memo[2:]
        return self.tokenize(x, mask)

    def patch_starts(self, x: Tensor, mask: Tensor | None = None, *,
                     modality: Tensor | None = None) -> Tensor | None:
        """Where each token starts (its patch): the first real byte and every real byte after a token's last byte."""
        _, ends, real = self._tokens(x, mask)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(ends)
        last = torch.zeros(x.shape, dtype=torch.bool, device=x.device).index_put((rows[real], ends[real]),
                                                                                torch.tensor(True, device=x.device))
        mask = torch.ones_like(last) if mask is None else mask.bool()
        first = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)  # each row's first real byte
        return first | (torch.nn.functional.pad(last[:, :-1], (1, 0), value=False) & mask)

    def prepare(self, data: ModelData) -> None:
        """The tokenizer: ``data.options["tokenizer"]`` (a JSON file; its bytes per token measured on the training
        samples), else the one kept in ``data.cache_dir`` for this vocabulary size, else the trained one the model
        has, else one trained on ``data.train_samples`` (and kept in ``data.cache_dir``). The main process makes it
        and shares it; a model being restored from a checkpoint takes the checkpoint's."""
        if data.restoring:
            return
        given = data.options.get("tokenizer")
        cached = None if data.cache_dir is None else Path(data.cache_dir) / f"bpe{self.config.vocab_size}.json"
        meta = None if cached is None else cached.with_suffix(".meta.json")
        if not given and cached is not None and cached.exists() and meta.exists():
            self.set_tokenizer(cached.read_text(), json.loads(meta.read_text())["bytes_per_token"])
            return
        if not given and self.trained_tokenizer:
            return
        if data.train_samples is None:
            raise ValueError("the BPE baseline needs its training samples to train or measure its tokenizer; use a "
                             "datamodule that lists them (datamodules.ByteDataModule, MixedDataModule)")
        made = None
        if data.is_main:
            max_bytes = int(data.options.get("tokenizer_bytes") or TOKENIZER_BYTES)
            if given:
                tokenizer_json = Path(given).read_text()
                made = tokenizer_json, bytes_per_token(tokenizer_json, data.train_samples(), max_bytes)
            else:
                made = train_tokenizer(data.train_samples(), self.config.vocab_size, max_bytes)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    # each file whole or absent (the next run loads them), the meta last: read only beside both
                    write_text(cached, made[0])
                    write_text(meta, json.dumps({"vocab_size": self.config.vocab_size, "bytes_per_token": made[1]}))
        self.set_tokenizer(*data.share(made))

    # -- generation: tokens are sampled and decoded to bytes (``mmbytes.model.generate.generate`` calls this)

    @torch.no_grad()
    def generate_bytes(self, prompt: Tensor, num_bytes: int, sample: Callable[[Tensor], Tensor],
                       on_progress: Callable[[int], None] | None = None, *,
                       modality: Tensor | None = None) -> Tensor:
        """Continue each row of ``prompt`` (B, L0) bytes by ``num_bytes`` bytes: the prompt is tokenized, tokens are
        drawn with ``sample`` ((1, V) logits -> (1,) ids) one at a time with a KV cache and decoded; the last token
        is cut to length. Rows are generated one after the other (their prompts have different token counts)."""
        B, L0 = prompt.shape
        out = torch.zeros(B, L0 + num_bytes, dtype=torch.long, device=prompt.device)
        out[:, :L0] = prompt
        device, dtype = prompt.device, next(self.parameters()).dtype
        # ids the tokenizer has no bytes for (past its vocabulary, or unused) are never drawn: an untrained model, or
        # a tokenizer with fewer merges than the vocabulary allows, gives them probability
        vocab = self.tokenizer.token_bytes
        unusable = torch.ones(self.config.vocab_size, dtype=torch.bool, device=device)
        unusable[: len(vocab)] = torch.tensor([not b for b in vocab], dtype=torch.bool, device=device)
        for i in range(B):
            ids = self.tokenizer.encode([bytes(prompt[i].to(torch.uint8).cpu().tolist())])[0]
            caches = self.transformer.make_caches(1, len(ids) + num_bytes + 1, device, dtype)
            inputs = torch.tensor([[self.bos, *ids]], dtype=torch.long, device=device)
            h = self.transformer(self.embed_inputs(inputs, None if modality is None else modality[i : i + 1]),
                                 caches)
            made = bytearray()
            while len(made) < num_bytes:
                token = sample(self.head(h[:, -1]).masked_fill(unusable, float("-inf")))  # (1,)
                made += self.tokenizer.token_bytes[int(token)]
                if on_progress is not None:  # bytes per row so far, as the byte models' loop reports them
                    on_progress((i * num_bytes + min(len(made), num_bytes)) // B)
                if len(made) < num_bytes:
                    h = self.transformer(self.embed(token[:, None]), caches)
            out[i, L0:] = torch.tensor(list(made[:num_bytes]), dtype=torch.long, device=device)
        return out


def tokenizer_summary(model: BPETransformer) -> dict[str, Any]:
    """What a report says about a BPE model's tokenizer."""
    return {"vocab": len(model.tokenizer.tok.get_vocab()), "bytes_per_token": model.bytes_per_token,
            "merges": len(json.loads(model.tokenizer.json)["model"]["merges"])}
