"""Plain-torch models: no Lightning, no data layer."""

from mmbytes.model.megabyte import Megabyte

__all__ = ["Megabyte"]
