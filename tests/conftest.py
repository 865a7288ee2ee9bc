import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # small real files shipped for the tests (credits: tests/data/MANIFEST.md)
# the development machine's larger real data, for benches and slow tests only; MMBYTES_SHARED_DATA moves it (.ci/run
# points it nowhere to prove that the default suite needs nothing outside the repository)
SHARED = Path(os.environ.get("MMBYTES_SHARED_DATA") or ROOT.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def text_bytes() -> bytes:
    """Real English text shipped with the quickstart."""
    return sorted((ROOT / "samples").rglob("*.txt"))[0].read_bytes()
