"""The CUDA path: fused kernels equal the CPU reference (checked on CPU in fp64 where the kernel has a CPU form),
and, where a GPU is present (tests marked ``cuda``), training and cached generation on it."""

import pytest
import torch

from mmbytes.model.generate import generate, generate_reference
from mmbytes.model.layers import flex_window_attention, window_attention
from mmbytes.model.registry import build

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ARCHS = ["debug", "transformer-debug", "spacebyte-debug", "blt-fixed-debug"]


@pytest.mark.parametrize("T, window", [(64, 16), (70, 16), (33, 8)])
def test_flex_window_attention_equals_the_blockwise_reference(T, window):
    """The CUDA path's fused sliding-window kernel against the CPU path, in fp64 (FlexAttention's eager form)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(flex_window_attention(q, k, v, window), window_attention(q, k, v, window),
                               rtol=0, atol=1e-12)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("T, window", [(1024, 128), (1000, 64)])
def test_flex_window_attention_gradients_equal_the_reference_on_cuda(T, window):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(2, 4, T, 32, generator=g, device="cuda", requires_grad=True) for _ in range(3)]
    grads = []
    for fn in (flex_window_attention, window_attention):
        for t in qkv:
            t.grad = None
        fn(*qkv, window).square().sum().backward()
        grads.append([t.grad.clone() for t in qkv])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("size", ARCHS)
def test_bf16_training_step_on_cuda_is_finite(size, text_bytes):
    model = build(size).cuda().train()
    x = torch.tensor(list(text_bytes[: 4 * 512]), device="cuda").view(4, 512)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.nll(x).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("size", ARCHS)
def test_cached_generation_equals_the_reference_on_cuda(size):
    model = build(size).cuda().eval()
    prompt = torch.tensor([list(b"ROMEO:")], device="cuda")
    fast = generate(model, prompt, 24, temperature=0.0)
    slow = generate_reference(model, prompt, 24, temperature=0.0)
    assert torch.equal(fast, slow)
