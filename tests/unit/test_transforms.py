"""The one preprocessing: ROI-sized outputs in [0, 1], joint crops, and inversion back to the input grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, Invertd

from prod9_ext.data import (
    MODALITIES,
    ScaleIntensityMaskedPercentilesd,
    brats_transforms,
    load_brats_datalist,
    medmnist_transforms,
)

SHAPE = (37, 41, 29)  # odd, anisotropic
# Permuted and flipped axes, anisotropic voxels, an offset origin: nothing like RAS.
AFFINE = np.array([[0.0, -1.2, 0.0, 30.0], [-0.9, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, -40.0], [0.0, 0.0, 0.0, 1.0]])
GAINS = {"t1": 1.0, "t1ce": 1.3, "t2": 2.0, "flair": 0.7}
ROI = (24, 24, 24)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One BraTS 2023-named case whose four contrasts are the same anatomy at different gains."""
    root = tmp_path_factory.mktemp("brats")
    case_dir = root / "BraTS-GLI-00000-000"
    case_dir.mkdir()
    rng = np.random.default_rng(0)
    anatomy = np.zeros(SHAPE, dtype=np.float32)
    anatomy[4:33, 6:37, 3:26] = rng.uniform(100.0, 1000.0, size=(29, 31, 23))
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[10:20, 12:22, 8:14] = 2
    seg[13:17, 15:19, 10:12] = 4
    suffixes = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f"}
    for key, suffix in suffixes.items():
        nib.save(nib.Nifti1Image(anatomy * GAINS[key], AFFINE), case_dir / f"{case_dir.name}{suffix}.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE), case_dir / f"{case_dir.name}-seg.nii.gz")
    (entry,) = load_brats_datalist(root, split="all")
    return entry


@pytest.mark.parametrize("train", [False, True])
def test_outputs_are_roi_sized_in_unit_range_and_jointly_cropped(case: dict[str, str], train: bool) -> None:
    out = brats_transforms(MODALITIES, roi_size=ROI, pixdim=(2.0, 2.0, 2.0), train=train, seg=True)(case)
    for key in MODALITIES:
        image = out[key]
        assert image.shape == (1, *ROI)
        assert image.dtype == torch.float32
        assert float(image.min()) == 0.0 and float(image.max()) == 1.0
        # Same anatomy at other gains: identical after scaling only if every key got the same crop and flip.
        torch.testing.assert_close(image.as_tensor(), out["t1"].as_tensor())
        np.testing.assert_allclose(image.affine.numpy(), out["t1"].affine.numpy())
    assert set(out["seg"].unique().tolist()) <= {0.0, 2.0, 4.0}
    spacing = np.diag(out["t1"].affine.numpy())[:3]
    np.testing.assert_allclose(np.abs(spacing), 2.0)  # 2 mm
    if not train:  # RAS; a training flip mirrors the first axis, and with it the affine, half of the time
        assert np.all(spacing > 0)


def test_inverse_restores_input_shape_and_affine(case: dict[str, str]) -> None:
    transform = brats_transforms(MODALITIES, roi_size=ROI, pixdim=(2.0, 2.0, 2.0), train=True, seg=True)
    restored = transform.inverse(transform(case))
    for key in (*MODALITIES, "seg"):
        assert restored[key].shape == (1, *SHAPE)
        np.testing.assert_allclose(restored[key].affine.numpy(), AFFINE, atol=1e-5)
    assert set(restored["seg"].unique().tolist()) <= {0.0, 2.0, 4.0}


def test_invertd_maps_a_network_output_back(case: dict[str, str]) -> None:
    transform = brats_transforms(("t1", "t2"), roi_size=ROI, pixdim=(2.0, 2.0, 2.0), train=False)
    out = transform(case)
    out["pred"] = out["t2"] * 0.5  # what a network returns: a MetaTensor carrying the input's trace
    restored = Invertd("pred", transform=transform, orig_keys="t2", nearest_interp=False)(out)
    assert restored["pred"].shape == (1, *SHAPE)
    np.testing.assert_allclose(restored["pred"].affine.numpy(), AFFINE, atol=1e-5)


def test_without_resampling_or_roi(case: dict[str, str]) -> None:
    out = brats_transforms(("flair",), roi_size=None, pixdim=None)(case)
    # Foreground box of the anatomy, in RAS order: file axes (i, j, k) are (-A, -R, +S).
    assert out["flair"].shape == (1, 31, 29, 23)
    np.testing.assert_allclose(np.abs(np.diag(out["flair"].affine.numpy()))[:3], [1.2, 0.9, 2.5])


def test_is_a_bundle_config_target(case: dict[str, str]) -> None:
    config = {"preprocessing": {"_target_": "prod9_ext.data.brats_transforms", "modalities": ["t1"], "roi_size": 16}}
    transform = ConfigParser(config).get_parsed_content("preprocessing")
    assert isinstance(transform, Compose)
    assert transform(case)["t1"].shape == (1, 16, 16, 16)


def test_rejects_no_modalities() -> None:
    with pytest.raises(ValueError, match="modalities"):
        brats_transforms(())


def test_masked_percentile_scaling() -> None:
    ramp = torch.arange(1.0, 1001.0).reshape(1, 10, 10, 10)
    image = torch.cat([torch.zeros(1, 10, 10, 10), ramp], dim=-1)  # half background
    scaled = ScaleIntensityMaskedPercentilesd("image")({"image": image})["image"]
    assert torch.all(scaled[..., :10] == 0.0)
    inside = scaled[..., 10:]
    low, high = np.percentile(np.arange(1.0, 1001.0), [0.5, 99.5])
    torch.testing.assert_close(inside, ((ramp - low) / (high - low)).clamp(0.0, 1.0))


@pytest.mark.parametrize("fill", [0.0, 5.0])
def test_masked_percentile_scaling_of_empty_or_constant_volume(fill: float) -> None:
    scaled = ScaleIntensityMaskedPercentilesd("image")({"image": torch.full((1, 4, 4, 4), fill)})["image"]
    assert torch.all(scaled == 0.0)


def test_masked_percentile_scaling_rejects_bad_percentiles() -> None:
    with pytest.raises(ValueError, match="lower=99"):
        ScaleIntensityMaskedPercentilesd("image", lower=99.0, upper=1.0)


@pytest.mark.parametrize("train", [False, True])
def test_medmnist_transforms(train: bool) -> None:
    item = {"image": np.random.default_rng(0).random((1, 28, 28, 28), dtype=np.float32), "label": 3}
    padded = medmnist_transforms(roi_size=32, train=train)(item)
    assert padded["image"].shape == (1, 32, 32, 32) and padded["label"] == 3
    cropped = medmnist_transforms(roi_size=(16, 16, 16), train=train, flip_axes=(0, 1, 2))(item)
    assert cropped["image"].shape == (1, 16, 16, 16)
    assert medmnist_transforms()(item)["image"].shape == (1, 28, 28, 28)
