"""bench/learning.py: each architecture's candidate forms (variant names made of atoms), several seeds, and a shard
set's training and validation samples as the data; two-step smoke runs on the debug sizes."""

import json
import tarfile
from pathlib import Path

import pytest
from bench_script import load_bench

from mmbytes.model import build
from mmbytes.model.megabyte_config import PRESETS
from mmbytes.model.spacebyte import PRESETS as SPACEBYTE_PRESETS

PAPER_FORM = PRESETS["paper"]

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "tests" / "data" / "files"  # real files of three kinds (tests/data/MANIFEST.md)
TEXT = ROOT / "samples" / "text" / "tinyshakespeare.txt"
DEBUG = ["debug", "transformer-debug", "spacebyte-debug", "blt-debug", "bpe-debug"]
SMOKE = ["--steps", "2", "--seq-len", "64", "--batch", "2", "--eval-every", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def learning():
    return load_bench("learning")


@pytest.fixture
def short_text(tmp_path) -> Path:
    """20 KB of real text: 18 KB to train on, 2 KB (31 windows of 64) held out."""
    path = tmp_path / "shakespeare.txt"
    path.write_bytes(TEXT.read_bytes()[:20_000])
    return path


@pytest.mark.parametrize("name", DEBUG)
def test_every_atom_builds_each_architecture_with_the_field_it_names(learning, name):
    expect = {"shift": ("token_shift", True), "swiglu": ("mlp", "swiglu"), "fanin": ("init", "fan_in"),
              "embed1": ("embed_std", 1.0)}
    for atom, (field, value) in expect.items():
        overrides, _ = learning.variant(f"paper+{atom}" if name != "debug" else f"{atom}+swiglu", name)
        assert getattr(build(name, **overrides).config, field) == value
    both, _ = learning.variant("fanin+embed1+shift+swiglu", name)
    config = build(name, **both).config
    assert (config.init, config.embed_std, config.token_shift, config.mlp) == ("fan_in", 1.0, True, "swiglu")


def test_paper_is_the_paper_preset_of_the_size_s_architecture(learning):
    assert learning.variant("paper+swiglu", "debug")[0] == {**PAPER_FORM, "mlp": "swiglu"}
    assert learning.variant("swiglu+paper", "debug")[0] == {**PAPER_FORM, "mlp": "swiglu"}  # paper first, wherever
    assert learning.variant("paper", "spacebyte-debug")[0] == SPACEBYTE_PRESETS["paper"]
    assert learning.variant("default", "blt-debug")[0] == {}
    # a MEGABYTE variant name keeps its meaning for MEGABYTE sizes; elsewhere its atoms apply to the named size
    assert learning.variant("shift", "debug")[0] == {**PAPER_FORM, "token_shift": True}
    assert learning.variant("shift", "spacebyte-debug")[0] == {"token_shift": True}


@pytest.mark.parametrize("name", DEBUG)
def test_two_steps_of_an_architecture_s_forms_run_through_main_and_score_held_out_bytes(learning, short_text, tmp_path,
                                                                                       name):
    out = tmp_path / "learning.json"
    rows = learning.main(["--size", name, "--text", str(short_text), "--variants", "default,shift+swiglu,reference",
                          "--json", str(out), *SMOKE])
    assert [r["variant"] for r in rows] == ["default", "shift+swiglu"]  # the reference: MEGABYTE-pytorch only
    assert rows[1]["overrides"] == {"token_shift": True, "mlp": "swiglu"}  # atoms: over the named size
    assert all(2.0 < r["val_bpb"][2] < 12.0 for r in rows)
    written = json.loads(out.read_text())
    assert written["runs"][1]["variant"] == "shift+swiglu"
    assert [row[0] for row in written["rows"]] == ["default", "shift+swiglu"]  # the rendered table, a row per run
    assert len(written["columns"]) == len(written["formats"]) == len(written["rows"][0])


def test_an_unknown_atom_stops_the_run_with_one_line_naming_it(learning, short_text):
    with pytest.raises(SystemExit, match=r"^bench/learning.py: variant 'shift\+bogus': unknown atom 'bogus'; [^\n]*$"):
        learning.main(["--size", "spacebyte-debug", "--text", str(short_text), "--variants", "default,shift+bogus",
                       *SMOKE])


def test_shards_train_on_the_training_samples_and_score_the_validation_samples_for_each_seed(learning, tmp_path):
    from mmbytes.cli import main as mmbytes

    shards = tmp_path / "shards"
    mmbytes(["shards", str(FILES), "--out", str(shards), "--workers", "0"])
    manifest = json.loads((shards / "manifest.json").read_text())
    train, val = learning.shard_bytes(shards)
    for split, got in (("train", train), ("val", val)):  # each split's samples in manifest order, read here by tarfile
        expect = b""
        for name in manifest["splits"][split]["shards"]:
            with tarfile.open(shards / name) as tar:
                expect += b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".bin"))
        assert got.numpy().tobytes() == expect and len(expect) == manifest["splits"][split]["bytes"]
    assert len(train) + len(val) == sum(p.stat().st_size for p in FILES.iterdir())
    rows = learning.main(["--size", "transformer-debug", "--shards", str(shards), "--variants", "default,swiglu",
                          "--seeds", "0,1", *SMOKE])
    assert [(r["variant"], r["seed"]) for r in rows] == [("default", 0), ("swiglu", 0), ("default", 1), ("swiglu", 1)]
    assert rows[0]["val_bpb"][2] != rows[2]["val_bpb"][2]  # another seed: other batches and initialisation
