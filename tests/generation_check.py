"""The check every architecture's cached generation passes: the cache against a full forward pass per byte."""

from dataclasses import fields, replace

import torch

from mmbytes.model import registry
from mmbytes.model.generate import generate, generate_reference
from mmbytes.model.megabyte_config import PRESETS

# MEGABYTE forms every causality and cache test runs: the paper's exact form and MEGABYTE-pytorch's choices
FORMS = {"paper": PRESETS["paper"],
         "shift-project-full": dict(token_shift=True, embed_std=1.0, patch_embed="project", global_to_local="full"),
         "sequence-shift": dict(token_shift=False, embed_std=1.0, patch_embed="concat", global_to_local="slice",
                                local_shift="sequence"),
         # the block options every architecture has: a SwiGLU MLP, token shift, fan-in initialisation
         "swiglu-shift-fanin": dict(mlp="swiglu", token_shift=True, init="fan_in")}


def in_form(name: str, **form):
    """A freshly built named size with the fields of ``form`` that its architecture has (the flat byte Transformer
    takes a MEGABYTE form's token shift, embedding scale, initialisation and start state, and has no patches)."""
    config = registry.config_from_name(name)
    known = {f.name for f in fields(config)}
    return registry.build(replace(config, **{k: v for k, v in form.items() if k in known}))


def cached_equals_reference(m, prompt: torch.Tensor, n: int, atol: float = 1e-10, **kw) -> torch.Tensor:
    """Greedy generation with the model's cache and with a full forward per byte: the logits agree at every step
    (float64 models) and so do the bytes; returns them."""
    fast, slow = {}, {}
    a = generate(m, prompt, n, temperature=0, on_logits=lambda t, v: fast.__setitem__(t, v), **kw)
    b = generate_reference(m, prompt, n, temperature=0, on_logits=lambda t, v: slow.__setitem__(t, v), **kw)
    assert sorted(fast) == sorted(slow) == list(range(prompt.shape[1], prompt.shape[1] + n))
    for t in fast:
        torch.testing.assert_close(fast[t], slow[t], atol=atol, rtol=0)
    assert torch.equal(a, b)
    return a


def condition(m, std: float = 1.0, seed: int = 0):
    """The model with random per-modality offsets of its start state (they start at zero: every modality the same),
    so that tests which pass a modality see each modality's own start state; returns it."""
    from mmbytes.model.layers import ModalityStart

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.modules():
            if isinstance(t, ModalityStart):
                t.offset.copy_(torch.randn(t.offset.shape, generator=g, dtype=t.offset.dtype) * std)
    return m
