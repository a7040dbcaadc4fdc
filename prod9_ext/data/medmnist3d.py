"""MedMNIST 3D through the ``medmnist`` package's own dataset classes, as MONAI-style dict items.

The six 3D sets (``organmnist3d``, ``nodulemnist3d``, ``adrenalmnist3d``, ``fracturemnist3d``,
``vesselmnist3d``, ``synapsemnist3d``) come as one ``.npz`` file each: ``{flag}.npz`` for 28^3 volumes and
``{flag}_64.npz`` for 64^3 volumes, in a folder given as ``dataset_dir`` (default: the ``MEDMNIST_DATA_DIR``
environment variable, else medmnist's own default root, ``~/.medmnist``). :func:`load_medmnist3d` reads one
split through the medmnist class named by ``medmnist.INFO[flag]["python_class"]`` and returns a thin dataset
of ``{"image": float32 [1, D, H, W] in [0, 1], "label": int}`` items, which ``monai.data.Dataset`` or
``CacheDataset`` take as their ``data``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import medmnist
import numpy as np
from medmnist.dataset import MedMNIST3D
from medmnist.info import DEFAULT_ROOT
from torch.utils.data import Dataset

__all__ = ["MEDMNIST3D_FLAGS", "MEDMNIST3D_SIZES", "MEDMNIST_DATA_DIR_ENV", "MedMNIST3DItems", "load_medmnist3d"]

MEDMNIST3D_FLAGS: tuple[str, ...] = (
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)
MEDMNIST3D_SIZES: tuple[int, ...] = (28, 64)
MEDMNIST_DATA_DIR_ENV = "MEDMNIST_DATA_DIR"
"""Environment variable that names the MedMNIST folder when ``dataset_dir`` is not given."""

_SPLITS = ("train", "val", "test")


class MedMNIST3DItems(Dataset):
    """One split of a MedMNIST 3D set as ``{"image", "label"}`` dicts, converted item by item.

    Args:
        source: the ``medmnist`` dataset object (e.g. ``medmnist.OrganMNIST3D``) holding the split.

    Attributes:
        flag: the set, e.g. ``"organmnist3d"``.
        num_classes: number of classes of the set (labels are ``0 .. num_classes - 1``).
        class_names: ``{label: name}`` as medmnist describes them.
    """

    def __init__(self, source: MedMNIST3D) -> None:
        self.source = source
        self.flag = str(source.flag)
        self.class_names: dict[int, str] = {int(k): v for k, v in source.info["label"].items()}
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        # The medmnist class's own __len__ asserts the official sample count, so count the array instead.
        return int(self.source.imgs.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": float32 array [1, D, H, W] in [0, 1], "label": int}``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} {self.flag} items.")
        image, target = self.source[index]
        return {"image": np.asarray(image, dtype=np.float32), "label": int(np.asarray(target).reshape(-1)[0])}


def load_medmnist3d(
    flag: str,
    split: Literal["train", "val", "test"] = "train",
    size: int = 28,
    dataset_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> MedMNIST3DItems:
    """Read one split of a MedMNIST 3D set from ``<dataset_dir>/{flag}.npz`` (or ``{flag}_64.npz``).

    Args:
        flag: one of :data:`MEDMNIST3D_FLAGS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: edge length of the volumes, 28 or 64.
        dataset_dir: folder of the ``.npz`` files; default: ``$MEDMNIST_DATA_DIR``, else medmnist's default root.
        download: let medmnist fetch the file when it is missing (needs a network).

    Returns:
        The split as a dataset of ``{"image": float32 [1, size, size, size] in [0, 1], "label": int}`` items.

    Raises:
        ValueError: unknown ``flag``, ``size`` or ``split``.
        FileNotFoundError: the file is missing and ``download`` is False.
        RuntimeError: ``download`` is True and the download failed.
    """
    if flag not in MEDMNIST3D_FLAGS:
        raise ValueError(f"Unknown MedMNIST 3D flag {flag!r}; expected one of {MEDMNIST3D_FLAGS}.")
    if size not in MEDMNIST3D_SIZES:
        raise ValueError(f"Unknown MedMNIST 3D size {size!r}; expected one of {MEDMNIST3D_SIZES}.")
    if split not in _SPLITS:
        raise ValueError(f"Unknown MedMNIST split {split!r}; expected one of {_SPLITS}.")
    root = _resolve_dataset_dir(dataset_dir)
    file_name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    if download:
        root.mkdir(parents=True, exist_ok=True)
    elif not (root / file_name).is_file():
        raise FileNotFoundError(
            f"MedMNIST file {file_name} not found in {root}. Put it there, or call with download=True to fetch "
            "it where a network exists."
        )
    dataset_class = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    try:
        source = dataset_class(split=split, root=str(root), size=size, download=download)
    except RuntimeError as err:
        if not download:
            raise
        # medmnist wraps the torchvision failure in a RuntimeError with the manual steps; keep only that.
        raise RuntimeError(f"Could not download MedMNIST file {file_name} into {root}: {err}") from None
    return MedMNIST3DItems(source)


def _resolve_dataset_dir(dataset_dir: str | os.PathLike | None) -> Path:
    """``dataset_dir``, else ``$MEDMNIST_DATA_DIR``, else medmnist's default root."""
    if dataset_dir is None:
        dataset_dir = os.environ.get(MEDMNIST_DATA_DIR_ENV) or DEFAULT_ROOT or Path.home() / ".medmnist"
    return Path(dataset_dir).expanduser().resolve()
