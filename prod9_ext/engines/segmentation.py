"""The tumour segmenter behind BraSyn's second score: Dice with a synthesised contrast in place of the real one.

A MONAI ``SegResNet`` reads the four contrasts as channels and predicts the three overlapping BraTS regions with a
sigmoid each (MONAI's BraTS tutorial and model-zoo ``brats_mri_segmentation``): tumour core (TC), whole tumour (WT)
and enhancing tumour (ET), from the labels by MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` (the BraTS 2023
enhancing label 3 counts as 2021's 4). It is trained on the real contrasts of the training cases; a synthesis is then
judged by how much the Dice drops when it replaces its real contrast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.nets import SegResNet
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from prod9_ext.atomic import atomic_output

__all__ = [
    "BRATS_REGIONS",
    "brats_regions",
    "build_segmenter",
    "load_segmenter",
    "region_dice",
    "save_segmenter",
    "segment",
    "segmentation_loss",
]

BRATS_REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
"""The channels of :func:`brats_regions` and of the segmenter's output."""


def brats_regions(seg: torch.Tensor) -> torch.Tensor:
    """The BraTS regions ``Bool[B, 3, *spatial]`` (TC, WT, ET) of labels ``[B, 1, *spatial]`` (2021 or 2023 values)."""
    labels = torch.as_tensor(seg)
    labels = torch.where(labels == 3, torch.full_like(labels, 4), labels)  # BraTS 2023's ET label is 2021's 4
    convert = ConvertToMultiChannelBasedOnBratsClasses()
    return torch.stack([torch.as_tensor(convert(item)) for item in labels]).bool()


def build_segmenter(in_channels: int = 4, init_filters: int = 8) -> SegResNet:
    """A 3D ``SegResNet`` with ``in_channels`` contrasts in and the three BraTS regions out (logits).

    ``init_filters`` must be a multiple of 8 (the group norms' 8 groups).
    """
    if init_filters < 8 or init_filters % 8:
        raise ValueError(f"init_filters must be a positive multiple of 8 (SegResNet's group norm), got {init_filters}")
    return SegResNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=len(BRATS_REGIONS),
        init_filters=init_filters,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


def segmentation_loss() -> DiceCELoss:
    """Dice + binary cross-entropy on the sigmoid of each region, as MONAI's BraTS recipes train it."""
    return DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)


@torch.no_grad()
def segment(network: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int]) -> torch.Tensor:
    """The regions ``Bool[B, 3, *spatial]`` that ``network`` finds in ``image`` ``[B, 4, *spatial]``, any size.

    MONAI's ``SlidingWindowInferer`` (windows of the training ``roi_size``, overlap 0.5, Gaussian blending) covers
    the whole volume; a region is where its sigmoid exceeds 0.5.
    """
    network.eval()
    inferer = SlidingWindowInferer(roi_size=list(roi_size), overlap=0.5, mode="gaussian")
    logits = inferer(image.float(), network)
    assert isinstance(logits, torch.Tensor)
    return logits.sigmoid() > 0.5


def region_dice(pred: torch.Tensor, seg: torch.Tensor) -> dict[str, float]:
    """Dice of each BraTS region of ``pred`` ``Bool[1, 3, *spatial]`` against the labels ``seg`` ``[1, 1, *spatial]``.

    A region absent from both scores 1 and one absent from the labels only scores 0 (BraTS's convention).
    """
    if pred.shape[0] != 1 or pred.shape[1] != len(BRATS_REGIONS):
        raise ValueError(f"pred must be [1, {len(BRATS_REGIONS)}, *spatial], got {tuple(pred.shape)}")
    truth = brats_regions(seg).to(pred.device)
    if truth.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and the regions of seg {tuple(truth.shape)} differ in shape")
    dice = compute_dice(pred.float(), truth.float(), include_background=True, ignore_empty=False)
    return {region: float(value) for region, value in zip(BRATS_REGIONS, dice[0], strict=True)}


def save_segmenter(network: SegResNet, path: str | os.PathLike, settings: dict) -> None:
    """Write the segmenter's weights and the ``settings`` it was built and trained with, atomically."""
    with atomic_output(path) as temporary:
        torch.save({"segmenter": network.state_dict(), "settings": settings}, temporary)


def load_segmenter(path: str | os.PathLike) -> tuple[SegResNet, dict]:
    """The segmenter saved at ``path`` and its settings (``init_filters``, ``roi_size``, ``pixdim``, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a segmenter checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint {path}: no such file; train it with scripts/train_segmenter.py")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "segmenter" not in saved or "settings" not in saved:
        raise ValueError(f"segmenter checkpoint {path}: not a file written by save_segmenter")
    network = build_segmenter(init_filters=int(saved["settings"]["init_filters"]))
    network.load_state_dict(saved["segmenter"])
    return network, dict(saved["settings"])
