"""The regression peer trains within its budget, learns, and writes prod9's metrics and its predicted volumes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import regression_peer
from regression_peer import TASKS, build_network, load_scoring_cases, predict, train_network

from prod9_ext.data import make_phantom_dataset
from prod9_ext.engines import SeparableSSIMLoss

# 6 mm phantoms (about 30x37x30 voxels) in a 32³ ROI, and a small U-Net: a few seconds of training learns a lot.
PIXDIM = [6.0, 6.0, 6.0]
ROI = [32, 32, 32]
FEATURES = [8, 8, 16, 16, 32, 8]
SECONDS = 8.0


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Three training phantoms; the peer trained on them for ``SECONDS`` and scored on them (the overfit case)."""
    data = tmp_path_factory.mktemp("peer_data")
    make_phantom_dataset(data, num_cases=3, seed=0, spacing=6.0, val_fraction=0.0, test_fraction=0.0)
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
        }
        assert scores["cases"] == 3 and scores["iterations"] >= 1
        assert math.isfinite(scores["psnr"]) and scores["psnr"] > 0
        for key in ("ssim", "ssim_tumour", "ssim_rest"):
            assert -1.0 <= scores[key] <= 1.0
        # The loop runs until the task's share is spent and stops at the next iteration (tiny ones here).
        assert SECONDS / len(TASKS) <= scores["train_seconds"] < SECONDS / len(TASKS) + 30


def test_predictions_are_written_on_the_scoring_grid(peer_run: tuple[Path, Path, dict]) -> None:
    _, out, _ = peer_run
    for task in TASKS:
        files = sorted((out / task).glob("*.nii.gz"))
        assert [f.name for f in files] == [f"Phantom_0000{i}.nii.gz" for i in range(3)]
        image = nib.load(files[0])
        assert image.shape == tuple(ROI)
        voxels = image.get_fdata()
        assert voxels.min() >= 0.0 and voxels.max() <= 1.0  # clipped, as scored
        assert image.affine[0, 0] == pytest.approx(PIXDIM[0])


def _objective(network: torch.nn.Module, sources: torch.Tensor, target: torch.Tensor) -> float:
    """The training loss, L1 + 0.2 (1 - SSIM), of ``network`` on one fixed case."""
    with torch.no_grad():
        pred = predict(network.eval(), sources)
    return float(F.l1_loss(pred, target) + 0.2 * SeparableSSIMLoss()(pred, target))


def test_training_lowers_the_loss_on_an_overfit_case(peer_run: tuple[Path, Path, dict]) -> None:
    data, _, _ = peer_run
    case = load_scoring_cases(data, "training", PIXDIM, ROI)[0]  # one fixed crop, no augmentation
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
