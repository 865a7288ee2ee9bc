"""``ByteLM(compile=...)``: regional compilation gives the eager model's loss and gradients, for every architecture."""

import pytest
import torch

from mmbytes.lit import ByteLM, compile_blocks
from mmbytes.model import bpe
from mmbytes.model.registry import build

ARCHS = ["debug", "transformer-debug", "spacebyte-debug", "blt-debug", "bpe-debug"]


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model.nll(x).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def pair(size, text_bytes):
    torch.manual_seed(0)
    eager = build(size)
    if size.startswith("bpe"):
        eager.set_tokenizer(*bpe.train_tokenizer([text_bytes], eager.config.vocab_size))
    compiled = build(size)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def check(size, text_bytes, backend):
    eager, compiled = pair(size, text_bytes)
    compile_blocks(compiled, backend)
    x = torch.frombuffer(bytearray(text_bytes[: 2 * 96]), dtype=torch.uint8).long().view(2, 96)
    (l0, g0), (l1, g1) = loss_and_grads(eager, x), loss_and_grads(compiled, x)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize("size", ARCHS)
def test_compiled_blocks_give_eager_loss_and_gradients(size, text_bytes):
    """Through dynamo and AOT autograd (the ``aot_eager`` backend: the traced graphs, no code generation)."""
    check(size, text_bytes, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("size", ARCHS)
def test_inductor_compiled_blocks_give_eager_loss_and_gradients(size, text_bytes):
    check(size, text_bytes, "inductor")


def test_the_module_option_compiles_every_block():
    lm = ByteLM(size="debug", compile="aot_eager")
    lm.configure_model()
    assert lm.model._mmbytes_compiled
    blocks = [m for m in lm.model.modules() if type(m).__name__ == "Block"]
    assert blocks and all("forward" in vars(b) for b in blocks)
