"""Checkpoints written before the model package was split into modules still load and score the same bytes to the
bit: each file in ``tests/data/compat`` holds a named size's state dict and ``config_to_dict`` as that code saved
them, a batch of two rows of ``samples/text`` and the per-byte nll that code gave for it."""

from pathlib import Path

import pytest
import torch

from mmbytes.model import registry

COMPAT = Path(__file__).parent / "data" / "compat"


@pytest.mark.parametrize("name", ["debug", "spacebyte-debug", "blt-fixed-debug", "transformer-debug",
                                  "blt-entropy-debug"])
def test_stored_checkpoint_loads_and_gives_the_stored_nll_exactly(name):
    stored = torch.load(COMPAT / f"{name}.pt", weights_only=True)
    model = registry.build(registry.config_from_dict(stored["config"]))
    model.load_state_dict(stored["state"])
    model.eval()
    with torch.no_grad():
        nll = model.nll(stored["x"].long())
    assert torch.equal(nll, stored["nll"])
