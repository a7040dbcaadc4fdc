"""The phantom generator: determinism, MRI-like contrasts, BraTS layout, refusal to overwrite, atomic writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from prod9_ext.data import (
    MODALITIES,
    PHANTOM_COMPARTMENTS,
    PhantomCase,
    generate_phantom_case,
    load_brats_datalist,
    make_phantom_dataset,
)

SPACING = 3.0  # coarse grid (60 x 73 x 60) keeps the tests fast
FILE_KEYS = (*MODALITIES, "seg")


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return generate_phantom_case(0, spacing=SPACING)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root, num_cases=3, seed=7, spacing=SPACING, val_fraction=0.34)
    return root


def _tissue_mask(case: PhantomCase, name: str, fraction: float = 0.9) -> np.ndarray:
    return case.tissue[PHANTOM_COMPARTMENTS.index(name)] > fraction


def _relative_to_white_matter(case: PhantomCase, modality: str, mask: np.ndarray) -> float:
    """Median of ``modality`` in ``mask`` over its median in healthy white matter (removes the gain)."""
    image = case.images[modality].astype(np.float64)
    normal_wm = _tissue_mask(case, "wm") & (case.seg == 0)
    return float(np.median(image[mask]) / np.median(image[normal_wm]))


def test_case_arrays(case: PhantomCase) -> None:
    assert set(case.images) == set(MODALITIES)
    for image in case.images.values():
        assert image.shape == (60, 73, 60)
        assert image.dtype == np.int16
    assert case.seg.shape == (60, 73, 60) and case.seg.dtype == np.uint8
    assert case.tissue.shape == (len(PHANTOM_COMPARTMENTS), 60, 73, 60)
    np.testing.assert_allclose(np.diag(case.affine), [SPACING, SPACING, SPACING, 1.0])


def test_default_grid_is_2mm_90x110x90() -> None:
    case = generate_phantom_case(1)
    assert case.seg.shape == (90, 110, 90)
    np.testing.assert_allclose(np.diag(case.affine)[:3], 2.0)


def test_labels_are_brats_labels_inside_the_brain(case: PhantomCase) -> None:
    assert set(np.unique(case.seg).tolist()) == {0, 1, 2, 4}
    assert np.all(case.images["t1"][case.seg > 0] > 0)


def test_intensities_look_like_a_scanner(case: PhantomCase) -> None:
    for modality, image in case.images.items():
        brain = image[image > 0]
        assert np.median(brain) > 100, modality
        assert brain.max() > 500, modality
    outside = case.tissue.sum(0) < 0.01
    assert np.all(case.images["t1"][outside] == 0)  # skull-stripped


def test_same_seed_same_case_and_other_seed_other_brain(case: PhantomCase) -> None:
    again = generate_phantom_case(0, spacing=SPACING)
    other = generate_phantom_case(1, spacing=SPACING)
    for modality in MODALITIES:
        np.testing.assert_array_equal(case.images[modality], again.images[modality])
    np.testing.assert_array_equal(case.seg, again.seg)
    assert not np.array_equal(case.tissue[2], other.tissue[2])


def test_t1_and_t2_are_anticorrelated_in_the_brain(case: PhantomCase) -> None:
    brain = (case.images["t1"] > 0) & (case.seg == 0)
    correlation = np.corrcoef(case.images["t1"][brain], case.images["t2"][brain])[0, 1]
    assert correlation < -0.3


def test_tissue_order_per_contrast(case: PhantomCase) -> None:
    csf, gm = _tissue_mask(case, "csf"), _tissue_mask(case, "gm") & (case.seg == 0)
    t1 = [_relative_to_white_matter(case, "t1", mask) for mask in (gm, csf)]
    t2 = [_relative_to_white_matter(case, "t2", mask) for mask in (gm, csf)]
    assert 1.0 > t1[0] > t1[1]  # T1: WM > GM > CSF
    assert 1.0 < t2[0] < t2[1]  # T2: WM < GM < CSF


def test_flair_suppresses_csf(case: PhantomCase) -> None:
    csf = _tissue_mask(case, "csf")
    assert _relative_to_white_matter(case, "flair", csf) < 0.5
    assert _relative_to_white_matter(case, "t2", csf) > 1.5


def test_oedema_is_bright_in_t2_and_flair(case: PhantomCase) -> None:
    oedema = (case.seg == 2) & _tissue_mask(case, "oedema", 0.8)
    assert _relative_to_white_matter(case, "t2", oedema) > 1.3
    assert _relative_to_white_matter(case, "flair", oedema) > 1.3


def test_enhancing_rim_brighter_in_t1ce_than_t1(case: PhantomCase) -> None:
    enhancing = case.seg == 4
    t1ce = _relative_to_white_matter(case, "t1ce", enhancing)
    assert t1ce > 1.1
    assert t1ce > 1.5 * _relative_to_white_matter(case, "t1", enhancing)


def test_generate_rejects_bad_spacing() -> None:
    with pytest.raises(ValueError, match="spacing"):
        generate_phantom_case(0, spacing=0.0)


def test_dataset_layout_and_datalist(dataset_dir: Path) -> None:
    datalist = json.loads((dataset_dir / "dataset.json").read_text())
    assert [e["case"] for e in datalist["training"]] == ["Phantom_00000", "Phantom_00001"]
    assert [e["case"] for e in datalist["validation"]] == ["Phantom_00002"]
    for entry in datalist["training"] + datalist["validation"]:
        name = entry["case"]
        for key in FILE_KEYS:
            assert entry[key] == f"{name}/{name}_{key}.nii.gz"
            assert (dataset_dir / entry[key]).is_file()
    assert not [p for p in dataset_dir.rglob(".*")]  # no temporary files left behind


def test_dataset_reads_back_through_load_brats_datalist(dataset_dir: Path) -> None:
    validation = load_brats_datalist(dataset_dir, split="validation")
    assert [e["case"] for e in validation] == ["Phantom_00002"]
    assert set(validation[0]) == {"case", *FILE_KEYS}
    assert Path(validation[0]["flair"]).is_absolute()


def test_same_seed_gives_byte_identical_files(dataset_dir: Path, tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path, num_cases=1, seed=7, spacing=SPACING)
    for key in FILE_KEYS:
        name = f"Phantom_00000/Phantom_00000_{key}.nii.gz"
        assert (tmp_path / name).read_bytes() == (dataset_dir / name).read_bytes()


def test_refuses_a_folder_that_holds_cases(dataset_dir: Path) -> None:
    with pytest.raises(FileExistsError, match=str(dataset_dir)):
        make_phantom_dataset(dataset_dir, num_cases=1, seed=0, spacing=SPACING)


def test_overwrite_replaces_the_phantom_cases(tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path, num_cases=2, seed=0, spacing=SPACING)
    make_phantom_dataset(tmp_path, num_cases=1, seed=1, spacing=SPACING, overwrite=True, val_fraction=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Phantom_00000", "dataset.json"]


def test_overwrite_leaves_other_cases_alone(tmp_path: Path) -> None:
    (tmp_path / "BraTS2021_00000").mkdir()
    (tmp_path / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").touch()
    with pytest.raises(FileExistsError, match="BraTS2021_00000"):
        make_phantom_dataset(tmp_path, num_cases=1, seed=0, spacing=SPACING, overwrite=True)


def test_interrupted_write_leaves_no_partial_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("prod9_ext.data.phantoms.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_phantom_dataset(tmp_path, num_cases=1, seed=0, spacing=SPACING)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_cases": 0}, "num_cases"),
        ({"val_fraction": 1.0}, "val_"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"num_cases": 2, "val_fraction": 0.5, "test_fraction": 0.5}, "no training case"),
    ],
)
def test_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    arguments = {"num_cases": 1, "seed": 0, "spacing": SPACING} | kwargs
    with pytest.raises(ValueError, match=match):
        make_phantom_dataset(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


@pytest.fixture
def fast_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_phantom_dataset without drawing or writing volumes: only dataset.json is real (the split logic)."""
    monkeypatch.setattr("prod9_ext.data.phantoms.generate_phantom_case", lambda *args, **kwargs: None)
    monkeypatch.setattr("prod9_ext.data.phantoms._write_case", lambda root, name, *args, **kwargs: {"case": name})


