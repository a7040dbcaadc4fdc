"""``scripts/brasyn_eval.py`` refuses bad input in one line (its end-to-end run: tests/system/test_quickstart.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/brasyn_eval.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_samples", "1"], "ValueError: num_samples must be at least 2 (a spread needs two samples), got 1"),
        (["--num_samples", "0"], "ValueError: num_samples must be at least 2 (a spread needs two samples), got 0"),
    ],
)
def test_too_few_samples_stop_in_one_line(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode != 0 and result.stderr.strip() == f"prod9 stopped: {message}"


def test_a_missing_quickstart_output_stops_in_one_line(tmp_path: Path) -> None:
    result = _run("--quickstart_dir", str(tmp_path), "--output_dir", str(tmp_path / "brasyn"))
    expected = f"{tmp_path}/transformer/models/model.pt: not found; run bash scripts/quickstart.sh first"
    assert result.returncode != 0 and result.stderr.strip().startswith(f"prod9 stopped: FileNotFoundError: {expected}")
    assert "Traceback" not in result.stderr and not (tmp_path / "brasyn").exists()  # nothing written
