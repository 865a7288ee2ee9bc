"""FLOPs counted as run (``train_flops``) against ``torch.utils.flop_counter.FlopCounterMode``, for every
architecture, on real text and real binary bytes.

What is compared: ``FlopCounterMode`` counts matrix products (linear layers, ``bmm``/``einsum`` contractions) and, with
the math SDPA backend, attention as matmuls, in the forward and in the backward; ``train_flops`` counts the same
products (``mmbytes.model.flops``) plus the weighted sums of BLT's patch pooling (a scatter-add the counter does not
see, under 1% of a step). The counter sees the forward of BLT's frozen entropy model too, without a backward.
"""

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmbytes.model import build
from mmbytes.model.bpe_tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # real files shipped for the tests (tests/data/MANIFEST.md)
TEXT = (ROOT / "samples" / "text" / "tinyshakespeare.txt").read_bytes()
ELF = (DATA / "files" / "alsa-utils_aconnect").read_bytes()
PNG = (ROOT / "samples" / "images" / "icon_places_user-home.png").read_bytes()


def rows(blobs: list[bytes], T: int, offset: int = 0) -> torch.Tensor:
    return torch.stack([torch.tensor(list(b[offset : offset + T])) for b in blobs])


def counted(m, x: torch.Tensor, **kw) -> float:
    m.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m.nll(x, **kw).sum().backward()
    m.zero_grad(set_to_none=True)
    return counter.get_total_flops()


FIXED = ["debug", "debug-long", "transformer-debug", "blt-fixed-debug", "spacebyte-fixed-debug", "blt-entropy-debug"]
SWIGLU = {"mlp": "swiglu"}  # the gated MLP (three matrices) of every architecture


@pytest.mark.parametrize("name,kw", [*((n, {}) for n in FIXED), *((n, SWIGLU) for n in FIXED)])
def test_train_flops_of_fixed_patch_models_match_the_flop_counter_and_flops_per_byte(name, kw):
    m = build(name, **kw)
    x = rows([TEXT, ELF], 300)
    assert m.train_flops(x) == pytest.approx(counted(m, x), rel=0.05)
    if "spacebyte" not in name:  # fixed patches: the planned figure is exact
        assert m.train_flops(x) == pytest.approx(m.flops_per_byte(300) * x.numel(), rel=1e-9)


@pytest.mark.parametrize("name", ["spacebyte-debug", "blt-debug"])
@pytest.mark.parametrize("data", ["text", "binary", "text+binary"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_train_flops_of_variable_patches_match_the_flop_counter_on_real_bytes(name, data, mlp):
    overrides = {"patching": "space"} if name == "blt-debug" else {}
    m = build(name, mlp=mlp, **overrides)
    blobs = {"text": [TEXT, TEXT[5000:]], "binary": [ELF, PNG], "text+binary": [TEXT, ELF]}[data]
    x = rows(blobs, 256, 100)
    assert m.train_flops(x) == pytest.approx(counted(m, x), rel=0.05)


@pytest.mark.parametrize("theta", [0.5, 9.0])
def test_blt_train_flops_follow_tiny_and_huge_thresholds_and_the_longest_row(theta):
    m = build("blt-debug")
    m.theta.fill_(theta)
    x = rows([TEXT, ELF, PNG], 256, 100)
    flops = m.train_flops(x)
    assert flops == pytest.approx(counted(m, x), rel=0.05)
    planned = m.flops_per_byte(256) * x.numel()
    # threshold 0.5 nats: a patch at every byte; 9 nats (above ln 256): one patch per row
    assert (flops > 1.3 * planned) if theta < 1 else (flops < 0.8 * planned)


def test_blt_train_flops_pad_every_row_to_the_batch_s_most_patches():
    m = build("blt-debug")
    x = rows([TEXT, ELF], 256)
    starts = torch.zeros(2, 256, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, ::2] = True  # 128 patches in row 0, 1 in row 1: both rows run 128
    m._memo = (x, None, starts)
    assert m.train_flops(x) == pytest.approx(3 * m.forward_flops(2, 256, 128) + m.entropy_model.train_flops(x) / 3)


def test_spacebyte_train_flops_use_the_cap_of_its_context_also_when_the_window_differs():
    m = build("spacebyte-debug", context=2048)  # cap ceil(2048 / 6) = 342 global positions, window 512
    x = rows([PNG, ELF[20_000:]], 512, 200)  # compressed and machine code: a word start every few bytes
    flops = m.train_flops(x)
    assert flops == pytest.approx(counted(m, x), rel=0.05)
    G = int(m.capped_starts(x)[1].sum(1).max())
    assert G > 512 / 6  # more global positions than the ceil(T / 6) a window of 512 plans for, fewer than the cap
    assert flops > 1.05 * m.flops_per_byte(512) * x.numel()


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_bpe_train_flops_count_the_tokens_each_batch_has(mlp):
    m = build("bpe-debug", mlp=mlp)
    m.set_tokenizer(*train_tokenizer([TEXT[:100_000]], 512))
    x = rows([TEXT[200_000:], ELF], 512)
    assert m.train_flops(x) == pytest.approx(counted(m, x), rel=0.05)


def test_blt_without_an_entropy_checkpoint_counts_the_one_byte_patches_it_runs_not_the_planned_ones():
    m = build("blt-debug")  # the entropy model as initialised, the default threshold of 2 nats
    assert m.requires() == {"entropy_ckpt": "blt-entropy-debug"} and m.caveats()
    x = rows([TEXT, ELF], 256, 100)
    starts = m.patch_starts(x)
    assert starts.float().mean() > 0.9  # an untrained model is unsure of every byte: a patch nearly every byte
    flops = m.train_flops(x)
    assert flops == pytest.approx(counted(m, x), rel=0.05)
    assert flops > 1.5 * m.flops_per_byte(256) * x.numel()  # the plan assumes patches of 4.5 bytes
