"""`val_num_cases`: training validates on a fixed subset of the validation cases; evaluate.json scores all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import AUTOENCODER_BUNDLE, TRANSFORMER_BUNDLE
from monai.bundle import ConfigParser


def _validation_cases(bundle: Path, configs: list[str], dataset_dir: Path, **overrides: object) -> list[str]:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in configs])
    parser.update({"dataset_dir": str(dataset_dir), **overrides})
    parser.get_parsed_content("imports")
    return [case["case"] for case in parser.get_parsed_content("validate#dataset#data")]


@pytest.fixture(scope="module")
def three_validation_cases(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom set with its four training cases' first three listed as validation cases too."""
    root = tmp_path_factory.mktemp("three_validation")
    listing = json.loads((phantom_dir / "dataset.json").read_text())
    for case in listing["training"] + listing["validation"] + listing.get("test", []):
        (root / case["case"]).symlink_to(phantom_dir / case["case"])
    listing["validation"] = listing["training"][:3]
    (root / "dataset.json").write_text(json.dumps(listing))
    return root


@pytest.mark.parametrize("bundle", [AUTOENCODER_BUNDLE, TRANSFORMER_BUNDLE], ids=lambda b: b.name)
def test_training_validates_on_the_first_cases_and_evaluation_on_all(
    bundle: Path, three_validation_cases: Path
) -> None:
    every = _validation_cases(bundle, ["train.json"], three_validation_cases)
    assert every == ["Phantom_00000", "Phantom_00001", "Phantom_00002"]
    assert _validation_cases(bundle, ["train.json"], three_validation_cases, val_num_cases=2) == every[:2]
    scored = _validation_cases(bundle, ["train.json", "evaluate.json"], three_validation_cases, val_num_cases=2)
    assert scored == every


@pytest.mark.parametrize("bundle", [AUTOENCODER_BUNDLE, TRANSFORMER_BUNDLE], ids=lambda b: b.name)
def test_a_negative_subset_is_refused_at_start_up(bundle: Path, phantom_dir: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"dataset_dir": str(phantom_dir), "val_num_cases": -1})
    parser.get_parsed_content("imports")
    checks = [item for item in parser["startup"] if "val_num_cases" in str(item)]
    assert len(checks) == 1
    with pytest.raises(RuntimeError) as failure:  # MONAI's wrapper of the check's ValueError
        parser.get_parsed_content(f"startup#{parser['startup'].index(checks[0])}")
    assert "val_num_cases must be an integer >= 0, got -1." in str(failure.value.__cause__)