def _splits(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(("num_cases", "sizes"), [(24, (16, 4, 4)), (5, (3, 1, 1)), (10, (6, 2, 2))])
def test_default_three_way_split(tmp_path: Path, fast_cases: None, num_cases: int, sizes: tuple) -> None:
    datalist = _splits(make_phantom_dataset(tmp_path, num_cases=num_cases, seed=0))
    names = [[e["case"] for e in datalist[key]] for key in ("training", "validation", "test")]
    assert tuple(len(n) for n in names) == sizes
    assert (datalist["numTraining"], datalist["numValidation"], datalist["numTest"]) == sizes
    assert [n for split in names for n in split] == [f"Phantom_{i:05d}" for i in range(num_cases)]  # disjoint, all
    assert names[2] == [f"Phantom_{i:05d}" for i in range(num_cases - sizes[2], num_cases)]  # the last cases


def test_three_way_split_is_deterministic(tmp_path: Path, fast_cases: None) -> None:
    first = _splits(make_phantom_dataset(tmp_path / "a", num_cases=7, seed=3, val_fraction=0.3, test_fraction=0.3))
    again = _splits(make_phantom_dataset(tmp_path / "b", num_cases=7, seed=3, val_fraction=0.3, test_fraction=0.3))
    assert first == again
    assert (first["numTraining"], first["numValidation"], first["numTest"]) == (3, 2, 2)


def test_no_test_fraction_writes_an_empty_test_list(tmp_path: Path, fast_cases: None) -> None:
    datalist = _splits(make_phantom_dataset(tmp_path, num_cases=5, seed=0, val_fraction=0.2, test_fraction=0.0))
    assert (datalist["numTraining"], datalist["numValidation"], datalist["numTest"]) == (4, 1, 0)
    assert datalist["test"] == []


def test_test_split_reads_back_through_load_brats_datalist(tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path, num_cases=3, seed=7, spacing=SPACING, val_fraction=0.34, test_fraction=0.34)
    assert [e["case"] for e in load_brats_datalist(tmp_path, split="training")] == ["Phantom_00000"]
    assert [e["case"] for e in load_brats_datalist(tmp_path, split="validation")] == ["Phantom_00001"]
    (test,) = load_brats_datalist(tmp_path, split="test")
    assert test["case"] == "Phantom_00002" and set(test) == {"case", *FILE_KEYS}


def test_cli_passes_the_fractions(tmp_path: Path, fast_cases: None) -> None:
    _load_cli().main(str(tmp_path), num_cases=10, val_fraction=0.1, test_fraction=0.3)
    datalist = _splits(tmp_path / "dataset.json")
    assert (datalist["numTraining"], datalist["numValidation"], datalist["numTest"]) == (6, 1, 3)


def _load_cli():
    path = Path(__file__).parents[2] / "scripts" / "make_phantoms.py"
    spec = importlib.util.spec_from_file_location("make_phantoms", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_preview_and_refuses_a_second_run(tmp_path: Path) -> None:
    cli = _load_cli()
    output_dir, preview = tmp_path / "phantoms", tmp_path / "preview.png"
    cli.main(str(output_dir), num_cases=1, seed=0, spacing=SPACING, preview=str(preview))
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as refused:
        cli.main(str(output_dir), num_cases=1, seed=0, spacing=SPACING)
    message = str(refused.value.code)
    assert str(output_dir) in message and "--overwrite" in message and "\n" not in message
