"""Whole-brain synthesis scores (prod9_ext.engines.scoring) and the script that applies them (score_synthesis.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from prod9_ext.engines import (
    RegionSSIMMetric,
    brain_mask,
    brasyn_normalise,
    closest_source,
    hfen,
    score_synthesis,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import score_synthesis as script  # noqa: E402

SHAPE = (28, 32, 24)


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    distance = np.sqrt(sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True)))
    return distance < radius


def _textured(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A smooth random texture in about [100, 900] (edges at several scales, as in a brain)."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal(shape), 1.0) + 0.5 * gaussian_filter(rng.standard_normal(shape), 3.0)
    return 500.0 + 400.0 * field / np.abs(field).max()


@pytest.fixture
def case() -> dict[str, np.ndarray]:
    """A real volume (textured brain in a zero background), its brain mask and a tumour inside it."""
    brain = _ball(SHAPE, (14, 16, 12), 10.5)
    tumour = _ball(SHAPE, (12, 17, 12), 3.5)
    real = np.where(brain, _textured(SHAPE, 0), 0.0).astype(np.float32)
    return {"real": real, "brain": brain, "seg": tumour.astype(np.uint8) * 2}


def test_hfen_is_zero_for_identical_volumes_and_rises_with_blur(case: dict[str, np.ndarray]) -> None:
    real = case["real"]
    assert hfen(real, real) == 0.0
    blurred = [hfen(gaussian_filter(real, sigma), real) for sigma in (0.5, 1.0, 2.0, 4.0)]
    assert 0.0 < blurred[0] < blurred[1] < blurred[2] < blurred[3] < 1.0, blurred
    # No edge at all (a flat prediction) is LoG(real) itself: exactly 1.
    assert hfen(np.zeros_like(real), real) == pytest.approx(1.0)
    # Torch tensors are read too, and an edgeless real volume has no reference to divide by.
    assert hfen(torch.from_numpy(real), torch.from_numpy(real)) == 0.0
    assert math.isnan(hfen(real, np.ones_like(real)))


def test_normalisation_clips_to_the_brain_percentiles_and_ignores_affine_intensity_changes(
    case: dict[str, np.ndarray],
) -> None:
    real, brain = case["real"], case["brain"]
    normalised = brasyn_normalise(real, brain)
    assert normalised.min() == 0.0 and normalised.max() == 1.0
    assert np.all(normalised[~brain] == 0.0)
    # 0.5 % of the brain lies below the lower percentile and 0.5 % above the upper one: clipped to 0 and 1.
    assert np.mean(normalised[brain] == 1.0) == pytest.approx(0.005, abs=0.002)
    assert np.mean(normalised[brain] == 0.0) == pytest.approx(0.005, abs=0.002)
    # Another scanner's scale and offset (the background offset too) give the same volume.
    changed = 3.7 * real - 250.0
    np.testing.assert_allclose(brasyn_normalise(changed, brain), normalised, atol=1e-5)
    scores = score_synthesis(changed, real, case["seg"], brain)
    assert scores["psnr"] > 80.0 and scores["hfen"] < 1e-4
    for key in ("ssim", "ssim_tumour", "ssim_non_tumour"):
        assert scores[key] == pytest.approx(1.0, abs=1e-4)


def test_tumour_and_non_tumour_ssim_when_only_the_tumour_differs(case: dict[str, np.ndarray]) -> None:
    real, brain, seg = case["real"], case["brain"], case["seg"]
    tumour = seg > 0
    pred = real.copy()
    # Shuffle the tumour's voxels: the brain's histogram, so both normalisations, stay exactly the same, and the
    # volumes differ inside the tumour only.
    pred[tumour] = np.random.default_rng(1).permutation(real[tumour])
    np.testing.assert_array_equal(brasyn_normalise(pred, brain)[~tumour], brasyn_normalise(real, brain)[~tumour])
    scores = score_synthesis(pred, real, seg, brain)
    assert scores["ssim_tumour"] < 0.5
    # Outside the tumour only the windows that reach into it lose anything.
    assert 0.9 < scores["ssim_non_tumour"] < 1.0
    assert scores["ssim_tumour"] < scores["ssim"] < scores["ssim_non_tumour"]
    # The region means are prod9's RegionSSIMMetric's (same map, same valid positions) on the normalised volumes.
    p, r = (torch.from_numpy(brasyn_normalise(v, brain))[None, None] for v in (pred, real))
    for key, region in (("ssim", brain), ("ssim_tumour", tumour), ("ssim_non_tumour", brain & ~tumour)):
        mask = torch.from_numpy(region.astype(np.float32))[None, None]
        expected = float(RegionSSIMMetric(spatial_dims=3)(p, torch.cat([r, mask], dim=1)))
        assert scores[key] == pytest.approx(expected, abs=1e-6), key
    # PSNR counts the brain's voxels only: the same error over a larger background would not raise it.
    error = np.mean((p - r).numpy()[0, 0][brain].astype(np.float64) ** 2)
    assert scores["psnr"] == pytest.approx(10 * math.log10(1 / error), rel=1e-6)


def test_a_case_without_tumour_has_no_tumour_ssim(case: dict[str, np.ndarray]) -> None:
    scores = score_synthesis(gaussian_filter(case["real"], 1.0), case["real"], np.zeros(SHAPE), case["brain"])
    assert math.isnan(scores["ssim_tumour"])
    assert scores["ssim_non_tumour"] == pytest.approx(scores["ssim"])


def test_bad_inputs_are_refused(case: dict[str, np.ndarray]) -> None:
    real, brain, seg = case["real"], case["brain"], case["seg"]
    with pytest.raises(ValueError, match="differ in shape"):
        score_synthesis(real[:-1], real, seg, brain)
    with pytest.raises(ValueError, match="3D volume"):
        score_synthesis(real[None], real, seg, brain)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        small = (slice(0, 6), slice(None), slice(None))
        score_synthesis(real[small], real[small], seg[small], np.ones_like(brain[small]))
    with pytest.raises(ValueError, match="no brain"):
        brain_mask([np.zeros(SHAPE)])


def test_brain_mask_is_where_any_contrast_is_nonzero() -> None:
    first, second = np.zeros(SHAPE), np.zeros(SHAPE)
    first[:5], second[-3:] = 1.0, -2.0
    mask = brain_mask([first, second])
    assert mask.sum() == (5 + 3) * SHAPE[1] * SHAPE[2] and mask[0].all() and mask[-1].all() and not mask[10].any()


def test_closest_source_is_the_one_nearest_after_normalisation(case: dict[str, np.ndarray]) -> None:
    real, brain = case["real"], case["brain"]
    rescaled = np.where(brain, 0.01 * gaussian_filter(real, 0.7) + 3.0, 0.0)  # far in raw intensity, near in shape
    other = np.where(brain, _textured(SHAPE, 5), 0.0)
    assert closest_source({"t1": other, "t1ce": rescaled}, real, brain) == "t1ce"


# --- scripts/score_synthesis.py on tiny synthetic BraTS folders -------------------------------------------------------

AFFINE = np.array([[-2.0, 0, 0, 60.0], [0, -2.0, 0, 70.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])  # LPS, as BraTS files


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)  # type: ignore[attr-defined]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three test cases in the BraTS 2021 layout: T1ce is an affine copy of T2 (the copy-the-source winner); Case_2
    has no tumour."""
    root = tmp_path / "data"
    brain = _ball(SHAPE, (14, 16, 12), 10.5)
    entries = []
    for index in range(3):
        name = f"Case_{index}"
        t2 = np.where(brain, _textured(SHAPE, 10 * index), 0.0)
        volumes = {
            "t1": np.where(brain, _textured(SHAPE, 10 * index + 1), 0.0),
            "t1ce": np.where(brain, 2.0 * t2 + 30.0, 0.0),
            "t2": t2,
            "flair": np.where(brain, _textured(SHAPE, 10 * index + 2), 0.0),
            "seg": (_ball(SHAPE, (12, 17, 12), 3.5) * (index < 2)).astype(np.uint8),
        }
        entry = {"case": name}
        for key, volume in volumes.items():
            _save(root / name / f"{name}_{key}.nii.gz", volume.astype(np.int16 if key != "seg" else np.uint8))
            entry[key] = f"{name}/{name}_{key}.nii.gz"
        entries.append(entry)
    (root / "dataset.json").write_text(json.dumps({"training": [], "validation": [], "test": entries}))
    return root


