"""The README's main job end to end in its smallest setting: phantoms -> stage 1 -> stage 2 -> volumes and report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = {"t2_from_t1": "t2", "flair_from_t1_t1ce_t2": "flair"}
ROWS = ("mean", "sample", "mean_of_4_samples", "mean_stage1_decoder", "token_swap")


@pytest.mark.slow
def test_quickstart_smoke_end_to_end_and_rerun(tmp_path: Path) -> None:
    command = [sys.executable, "scripts/quickstart.py", "--output_dir", str(tmp_path), "--smoke", "true"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    report = (tmp_path / "report.md").read_text()
    assert "python -m monai.bundle run" in report and "| **total** |" in report
    assert "the test split" in report
    assert "| T1 → T2 | regression peer: MONAI BasicUNet" in report
    for title in ("expected code, source-aware decoder", "one MaskGiT sample", "mean of 4 MaskGiT samples",
                  "stage 1's decoder", "another case", "copy the source"):  # fmt: skip
        assert title in report, title
    peer = json.loads((tmp_path / "peer" / "metrics.json").read_text())
    assert sorted(peer) == sorted(TASKS) and all(0 < peer[task]["ssim"] <= 1 for task in TASKS)
    assert "| report: score the block-PCA codes on the held-out cases |" in report  # its time counts too
    stage1 = json.loads((tmp_path / "autoencoder" / "evaluate" / "metrics.json").read_text())["mean"]
    assert all(math.isfinite(stage1[k]) for k in ("val_psnr", "val_ssim", "val_codebook_usage"))
    references = [line.split("|") for line in report.splitlines() if line.startswith("| block PCA")]
    assert len(references) == 3  # rounded to the FSQ levels, unrounded, one more component unrounded
    assert all(math.isfinite(float(cells[2])) and 0 < float(cells[3]) <= 1 for cells in references)
    held_out = json.loads((tmp_path / "data" / "dataset.json").read_text())["test"]  # the report scores the test cases
    names = sorted(case["case"] for case in held_out)
    for task, target in TASKS.items():
        metrics = json.loads((tmp_path / "transformer" / f"evaluate_{task}" / "metrics.json").read_text())
        for key in ("val_psnr", "val_ssim", "val_ssim_tumour", "baseline_psnr", "baseline_ssim"):
            assert math.isfinite(metrics["mean"][key]), (task, key)
        assert sorted(metrics["per_item"]) == names
        for case in names:
            assert (tmp_path / "transformer" / f"evaluate_{task}" / "cases" / f"{case}.png").is_file()
            assert f"evaluate_{task}/cases/{case}.png" in report
            real = nib.load(tmp_path / "data" / case / f"{case}_{target}.nii.gz")
            for row in ROWS:
                synthesised = nib.load(tmp_path / "synthesis" / task / row / f"{case}_{target}_synth.nii.gz")
                assert synthesised.shape == real.shape
                np.testing.assert_allclose(synthesised.affine, real.affine, atol=1e-5)
            assert (tmp_path / "synthesis" / task / "mean_of_4_samples" / f"{case}_{target}_synth_std.nii.gz").is_file()
        scores = json.loads((tmp_path / "scores" / task / "mean.json").read_text())
        assert sorted(scores["cases"]) == names and math.isfinite(scores["mean"]["hfen"])

    # a rerun skips every finished step (the phantoms exist, so they are not even listed) and rewrites the report
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    # stage 1 ×2, stage 2, decoder, peer; per task: evaluation, one synthesis per row, one score per row, peer, copy
    assert second.stdout.count("done before, skipped") == 5 + len(TASKS) * (1 + 2 * len(ROWS) + 2)
    assert "monai.bundle run" not in second.stdout

    # the BraSyn evaluation on these models: every task, Dice three ways, calibration; a rerun skips its steps
    brasyn = [sys.executable, "scripts/brasyn_eval.py", "--quickstart_dir", str(tmp_path)]
    brasyn += ["--output_dir", str(tmp_path / "brasyn"), "--num_samples", "2", "--smoke", "true"]
    third = subprocess.run(brasyn, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    figures = json.loads((tmp_path / "brasyn" / "brasyn.json").read_text())
    tasks = figures["tasks"]
    assert len(tasks) == 5 and sorted(target for target, _ in tasks.values()) == ["flair", "t1", "t1ce", "t2", "t2"]
    for task, (target, _) in tasks.items():
        rows = figures["synthesis"][task]
        assert set(rows) == {"prod9_expected_code", "prod9_one_sample", "prod9_mean_of_k", "peer", "copy_the_source"}
        assert all(-1 <= rows[row]["mean"]["ssim"] <= 1 for row in rows)
        assert set(figures["dice"][task]) == {"prod9_expected_code", "prod9_one_sample", "prod9_mean_of_k", "peer"}
        assert 0 < figures["uncertainty"][task]["mean"]["diversity_ssim"] <= 1
        for case in names:
            std = nib.load(tmp_path / "brasyn" / "prod9" / task / "samples" / f"{case}_{target}_synth_std.nii.gz")
            assert std.shape == nib.load(tmp_path / "data" / case / f"{case}_{target}.nii.gz").shape
    assert all(0 <= figures["dice"]["real"][region] <= 1 for region in ("TC", "WT", "ET"))
    assert set(figures["dice"]["zeroed"]) == {"t1", "t1ce", "t2", "flair"}
    report = (tmp_path / "brasyn" / "report.md").read_text()
    assert "## Segmentation Dice" in report and "## Goals" in report and "pictures/t2_from_t1.png" in report
    fourth = subprocess.run(brasyn, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0 and fourth.stdout.count("done before, skipped") == 2 * len(tasks) + 2
