"""`val_num_cases`: training validates on a fixed subset of the validation cases; evaluate.json scores all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import AUTOENCODER_BUNDLE, TINY_AUTOENCODER, TRANSFORMER_BUNDLE, run_bundle
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


def test_a_negative_subset_is_refused_at_start_up(phantom_dir: Path, tmp_path: Path) -> None:
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        "--dataset_dir", str(phantom_dir),
        "--output_dir", str(tmp_path / "eval"),
        "--ckpt_dir", str(tmp_path / "models"),
        "--val_num_cases", "-1",
        expect_failure=True,
    )  # fmt: skip
    assert "val_num_cases must be an integer >= 0, got -1." in result.stdout + result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
