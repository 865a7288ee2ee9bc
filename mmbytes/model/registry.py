"""Every architecture's named sizes in one namespace, and the one way to build a model from a name or a stored config.

Each architecture lives in its own module of ``mmbytes/model/``: a config dataclass with an ``arch`` field and
documented fields, a ``SIZES`` dict of named configs, and a plain-torch model that implements
``mmbytes.model.protocol.ByteModel``: ``forward``/``nll`` (with ``modality=``), ``flops_per_byte`` (planning) and
``train_flops`` (as run), ``patch_starts``, ``prepare(data)``, ``requires``/``caveats``, and cached generation
(``new_cache``, ``prefill``, ``step``) or ``generate_bytes``, as its declared ``capabilities`` say. Callers read the
capabilities and never branch on the architecture, so a new architecture is a new module with those pieces and one
entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from typing import Any

from torch import nn

from mmbytes.model import blt, blt_config, bpe, megabyte, megabyte_config, spacebyte

ARCHITECTURES: dict[str, tuple[type, type[nn.Module], Any]] = {
    # arch -> (config class, model class, module holding SIZES and LEGACY)
    "megabyte": (megabyte_config.MegabyteConfig, megabyte.Megabyte, megabyte_config),
    # the flat baseline: MEGABYTE with P = 1
    "transformer": (megabyte_config.MegabyteConfig, megabyte.Megabyte, megabyte_config),
    "spacebyte": (spacebyte.SpaceByteConfig, spacebyte.SpaceByte, spacebyte),
    "blt": (blt_config.BLTConfig, blt.BLT, blt_config),
    "bpe": (bpe.BPEConfig, bpe.BPETransformer, bpe),  # the subword baseline: tokenizes each byte window itself
}

SIZES: dict[str, Any] = {name: config for _, _, module in {id(a[2]): a for a in ARCHITECTURES.values()}.values()
                         for name, config in module.SIZES.items()}
"""Every named size of every architecture: ``debug``/``small``/``base`` are MEGABYTE, ``transformer-*`` the flat
byte Transformer, ``spacebyte-*`` SpaceByte, ``blt-*`` BLT (``blt-entropy-*``: its entropy models, flat windowed
byte Transformers), ``bpe-*`` the subword (BPE) token Transformer baseline; and each of ``ALIASES``."""

ALIASES: dict[str, str] = {f"megabyte-{size}": size for size in ("debug", "small", "base", "long")}
"""MEGABYTE's named sizes under the architecture's name, each the same config as the short name it stands for."""
SIZES.update({alias: SIZES[size] for alias, size in ALIASES.items()})


def config_from_name(name: str, **overrides: Any):
    """The config of a named size, with fields replaced by ``overrides`` (unknown fields are refused by name)."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    base = SIZES[name]
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown} for {name!r}; known: {sorted(known)}")
    return replace(base, **overrides)


def config_to_dict(config) -> dict[str, Any]:
    return asdict(config)


def config_from_dict(stored: dict[str, Any]):
    """A config saved with ``config_to_dict``; its ``arch`` picks the class. Fields it lacks (saved before they
    existed) take the values such models were trained with; fields this version does not know are dropped."""
    arch = stored.get("arch", "megabyte")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    cls, _, module = ARCHITECTURES[arch]
    known = {f.name for f in fields(cls)}
    return cls(**{**getattr(module, "LEGACY", {}), **{k: v for k, v in stored.items() if k in known}})


def build(config_or_name, **overrides: Any) -> nn.Module:
    """A freshly initialised model from a config or a named size (with overrides)."""
    config = config_from_name(config_or_name, **overrides) if isinstance(config_or_name, str) else config_or_name
    return ARCHITECTURES[config.arch][1](config)
