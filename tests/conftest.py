from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # small real files shipped for the tests (credits: tests/data/MANIFEST.md)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def text_bytes() -> bytes:
    """Real English text shipped with the quickstart."""
    return sorted((ROOT / "samples").rglob("*.txt"))[0].read_bytes()
