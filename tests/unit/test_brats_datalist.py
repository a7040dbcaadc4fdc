"""load_brats_datalist: both BraTS namings, .nii and .nii.gz, splits, folds and every error path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from prod9_ext.data import BRATS_DATA_DIR_ENV, MODALITIES, load_brats_datalist

NAMES_2021 = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}
NAMES_2023 = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}


def make_case(
    root: Path, case: str, names: dict[str, str], extension: str = ".nii.gz", keys=(*MODALITIES, "seg")
) -> Path:
    """An (empty-file) case folder: the datalist only looks at names, never at content."""
    case_dir = root / case
    case_dir.mkdir(parents=True)
    for key in keys:
        (case_dir / f"{case}{names[key]}{extension}").touch()
    return case_dir


def make_dataset(root: Path, num_cases: int) -> list[str]:
    cases = [f"BraTS2021_{i:05d}" for i in range(num_cases)]
    for case in cases:
        make_case(root, case, NAMES_2021)
    return cases


def test_reads_brats2021_names(tmp_path: Path) -> None:
    make_case(tmp_path, "BraTS2021_00000", NAMES_2021)
    (entry,) = load_brats_datalist(tmp_path, split="all")
    assert set(entry) == {"case", *MODALITIES, "seg"}
    assert entry["case"] == "BraTS2021_00000"
    for key, suffix in NAMES_2021.items():
        assert entry[key] == str(tmp_path / "BraTS2021_00000" / f"BraTS2021_00000{suffix}.nii.gz")


def test_reads_brats2023_names_and_plain_nii(tmp_path: Path) -> None:
    make_case(tmp_path, "BraTS-GLI-00000-000", NAMES_2023, extension=".nii")
    (entry,) = load_brats_datalist(tmp_path, split="all")
    for key, suffix in NAMES_2023.items():
        assert entry[key] == str(tmp_path / "BraTS-GLI-00000-000" / f"BraTS-GLI-00000-000{suffix}.nii")


def test_seg_only_where_present(tmp_path: Path) -> None:
    make_case(tmp_path, "BraTS2021_00000", NAMES_2021, keys=MODALITIES)
    (entry,) = load_brats_datalist(tmp_path, split="all")
    assert set(entry) == {"case", *MODALITIES}


def test_dataset_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path, 2)
    monkeypatch.setenv(BRATS_DATA_DIR_ENV, str(tmp_path))
    assert len(load_brats_datalist(split="all")) == 2


def test_no_dataset_dir_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BRATS_DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=BRATS_DATA_DIR_ENV):
        load_brats_datalist()


def test_missing_dataset_dir_names_path_and_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*{BRATS_DATA_DIR_ENV}"):
        load_brats_datalist(missing)


def test_empty_dataset_dir_names_path_and_variable(tmp_path: Path) -> None:
    (tmp_path / "not_a_case").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*{BRATS_DATA_DIR_ENV}"):
        load_brats_datalist(tmp_path)


def test_missing_modality_names_case_and_file(tmp_path: Path) -> None:
    make_dataset(tmp_path, 2)
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"BraTS2021_00001.*BraTS2021_00001_t2\.nii"):
        load_brats_datalist(tmp_path, split="all")


def test_skip_incomplete_warns_and_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_dataset(tmp_path, 2)
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        cases = load_brats_datalist(tmp_path, split="all", skip_incomplete=True)
    assert [c["case"] for c in cases] == ["BraTS2021_00000"]
    assert "BraTS2021_00001_flair" in caplog.text


def test_two_files_for_one_modality(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path, "BraTS2021_00000", NAMES_2021)
    (case_dir / "BraTS2021_00000_t1.nii").touch()
    with pytest.raises(ValueError, match=r"two t1 files"):
        load_brats_datalist(tmp_path)


def test_seeded_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    cases = make_dataset(tmp_path, 10)

    def names(split: str, seed: int) -> list[str]:
        return [c["case"] for c in load_brats_datalist(tmp_path, split=split, val_fraction=0.2, seed=seed)]

    training, validation = names("training", 0), names("validation", 0)
    assert len(validation) == 2
    assert sorted(training + validation) == cases
    assert names("training", 0) == training
    assert names("all", 0) == training + validation
    assert any(names("validation", seed) != validation for seed in range(1, 5))


def test_folds_are_disjoint_and_cover_all_cases(tmp_path: Path) -> None:
    cases = make_dataset(tmp_path, 10)
    validations = []
    for fold in range(3):
        training = load_brats_datalist(tmp_path, split="training", fold=fold, num_folds=3)
        validation = load_brats_datalist(tmp_path, split="validation", fold=fold, num_folds=3)
        assert sorted(c["case"] for c in training + validation) == cases
        validations.append({c["case"] for c in validation})
    assert sorted(len(v) for v in validations) == [3, 3, 4]
    assert set.union(*validations) == set(cases)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "testing"}, "split"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"fold": 0}, "num_folds"),
        ({"fold": 3, "num_folds": 3}, "fold"),
        ({"fold": 0, "num_folds": 1}, "num_folds"),
        ({"fold": 0, "num_folds": 11}, "num_folds"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    make_dataset(tmp_path, 10)
    with pytest.raises(ValueError, match=match):
        load_brats_datalist(tmp_path, **kwargs)


def test_split_from_dataset_json(tmp_path: Path) -> None:
    make_dataset(tmp_path, 4)
    datalist = {
        "training": [{"case": "BraTS2021_00003"}, {"case": "BraTS2021_00001"}],
        "validation": [{"case": "BraTS2021_00000", "t1": "ignored.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    assert [c["case"] for c in load_brats_datalist(tmp_path)] == ["BraTS2021_00003", "BraTS2021_00001"]
    assert [c["case"] for c in load_brats_datalist(tmp_path, split="validation")] == ["BraTS2021_00000"]
    folds = [load_brats_datalist(tmp_path, split="validation", fold=f, num_folds=3) for f in range(3)]
    assert sorted(c["case"] for fold in folds for c in fold) == sorted(f"BraTS2021_0000{i}" for i in (0, 1, 3))


def test_malformed_dataset_json(tmp_path: Path) -> None:
    make_dataset(tmp_path, 1)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "x.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"dataset\.json"):
        load_brats_datalist(tmp_path)


def test_dataset_json_naming_a_missing_case(tmp_path: Path) -> None:
    make_dataset(tmp_path, 1)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"case": "BraTS2021_00009"}]}))
    with pytest.raises(FileNotFoundError, match="BraTS2021_00009"):
        load_brats_datalist(tmp_path)


def _write_datalist(root: Path, training: list[str], validation: list[str], test: list[str] | None) -> Path:
    content: dict = {"training": [{"case": c} for c in training], "validation": [{"case": c} for c in validation]}
    if test is not None:
        content["test"] = [{"case": c} for c in test]
    path = root / "dataset.json"
    path.write_text(json.dumps(content))
    return path


def test_test_split_from_dataset_json_is_held_out_of_every_other_split(tmp_path: Path) -> None:
    cases = make_dataset(tmp_path, 6)
    _write_datalist(tmp_path, cases[:3], cases[3:4], cases[4:])

    def names(split: str, **kwargs) -> list[str]:
        return [c["case"] for c in load_brats_datalist(tmp_path, split=split, **kwargs)]

    assert names("test") == cases[4:]
    assert names("training") == cases[:3] and names("validation") == cases[3:4]
    assert names("all") == cases[:4]  # "all" is training + validation, never the test cases
    for fold in range(2):  # folds cut training + validation only
        assert not set(names("validation", fold=fold, num_folds=2)) & set(cases[4:])
        assert not set(names("training", fold=fold, num_folds=2)) & set(cases[4:])
    assert names("test", fold=0, num_folds=2) == cases[4:]


@pytest.mark.parametrize("test_list", [None, []], ids=["no-test-key", "empty-test-list"])
def test_test_split_without_a_test_list_names_file_and_key(tmp_path: Path, test_list: list | None) -> None:
    cases = make_dataset(tmp_path, 3)
    path = _write_datalist(tmp_path, cases[:2], cases[2:], test_list)
    with pytest.raises(ValueError, match="'test'") as error:
        load_brats_datalist(tmp_path, split="test")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_test_split_without_dataset_json_names_the_file(tmp_path: Path) -> None:
    make_dataset(tmp_path, 3)
    with pytest.raises(ValueError, match="'test'") as error:
        load_brats_datalist(tmp_path, split="test")
    assert str(tmp_path / "dataset.json") in str(error.value) and "\n" not in str(error.value)


def test_test_case_listed_for_training_is_refused(tmp_path: Path) -> None:
    cases = make_dataset(tmp_path, 3)
    _write_datalist(tmp_path, cases[:2], cases[2:], cases[1:2])
    for split in ("training", "test"):
        with pytest.raises(ValueError, match=f"test cases also listed.*{cases[1]}"):
            load_brats_datalist(tmp_path, split=split)
