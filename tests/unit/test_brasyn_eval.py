"""``scripts/brasyn_eval.py`` refuses bad input in one line (its end-to-end run: tests/system/test_quickstart.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/brasyn_eval.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_fewer_than_two_samples_stop_in_one_line() -> None:
    result = _run("--num_samples", "0")
    expected = "prod9 stopped: ValueError: num_samples must be at least 2 (a spread needs two samples), got 0"
    assert result.returncode != 0 and result.stderr.strip() == expected


def test_a_missing_quickstart_output_stops_in_one_line(tmp_path: Path) -> None:
    result = _run("--quickstart_dir", str(tmp_path), "--output_dir", str(tmp_path / "brasyn"))
    expected = f"{tmp_path}/transformer/models/model.pt: not found; run bash scripts/quickstart.sh first"
    assert result.returncode != 0 and result.stderr.strip().startswith(f"prod9 stopped: FileNotFoundError: {expected}")
    assert "Traceback" not in result.stderr and not (tmp_path / "brasyn").exists()  # nothing written
