"""load_datalist: the held-out test split of both data sets (BraTS ``dataset.json`` "test" list, MedMNIST's own)."""

from __future__ import annotations

import json
from pathlib import Path

import medmnist
import nibabel as nib
import numpy as np
import pytest

from prod9_ext.data import MODALITIES, load_datalist

SUFFIXES = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair"}


def _brats_folder(root: Path, splits: dict[str, list[str]]) -> Path:
    """Tiny readable BraTS 2021 cases (4x4x4 volumes) and a ``dataset.json`` with the lists of ``splits``."""
    for names in splits.values():
        for case in names:
            (root / case).mkdir()
            for key in MODALITIES:
                volume = np.arange(64, dtype=np.int16).reshape(4, 4, 4)
                nib.save(nib.Nifti1Image(volume, np.eye(4)), root / case / f"{case}{SUFFIXES[key]}.nii.gz")
    content = {key: [{"case": case} for case in names] for key, names in splits.items()}
    (root / "dataset.json").write_text(json.dumps(content))
    return root


def test_brats_test_split_reads_the_test_list(tmp_path: Path) -> None:
    _brats_folder(tmp_path, {"training": ["A", "B"], "validation": ["C"], "test": ["D", "E"]})
    test = load_datalist("brats", tmp_path, "test")
    assert [entry["case"] for entry in test] == ["D", "E"]
    assert test[0]["t2"] == str(tmp_path / "D" / "D_t2.nii.gz")
    assert [entry["case"] for entry in load_datalist("brats", tmp_path, "validation")] == ["C"]
    assert [entry["case"] for entry in load_datalist("brats", tmp_path, "all")] == ["A", "B", "C"]


def test_brats_test_split_without_a_test_list_is_one_line(tmp_path: Path) -> None:
    _brats_folder(tmp_path, {"training": ["A", "B"], "validation": ["C"]})
    with pytest.raises(ValueError, match="'test'") as error:
        load_datalist("brats", tmp_path, "test")
    message = str(error.value)
    assert str(tmp_path / "dataset.json") in message and "\n" not in message


def test_unknown_split_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_datalist("brats", tmp_path, "testing")


def test_medmnist_test_split_is_its_own_test_split(tmp_path: Path) -> None:
    sizes = {"train": 3, "val": 2, "test": 4}
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, len(medmnist.INFO["organmnist3d"]["label"]), (n, 1), np.uint8)
    np.savez_compressed(tmp_path / "organmnist3d.npz", **arrays)
    test = load_datalist("medmnist3d", tmp_path, "test", "organmnist3d", 28)
    assert len(test) == sizes["test"]
    np.testing.assert_allclose(test[0]["image"][0], arrays["test_images"][0] / 255.0, atol=1e-6)
