"""Errors a user can act on. Each message names the file and says what to do; ``mmbytes`` prints it as one line
(``--debug`` or ``MMBYTES_DEBUG=1`` shows the traceback)."""

from __future__ import annotations


class MmbytesError(Exception):
    """Base of the project's own errors."""


class ShardsError(MmbytesError):
    """``mmbytes shards`` refused its output folder, ran out of space, or wrote no sample."""


class ManifestError(MmbytesError, ValueError):
    """A ``manifest.json`` that is missing, not JSON, or not one ``mmbytes shards`` wrote."""


class NoDataError(MmbytesError, RuntimeError):
    """No shard of a split yields a single readable sample."""


class CheckpointError(MmbytesError, ValueError):
    """A file that is not a checkpoint ``mmbytes`` can load."""


class OptionError(MmbytesError, ValueError):
    """An option out of its range, or options that do not fit together."""
