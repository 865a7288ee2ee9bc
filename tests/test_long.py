"""Million-byte training (issue: long sequences). Minutes of CPU time and ~10 GB: marked slow, run with
``pytest -m slow``."""

import json
import subprocess
import sys

import pytest

STEP = """
import json, resource, sys, torch
from mmbytes import Megabyte, MegabyteConfig
torch.manual_seed(0)
m = Megabyte(MegabyteConfig.from_name("long")).train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randint(0, 256, (1, 2**20))
loss = m.nll(x, modality=torch.tensor([1])).mean()  # a start state per modality: told one
loss.backward()
finite = all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
opt.step()
print(json.dumps({"params": m.num_params(), "loss": loss.item(), "grads_finite": bool(finite),
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@pytest.mark.slow
def test_one_training_step_on_a_million_bytes_fits_in_16_gb():
    out = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, timeout=1800, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] >= 10e6
    assert r["grads_finite"] and 5.0 < r["loss"] < 6.0  # ln 256 = 5.55 at initialisation
    assert r["peak_gb"] < 16, r
