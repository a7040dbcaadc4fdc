"""The regression peer trains within its budget, learns, writes its metrics, and predicts whole cases on their grid."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import regression_peer
import score_synthesis
from regression_peer import (
    BRASYN_TASKS,
    MODALITIES,
    TASKS,
    TaskConditioned,
    build_network,
    load_scoring_cases,
    predict,
    predict_whole,
    score_network,
    train_network,
)

from prod9_ext.data import make_phantom_dataset
from prod9_ext.engines import SeparableSSIMLoss

# 6 mm phantoms (about 30x37x30 voxels) in a 32³ ROI, and a small U-Net: a few seconds of training learns a lot.
PIXDIM = [6.0, 6.0, 6.0]
ROI = [32, 32, 32]
FEATURES = [8, 8, 16, 16, 32, 8]
SECONDS = 8.0
# This case's files are stored LPS (as BraTS files are), the others RAS: the predictions must follow each file's grid.
LPS_CASE = "Phantom_00002"


class CopyFirstSource(torch.nn.Module):
    """A "network" whose prediction is its first source: where it lands shows where the peer puts a prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def _store_lps(case_dir: Path) -> None:
    """Rewrite every file of a case with its voxels in LPS order (same world positions, another affine)."""
    for file in case_dir.glob("*.nii.gz"):
        image = nib.load(file)  # type: ignore[attr-defined]
        to_lps = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
        )
        nib.save(image.as_reoriented(to_lps), file)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Three training phantoms; the peer trained on them for ``SECONDS`` and scored on them (the overfit case)."""
    data = tmp_path_factory.mktemp("peer_data")
    make_phantom_dataset(data, num_cases=3, seed=0, spacing=6.0, val_fraction=0.0, test_fraction=0.0)
    _store_lps(data / LPS_CASE)
    out = tmp_path_factory.mktemp("peer_out")
    # float32: with bf16 autocast on a CPU with AVX512-BF16 but no AMX (an AMD EPYC), this U-Net's 2³ bottleneck
    # convolutions returned non-finite values within a dozen iterations, in some runs and not others.
    regression_peer.main(
        str(data),
        str(out),
        seconds=SECONDS,
        split="training",
        pixdim=PIXDIM,
        roi_size=ROI,
        features=FEATURES,
        amp=False,
    )
    return data, out, json.loads((out / "metrics.json").read_text())


def test_metrics_json_has_every_task_with_sane_values(peer_run: tuple[Path, Path, dict]) -> None:
    _, _, metrics = peer_run
    assert set(metrics) == set(TASKS)
    for scores in metrics.values():
        assert set(scores) == {
            "psnr",
            "ssim",
            "ssim_tumour",
            "ssim_rest",
            "cases",
            "iterations",
            "train_seconds",
            "loss_first",
            "loss_last",
            "design",
        }
        assert scores["cases"] == 3 and scores["iterations"] >= 1
        assert math.isfinite(scores["psnr"]) and scores["psnr"] > 0
        for key in ("ssim", "ssim_tumour", "ssim_rest"):
            assert -1.0 <= scores[key] <= 1.0
        # The loop runs until the task's share is spent and stops at the next iteration (tiny ones here).
        assert SECONDS / len(TASKS) <= scores["train_seconds"] < SECONDS / len(TASKS) + 30


def test_predictions_are_written_on_each_case_files_grid(peer_run: tuple[Path, Path, dict]) -> None:
    data, out, _ = peer_run
    assert nib.aff2axcodes(nib.load(next((data / LPS_CASE).glob("*_t1.nii.gz"))).affine) == ("L", "P", "S")
    for task, (target, _) in TASKS.items():
        files = sorted((out / task).iterdir())
        assert [f.name for f in files] == [f"Phantom_0000{i}_{target}_synth.nii.gz" for i in range(3)]
        for i, file in enumerate(files):
            image = nib.load(file)  # type: ignore[attr-defined]
            real = nib.load(data / f"Phantom_0000{i}" / f"Phantom_0000{i}_{target}.nii.gz")  # type: ignore[attr-defined]
            assert image.shape == real.shape
            np.testing.assert_allclose(image.affine, real.affine, atol=1e-4)
            voxels = image.get_fdata()
            assert voxels.min() >= 0.0 and voxels.max() <= 1.0  # clipped, as scored


def test_score_synthesis_scores_the_peer_as_it_scores_prod9(peer_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    data, out, _ = peer_run
    for task, (target, sources) in TASKS.items():
        output = tmp_path / f"{task}.json"
        score_synthesis.main(str(data), str(output), target, "training", str(out / task), sources)
        scores = json.loads(output.read_text())
        assert list(scores["cases"]) == [f"Phantom_0000{i}" for i in range(3)]
        assert math.isfinite(scores["mean"]["psnr"]) and scores["mean"]["hfen"] > 0.0
        for key in ("ssim", "ssim_tumour", "ssim_non_tumour"):
            assert -1.0 <= scores["mean"][key] <= 1.0


def test_a_prediction_lands_on_the_voxels_of_its_case(peer_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """The preprocessing is undone: a copy of the preprocessed T1 written back matches the T1 file voxel by voxel."""
    data, _, _ = peer_run
    preprocessing, cases = load_scoring_cases(data, "training", PIXDIM)
    score_network(CopyFirstSource(), cases, "t2", ["t1"], torch.device("cpu"), ROI, save=(preprocessing, tmp_path))
    for case in (LPS_CASE, "Phantom_00000"):
        written = nib.load(tmp_path / f"{case}_t2_synth.nii.gz").get_fdata()  # type: ignore[attr-defined]
        t1 = nib.load(data / case / f"{case}_t1.nii.gz").get_fdata()  # type: ignore[attr-defined]
        brain = t1 != 0
        aligned = np.corrcoef(written[brain], t1[brain])[0, 1]
        mirrored = np.corrcoef(written[::-1][brain], t1[brain])[0, 1]
        assert aligned > 0.95 and mirrored < aligned - 0.2, (case, aligned, mirrored)


def test_whole_cases_are_predicted_in_windows_of_the_training_roi(peer_run: tuple[Path, Path, dict]) -> None:
    data, _, _ = peer_run
    _, cases = load_scoring_cases(data, "training", PIXDIM)
    box = cases[0]["t1"].shape[1:]
    assert tuple(box) != tuple(ROI)  # the whole foreground box, neither padded nor cropped to the ROI
    # Windows of 16³ cover every voxel of a larger case (and pad a smaller one): the copy comes back unchanged.
    for shape in ((20, 37, 30), (12, 9, 14)):
        sources = torch.rand(1, 2, *shape)
        torch.testing.assert_close(predict_whole(CopyFirstSource(), sources, (16, 16, 16)), sources[:, :1])


def _objective(network: torch.nn.Module, sources: torch.Tensor, target: torch.Tensor) -> float:
    """The training loss, L1 + 0.2 (1 - SSIM), of ``network`` on one fixed case."""
    with torch.no_grad():
        pred = predict(network.eval(), sources)
    return float(F.l1_loss(pred, target) + 0.2 * SeparableSSIMLoss()(pred, target))


def test_training_lowers_the_loss_on_an_overfit_case(peer_run: tuple[Path, Path, dict]) -> None:
    data, _, _ = peer_run
    case = load_scoring_cases(data, "training", PIXDIM)[1][0]  # one fixed whole case, no augmentation
    sources, target = (torch.as_tensor(case[key]).float()[None] for key in ("t1", "t2"))
    network = build_network(1, FEATURES)
    before = _objective(network, sources, target)
    loader = DataLoader([case], batch_size=1)
    training = train_network(network, loader, "t2", ["t1"], SECONDS, torch.device("cpu"))
    assert training["iterations"] >= 1
    after = _objective(network, sources, target)
    assert after < before - 0.05, (before, after, training)
    assert training["loss_last"] < training["loss_first"]


def test_predict_keeps_any_spatial_size() -> None:
    network = build_network(2, FEATURES).eval()
    with torch.no_grad():
        assert predict(network, torch.rand(1, 2, 20, 24, 18)).shape == (1, 1, 20, 24, 18)


def test_rejects_an_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks"):
        regression_peer.main(str(tmp_path), str(tmp_path / "out"), tasks=["t1_from_nothing"])


def test_a_non_finite_loss_stops_training_naming_the_task() -> None:
    class NotANumber(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1] * float("nan") + self.bias

    batch = {"t1": torch.rand(1, 1, 16, 16, 16), "t2": torch.rand(1, 1, 16, 16, 16)}
    with pytest.raises(FloatingPointError, match=r"^t2: the training loss is nan at iteration 1 .*--amp false"):
        train_network(NotANumber(), [batch], "t2", ["t1"], 5.0, torch.device("cpu"))  # type: ignore[arg-type]


class ShowInput(torch.nn.Module):
    """A "network" that returns its input, to see what ``TaskConditioned`` feeds the U-Net."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_task_conditioning_puts_each_source_in_its_slot_with_availability_and_target_planes() -> None:
    sources = torch.stack([torch.full((2, 4, 4, 4), 10.0), torch.full((2, 4, 4, 4), 20.0)], dim=1)  # t1, flair
    planes = TaskConditioned(ShowInput(), "t2", ["t1", "flair"])(sources)
    assert planes.shape == (2, 3 * len(MODALITIES), 4, 4, 4)
    per_plane = planes[0, :, 0, 0, 0].tolist()
    assert per_plane == [10.0, 0.0, 0.0, 20.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # images, available, target
    with pytest.raises(ValueError, match="target 't2'"):
        TaskConditioned(ShowInput(), "t2", ["t1", "t2"])


def test_the_multitask_peer_trains_one_network_for_every_task(
    peer_run: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    data, _, _ = peer_run
    tasks = ["t1_from_t1ce_t2_flair", "t2_from_t1"]
    regression_peer.main(
        str(data), str(tmp_path), seconds=4.0, split="training", pixdim=PIXDIM, roi_size=ROI, features=FEATURES,
        amp=False, tasks=tasks, design="multitask",
    )  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == tasks and all(metrics[t]["design"] == "multitask" for t in tasks)
    assert metrics[tasks[0]]["iterations"] == metrics[tasks[1]]["iterations"] >= 1  # one network, one training
    assert metrics[tasks[0]]["train_seconds"] >= 4.0  # the whole budget, not a share
    for task in tasks:
        target = BRASYN_TASKS[task][0]
        assert len(list((tmp_path / task).glob(f"*_{target}_synth.nii.gz"))) == 3
        assert -1.0 <= metrics[task]["ssim"] <= 1.0
    with pytest.raises(ValueError, match="design"):
        regression_peer.main(str(data), str(tmp_path), seconds=1.0, split="training", design="shared")
