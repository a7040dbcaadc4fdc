"""The one preprocessing of prod9: MONAI dictionary transforms shared by training, evaluation and inference.

:func:`brats_transforms` (BraTS-style cases, one NIfTI file per modality)::

    LoadImaged (CheckedNibabelReader) -> CheckImaged (one 3D volume, finite, not constant) -> EnsureChannelFirstd
    -> Orientationd (RAS) -> Spacingd (optional) -> CropForegroundd
    -> ScaleIntensityMaskedPercentilesd (0.5-99.5 % inside the brain to [0, 1])
    -> SpatialPadd + CenterSpatialCropd to ``roi_size``            (evaluation / inference)
    -> SpatialPadd + RandSpatialCropd to ``roi_size`` + RandFlipd  (training)

All keys of a case go through the same spatial transforms with the same random draws, so the modalities
(and the segmentation) stay aligned. The spatial transforms are invertible: ``Compose.inverse`` or ``Invertd``
maps a network output back onto the input file's grid (shape and affine); the intensity scaling is not
inverted. :func:`medmnist_transforms` does the pad/crop part for MedMNIST 3D items, which are already in
[0, 1].

Both functions return a ``monai.transforms.Compose`` and can be named from a bundle config, e.g.
``{"_target_": "prod9_ext.data.brats_transforms", "modalities": ["t1", "t2"], "roi_size": [64, 64, 64],
"train": true}``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
    Transform,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile

from prod9_ext.data.brats import MODALITIES
from prod9_ext.data.validation import CheckedNibabelReader, CheckImaged

__all__ = ["ScaleIntensityMaskedPercentilesd", "brats_transforms", "medmnist_transforms"]


class ScaleIntensityMaskedPercentilesd(MapTransform):
    """Map the ``lower``-``upper`` percentiles of each channel's nonzero voxels to [0, 1], clipped.

    The percentiles are computed inside the mask of nonzero voxels only (the brain, in skull-stripped MRI), as
    the BraSyn challenge normalises its volumes; voxels outside the mask stay 0. A channel with no nonzero
    voxel, or whose two percentiles are equal, maps to 0. Works on tensors ``[C, *spatial]`` and keeps their
    metadata (affine, applied operations).

    Args:
        keys: keys of the images to scale.
        lower: lower percentile, in [0, 100).
        upper: upper percentile, in (lower, 100].
        allow_missing_keys: do not raise for absent keys.
    """

    def __init__(
        self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"Need 0 <= lower < upper <= 100, got lower={lower} and upper={upper}.")
        self.lower = lower
        self.upper = upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scale(d[key])
        return d

    def scale(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled copy of ``image`` ``[C, *spatial]`` (float32, values in [0, 1])."""
        image = torch.as_tensor(image, dtype=torch.float32)
        channels = [self._scale_channel(channel) for channel in image]
        return torch.stack(channels) if channels else image

    def _scale_channel(self, channel: torch.Tensor) -> torch.Tensor:
        mask = channel != 0
        if not mask.any():
            return torch.zeros_like(channel)
        low, high = (float(percentile(channel[mask], q)) for q in (self.lower, self.upper))
        if high <= low:
            return torch.zeros_like(channel)
        scaled = ((channel - low) / (high - low)).clamp(0.0, 1.0)
        return torch.where(mask, scaled, torch.zeros_like(scaled))


def brats_transforms(
    modalities: Sequence[str] = MODALITIES,
    roi_size: Sequence[int] | int | None = (96, 96, 96),
    pixdim: Sequence[float] | float | None = (2.0, 2.0, 2.0),
    train: bool = False,
    seg: bool = False,
    flip_axes: Sequence[int] = (0,),
) -> Compose:
    """The preprocessing of BraTS-style cases (datalist dicts from ``load_brats_datalist``).

    Args:
        modalities: datalist keys of the images to load, e.g. ``("t1", "t1ce", "t2", "flair")``; the first one
            gives the foreground box that crops all keys.
        roi_size: spatial size of the output ``[X, Y, Z]`` (smaller volumes are zero-padded, larger ones
            cropped: centred for evaluation, at random for training); ``None`` keeps the foreground box.
        pixdim: voxel size in mm to resample to; ``None`` keeps the files' voxel size.
        train: add the training augmentation (random crop position, random flips).
        seg: also load the ``"seg"`` key (nearest-neighbour resampling, no intensity scaling).
        flip_axes: spatial axes (RAS: 0 = left-right) that training flips, each with probability 1/2.

    Returns:
        A Compose mapping ``{"t1": path, ...}`` to ``{"t1": MetaTensor[1, *roi_size] in [0, 1], ...}`` (RAS,
        affine in the metadata); with ``seg``, ``"seg"`` is ``MetaTensor[1, *roi_size]`` with the label values.
    """
    image_keys = list(modalities)
    if not image_keys:
        raise ValueError("modalities must name at least one image key.")
    keys = [*image_keys, "seg"] if seg else image_keys
    transforms: list[Transform] = [
        LoadImaged(keys, reader=CheckedNibabelReader, image_only=True),
        CheckImaged(image_keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=None),
    ]
    if pixdim is not None:
        modes = ["bilinear"] * len(image_keys) + (["nearest"] if seg else [])
        transforms.append(Spacingd(keys, pixdim=pixdim, mode=modes, dtype=np.float32))
    transforms += [
        CropForegroundd(keys, source_key=image_keys[0], allow_smaller=True),
        ScaleIntensityMaskedPercentilesd(image_keys),
    ]
    transforms += _pad_crop_flip(keys, roi_size, train, flip_axes)
    return Compose(transforms)


def medmnist_transforms(
    roi_size: Sequence[int] | int | None = None, train: bool = False, flip_axes: Sequence[int] = ()
) -> Compose:
    """The preprocessing of MedMNIST 3D items (``{"image": array[1, D, H, W] in [0, 1], "label": int}``).

    Args:
        roi_size: spatial size of the output (zero-padded or cropped: centred for evaluation, at random for
            training); ``None`` keeps the native 28 or 64.
        train: add the training augmentation (random crop position, random flips).
        flip_axes: spatial axes that training flips, each with probability 1/2. None by default: some labels
            are lateral (OrganMNIST3D's left and right kidney and femur), and a flip would swap them.

    Returns:
        A Compose mapping an item to ``{"image": MetaTensor[1, *roi_size] float32, "label": int}``.
    """
    transforms: list[Transform] = [EnsureTyped("image", dtype=torch.float32)]
    transforms += _pad_crop_flip(["image"], roi_size, train, flip_axes)
    return Compose(transforms)


def _pad_crop_flip(
    keys: list[str], roi_size: Sequence[int] | int | None, train: bool, flip_axes: Sequence[int]
) -> list[Transform]:
    """Pad/crop ``keys`` to ``roi_size`` (random crop position when ``train``) and, when ``train``, flip."""
    transforms: list[Transform] = []
    if roi_size is not None:
        transforms.append(SpatialPadd(keys, spatial_size=roi_size))
        crop = RandSpatialCropd(keys, roi_size, random_size=False) if train else CenterSpatialCropd(keys, roi_size)
        transforms.append(crop)
    if train:
        transforms += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
    return transforms
