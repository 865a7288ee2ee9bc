"""FLOP helpers shared by every architecture: forward multiply-add FLOPs (2 per multiply-add) of the matmuls a model
runs. What is counted is what ``torch.utils.flop_counter.FlopCounterMode`` counts: matrix products (linear layers,
``bmm``/``einsum`` contractions, attention run as matmuls by the math SDPA backend), a causal attention charged for all
its query-key pairs (kernels without causal skipping compute them). Embedding lookups, norms, softmaxes, gathers and
elementwise work are free. A training step costs 3 x the forward of its trainable parts (the backward computes the
gradients of both operands of every product) plus 1 x the forward of frozen parts that run without gradients.
Activation recomputation (``checkpointing``, the chunked head beyond its chunk) is a memory trade, not model compute,
and is not counted.
"""

from __future__ import annotations

import math

from mmbytes.model.layers import mlp_hidden


def linear(n: float, d_in: int, d_out: int) -> float:
    """``n`` positions through a (d_in -> d_out) linear layer."""
    return 2.0 * n * d_in * d_out


def block_dense(n: float, d: int, mlp_ratio: float, mlp: str = "gelu") -> float:
    """The projections of one pre-norm block of width d on ``n`` positions: q, k, v and output projections and the
    MLP's matmuls (attention itself: ``attention``). ``gelu``: d -> h -> d with h = d * mlp_ratio; ``swiglu``: three
    matrices, d -> 2h (gate and up) and h -> d, with h = ``layers.mlp_hidden`` (about 2/3 of the gelu width)."""
    h = mlp_hidden(d, mlp_ratio, mlp)
    up = 2 * h if mlp == "swiglu" else h
    return linear(n, d, 3 * d) + linear(n, d, d) + linear(n, d, up) + linear(n, h, d)


def attention(queries: float, keys: float, d: int) -> float:
    """Query-key scores and attention-weighted values of ``queries`` queries each against ``keys`` keys, width d (all
    heads together)."""
    return 4.0 * queries * keys * d


def causal_attention(rows: float, length: int, d: int) -> float:
    """Full causal self-attention over ``rows`` sequences of ``length`` positions, charged for every pair."""
    return rows * attention(length, length, d)


def windowed_attention(rows: float, length: int, d: int, window: int) -> float:
    """Causal self-attention in which each query sees ``window`` positions (``mmbytes.model.layers.window_attention``):
    once ``length`` > ``window`` it runs in blocks of ``window`` queries against 2 x ``window`` keys over the length
    padded to whole blocks; otherwise as full causal attention."""
    if window and length > window:
        return rows * attention(math.ceil(length / window) * window, 2 * window, d)
    return causal_attention(rows, length, d)


def blocks(rows: float, length: int, d: int, n_layer: int, mlp_ratio: float, window: int = 0,
           mlp: str = "gelu") -> float:
    """``n_layer`` blocks of width d over ``rows`` sequences of ``length`` positions (``window``: sliding-window
    attention, 0: full causal; ``mlp``: the MLP's form, ``block_dense``)."""
    return n_layer * (block_dense(rows * length, d, mlp_ratio, mlp) + windowed_attention(rows, length, d, window))