def _predictions(dataset: Path, folder: Path, blur: float) -> None:
    """``<case>_t2_synth.nii.gz`` for every case: the real T2 rescaled to [0, 1] and blurred by ``blur`` voxels."""
    for index in range(3):
        real = nib.load(dataset / f"Case_{index}" / f"Case_{index}_t2.nii.gz").get_fdata()  # type: ignore[attr-defined]
        _save(folder / f"Case_{index}_t2_synth.nii.gz", gaussian_filter(real / real.max(), blur).astype(np.float32))


def test_script_scores_every_case_and_writes_the_means(dataset: Path, tmp_path: Path) -> None:
    sharp, blurred = tmp_path / "sharp", tmp_path / "blurred"
    _predictions(dataset, sharp, 0.0)
    _predictions(dataset, blurred, 1.5)
    runs = {}
    for folder in (sharp, blurred):
        output = tmp_path / "scores" / f"{folder.name}.json"
        script.main(str(dataset), str(output), target="t2", pred_dir=str(folder), sources=["t1"])
        runs[folder.name] = json.loads(output.read_text())
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["blurred.json", "sharp.json"]  # no temp file
    result = runs["blurred"]
    assert result["target"] == "t2" and result["sources"] == ["t1"] and result["split"] == "test"
    assert result["method"] == str(blurred.resolve())
    assert list(result["cases"]) == ["Case_0", "Case_1", "Case_2"]
    assert result["cases"]["Case_2"]["ssim_tumour"] is None  # no tumour: no value, left out of the mean
    for key in ("psnr", "ssim", "ssim_non_tumour", "hfen"):
        assert result["mean"][key] == pytest.approx(np.mean([c[key] for c in result["cases"].values()]))
    assert result["mean"]["ssim_tumour"] == pytest.approx(
        np.mean([result["cases"][c]["ssim_tumour"] for c in ("Case_0", "Case_1")])
    )
    # The rescaled real T2 scores as the real T2 (up to the int16 rounding); blur costs SSIM and raises HFEN.
    assert runs["sharp"]["mean"]["ssim"] > 0.999 and runs["sharp"]["mean"]["hfen"] < 0.01
    assert result["mean"]["ssim"] < 0.9 and result["mean"]["hfen"] > 0.3


