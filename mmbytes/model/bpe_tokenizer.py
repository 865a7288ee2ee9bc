"""The byte-level BPE tokenizer of the subword baseline (``mmbytes.model.bpe``): GPT-2's byte <-> character map and a
Hugging Face ``tokenizers`` BPE trained on the training bytes, with at most one leading space per word."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

TOKENIZER_BYTES = 64 * 2**20
"""Training bytes a tokenizer is trained on (and its bytes per token measured on) unless told otherwise."""

SPLIT = r"Ġ?[A-Za-z]+|Ġ?[0-9]{1,3}|Ġ?[^A-Za-z0-9ĠĊ]+|[ĠĊ]+"
"""Pre-tokenization on the mapped characters (``Ġ`` is the space byte, ``Ċ`` the newline): a token never spans two
words. Every character matches one of the alternatives, so no byte is dropped."""


@lru_cache(maxsize=1)
def byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> character table: printable bytes map to themselves, the others to characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return tuple(chars[b] for b in range(256))


@lru_cache(maxsize=1)
def char_bytes() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_chars())}


def to_chars(data: bytes) -> str:
    table = byte_chars()
    return "".join(table[b] for b in data)


def from_chars(text: str) -> bytes:
    table = char_bytes()
    return bytes(table[c] for c in text)


def _tokenizer(model):
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    return tok


def byte_tokenizer_json() -> str:
    """A tokenizer with the 256 single-byte tokens and no merges (an untrained model's)."""
    from tokenizers import models

    return _tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars())}, merges=[])).to_str()


def _texts(samples: Iterable[bytes], max_bytes: int) -> list[str]:
    texts, total = [], 0
    for data in samples:
        if total >= max_bytes:
            break
        data = bytes(data[: max_bytes - total])
        texts.append(to_chars(data))
        total += len(data)
    if not total:
        raise ValueError("no training bytes for the tokenizer")
    return texts


def bytes_per_token(tokenizer_json: str, samples: Iterable[bytes], max_bytes: int = 64 * 2**20) -> float:
    """Mean bytes per token of a tokenizer on (the first ``max_bytes`` of) ``samples``."""
    from tokenizers import Tokenizer

    texts = _texts(samples, max_bytes)
    tokens = sum(len(e.ids) for e in Tokenizer.from_str(tokenizer_json).encode_batch(texts, add_special_tokens=False))
    return sum(map(len, texts)) / max(1, tokens)


def train_tokenizer(samples: Iterable[bytes], vocab_size: int, max_bytes: int = 64 * 2**20) -> tuple[str, float]:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``samples`` (the first ``max_bytes`` of
    them); returns its JSON and its bytes per token on those samples."""
    from tokenizers import models, trainers

    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} < 256: byte-level BPE needs every byte as a token")
    texts = _texts(samples, max_bytes)
    tok = _tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=list(byte_chars()), show_progress=False,
                                  special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tok.to_str(), sum(map(len, texts)) / max(1, tokens)


class ByteTokenizer:
    """Bytes <-> token ids with a byte-level BPE tokenizer's JSON."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.json = tokenizer_json
        self.tok = Tokenizer.from_str(tokenizer_json)
        vocab = self.tok.get_vocab()
        self.vocab_size = len(vocab)
        self.token_bytes: list[bytes] = [b""] * (max(vocab.values()) + 1)
        for text, i in vocab.items():
            self.token_bytes[i] = from_chars(text)

    def encode(self, rows: list[bytes]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch([to_chars(r) for r in rows], add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)


