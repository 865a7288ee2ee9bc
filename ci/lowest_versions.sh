#!/usr/bin/env bash
# Install the lowest versions pyproject.toml allows (torch CPU build) into a fresh virtual environment and run the
# default test suite there. Usage: bash ci/lowest_versions.sh [venv folder, default .venv-ci] [pytest args...]
# TORCH_INDEX=URL takes torch and torchaudio from another index; TORCH_INDEX= (empty) from the configured one.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-ci}
shift || true
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" ci/floors.py > "$venv/constraints.txt"
torch=$(grep '^torch==' "$venv/constraints.txt" | cut -d= -f3)
torchaudio=$(grep '^torchaudio==' "$venv/constraints.txt" | cut -d= -f3)
# CPU wheels of the floor torch and torchaudio from PyTorch's own index (TORCH_INDEX= empty: the configured package
# index, whose Linux torch wheels are CUDA builds), then everything else at its floor
index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
"$venv/bin/python" -m pip install -q ${index:+--index-url "$index"} "torch==$torch" "torchaudio==$torchaudio"
"$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -e ".[test]"
"$venv/bin/python" -m pip freeze | grep -iE '^(torch|torchaudio|lightning|jsonargparse|torchmetrics|webdataset|numpy)=='
"$venv/bin/python" -m pytest -q "$@"
