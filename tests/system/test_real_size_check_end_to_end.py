"""scripts/real_size_check.py end to end in its --tiny setting: every workflow passes and has its table row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = {
    "stage1-train": "step",
    "stage1-evaluate": "case",
    "stage1-inference": "case*",
    "stage1-multi_gpu_train": "step",
    "stage2-tokenize": "case*",
    "stage2-train": "step",
    "stage2-train_decoder": "step",
    "stage2-evaluate-sample": "case",
    "stage2-evaluate-mean": "case",
    "stage2-inference-sample": "case*",
    "stage2-inference-mean": "case*",
    "stage2-multi_gpu_train": "step",
}
GRID_CHECKED = {"stage1-inference", "stage2-inference-sample", "stage2-inference-mean"}
TRAINING = {"stage1-train", "stage1-multi_gpu_train", "stage2-train", "stage2-multi_gpu_train"}


@pytest.mark.slow
def test_tiny_dry_run_passes_with_a_row_per_workflow(tmp_path: Path) -> None:
    command = [sys.executable, "scripts/real_size_check.py", "--output_dir", str(tmp_path), "--tiny", "true"]
    command += ["--num_cases", "3", "--naming", "2023", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert result.stdout.count("-m monai.bundle run") == len(WORKFLOWS)  # every command printed (2 via torchrun)

    report = (tmp_path / "real_size_check.md").read_text()
    assert report in result.stdout
    rows = {
        cells[0]: cells
        for line in report.splitlines()
        if line.startswith("| stage")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert set(rows) == set(WORKFLOWS)
    for name, unit in WORKFLOWS.items():
        _, status, wall, per_unit, rss, activation, cuda_peak, grid = rows[name]
        assert status == "ok", name
        assert float(wall) > 0 and float(rss) > 0, name
        assert per_unit.split(" / ")[1].split(" ")[0].rstrip(";") == unit, (name, per_unit)
        assert float(per_unit.split(" / ")[0]) > 0, name
        assert (float(activation) > 0) if name in TRAINING else activation == "–", name
        assert cuda_peak == "–"  # CPU
        assert grid == ("yes" if name in GRID_CHECKED else "–"), name
    assert "validation" in rows["stage1-train"][3] and "validation" in rows["stage2-train"][3]
    assert "(2 steps)" in rows["stage1-train"][3]  # one training case, batch 2: two epochs of one step
    assert "- stage 1 (sliding-window reconstruction of the 4 contrasts): " in report
    assert report.count(" h (") == 2  # both extrapolations have a figure
