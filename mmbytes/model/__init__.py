"""Plain-torch models: no Lightning, no data layer. ``registry`` names every size of every architecture."""

from mmbytes.model.megabyte import Megabyte
from mmbytes.model.megabyte_config import MegabyteConfig
from mmbytes.model.registry import SIZES, build, config_from_name
from mmbytes.model.spacebyte import SpaceByte, SpaceByteConfig
from mmbytes.model.transformer import ByteTransformer, TransformerConfig

__all__ = ["SIZES", "ByteTransformer", "Megabyte", "MegabyteConfig", "SpaceByte", "SpaceByteConfig",
           "TransformerConfig", "build", "config_from_name"]