def test_script_copy_source_picks_the_closest_source(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "copy.json"
    script.main(str(dataset), str(output), target="t2", copy_source=True)
    result = json.loads(output.read_text())
    assert result["method"] == "copy_source" and result["sources"] == ["t1", "t1ce", "flair"]
    assert {case["source"] for case in result["cases"].values()} == {"t1ce"}
    assert result["mean"]["ssim"] > 0.999
    script.main(str(dataset), str(output), target="t2", copy_source="true", sources=["t1", "flair"])  # as typed
    assert json.loads(output.read_text())["mean"]["ssim"] < 0.5


def test_script_stops_with_one_line_naming_the_prediction_file(dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pred"
    _predictions(dataset, folder, 0.0)
    output = str(tmp_path / "out.json")
    missing = folder / "Case_1_t2_synth.nii.gz"
    volume = nib.load(missing).get_fdata().astype(np.float32)  # type: ignore[attr-defined]
    _save(missing, volume[:, :, :-2])
    with pytest.raises(ValueError, match=r"Case_1_t2_synth.nii.gz: shape \(28, 32, 22\), but the real t2 of case"):
        script.main(str(dataset), output, pred_dir=str(folder))
    _save(missing, volume, np.diag([2.0, 2.0, 2.0, 1.0]))  # RAS: same shape, mirrored grid
    with pytest.raises(
        ValueError, match=r"Case_1_t2_synth.nii.gz: affine .* is not the real t2's .*not on the case's grid"
    ):
        script.main(str(dataset), output, pred_dir=str(folder))
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=r"Case_1_t2_synth.nii.gz: no prediction of case Case_1"):
        script.main(str(dataset), output, pred_dir=str(folder))
    assert not Path(output).exists()
    # From the command line the run ends with that one line, no traceback.
    command = [sys.executable, str(REPO / "scripts" / "score_synthesis.py"), "--dataset_dir", str(dataset)]
    command += ["--output", output, "--pred_dir", str(folder)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]  # after the log lines of the cases scored before
    assert "Traceback" not in run.stderr and last.startswith("prod9 stopped: FileNotFoundError: "), run.stderr
    assert f"{missing}: no prediction of case Case_1" in last


def test_script_refuses_bad_arguments(dataset: Path, tmp_path: Path) -> None:
    output = str(tmp_path / "out.json")
    with pytest.raises(ValueError, match="--pred_dir or --copy_source"):
        script.main(str(dataset), output)
    with pytest.raises(ValueError, match="--pred_dir or --copy_source"):
        script.main(str(dataset), output, pred_dir=str(tmp_path), copy_source=True)
    with pytest.raises(ValueError, match="--pred_dir or --copy_source"):
        script.main(str(dataset), output, copy_source="false")  # the command line's "false" is no copy-the-source
    with pytest.raises(ValueError, match="include the target"):
        script.main(str(dataset), output, copy_source=True, sources=["t2"])
    with pytest.raises(ValueError, match="target"):
        script.main(str(dataset), output, target="pd", copy_source=True)
