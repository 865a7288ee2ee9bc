"""Helpers of tests/test_bad_input.py that worker processes import (kept free of heavy imports)."""

import os
import signal
from pathlib import Path

from mmbytes.codecs.raw import RawCodec


class KillingCodec(RawCodec):
    """The raw codec, except that its process is killed (as by the kernel's OOM killer) on one file."""

    def encode(self, path):
        if Path(path).name == "kill_me.py":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode(path)
