#!/usr/bin/env bash
# The README's main-job command: install prod9 at the pinned versions, then phantoms (or your BraTS folder:
# --dataset_dir DIR or BRATS_DATA_DIR) -> stage 1 -> stage 2 -> synthesised volumes and outputs/quickstart/report.md.
# Rerun it after an interruption: finished steps are skipped, an interrupted training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
python -m pip install --quiet -c constraints.txt -e .
python scripts/quickstart.py "$@"
