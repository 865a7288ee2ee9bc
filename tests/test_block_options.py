"""The block options every architecture has: the MLP (``gelu`` or ``swiglu`` at equal parameters), token shift, the
initialisation (``gpt2`` or ``fan_in``) and the embedding scale. Causality, cached generation and FLOPs with these
options are tested with each architecture's own checks (test_model, test_generate, test_architectures, test_blt,
test_flops); here: what each option builds."""

import math

import pytest
import torch
from torch import nn

from mmbytes.model import build, config_from_name
from mmbytes.model.layers import MLP, Block, Transformer, mlp_hidden
from mmbytes.model.registry import config_from_dict, config_to_dict

NAMES = ["debug", "transformer-debug", "spacebyte-debug", "blt-debug", "bpe-debug"]
SMALL = ["small", "transformer-small", "spacebyte-small", "blt-small", "bpe-small"]
NEW = {"mlp": "gelu", "token_shift": False, "init": "gpt2"}  # fields every architecture has now, at their defaults


def trained(m, kind: type) -> list[nn.Module]:
    """The model's modules of a kind that train (BLT's frozen entropy model left out)."""
    return [x for x in m.modules() if isinstance(x, kind) and all(p.requires_grad for p in x.parameters())]


def stacks(m) -> list[Transformer]:
    return trained(m, Transformer)


def test_swiglu_hidden_width_is_two_thirds_of_gelu_s_rounded_to_a_multiple_of_eight():
    assert mlp_hidden(384, 4.0, "gelu") == 1536
    assert mlp_hidden(384, 4.0, "swiglu") == 1024
    assert mlp_hidden(32, 4.0, "swiglu") == 88  # 85.3 -> 88
    assert all(mlp_hidden(d, 4.0, "swiglu") % 8 == 0 for d in (16, 24, 40, 100, 768))
    with pytest.raises(ValueError, match="mlp must be 'gelu' or 'swiglu', got 'relu'"):
        mlp_hidden(32, 4.0, "relu")


@pytest.mark.parametrize("name", SMALL)
def test_a_swiglu_mlp_keeps_each_small_size_s_parameters_within_one_percent(name):
    gelu, swiglu = build(name), build(name, mlp="swiglu")
    assert swiglu.num_params() == pytest.approx(gelu.num_params(), rel=0.01)
    assert all(b.mlp.kind == "swiglu" and b.mlp.fc.out_features == 2 * b.mlp.proj.in_features
               for t in stacks(swiglu) for b in t.blocks)


def test_swiglu_is_the_silu_gated_product_of_two_projections():
    torch.manual_seed(0)
    mlp = MLP(16, 4.0, 0.0, "swiglu").double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    h = mlp.proj.in_features
    w, v = mlp.fc.weight[:h], mlp.fc.weight[h:]
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(x @ w.T) * (x @ v.T)) @ mlp.proj.weight.T)


@pytest.mark.parametrize("name", SMALL)
def test_gpt2_init_depth_scales_the_output_projection_of_a_swiglu_mlp(name):
    m = build(name, mlp="swiglu", init="gpt2")
    for t in stacks(m):
        for b in t.blocks:
            target = 0.02 / math.sqrt(2 * len(t.blocks))
            assert b.mlp.proj.weight.std().item() == pytest.approx(target, rel=0.1)
            assert b.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name", ["blt-small", "bpe-small"])
def test_fan_in_init_of_blt_and_bpe_is_pytorch_s_default_for_every_linear_layer_head_included(name):
    m = build(name, init="fan_in")
    linears = trained(m, nn.Linear)
    assert m.head in linears
    for x in linears:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
        assert x.weight.std().item() == pytest.approx(1 / math.sqrt(3 * x.in_features), rel=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_token_shift_reaches_every_block_of_every_stack(name):
    assert all(b.shift for t in stacks(build(name, token_shift=True)) for b in t.blocks)
    assert not any(b.shift for t in stacks(build(name, token_shift=False)) for b in t.blocks)


@pytest.mark.parametrize("name", NAMES)
def test_embed_std_sets_the_byte_or_token_embeddings(name):
    m = build(name, embed_std=1.0)
    tables = trained(m, nn.Embedding)
    assert tables and all(e.weight.std().item() == pytest.approx(1.0, rel=0.15) for e in tables)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field,value", [("mlp", "relu"), ("init", "xavier")])
def test_an_unknown_mlp_or_init_is_refused_by_name(name, field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        config_from_name(name, **{field: value})


@pytest.mark.parametrize("name", NAMES)
def test_a_config_stored_before_the_block_options_loads_with_gelu_no_shift_and_gpt2_init(name):
    stored = config_to_dict(config_from_name(name))
    for field in NEW:
        stored.pop(field, None)
    old = config_from_dict(stored)
    assert {f: getattr(old, f) for f in NEW} == NEW


def test_bpe_token_transformer_with_every_block_option_is_causal_and_its_cache_equals_the_full_forward():
    m = build("bpe-debug", mlp="swiglu", token_shift=True, init="fan_in", embed_std=1.0).double().eval()
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = m.hidden(tokens)  # position i has seen BOS and tokens < i
        for i in range(tokens.shape[1]):
            other = tokens.clone()
            other[:, i] = (other[:, i] + 1) % 512
            torch.testing.assert_close(m.hidden(other)[:, : i + 1], full[:, : i + 1], atol=1e-12, rtol=0)
        inputs = torch.cat([torch.full_like(tokens[:, :1], m.bos), tokens[:, :-1]], dim=1)
        caches = m.transformer.make_caches(2, tokens.shape[1], dtype=torch.float64)
        e = m.embed_inputs(inputs)
        steps = [m.transformer(e[:, :5], caches)]  # a prefill, then one token at a time
        steps += [m.transformer(e[:, i : i + 1], caches) for i in range(5, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)


def test_a_block_s_default_mlp_is_the_gelu_one_with_the_stored_parameter_names():
    b = Block(32, 2, 4.0, 0.0)
    assert b.mlp.kind == "gelu" and b.mlp.fc.weight.shape == (128, 32) and b.mlp.proj.weight.shape == (32, 128)
