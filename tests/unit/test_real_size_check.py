"""The dry run's helpers: activation memory from saved tensors, log timings, the grid check; its time budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import real_size_check as rsc


@pytest.mark.parametrize("fake", [False, True])
def test_saved_tensor_bytes_of_linear_relu_is_the_hand_count(fake: bool) -> None:
    batch, n_in, n_out = 16, 32, 8
    layer = nn.Linear(n_in, n_out)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.autograd.set_grad_enabled(True):
        x = torch.randn(batch, n_in)
        counted = rsc.saved_tensor_bytes(lambda: torch.relu(layer(x)), exclude=list(layer.parameters()))
    # Linear saves its input (its weight is a parameter, excluded); ReLU saves its output.
    assert counted == 4 * batch * (n_in + n_out)


def test_saved_tensor_bytes_counts_shared_storage_once_and_parameters_when_asked() -> None:
    layer = nn.Linear(4, 4, bias=False)
    x = torch.randn(3, 4, requires_grad=True)
    # x and the weight are saved by both matmuls, their outputs by the multiplication: each storage once
    counted = rsc.saved_tensor_bytes(lambda: (layer(x) * layer(x).view(3, 4)).sum())
    assert counted == 4 * 3 * 4 * 3 + 4 * 4 * 4  # x, both outputs, and the weight (not excluded)


def test_flash_attention_as_on_cuda_saves_no_attention_matrix() -> None:
    q = torch.randn(1, 2, 64, 8, requires_grad=True)

    def attention() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    with rsc.flash_attention_as_on_cuda():
        flash = rsc.saved_tensor_bytes(attention)
    assert flash < 2 * 64 * 64 * 4  # q, k, v, out, log-sum-exp: O(N); the math path saves [2, 64, 64] twice
    assert rsc.saved_tensor_bytes(attention) > flash


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_training_activation_bytes_of_the_tiny_bundles(tmp_path: Path, stage: str) -> None:
    ae, tr = tmp_path / "ae.json", tmp_path / "tr.json"
    ae.write_text(json.dumps(rsc.TINY_AUTOENCODER))
    tr.write_text(json.dumps(rsc.TINY_TRANSFORMER))
    fp32 = rsc.training_activation_bytes(stage, ["train.json", ae], ["train.json", tr], "cpu", amp=False)
    bf16 = rsc.training_activation_bytes(stage, ["train.json", ae], ["train.json", tr], "cpu", amp=True)
    assert 0 < bf16 < fp32
    if stage == "stage1":  # at least the input crops: batch 2 x 4 contrasts of 32^3 float32
        assert fp32 > 2 * 4 * 32**3 * 4


def test_step_and_evaluator_seconds_from_a_bundle_log() -> None:
    log = "\n".join(
        [
            "2026-01-01 10:00:00,000 - INFO - > max_epochs: 1",
            "2026-01-01 10:00:01,000 - ignite.engine.engine.Bf16Trainer - INFO - Engine run resuming from iteration 0",
            "2026-01-01 10:00:05,000 - INFO - Epoch: 1/1, Iter: 1/3 -- train_loss: 1.0",
            "2026-01-01 10:00:07,000 - INFO - Epoch: 1/1, Iter: 2/3 -- train_loss: 1.0",
            "2026-01-01 10:00:09,000 - INFO - Epoch: 1/1, Iter: 3/3 -- train_loss: 1.0",
            "2026-01-01 10:00:21,500 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[1] Complete. "
            "Time taken: 00:01:02.500",
        ]
    )
    assert rsc.step_seconds(log) == (2.0, 3)
    assert rsc.evaluator_seconds(log) == 62.5
    assert rsc.log_span_seconds(log) == 21.5
    one = "\n".join(log.splitlines()[:3])
    assert rsc.step_seconds(one) == (4.0, 1)
    assert math.isnan(rsc.evaluator_seconds(one))


def test_grid_check(tmp_path: Path) -> None:
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), tmp_path / "in.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), tmp_path / "same.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), tmp_path / "moved.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 5), np.float32), affine), tmp_path / "cut.nii.gz")
    reference = tmp_path / "in.nii.gz"
    assert rsc.grid_check(tmp_path / "same.nii.gz", reference) == "yes"
    assert rsc.grid_check(tmp_path / "moved.nii.gz", reference) == "affine differs"
    assert rsc.grid_check(tmp_path / "cut.nii.gz", reference).startswith("shape")
    assert rsc.grid_check(tmp_path / "missing.nii.gz", reference) == "no missing.nii.gz"


def test_report_of_a_subset_of_the_workflows() -> None:
    """``--workflows``: the report has the rows that ran, no section for a stage that did not, and no estimate
    without a per-case time."""
    workflow = rsc.Workflow("stage1-train", ["python"], Path("."), activation="stage1")
    result = rsc.Result("stage1-train", "ok", wall_s=10.0, per_unit_s=4.0, unit="step", steps=2)
    text = rsc.report({"stage1-train": result}, [workflow], {"stage1-train": 2**30}, "t", "fp32", measured=False)
    assert "| stage1-train | ok | 10.0 | 4.0 / step (2 steps) |" in text
    assert "Stage 2" not in text
    assert "- stage 1 (sliding-window reconstruction of the 4 contrasts): –" in text


def test_budget_stops_starting_workflows_and_the_table_still_prints(tmp_path: Path) -> None:
    """``--budget_s``: a workflow that finds the budget spent is a row "not run", the report is written, the exit is
    non-zero; the ``-mean`` decoding and the multi-GPU runs come after the others."""
    command = [sys.executable, str(Path(rsc.__file__)), "--output_dir", str(tmp_path), "--tiny", "true"]
    command += ["--num_cases", "3", "--device", "cpu", "--budget_s", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    report = (tmp_path / "real_size_check.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| stage")]
    assert "| stage1-train | not run (budget_s spent) |" in report
    assert rows.index("stage1-multi_gpu_train") == 3 and rows[-1] == "stage2-multi_gpu_train"
    assert rows.index("stage2-evaluate-mean") > rows.index("stage2-inference-sample")
    assert "did not pass" in result.stderr
