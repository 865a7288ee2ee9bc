import math

import pytest
import torch
from generation_check import FORMS, condition, in_form

from mmbytes import Megabyte, MegabyteConfig
from mmbytes.codecs import MODALITIES
from mmbytes.model import registry
from mmbytes.model.megabyte_config import PRESETS

SIZES = ["debug", "debug-long", "transformer-debug"]  # two stages, three stages, flat
MODALITY = torch.tensor([MODALITIES.index("image"), MODALITIES.index("text")])  # the two rows' start states


def model(name: str, **kw) -> Megabyte:
    """A named size in eval mode (with the fields of ``kw`` its architecture has), its start state per modality given
    random offsets (``condition``)."""
    return condition(in_form(name, **kw).eval())


def leaks(m: Megabyte, T: int) -> list[int]:
    """Positions t where changing byte t changes any logit at a position <= t (two rows of two modalities)."""
    x = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        base = m(x, modality=MODALITY)
        bad = []
        for t in range(T):
            y = x.clone()
            y[:, t] = (y[:, t] + 1 + torch.randint(0, 254, (1,))) % 256
            if not torch.allclose(m(y, modality=MODALITY)[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0):
                bad.append(t)
    return bad


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [16, 19])  # a multiple of P and an odd length (internally padded)
def test_strict_causality(name, form, T):
    assert leaks(model(name, **FORMS[form]), T) == []


FOUR_STAGES = dict(patch_size=16, d_global=4, mid_patch_sizes=(8, 2), d_mid=(8, 16), n_layer_mid=(1, 1),
                   n_head_mid=(2, 2), d_local=16, n_head_local=2)


@pytest.mark.parametrize("T", [32, 35])
@pytest.mark.parametrize("local_shift", ["patch", "sequence"])
def test_strict_causality_with_four_stages(T, local_shift):
    m = model("debug", **FOUR_STAGES, local_shift=local_shift)
    assert [s.patch for s in m.stages()] == [16, 8, 2, 1]
    assert leaks(m, T) == []


def test_causality_test_catches_a_leak(monkeypatch):
    """Without the shift by the padding byte, the local model sees the byte it predicts: the check must say so."""
    m = model("debug")
    monkeypatch.setattr(m, "unit_inputs", lambda s, x, parent: s.embed(x.reshape(-1, parent)))
    assert leaks(m, 8) == list(range(8))


def test_future_bytes_do_change_predictions():
    m = model("debug")
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 5] ^= 1
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, 6:], m(y)[:, 6:])


@pytest.mark.parametrize("name", SIZES)
def test_nll_is_hand_computed_cross_entropy(name):
    m = model(name)
    x = torch.randint(0, 256, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        logits = m(x)
        nll = m.nll(x, mask)
        chunked = m.nll(x, mask, chunk=5)
    for b in range(2):
        for t in range(11):
            row = logits[b, t].double()
            expect = (math.log(row.exp().sum()) - row[x[b, t]]).item() if mask[b, t] else 0.0
            assert nll[b, t].item() == pytest.approx(expect, abs=1e-4)
    torch.testing.assert_close(chunked, nll)


def test_chunked_loss_gradients_match():
    m = model("debug").train()
    x = torch.randint(0, 256, (2, 24))
    grads = []
    for chunk in (10_000, 7):
        m.zero_grad()
        m.nll(x, chunk=chunk, modality=MODALITY).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["debug", "debug-long"])
def test_checkpointed_blocks_in_slices_give_the_same_gradients(name, monkeypatch):
    from mmbytes.model import layers

    monkeypatch.setattr(layers, "CHECKPOINT_TOKENS", 8)  # slices of 8 positions: several per folded batch
    x = torch.randint(0, 256, (2, 40))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = model(name, checkpointing=checkpointing).train()
        m.nll(x, modality=MODALITY).mean().backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    torch.testing.assert_close(grads[1], grads[0])


