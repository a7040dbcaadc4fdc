"""Phantoms in BraTS geometry (240 x 240 x 155, 1 mm, the BraTS affine, int16) and the BraTS 2023 naming."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from prod9_ext.data import MODALITIES, generate_phantom_case, load_brats_datalist, make_phantom_dataset
from prod9_ext.data.phantoms import BRATS_AFFINE, BRATS_SHAPE

SPACING = 4.0  # drawn coarse, written at 1 mm: keeps the tests fast
SUFFIXES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


@pytest.fixture(scope="module")
def brats_2023_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats_2023")
    make_phantom_dataset(root, num_cases=2, seed=3, spacing=SPACING, geometry="brats", naming="2023")
    return root


def test_brats_2023_cases_read_back_with_brats_geometry(brats_2023_dir: Path) -> None:
    cases = load_brats_datalist(brats_2023_dir, split="all")
    assert sorted(c["case"] for c in cases) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    for case in cases:
        name = case["case"]
        for key in (*MODALITIES, "seg"):
            assert Path(case[key]).name == f"{name}-{SUFFIXES_2023[key]}.nii.gz"
            image = nib.load(case[key])
            assert image.shape == BRATS_SHAPE
            assert image.get_data_dtype() == (np.uint8 if key == "seg" else np.int16)
            np.testing.assert_array_equal(image.affine, BRATS_AFFINE)
            assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
            assert image.header.get_zooms() == (1.0, 1.0, 1.0)
        seg = np.asarray(nib.load(case["seg"]).dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg == 3).any()  # BraTS 2023: enhancing tumour is 3
        brain = np.asarray(nib.load(case["t1"]).dataobj) > 0
        assert 0.1 < brain.mean() < 0.3  # a brain, not an empty or full box
    datalist = json.loads((brats_2023_dir / "dataset.json").read_text())
    assert (datalist["geometry"], datalist["naming"], datalist["spacing_mm"]) == ("brats", "2023", 1.0)
    assert datalist["labels"]["3"] == "enhancing tumour" and "4" not in datalist["labels"]


def test_brats_geometry_keeps_left_and_right() -> None:
    """The same case in both geometries puts its tumour at the same place of the brain (no axis flipped)."""
    phantom = generate_phantom_case(0, spacing=SPACING)
    brats = generate_phantom_case(0, spacing=SPACING, geometry="brats")

    def tumour_centre(seg: np.ndarray, affine: np.ndarray) -> np.ndarray:
        return affine[:3, :3] @ np.argwhere(seg > 0).mean(0) + affine[:3, 3]

    def brain_centre(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        voxels = np.argwhere(image > 0)
        return affine[:3, :3] @ ((voxels.min(0) + voxels.max(0)) / 2.0) + affine[:3, 3]

    offsets = [
        tumour_centre(case.seg, case.affine) - brain_centre(case.images["t1"], case.affine) for case in (phantom, brats)
    ]
    assert abs(offsets[0][0]) > 10.0  # a tumour off the midline, so that a left-right flip would show
    np.testing.assert_allclose(offsets[1], 0.85 * offsets[0], atol=8.0)


def test_overwrite_replaces_2023_phantoms_but_not_real_cases(tmp_path: Path) -> None:
    make_phantom_dataset(tmp_path, num_cases=1, seed=0, spacing=8.0, geometry="brats", naming="2023")
    make_phantom_dataset(tmp_path, num_cases=1, seed=1, spacing=8.0, naming="2023", overwrite=True)
    assert nib.load(tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz").shape != BRATS_SHAPE
    real = tmp_path / "real" / "BraTS-GLI-00007-000"
    real.mkdir(parents=True)
    (real / "BraTS-GLI-00007-000-t1n.nii.gz").touch()
    with pytest.raises(FileExistsError, match="BraTS-GLI-00007-000"):
        make_phantom_dataset(real.parent, num_cases=1, seed=0, spacing=8.0, naming="2023", overwrite=True)


@pytest.mark.parametrize(("kwargs", "match"), [({"geometry": "sri24"}, "geometry"), ({"naming": "2020"}, "naming")])
def test_unknown_geometry_or_naming_is_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_phantom_dataset(tmp_path, num_cases=1, **kwargs)


def test_cli_writes_brats_geometry_in_2021_names_with_a_preview(tmp_path: Path) -> None:
    path = Path(__file__).parents[2] / "scripts" / "make_phantoms.py"
    spec = importlib.util.spec_from_file_location("make_phantoms", path)
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    output_dir, preview = tmp_path / "cases", tmp_path / "preview.png"
    cli.main(str(output_dir), num_cases=1, spacing=8.0, geometry="brats", preview=str(preview))
    image = nib.load(output_dir / "Phantom_00000" / "Phantom_00000_flair.nii.gz")
    assert image.shape == BRATS_SHAPE and image.get_data_dtype() == np.int16
    np.testing.assert_array_equal(image.affine, BRATS_AFFINE)
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
