"""Every architecture's named sizes in one namespace, and the one way to build a model from a name or a stored config.

Each architecture lives in its own module of ``mmbytes/model/``: a config dataclass with an ``arch`` field and
documented fields, ``PRESETS`` (named forms: field -> value, ``paper`` among them), ``SIZES`` (named configs, each a
shape in a preset), and a plain-torch model that implements ``mmbytes.model.protocol.ByteModel``: ``forward``/``nll``
(with ``modality=``), ``flops_per_byte`` (planning) and ``train_flops`` (as run), ``patch_starts``, ``prepare(data)``,
``requires``/``caveats``, and cached generation (``new_cache``, ``prefill``, ``step``) or ``generate_bytes``, as its
declared ``capabilities`` say. Callers read the capabilities and never branch on the architecture, so a new
architecture is a new module with those pieces and one entry in ``ARCHITECTURES``. The registry imports the models;
no model imports the registry.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from mmbytes.model import blt, blt_config, bpe, megabyte, megabyte_config, spacebyte, transformer
from mmbytes.model.common import named_config, rename_stored

ARCHITECTURES: dict[str, tuple[type, type[nn.Module], Any]] = {
    # arch -> (config class, model class, module holding PRESETS and SIZES)
    "megabyte": (megabyte_config.MegabyteConfig, megabyte.Megabyte, megabyte_config),
    "transformer": (transformer.TransformerConfig, transformer.ByteTransformer, transformer),  # the flat baseline
    "spacebyte": (spacebyte.SpaceByteConfig, spacebyte.SpaceByte, spacebyte),
    "blt": (blt_config.BLTConfig, blt.BLT, blt_config),
    "bpe": (bpe.BPEConfig, bpe.BPETransformer, bpe),  # the subword baseline: tokenizes each byte window itself
}

SIZES: dict[str, Any] = {name: config for _, _, module in ARCHITECTURES.values()
                         for name, config in module.SIZES.items()}
"""Every named size of every architecture: ``debug``/``small``/``base`` are MEGABYTE, ``transformer-*`` the flat
byte Transformer (``blt-entropy-*``: BLT's entropy models, flat windowed byte Transformers), ``spacebyte-*``
SpaceByte, ``blt-*`` BLT, ``bpe-*`` the subword (BPE) token Transformer baseline; and each of ``ALIASES``."""

ALIASES: dict[str, str] = {f"megabyte-{size}": size for size in ("debug", "debug-long", "small", "base", "long")}
"""MEGABYTE's named sizes under the architecture's name, each the same config as the short name it stands for."""
SIZES.update({alias: SIZES[size] for alias, size in ALIASES.items()})


def presets(name: str) -> dict[str, dict]:
    """The presets of the architecture of the named size (none for an unknown name)."""
    return ARCHITECTURES[SIZES[name].arch][2].PRESETS if name in SIZES else {}


def config_from_name(name: str, preset: str | None = None, **overrides: Any):
    """The config of a named size, in the named form ``preset`` of its architecture if given (e.g. ``paper``), with
    fields replaced by ``overrides`` (applied after the preset); unknown sizes, presets and fields are refused by
    name."""
    for field in NESTED.get(SIZES[name].arch if name in SIZES else "", ()):
        if isinstance(overrides.get(field), dict):
            overrides[field] = _stored_config(overrides[field])
    return named_config(SIZES, presets(name), name, preset, overrides)


def config_to_dict(config) -> dict[str, Any]:
    return asdict(config)


MIGRATIONS: dict[str, dict[str, Any]] = {
    # arch -> {field: the value configs stored before the field existed were trained with}
    "megabyte": {"window": 0, "token_shift": False, "embed_std": 0.02, "patch_embed": "concat", "d_embed": 0,
                 "global_to_local": "slice", "tied_head": False, "local_shift": "patch", "init": "gpt2",
                 "modality_start": False},
    "transformer": {"window": 0, "token_shift": False, "embed_std": 0.02, "init": "gpt2", "tied_head": False,
                    "modality_start": False},
    "spacebyte": {"modality_start": False},
    "blt": {"hash_version": 1, "modality_start": False},
    "bpe": {"modality_start": False},
}
"""The paper's form, or the form the architecture first had, for every field added to a config after checkpoints
were stored with it."""

NESTED: dict[str, tuple[str, ...]] = {"blt": ("entropy",)}
"""Fields of a config that may hold another model's stored config (BLT's entropy model)."""

FLAT_FROM_MEGABYTE = {"d_global": "d_model", "n_layer_global": "n_layer", "n_head_global": "n_head"}
"""Fields of a flat byte Transformer stored as MEGABYTE with P = 1 (``arch: transformer`` with MEGABYTE's fields)
-> its own config's fields."""


def migrate(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config (``config_to_dict``, of this or any earlier version) as fields of its architecture's config
    today: fields it lacks take the value such models were trained with (``MIGRATIONS``), a flat byte Transformer
    stored with MEGABYTE's fields gets its own (``FLAT_FROM_MEGABYTE``), a nested stored config is migrated too, and
    fields this version does not know are dropped."""
    stored = {"arch": "megabyte", **stored}
    arch = stored["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if arch == "transformer" and "d_global" in stored:
        if stored.get("patch_embed", "concat") != "concat":
            raise ValueError(f"a flat byte Transformer stored with patch_embed={stored['patch_embed']!r} has no "
                             "equivalent: its bytes are embedded directly")
        stored = {FLAT_FROM_MEGABYTE.get(k, k): v for k, v in stored.items()}
    for field in NESTED.get(arch, ()):
        if isinstance(stored.get(field), dict):
            stored[field] = _stored_config(stored[field])
    known = {f.name for f in fields(ARCHITECTURES[arch][0])}
    return {**MIGRATIONS.get(arch, {}), **{k: v for k, v in stored.items() if k in known}}


def _stored_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A nested stored config, migrated and complete (every field of its config class), as a plain dict."""
    return config_to_dict(config_from_dict(stored))


def config_from_dict(stored: dict[str, Any]):
    """A config saved with ``config_to_dict`` (``migrate``d); its ``arch`` picks the class."""
    migrated = migrate(stored)
    return ARCHITECTURES[migrated["arch"]][0](**migrated)


def migrate_state(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A stored state dict under the tensor names ``model`` has today: the keys of every submodule whose class
    renamed its tensors (``STORED_NAMES``: old name prefix -> new) are renamed as its ``_load_from_state_dict``
    renames them on loading, so checks that compare names before loading see the same names."""
    out = dict(state)
    for name, module in model.named_modules():
        renames = getattr(type(module), "STORED_NAMES", None)
        if renames:
            rename_stored(out, f"{name}." if name else "", renames)
    return out


def build(config_or_name, **overrides: Any) -> nn.Module:
    """A freshly initialised model from a config or a named size (with overrides)."""
    config = config_from_name(config_or_name, **overrides) if isinstance(config_or_name, str) else config_or_name
    return ARCHITECTURES[config.arch][1](config)
