"""Every architecture behind one interface; boundary rules; SpaceByte (causality, cache, cap, loss)."""

import math
from pathlib import Path

import pytest
import torch
from generation_check import cached_equals_reference, condition
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmbytes.codecs import MODALITIES
from mmbytes.model import SIZES, build, config_from_name, patching
from mmbytes.model.generate import generate
from mmbytes.model.registry import config_from_dict, config_to_dict

DEBUG = ["debug", "debug-long", "transformer-debug", "spacebyte-debug", "spacebyte-fixed-debug", "blt-fixed-debug"]
EVERY = [*DEBUG, "blt-debug", "blt-entropy-debug"]  # BLT with entropy patches: its FLOPs test is in test_blt.py
SPACEBYTE = ["spacebyte-debug", "spacebyte-fixed-debug"]
TEXT = Path(__file__).resolve().parents[1] / "samples" / "text"
MODALITY = torch.tensor([MODALITIES.index("image"), MODALITIES.index("text")])  # rows' start states, in order


def real_text(n: int) -> torch.Tensor:
    blob = b"".join(p.read_bytes() for p in sorted(TEXT.rglob("*")) if p.is_file())
    assert len(blob) >= n
    return torch.tensor(list(blob[:n]))


def leaks(m, x: torch.Tensor, change) -> list[int]:
    """Positions t where changing byte t (by ``change``) changes any logit at a position <= t; each row from its
    modality's start state (``MODALITY``)."""
    modality = MODALITY[: x.shape[0]]
    with torch.no_grad():
        base = m(x, modality=modality)
        bad = []
        for t in range(x.shape[1]):
            y = x.clone()
            y[:, t] = change(y[:, t], t)
            if not torch.allclose(m(y, modality=modality)[:, : t + 1], base[:, : t + 1], atol=1e-9, rtol=0):
                bad.append(t)
    return bad


# -- one interface


@pytest.mark.parametrize("name", EVERY)
def test_every_size_answers_the_model_interface(name):
    m = build(name).eval()
    x = torch.randint(0, 256, (2, 37))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    with torch.no_grad():
        assert m(x).shape == (2, 37, 256)
        nll = m.nll(x, mask)
    assert nll.shape == (2, 37) and bool((nll[1, 30:] == 0).all()) and bool((nll[:, :30] > 0).all())
    assert m.flops_per_byte(64) > 0
    out = generate(m, x[:, :5], 7, temperature=0)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], x[:, :5])


@pytest.mark.parametrize("name,kw", [*((n, {}) for n in DEBUG), ("debug", {"mlp": "swiglu"}),
                                     ("spacebyte-debug", {"mlp": "swiglu"}), ("blt-fixed-debug", {"mlp": "swiglu"})])
def test_flops_per_byte_matches_the_flop_counter_at_two_lengths(name, kw):
    m = build(name, **kw).train()
    for T in (256, 1024):
        x = torch.randint(0, 256, (1, T))  # random bytes open more words than the cap: SpaceByte runs T_G slots
        # the counter sees no FLOPs in the fused CPU attention kernels; the math backend runs attention as matmuls
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            m.nll(x).sum().backward()
        m.zero_grad(set_to_none=True)
        measured = counter.get_total_flops() / T
        assert m.flops_per_byte(T) == pytest.approx(measured, rel=0.10), (T, m.flops_per_byte(T), measured)


def test_named_sizes_share_one_namespace_and_refuse_unknown_names_and_fields():
    assert {"debug", "small", "base", "transformer-small", "spacebyte-debug", "spacebyte-small",
            "spacebyte-fixed-small"} <= set(SIZES)
    with pytest.raises(ValueError, match="unknown model size 'nope'"):
        config_from_name("nope")
    with pytest.raises(ValueError, match=r"unknown config fields \['patch_count'\]"):
        config_from_name("spacebyte-debug", patch_count=3)


@pytest.mark.parametrize("name", EVERY)
def test_a_stored_config_builds_the_same_architecture(name):
    config = config_from_name(name)
    assert config_from_dict(config_to_dict(config)) == config


