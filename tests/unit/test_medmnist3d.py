"""load_medmnist3d through the real medmnist classes, on tiny .npz files written in the MedMNIST format."""

from __future__ import annotations

from pathlib import Path

import medmnist
import numpy as np
import pytest
from monai.data import DataLoader, Dataset

from prod9_ext.data import (
    MEDMNIST3D_FLAGS,
    MEDMNIST_DATA_DIR_ENV,
    load_datalist,
    load_medmnist3d,
    medmnist_transforms,
)

SPLIT_SIZES = {"train": 5, "val": 3, "test": 2}


def write_npz(root: Path, flag: str, size: int = 28, seed: int = 0) -> dict[str, np.ndarray]:
    """A MedMNIST-format file: ``{split}_images`` uint8 [N, S, S, S] and ``{split}_labels`` uint8 [N, 1]."""
    rng = np.random.default_rng(seed)
    num_classes = len(medmnist.INFO[flag]["label"])
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, num_classes, size=(n, 1), dtype=np.uint8)
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    np.savez_compressed(root / name, **arrays)
    return arrays


@pytest.mark.parametrize("flag", MEDMNIST3D_FLAGS)
def test_loads_every_flag_through_its_medmnist_class(tmp_path: Path, flag: str) -> None:
    arrays = write_npz(tmp_path, flag)
    items = load_medmnist3d(flag, split="val", dataset_dir=tmp_path)
    assert isinstance(items.source, getattr(medmnist, medmnist.INFO[flag]["python_class"]))
    assert len(items) == SPLIT_SIZES["val"]
    assert items.num_classes == len(medmnist.INFO[flag]["label"])
    item = items[1]
    assert item["image"].shape == (1, 28, 28, 28) and item["image"].dtype == np.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    np.testing.assert_allclose(item["image"][0], arrays["val_images"][1] / 255.0, atol=1e-6)
    assert isinstance(item["label"], int) and item["label"] == arrays["val_labels"][1, 0]


def test_loads_size_64(tmp_path: Path) -> None:
    arrays = write_npz(tmp_path, "nodulemnist3d", size=64)
    items = load_medmnist3d("nodulemnist3d", split="test", size=64, dataset_dir=tmp_path)
    assert items[-1]["image"].shape == (1, 64, 64, 64)
    assert items[-1]["label"] == arrays["test_labels"][-1, 0]


def test_dataset_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_npz(tmp_path, "organmnist3d")
    monkeypatch.setenv(MEDMNIST_DATA_DIR_ENV, str(tmp_path))
    assert len(load_medmnist3d("organmnist3d")) == SPLIT_SIZES["train"]


def test_missing_file_names_file_folder_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        load_medmnist3d("vesselmnist3d", size=64, dataset_dir=tmp_path)
    message = str(missing.value)
    assert "vesselmnist3d_64.npz" in message and str(tmp_path) in message and "download=True" in message


def test_failed_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self) -> None:
        raise RuntimeError("Automatic download failed!")

    monkeypatch.setattr(medmnist.dataset.MedMNIST, "download", offline)
    with pytest.raises(RuntimeError, match=r"synapsemnist3d\.npz") as failed:
        load_medmnist3d("synapsemnist3d", dataset_dir=tmp_path / "new", download=True)
    assert failed.value.__cause__ is None and failed.value.__suppress_context__


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flag": "pathmnist"}, "pathmnist"),
        ({"flag": "organmnist3d", "size": 32}, "32"),
        ({"flag": "organmnist3d", "split": "training"}, "training"),
    ],
)
def test_unknown_flag_size_or_split(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_medmnist3d(dataset_dir=tmp_path, **kwargs)


def test_index_out_of_range(tmp_path: Path) -> None:
    write_npz(tmp_path, "adrenalmnist3d")
    items = load_medmnist3d("adrenalmnist3d", split="test", dataset_dir=tmp_path)
    with pytest.raises(IndexError, match="index 2"):
        items[2]


def test_feeds_a_monai_dataset_and_loader(tmp_path: Path) -> None:
    write_npz(tmp_path, "fracturemnist3d")
    items = load_medmnist3d("fracturemnist3d", dataset_dir=tmp_path)
    dataset = Dataset(items, transform=medmnist_transforms(roi_size=32))
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    assert batch["label"].tolist() == [items[0]["label"], items[1]["label"]]


def test_load_datalist_keeps_the_first_cases_of_a_split(tmp_path: Path) -> None:
    """``num_cases`` (the bundles' ``val_num_cases``) on MedMNIST: the first items, 0 for all of them."""
    arrays = write_npz(tmp_path, "organmnist3d")
    first = load_datalist("medmnist3d", tmp_path, "validation", "organmnist3d", 28, num_cases=2)
    assert len(first) == 2
    assert first[1]["label"] == arrays["val_labels"][1, 0]
    assert len(load_datalist("medmnist3d", tmp_path, "validation", "organmnist3d", 28)) == SPLIT_SIZES["val"]
    assert len(load_datalist("medmnist3d", tmp_path, "validation", "organmnist3d", 28, num_cases=9)) == 3
