"""mmbytes: generative modeling on raw file bytes with MEGABYTE-style multiscale transformers."""

from mmbytes.config import MegabyteConfig
from mmbytes.model import Megabyte

__all__ = ["Megabyte", "MegabyteConfig"]
__version__ = "0.1.0"
