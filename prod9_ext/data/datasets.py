"""One entry point per data set, so a bundle switches between BraTS and MedMNIST 3D with its ``dataset`` key.

The bundles set that key, and the MedMNIST 3D task (target ``image``, no sources), in ``configs/medmnist3d.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from monai.data.utils import pickle_hashing
from monai.transforms import Compose
from torch.utils.data import Subset

from prod9_ext.data.brats import MODALITIES, check_modalities, load_brats_datalist
from prod9_ext.data.medmnist3d import load_medmnist3d
from prod9_ext.data.transforms import brats_transforms, medmnist_transforms
from prod9_ext.data.validation import check_datalist

__all__ = ["DATASETS", "cache_key", "image_keys", "load_datalist", "preprocessing"]

DATASETS = ("brats", "medmnist3d")

_BRATS_SPLITS = {"training": "training", "validation": "validation", "test": "test", "all": "all"}
_MEDMNIST_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _check(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}.")


def image_keys(dataset: str, modalities: Sequence[str] = MODALITIES) -> list[str]:
    """The keys of the images a batch holds: the BraTS ``modalities``, or ``["image"]`` for MedMNIST 3D."""
    _check(dataset)
    if dataset == "medmnist3d":
        return ["image"]
    return check_modalities(modalities)


def load_datalist(
    dataset: str,
    dataset_dir: str | os.PathLike | None,
    split: str = "training",
    medmnist_flag: str = "organmnist3d",
    medmnist_size: int = 28,
    num_cases: int = 0,
    **kwargs,
) -> Sequence[dict]:
    """Cases of one split: BraTS file dicts (:func:`load_brats_datalist`) or MedMNIST 3D items.

    The header of every BraTS image is checked here (:func:`~prod9_ext.data.validation.check_datalist`), so a missing,
    truncated, 2D or 4D file stops the run before anything is trained or written.

    Args:
        dataset: ``"brats"`` or ``"medmnist3d"``.
        dataset_dir: the data root (BraTS case folders, or the folder of the MedMNIST ``.npz`` files).
        split: ``"training"``, ``"validation"`` or ``"test"`` (or ``"all"`` for BraTS: training and validation).
            BraTS reads ``"test"`` from the ``"test"`` list of ``<dataset_dir>/dataset.json`` (a one-line
            ``ValueError`` when there is none); MedMNIST uses its own ``train``/``val``/``test`` splits.
        medmnist_flag, medmnist_size: which MedMNIST 3D set.
        num_cases: only the first this many cases of the split (a fixed subset); 0: all of them.
        kwargs: passed to :func:`load_brats_datalist` (``val_fraction``, ``seed``, ``fold``, ...).
    """
    _check(dataset)
    splits = _BRATS_SPLITS if dataset == "brats" else _MEDMNIST_SPLITS
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)} for {dataset}, got {split!r}.")
    if dataset == "brats":
        datalist = load_brats_datalist(dataset_dir, split=splits[split], **kwargs)  # type: ignore[arg-type]
        datalist = datalist[:num_cases] if num_cases else datalist
        check_datalist(datalist, MODALITIES)
        return datalist
    items = load_medmnist3d(medmnist_flag, split=splits[split], size=medmnist_size, dataset_dir=dataset_dir)  # type: ignore[arg-type]
    return Subset(items, range(min(num_cases, len(items)))) if num_cases else items  # type: ignore[return-value]


def preprocessing(
    dataset: str,
    modalities: Sequence[str] = MODALITIES,
    roi_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = (2.0, 2.0, 2.0),
    train: bool = False,
    seg: bool = False,
) -> Compose:
    """The one preprocessing of ``dataset`` (:func:`brats_transforms` or :func:`medmnist_transforms`)."""
    _check(dataset)
    if dataset == "medmnist3d":
        return medmnist_transforms(roi_size=roi_size, train=train)
    return brats_transforms(image_keys(dataset, modalities), roi_size=roi_size, pixdim=pixdim, train=train, seg=seg)


def cache_key(item: Any) -> bytes:
    """The name of a case in a ``PersistentDataset`` cache (the bundles' ``hash_func``): a hash of the case's entries
    and, for every entry naming a file, of its size and modification time, so that a file replaced in place is
    preprocessed again instead of read stale from the cache. The preprocessing's settings enter the name through
    ``hash_transform``."""
    if isinstance(item, Mapping):
        item = {key: _file_stamp(value) for key, value in item.items()}
    return pickle_hashing(item)


def _file_stamp(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        stat = os.stat(value)
        return os.fspath(value), stat.st_size, stat.st_mtime_ns
    return value
