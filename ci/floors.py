"""Print a pip constraints file pinning every dependency in pyproject.toml to its lower bound (``name==floor``).

    python ci/floors.py > constraints.txt && pip install -c constraints.txt -e ".[test]"
"""

import re
import sys
from pathlib import Path

text = re.sub(r"#.*", "", (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())  # no comments
lists = re.findall(r"^(?:dependencies|test) = \[(.*?)\]$", text, flags=re.M | re.S)  # runtime and test extras
for name, spec in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?([^"]*)"', "\n".join(lists)):
    floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    if floor:
        print(f"{name}=={floor.group(1)}")
    else:
        print(f"# {name}: no lower bound", file=sys.stderr)