def test_a_megabyte_config_stored_before_the_new_fields_loads_in_the_paper_form():
    stored = config_to_dict(config_from_name("small"))
    for field in ("token_shift", "embed_std", "patch_embed", "d_embed", "global_to_local", "local_shift", "init"):
        del stored[field]
    old = config_from_dict(stored)
    assert (old.token_shift, old.embed_std, old.patch_embed, old.global_to_local, old.local_shift, old.init) == (
        False, 0.02, "concat", "slice", "patch", "gpt2")
    assert config_from_name("small").local_shift == "sequence"  # what the named size builds


def test_spacebyte_small_is_about_ten_million_parameters_at_megabyte_small_flops():
    sb, mb = build("spacebyte-small"), build("small")
    assert 9e6 < sb.num_params() < 11e6
    assert 0.7 < sb.flops_per_byte(8192) / mb.flops_per_byte(8192) < 1.5


# -- boundary rules


def spacelike_reference(data: bytes) -> list[bool]:
    """The paper's rule, written out byte by byte."""
    def space(b: int) -> bool:
        return not (chr(b).isascii() and chr(b).isalnum()) and not 0x80 <= b <= 0xBF

    trigger = [space(b) and not (i > 0 and space(data[i - 1])) for i, b in enumerate(data)]
    return [True] + trigger[:-1] if data else []


@pytest.mark.parametrize("text", ["hello world", "abc 123 x9", "hi,  there...  ok", "a\n\n\tb", "привет мир",
                                  "汉字 和 かな", "emoji 🙂🙂 end", "x"])
def test_spacelike_rule_on_hand_picked_strings(text):
    data = text.encode()
    got = patching.spacelike_starts(torch.tensor([list(data)]))[0].tolist()
    assert got == spacelike_reference(data)


def test_spacelike_rule_by_hand():
    def starts(s: str) -> list[int]:
        return patching.spacelike_starts(torch.tensor([list(s.encode())]))[0].nonzero().flatten().tolist()

    assert starts("hello world") == [0, 6]  # the global blocks run at the space; their output predicts "w"
    assert starts("hi,  there") == [0, 3]  # a run of punctuation and spaces: one boundary, after its first byte
    assert starts("12 ab") == [0, 3]  # digits are word bytes
    assert starts("é e") == [0, 1, 3]  # 0xC3 (a lead byte) is spacelike, 0xA9 (continuation) is not


def test_spacelike_rule_over_all_256_byte_values():
    space = patching.spacelike(torch.arange(256))
    word = set(range(0x30, 0x3A)) | set(range(0x41, 0x5B)) | set(range(0x61, 0x7B)) | set(range(0x80, 0xC0))
    assert [i for i in range(256) if not space[i]] == sorted(word)
    data = bytes(range(256)) + bytes(range(255, -1, -1))
    assert patching.spacelike_starts(torch.tensor([list(data)]))[0].tolist() == spacelike_reference(data)


RULES = {
    "fixed": lambda x: patching.fixed_starts(x, 6),
    "spacelike": patching.spacelike_starts,
    "spacelike-capped": lambda x: patching.cap_starts(patching.spacelike_starts(x), 7),
}


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_incremental_on_random_and_real_bytes(rule):
    f = RULES[rule]
    for x in (torch.randint(0, 256, (3, 90)), real_text(270).view(3, 90)):
        whole = f(x)
        assert bool(whole[:, 0].all())
        for t in range(1, x.shape[1] + 1):
            assert torch.equal(f(x[:, :t]), whole[:, :t]), t


# -- SpaceByte


def sb(name: str, **kw):
    """A float64 SpaceByte in eval mode, its start state per modality given random offsets (``condition``)."""
    return condition(build(name, **kw).double().eval())


def flip(b: torch.Tensor, t: int) -> torch.Tensor:
    """Alternately a space and a letter (moves every later word boundary) and any other byte."""
    return torch.full_like(b, 32 if t % 3 == 0 else 97 if t % 3 == 1 else 0) + ((b + 7) % 256) * (t % 3 == 2)


@pytest.mark.parametrize("name", SPACEBYTE)
@pytest.mark.parametrize("kw", [{}, {"mlp": "swiglu", "token_shift": True}])
def test_spacebyte_is_strictly_causal_also_where_boundaries_move_and_at_the_cap(name, kw):
    m = sb(name, **kw)
    assert m.config.max_global == 11 and m.config.local_window == 8
    for x in (torch.randint(0, 256, (2, 70)), real_text(140).view(2, 70)):  # random bytes pass the cap
        assert leaks(m, x, flip) == []
    assert int(patching.spacelike_starts(torch.randint(0, 256, (1, 70))).sum()) > 11 or name.endswith("fixed-debug")