def test_every_byte_value_is_data():
    """No byte value is reserved for padding: every value's embedding rows learn (an embedding with
    ``padding_idx=0`` would give row 0 no gradient), and the loss of a 0x00 byte moves with its logit (a loss that
    ignored target 0 would not)."""
    m = model("debug").train()
    values = torch.arange(256)
    # each value sits in some row away from the last patch (the global model never embeds it) and away from the
    # last byte of a patch (the local model never embeds it)
    x = torch.stack([values.roll(s) for s in (0, 1, 128, 129)])  # (4, 256)
    m.nll(x).sum().backward()
    for table in (m.global_embed, m.local_embed):
        assert (table.weight.grad.abs().sum(1) > 0).all()
    zero = x == 0
    with torch.no_grad():
        before = m.nll(x)[zero]
        m.head.weight[0] += 0.5 * m.head.weight.norm(dim=1).max()  # move the logit of byte 0 everywhere
        after = m.nll(x)[zero]
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("name", SIZES)
def test_overfits_one_batch(name, text_bytes):
    torch.manual_seed(0)
    m = model(name).train()
    x = torch.tensor(list(text_bytes[:256])).view(2, 128)
    # 3e-3: at 1e-2 the byte Transformer's loss oscillates (1.38 after 200 steps with torch 2.6, seed 0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = m.nll(x).mean()
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 1.0  # from ~ln 256 = 5.55 nats


def test_odd_lengths_and_dtypes():
    m = model("debug")
    for T in (1, 3, 5, 17):
        assert m(torch.randint(0, 256, (2, T), dtype=torch.uint8)).shape == (2, T, 256)


def test_named_sizes_parameter_counts():
    counts = {n: registry.build(n).num_params() for n in
              ["debug", "small", "base", "long", "transformer-debug", "transformer-small"]}
    print(counts)
    assert 8e6 < counts["small"] < 12e6
    assert 85e6 < counts["base"] < 115e6
    assert counts["long"] >= 10e6  # the million-byte configuration
    assert abs(counts["transformer-small"] / counts["small"] - 1) < 0.1
    assert abs(counts["transformer-debug"] / counts["debug"] - 1) < 0.1


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="unknown config fields"):
        MegabyteConfig.from_name("debug", n_layers=3)
    with pytest.raises(ValueError, match="unknown model size"):
        MegabyteConfig.from_name("huge")
    with pytest.raises(ValueError, match="arch 'megabyte'"):
        MegabyteConfig(arch="transformer")
    with pytest.raises(ValueError, match="n_layer_local >= 1"):
        MegabyteConfig(n_layer_local=0)
    with pytest.raises(ValueError, match="one entry per middle stage"):
        MegabyteConfig(patch_size=8, mid_patch_sizes=(2,), d_mid=(16, 16), n_layer_mid=(1,), n_head_mid=(2,))
    for mids in [(3,), (8,), (4, 4), (1,)]:  # must divide, be smaller than the size above, and be at least 2
        with pytest.raises(ValueError, match="middle patch size"):
            MegabyteConfig(patch_size=8, mid_patch_sizes=mids, d_mid=(16,) * len(mids), n_layer_mid=(1,) * len(mids),
                           n_head_mid=(2,) * len(mids))
    cfg = MegabyteConfig(patch_size=8, mid_patch_sizes=[2], d_mid=[16], n_layer_mid=[1], n_head_mid=[2])  # YAML lists
    assert cfg.mid_patch_sizes == (2,) and cfg == MegabyteConfig.from_name("debug-long", **{
        k: getattr(cfg, k) for k in ("d_global", "n_layer_global", "n_head_global", "d_local", "n_layer_local",
                                     "n_head_local", *PRESETS["shifted"])})
    for field, value in [("init", "xavier"), ("local_shift", "global")]:
        with pytest.raises(ValueError, match=field):
            MegabyteConfig.from_name("debug", **{field: value})


def test_strided_nll_paper_rule_takes_each_byte_from_the_pass_where_it_is_early_in_its_patch():
    m = model("debug")  # P = 4: bytes 0, 1 of each patch come from the first pass, 2, 3 from the shifted one
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        first, shifted, strided = m.nll(x), m.nll(x[:, 2:]), m.nll_strided(x)  # the paper's rule is the default
    early = [0, 1, 4, 5, 8, 9, 12, 13]
    torch.testing.assert_close(strided[:, early], first[:, early])
    # byte t of the first pass is byte t - 2 of the shifted one, where 2, 3, 6, 7, ... sit early in their patch
    torch.testing.assert_close(strided[:, [2, 3, 6, 7, 10, 11, 14, 15]], shifted[:, [0, 1, 4, 5, 8, 9, 12, 13]])
    torch.testing.assert_close(m.nll_strided(x, rule="paper"), strided)


