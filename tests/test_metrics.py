import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmbytes.codecs import MODALITIES
from mmbytes.metrics import BitsPerByte

IMAGE, AUDIO, TEXT = (MODALITIES.index(m) for m in ("image", "audio", "text"))


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        counts = torch.randint(1, 100, (3,), generator=g).float()
        nats = counts * torch.rand(3, generator=g) * 5
        yield nats, counts, torch.tensor([IMAGE, AUDIO, TEXT])


def test_bits_match_a_hand_computation():
    m = BitsPerByte()
    nats = {IMAGE: 0.0, AUDIO: 0.0, TEXT: 0.0}
    count = dict.fromkeys(nats, 0.0)
    for n, c, mod in batches():
        m.update(n, c, mod)
        for i in range(3):
            nats[mod[i].item()] += n[i].item()
            count[mod[i].item()] += c[i].item()
    out = m.compute()
    bpb = {k: nats[k] / count[k] / math.log(2) for k in nats}
    assert out["bpb"].item() == pytest.approx(sum(nats.values()) / sum(count.values()) / math.log(2))
    assert out["bpb_image"].item() == pytest.approx(bpb[IMAGE], rel=1e-6)
    assert out["bpd_image"].item() == pytest.approx(bpb[IMAGE], rel=1e-6)  # one byte per sub-pixel
    assert out["bpb_audio"].item() == pytest.approx(bpb[AUDIO], rel=1e-6)  # the primary audio figure, per byte
    assert out["bits_per_sample_audio"].item() == pytest.approx(2 * bpb[AUDIO], rel=1e-6)  # two bytes per sample
    assert "bpd_audio" not in out  # the old name read like a per-byte figure and was 2x it
    assert out["bpb_text"].item() == pytest.approx(bpb[TEXT], rel=1e-6)
    assert "bpb_raw" not in out  # only modalities that were seen


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m = BitsPerByte()
    for i, b in enumerate(batches()):
        if i % world == rank:  # each process sees half of the batches
            m.update(*b)
    out = m.compute()
    queue.put((rank, {k: v.item() for k, v in out.items()}))
    dist.destroy_process_group()


def test_bits_are_exact_across_two_processes():
    single = BitsPerByte()
    for b in batches():
        single.update(*b)
    expect = {k: v.item() for k, v in single.compute().items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        assert results[rank].keys() == expect.keys()
        for k in expect:
            assert abs(results[rank][k] - expect[k]) < 1e-6, (rank, k)
