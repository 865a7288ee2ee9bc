"""The registry and the model package's layout: the flat byte Transformer's own config and the migration of configs it
was stored with, the import direction (the registry imports the models, no model imports it), and the named presets
every size is built from."""

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from mmbytes.model import blt_config, bpe, megabyte_config, registry, spacebyte, transformer
from mmbytes.model.megabyte_config import MegabyteConfig
from mmbytes.model.transformer import ByteTransformer, TransformerConfig

MODEL = Path(__file__).resolve().parents[1] / "mmbytes" / "model"
COMPAT = Path(__file__).parent / "data" / "compat"
MODULES = [megabyte_config, transformer, spacebyte, blt_config, bpe]


@pytest.mark.parametrize("name", ["transformer-debug", "transformer-small", "blt-entropy-debug"])
def test_a_flat_transformer_config_round_trips_through_its_stored_dict(name):
    config = registry.config_from_name(name)
    assert type(config) is TransformerConfig
    stored = registry.config_to_dict(config)
    assert stored["arch"] == "transformer" and "d_model" in stored
    assert registry.config_from_dict(stored) == config


def test_a_flat_transformer_stored_with_megabyte_fields_loads_into_its_own_config_and_scores_the_same():
    stored = torch.load(COMPAT / "transformer-debug.pt", weights_only=True)
    assert stored["config"]["arch"] == "transformer" and stored["config"]["d_global"] == 64  # MEGABYTE's fields
    config = registry.config_from_dict(stored["config"])
    assert config == TransformerConfig(d_model=64, n_layer=2, n_head=2, modality_start=True)
    model = ByteTransformer(config)
    model.load_state_dict(stored["state"])  # the tensors under their MEGABYTE names
    with torch.no_grad():
        assert torch.equal(model.eval().nll(stored["x"].long()), stored["nll"])


def test_a_blt_config_holding_a_stored_entropy_config_with_megabyte_fields_migrates_it():
    entropy = torch.load(COMPAT / "blt-entropy-debug.pt", weights_only=True)["config"]
    stored = registry.config_to_dict(registry.config_from_name("blt-debug"))
    stored["entropy"] = entropy
    config = registry.config_from_dict(stored)
    assert config.entropy_config == transformer.SIZES["blt-entropy-debug"]
    assert registry.config_from_name("blt-debug", entropy=entropy).entropy_config == config.entropy_config


def test_megabyte_refuses_the_flat_transformer_arch():
    with pytest.raises(ValueError, match="TransformerConfig"):
        MegabyteConfig(arch="transformer", patch_size=1, n_layer_local=0)


def test_no_model_module_imports_the_registry():
    importers = []
    for path in sorted(MODEL.glob("*.py")):
        if path.name in ("registry.py", "__init__.py"):  # the registry itself; the package exports it
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            if any(n == "mmbytes.model.registry" or n.startswith("mmbytes.model.registry.") for n in names):
                importers.append(path.name)
    assert importers == []


def test_megabyte_small_in_the_paper_preset_has_the_papers_form_and_its_shape():
    config = registry.config_from_name("megabyte-small", preset="paper")
    assert (config.embed_std, config.init, config.local_shift, config.token_shift, config.patch_embed,
            config.modality_start) == (0.02, "gpt2", "patch", False, "concat", False)
    named = registry.config_from_name("small")
    assert named.token_shift and named.local_shift == "sequence"  # the named size itself is not in the paper's form
    shape = {f.name for f in fields(MegabyteConfig)} - set(megabyte_config.PRESETS["paper"])
    assert {k: getattr(config, k) for k in shape} == {k: getattr(named, k) for k in shape}
    assert config == MegabyteConfig(**megabyte_config.SHAPES["small"][1])  # the dataclass defaults: the paper's form


def test_overrides_apply_after_the_preset_and_unknown_presets_are_refused_by_name():
    assert registry.config_from_name("small", preset="paper", token_shift=True).token_shift is True
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        registry.config_from_name("small", preset="fast")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_each_named_size_is_its_shape_in_its_preset(module):
    assert "paper" in module.PRESETS and set(module.SIZES) == set(module.SHAPES)
    for name, (preset, shape) in module.SHAPES.items():
        config = registry.config_from_name(name)
        assert {k: getattr(config, k) for k in shape} == shape
        assert {k: getattr(config, k) for k in module.PRESETS[preset]} == module.PRESETS[preset]
        assert config == registry.config_from_name(name, preset=preset)


def test_the_cli_builds_a_named_size_in_the_preset_it_is_given(tmp_path, monkeypatch):
    from mmbytes.cli import run_cli

    monkeypatch.chdir(tmp_path)  # nothing may be written into the project
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    cli = run_cli(["--config", str(recipe), "--model.preset", "paper"], run=False)
    overrides = cli.model.hparams["overrides"]
    assert cli.model.model.config == registry.config_from_name(cli.model.hparams["size"], "paper", **overrides)
    assert cli.model.model.config.token_shift is False and cli.model.model.config.patch_embed == "concat"
    with pytest.raises(ValueError, match="unknown preset 'fast' for 'debug'; known: paper, shifted, shifted-swiglu"):
        run_cli(["--config", str(recipe), "--model.preset", "fast"], run=False)


def test_a_study_refuses_a_preset_that_one_of_its_models_lacks_before_training(tmp_path):
    from mmbytes.study import main

    with pytest.raises(SystemExit, match=r"--preset shifted: no such preset for \['transformer-debug'\]"):
        main(["--data", str(tmp_path), "--budget", "1e9", "--models", "debug,transformer-debug",
              "--out", str(tmp_path / "study"), "--preset", "shifted"])
    assert not (tmp_path / "study").exists()


def test_a_blt_config_whose_entropy_model_is_not_a_flat_transformer_is_refused_by_name():
    with pytest.raises(ValueError, match="'debug' is not a flat byte Transformer size"):
        registry.config_from_name("blt-debug", entropy="debug")
    stored = registry.config_to_dict(registry.config_from_name("debug"))
    with pytest.raises(ValueError, match="this one has arch 'megabyte'"):
        registry.config_from_name("blt-debug", entropy=stored)
    assert registry.config_from_name("blt-fixed-debug", entropy="debug").patching == "fixed"  # no entropy model built
