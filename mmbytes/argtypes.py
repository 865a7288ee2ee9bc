"""Argument types for the ``mmbytes`` subcommands: a bad value stops the parser with ``argument --x: ...`` (exit 2)
before any file is read or any model is loaded."""

from __future__ import annotations

import argparse
import math
import os
import stat
from pathlib import Path


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def count(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and less than 1, not {value}")
    return value


def probability(text: str) -> float:
    """A probability mass in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, not {value}")
    return value


def regular_file(text: str) -> Path:
    """An existing regular file: a FIFO, a device or a folder is refused before anything opens it (a FIFO would
    block forever)."""
    path = Path(text)
    try:
        st = os.stat(path)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise argparse.ArgumentTypeError(f"{text}: is {kind}; give a regular file")
    return path


def at_most(kind, least: int | float, most: int | float, what: str = ""):
    """A number of ``kind`` in [least, most]: ``type=at_most(int, 1, 2**24)``."""

    def check(text: str):
        value = _number(kind, text)
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be from {least:,} to {most:,}{what}, not {value:,}")
        return value

    check.__name__ = f"{kind.__name__} from {least} to {most}"  # argparse names the type in its messages
    return check


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed
seed = at_most(int, 0, SEED_MAX, " (a 64-bit seed)")


def model_rate(text: str) -> str:
    """``MODEL=LR`` with a finite positive learning rate (the model name is checked against the registry later)."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=LR (e.g. small=3e-4)")
    positive_float(value)
    return text


MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_NODES = 100_000


def yaml_config(path: str | Path) -> None:
    """Refuse a ``--config`` file that is not a regular file, is over 1 MiB, is not YAML, or whose aliases expand to
    more than ``MAX_CONFIG_NODES`` values (a "billion laughs" alias bomb: a few lines that the config parser would
    copy out into gigabytes). The expanded size is counted on the composed node graph, where each alias is one
    shared node, so the check itself takes no more memory than the file."""
    import yaml

    from mmbytes.errors import OptionError

    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise OptionError(f"{path}: cannot read the config ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(f"{path}: the config is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise OptionError(f"{path}: a config of {st.st_size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit")
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptionError(f"{path}: not a YAML config ({first})") from None
    sizes: dict[int, int] = {}

    def expanded(node) -> int:  # children before parents, without recursion (any depth)
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if id(n) in sizes:
                continue
            kids = ([v for pair in n.value for v in pair] if isinstance(n, yaml.MappingNode) else
                    n.value if isinstance(n, yaml.SequenceNode) else [])
            if done:
                sizes[id(n)] = min(1 + sum(sizes[id(k)] for k in kids), MAX_CONFIG_NODES + 1)
            else:
                stack.append((n, True))
                stack.extend((k, False) for k in kids if id(k) not in sizes)
        return sizes[id(node)]

    if root is not None and expanded(root) > MAX_CONFIG_NODES:
        raise OptionError(f"{path}: its YAML aliases expand to more than {MAX_CONFIG_NODES:,} values (an alias "
                          "bomb?); write the config out without them")