def test_causality_check_catches_a_spacebyte_leak(monkeypatch):
    """If a position's global step could see its own byte, the check must say so."""
    m = sb("spacebyte-debug")
    monkeypatch.setattr(m, "inputs", lambda x, modality=None: m.embed(x))  # no shift: position t reads byte t
    assert len(leaks(m, torch.randint(0, 256, (1, 20)), flip)) == 20


def test_spacebyte_init_gpt2_depth_scales_residual_projections_and_fan_in_is_pytorchs_default():
    gpt2 = build("spacebyte-small", init="gpt2")
    assert gpt2.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for stack in (gpt2.local_in, gpt2.global_model, gpt2.local_out):
        for block in stack.blocks:
            assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * len(stack.blocks)),
                                                                        rel=0.1)
    fan_in = build("spacebyte-small", init="fan_in")
    linears = [m for m in fan_in.modules() if isinstance(m, torch.nn.Linear)]
    assert fan_in.head in linears
    for m in linears:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
        bound = 1 / math.sqrt(m.in_features)
        assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    with pytest.raises(ValueError, match="init"):
        config_from_name("spacebyte-debug", init="xavier")


@pytest.mark.parametrize("name", SPACEBYTE)
@pytest.mark.parametrize("kw", [{}, {"token_shift": True}, {"token_shift": True, "mlp": "swiglu", "init": "fan_in"}])
@pytest.mark.parametrize("prompt_len", [0, 1, 5, 30])
def test_spacebyte_cached_logits_equal_the_reference_at_every_step(name, kw, prompt_len):
    m = sb(name, **kw)
    x = real_text(2 * prompt_len + 2)[: 2 * prompt_len].view(2, prompt_len)
    cached_equals_reference(m, x, 40, modality=MODALITY)


def test_identical_prompts_in_one_batch_decode_identically_while_rows_open_words_at_different_steps():
    m = sb("spacebyte-debug", context=4096)  # no cap: every word boundary is a global step
    text = real_text(90)
    prompts = torch.stack([text[:30], text[30:60], text[:30], text[60:90]])
    out = generate(m, prompts, 50, temperature=0)
    assert torch.equal(out[0], out[2])
    # with a random model the rows make different bytes, so they open words at different steps
    starts = patching.spacelike_starts(out)[:, 30:]
    assert not torch.equal(starts[0], starts[1]) or not torch.equal(starts[0], starts[3])


def test_spacebyte_loss_scores_every_byte_also_past_the_cap():
    m = sb("spacebyte-debug")
    x = torch.randint(0, 256, (2, 70))
    glob, _ = m.global_positions(x)
    starts = patching.spacelike_starts(x)
    assert int(starts.sum(1).min()) > m.config.max_global  # the cap is reached in both rows
    assert int(glob.sum(1).max()) == m.config.max_global
    with torch.no_grad():
        logits = m(x)
        nll = m.nll(x)
    expect = torch.logsumexp(logits, -1) - logits.gather(-1, x[..., None]).squeeze(-1)
    torch.testing.assert_close(nll, expect, atol=1e-10, rtol=0)
    assert bool((nll > 0).all())  # no byte is left out


def test_spacebyte_reports_the_share_of_bytes_past_the_cap_in_training():
    m = build("spacebyte-debug").train()
    m.nll(torch.randint(0, 256, (2, 70)))
    assert 0 < float(m.stats["spacebyte_overflow"]) < 1
    roomy = build("spacebyte-debug", context=4096).train()  # a cap of 683: never reached by 70 bytes
    roomy.nll(torch.randint(0, 256, (2, 70)))
    assert float(roomy.stats["spacebyte_overflow"]) == 0


def test_fixed_patch_spacebyte_runs_its_global_blocks_every_patch():
    m = sb("spacebyte-fixed-debug", context=4096)
    glob, idx = m.global_positions(torch.randint(0, 256, (1, 40)))
    assert idx[0].tolist() == list(range(0, 40, 6))


def test_bytes_per_global_position_follow_the_rule_on_text():
    """On English text a word and its space: far fewer global positions than bytes."""
    x = real_text(4096)[None]
    share = patching.spacelike_starts(x).float().mean().item()
    assert 0.1 < share < 0.3
