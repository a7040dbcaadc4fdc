#!/usr/bin/env bash
# The README's test command: install prod9 with its dev tools at the pinned versions, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
python -m pip install --quiet -c constraints.txt -e ".[dev]"
ruff check .
ruff format --check .
pyright prod9_ext
python -m pytest "$@"
