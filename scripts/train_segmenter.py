"""Train the tumour segmenter that scores syntheses by Dice (BraSyn's second metric), for a wall-time budget.

A MONAI ``SegResNet`` (:func:`prod9_ext.engines.build_segmenter`) learns the BraTS regions TC, WT and ET from the
four real contrasts of the *training* cases, on random ``roi_size`` crops at ``pixdim`` (stage 2's preprocessing),
with Dice + cross-entropy. Its Dice on the whole *validation* cases is written beside the checkpoint; no test case is
read.

    python scripts/train_segmenter.py --dataset_dir outputs/quickstart/data --output outputs/brasyn/segmenter.pt \\
        --seconds 480

Writes ``--output`` (weights and settings) and ``<output>.json`` (settings, training figures, validation Dice).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import fire
import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import convert_to_tensor, set_determinism
from regression_peer import MODALITIES, load_scoring_cases

import prod9_ext.data
from prod9_ext.atomic import atomic_write_text
from prod9_ext.engines import (
    BRATS_REGIONS,
    brats_regions,
    build_segmenter,
    endless,
    error_summary,
    region_dice,
    save_segmenter,
    segment,
    segmentation_loss,
    train_for_seconds,
)

__all__ = ["contrasts", "main", "mean_dice"]

logger = logging.getLogger("train_segmenter")


def contrasts(case: dict, device: torch.device) -> torch.Tensor:
    """The four contrasts of a (batched) case as channels ``[B, 4, *spatial]`` in :data:`MODALITIES` order."""
    arrays = [convert_to_tensor(case[key], dtype=torch.float32, track_meta=False) for key in MODALITIES]
    return torch.cat(arrays, dim=1).to(device)


def mean_dice(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each region's Dice over ``scores`` (one dict per case)."""
    if not scores:
        raise ValueError("no case to average")
    return {region: sum(s[region] for s in scores) / len(scores) for region in BRATS_REGIONS}


def main(
    dataset_dir: str,
    output: str,
    seconds: float = 480.0,
    pixdim: Sequence[float] = (3.0, 3.0, 3.0),
    roi_size: Sequence[int] = (48, 64, 48),
    init_filters: int = 8,
    batch_size: int = 2,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
) -> None:
    """Train on the training cases for ``seconds``, score Dice on the validation cases, write ``output``.

    Args:
        dataset_dir: BraTS-layout folder with ``dataset.json`` (training and validation lists, ``seg`` files).
        output: the checkpoint to write (its folder is created); ``<output>.json`` gets the figures.
        seconds: wall-time budget of the training loop.
        pixdim: voxel size in mm (the demo's 3 mm).
        roi_size: training crop and inference window (each side a multiple of 8).
        init_filters: ``SegResNet`` width.
        batch_size: training batch size.
        learning_rate: Adam's initial learning rate (cosine decay over the budget).
        seed: seed of the initialisation, the crops and the flips.
        device: torch device.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if seconds <= 0 or batch_size < 1 or any(int(n) % 8 for n in roi_size):
        raise ValueError(
            f"need seconds > 0, batch_size >= 1 and roi_size sides that are multiples of 8; got {seconds}, "
            f"{batch_size} and {list(roi_size)}"
        )
    torch_device = torch.device(device)
    set_determinism(seed=seed)
    transform = prod9_ext.data.preprocessing("brats", MODALITIES, list(roi_size), list(pixdim), train=True, seg=True)
    training = CacheDataset(prod9_ext.data.load_datalist("brats", dataset_dir, "training"), transform, progress=False)
    loader = DataLoader(training, batch_size=batch_size, shuffle=True, num_workers=0)
    network = build_segmenter(len(MODALITIES), init_filters).to(torch_device)
    loss = segmentation_loss()

    def loss_of(batch: dict) -> torch.Tensor:
        regions = brats_regions(convert_to_tensor(batch["seg"], track_meta=False)).float().to(torch_device)
        return loss(network(contrasts(batch, torch_device)), regions)

    logger.info("segmenter: %d training cases, %.0f s", len(training), seconds)
    figures = train_for_seconds(network, endless(loader), loss_of, seconds, learning_rate, "segmenter")
    _, cases = load_scoring_cases(dataset_dir, "validation", pixdim)
    scores = []
    for case in cases:
        batch = {key: torch.as_tensor(case[key])[None] for key in (*MODALITIES, "seg")}
        scores.append(region_dice(segment(network, contrasts(batch, torch_device), roi_size), batch["seg"]))
    settings = {"init_filters": init_filters, "roi_size": list(roi_size), "pixdim": list(pixdim), "seed": seed}
    save_segmenter(network.cpu(), output, settings)
    summary = {**settings, **figures, "validation_dice": mean_dice(scores), "validation_cases": len(scores)}
    atomic_write_text(Path(f"{output}.json"), json.dumps(summary, indent=2) + "\n")
    logger.info("segmenter: validation Dice %s", json.dumps(summary["validation_dice"]))


if __name__ == "__main__":
    with error_summary.one_line_errors():
        fire.Fire(main)
