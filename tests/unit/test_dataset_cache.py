"""The bundles cache preprocessed cases on disk (MONAI's PersistentDataset), not in memory, under their cache_dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import PersistentDataset

from prod9_ext.data import cache_key, make_phantom_dataset
from prod9_ext.engines.startup import fill_disk_cache

REPO = Path(__file__).resolve().parents[2]
DATASETS = [
    ("autoencoder_fsq", "train#dataset"),
    ("autoencoder_fsq", "validate#dataset"),
    ("maskgit_transformer", "validate#dataset"),
]


def test_cache_key_follows_the_files_a_case_names(tmp_path: Path) -> None:
    image = tmp_path / "case_t1.nii.gz"
    image.write_bytes(b"first")
    case = {"case": "c", "t1": str(image)}
    assert cache_key(case) == cache_key(dict(case))
    assert cache_key(case) != cache_key({**case, "case": "d"})
    first = cache_key(case)
    image.write_bytes(b"second, longer")  # the file replaced in place: the same path, other contents
    os.utime(image, ns=(1, 1))
    assert cache_key(case) != first
    item = {"image": torch.zeros(2).numpy(), "label": 1}  # MedMNIST: arrays, no files
    assert cache_key(item) == cache_key({"image": torch.zeros(2).numpy(), "label": 1})
    assert cache_key(item) != cache_key({**item, "label": 2})


@pytest.mark.parametrize(("bundle", "dataset"), DATASETS)
def test_default_datasets_cache_on_disk(bundle: str, dataset: str) -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    config = parser.get(dataset)
    assert config["_target_"] == "PersistentDataset"
    assert "cache_rate" not in parser.get() and "cache_dir" in parser.get()
    assert config["hash_func"] == "$prod9_ext.data.cache_key"
    assert config["hash_transform"] == "$monai.data.utils.pickle_hashing"  # the preprocessing's settings name files


def _stage1_dataset(phantoms: Path, out: Path, split: str, pixdim: list[float]) -> PersistentDataset:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "autoencoder_fsq" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(phantoms), "output_dir": str(out), "pixdim": pixdim, "roi_size": [32, 32, 32]})
    return parser.get_parsed_content(f"{split}#dataset")


def test_stage1_cache_is_written_once_then_read_and_follows_the_settings(tmp_path: Path) -> None:
    phantoms = tmp_path / "phantoms"
    make_phantom_dataset(phantoms, num_cases=3, seed=0, spacing=6.0, val_fraction=0.34)
    cache = tmp_path / "eval" / "cache"
    dataset = _stage1_dataset(phantoms, tmp_path / "eval", "validate", [3.0, 3.0, 3.0])
    assert isinstance(dataset, PersistentDataset) and len(dataset) == 1
    first = dataset[0]
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = _stage1_dataset(phantoms, tmp_path / "eval", "validate", [3.0, 3.0, 3.0])[0]
    assert files[0].stat().st_mtime_ns == stamp  # read, not written again
    assert torch.equal(torch.as_tensor(first["t1"]), torch.as_tensor(again["t1"]))
    assert again["t1"].affine is not None  # MetaTensor kept: affine and applied operations
    other = _stage1_dataset(phantoms, tmp_path / "eval", "validate", [4.0, 4.0, 4.0])[0]
    assert len(list(cache.glob("*.pt"))) == 2  # another voxel size: another file, never the stale one
    assert other["t1"].shape != first["t1"].shape


def test_fill_disk_cache_preprocesses_every_case_before_training(tmp_path: Path) -> None:
    phantoms = tmp_path / "phantoms"
    make_phantom_dataset(phantoms, num_cases=4, seed=0, spacing=6.0, val_fraction=0.25)
    dataset = _stage1_dataset(phantoms, tmp_path / "eval", "train", [6.0, 6.0, 6.0])
    assert len(dataset) >= 2 and not list((tmp_path / "eval" / "cache").glob("*.pt"))
    fill_disk_cache(dataset, num_workers=0)
    assert len(list((tmp_path / "eval" / "cache").glob("*.pt"))) == len(dataset)
    fill_disk_cache([{"t1": "not a PersistentDataset: left alone"}])
