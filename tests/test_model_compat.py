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


@pytest.mark.parametrize("name", ["transformer-debug", "blt-entropy-debug"])
def test_an_old_flat_transformer_bytelm_checkpoint_passes_the_checks_and_loads(name, tmp_path):
    """Weights stored under MEGABYTE's names (``global_embed``, ``global_model``...) in a ``ByteLM`` checkpoint: the
    checks made before loading see today's names, and as an entropy model it gives the stored nll."""
    from mmbytes.checkpoint import checked_model, load_entropy_model
    from mmbytes.model.transformer import ByteTransformer

    stored = torch.load(COMPAT / f"{name}.pt", weights_only=True)
    assert any(k.startswith("global_model.") for k in stored["state"])  # the earlier layout's names
    ckpt = {"mmbytes": {"config": stored["config"]}, "hyper_parameters": {"size": name},
            "state_dict": {f"model.{k}": v for k, v in stored["state"].items()}}
    config, state = checked_model(ckpt, "old.ckpt")
    assert set(state) == set(ByteTransformer(config).state_dict())
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    entropy = load_entropy_model(path) if name == "blt-entropy-debug" else {"config": stored["config"], "state": state}
    model = registry.build(registry.config_from_dict(entropy["config"]))
    model.load_state_dict(entropy["state"])
    with torch.no_grad():
        assert torch.equal(model.eval().nll(stored["x"].long()), stored["nll"])