def test_strided_nll_later_rule_takes_each_byte_from_the_pass_where_it_is_late_in_its_patch():
    m = model("debug")  # P = 4: bytes 2, 3 of each patch come from the first pass, 0, 1 from the shifted one
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        first, shifted, strided = m.nll(x), m.nll(x[:, 2:]), m.nll_strided(x, rule="later")
    late = [2, 3, 6, 7, 10, 11, 14, 15]
    torch.testing.assert_close(strided[:, late], first[:, late])
    torch.testing.assert_close(strided[:, [4, 5, 8, 9, 12, 13]], shifted[:, [2, 3, 6, 7, 10, 11]])
    torch.testing.assert_close(strided[:, :2], first[:, :2])  # the shifted pass never saw them
    with pytest.raises(ValueError, match="paper"):
        m.nll_strided(x, rule="first")


@pytest.mark.parametrize("name, table", [("debug", "local_embed"), ("transformer-debug", "embed")])
def test_tied_head_reuses_the_byte_embedding_and_stays_causal(name, table):
    untied, tied = model(name), model(name, tied_head=True)
    assert tied.head.weight is getattr(tied, table).weight  # the paper's output layer: E^local-embed
    assert untied.num_params() - tied.num_params() == tied.head.weight.numel()
    assert leaks(tied, 12) == []
    x = torch.randint(0, 256, (2, 12))
    tied.train()
    tied.nll(x).mean().backward()
    assert getattr(tied, table).weight.grad.abs().sum() > 0


def test_configs_stored_before_tied_head_load_untied():
    from mmbytes.model.registry import config_from_dict, config_to_dict

    stored = config_to_dict(MegabyteConfig.from_name("debug"))
    stored.pop("tied_head")
    assert config_from_dict(stored).tied_head is False


@pytest.mark.parametrize("local_shift, reads_previous_byte", [("patch", False), ("sequence", True)])
def test_local_shift_decides_whether_a_patch_start_reads_the_byte_before_it(local_shift, reads_previous_byte):
    """With the global model cut off (w^GL zero), a patch's first byte is predicted from its own stage's input alone:
    the padding byte (``patch``) or the last byte of the patch before (``sequence``)."""
    m = model("debug", local_shift=local_shift)
    torch.nn.init.zeros_(m.global_to_local.weight)
    x = torch.randint(0, 256, (1, 8))
    y = x.clone()
    y[0, 3] ^= 1  # the last byte of patch 0 (P = 4)
    with torch.no_grad():
        changed = not torch.allclose(m(x)[0, 4], m(y)[0, 4])
    assert changed == reads_previous_byte


@pytest.mark.parametrize("name", ["small", "debug-long"])
def test_gpt2_init_keeps_the_depth_scaled_residual_projections_and_fan_in_is_pytorchs_default(name):
    gpt2 = Megabyte(MegabyteConfig.from_name(name, init="gpt2"))
    for stack in (gpt2.global_model, *gpt2.mid_models, gpt2.local_model):
        scaled = 0.02 / math.sqrt(2 * len(stack.blocks))
        for block in stack.blocks:
            assert block.attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
            assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    fan_in = Megabyte(MegabyteConfig.from_name(name, init="fan_in"))
    linears = [m for m in fan_in.modules() if isinstance(m, torch.nn.Linear)]
    assert fan_in.head in linears
    for m in linears:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
        bound = 1 / math.sqrt(m.in_features)
        assert m.weight.abs().max().item() <= bound * (1 + 1e-6)
        if m.weight.numel() > 1000:
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_megabyte_size_aliases_name_the_same_config_in_registry_and_study():
    from mmbytes.model.registry import SIZES, config_from_name
    from mmbytes.study import size_of

    for size in ("debug", "small", "base", "long"):
        alias = f"megabyte-{size}"
        assert size in SIZES and alias in SIZES
        assert config_from_name(alias) == config_from_name(size) == SIZES[size]
        assert config_from_name(alias, dropout=0.1) == config_from_name(size, dropout=0.1)
        assert size_of(alias) == size_of(size) == size
