"""Plain-torch models: no Lightning, no data layer. ``registry`` names every size of every architecture."""

from mmbytes.model.megabyte import Megabyte
from mmbytes.model.megabyte_config import MegabyteConfig
from mmbytes.model.registry import SIZES, build, config_from_name
from mmbytes.model.spacebyte import SpaceByte, SpaceByteConfig

__all__ = ["SIZES", "Megabyte", "MegabyteConfig", "SpaceByte", "SpaceByteConfig", "build", "config_from_name"]
