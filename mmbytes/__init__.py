"""mmbytes: generative modeling on raw file bytes with byte-level architectures (MEGABYTE, SpaceByte, ...)."""

from mmbytes.model import SIZES, Megabyte, MegabyteConfig, SpaceByte, SpaceByteConfig, build, config_from_name

__all__ = ["SIZES", "Megabyte", "MegabyteConfig", "SpaceByte", "SpaceByteConfig", "build", "config_from_name"]
__version__ = "0.1.0"
