"""configs/inference.json through its real command line: reconstructions on the input's grid, token grids, inputs."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import AUTOENCODER_BUNDLE, TINY_AUTOENCODER, run_bundle
from monai.bundle import ConfigWorkflow
from scipy.spatial.transform import Rotation

SHAPE = (37, 45, 29)
SPACING = (2.5, 3.0, 3.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, phantom_dir: Path) -> Path:
    """``model.pt`` from one epoch of tiny training (validation after it saves the model)."""
    out = tmp_path_factory.mktemp("autoencoder_for_inference")
    run_bundle(
        AUTOENCODER_BUNDLE,
        ["train.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(out / "models"),
        "--output_dir", str(out / "eval"),
        "--dataset_dir", str(phantom_dir),
        "--max_epochs", "1",
        "--val_interval", "1",
    )  # fmt: skip
    assert (out / "models" / "model.pt").is_file()
    return out / "models"


def _oblique_affine() -> np.ndarray:
    """Rotated, anisotropic, LPS-like voxel-to-world matrix with an offset."""
    rotation = Rotation.from_euler("xyz", [20.0, -15.0, 30.0], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation @ np.diag(SPACING)
    affine[:3, 3] = [40.0, -60.0, 10.0]
    return affine


def _write_volume(path: Path, seed: int = 0) -> nib.Nifti1Image:
    """An ellipsoid 'head' with texture, zero outside, on an odd grid with an oblique affine."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    texture = np.random.default_rng(seed).random(SHAPE)
    data = np.where(inside, 100.0 + 50.0 * texture, 0.0).astype(np.float32)
    image = nib.Nifti1Image(data, _oblique_affine())
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return image


def _infer(models: Path, output_dir: Path, input_files: str, *extra: str) -> subprocess.CompletedProcess:
    return run_bundle(
        AUTOENCODER_BUNDLE,
        ["inference.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(models),
        "--output_dir", str(output_dir),
        "--input_files", input_files,
        *extra,
    )  # fmt: skip


def test_reconstruction_has_the_input_grid_and_tokens_are_written(models: Path, tmp_path: Path) -> None:
    source = _write_volume(tmp_path / "in" / "oblique_case.nii.gz")
    out = tmp_path / "out"
    _infer(models, out, f"['{tmp_path / 'in' / 'oblique_case.nii.gz'}']", "--save_tokens", "true")

    recon = nib.load(out / "oblique_case_recon.nii.gz")
    assert recon.shape == SHAPE
    assert np.allclose(recon.affine, source.affine, atol=1e-4)
    assert nib.aff2axcodes(recon.affine) == nib.aff2axcodes(source.affine) == ("L", "P", "S")
    assert np.allclose(recon.header.get_zooms(), SPACING)
    assert int(recon.header["sform_code"]) > 0 and int(recon.header["qform_code"]) > 0
    values = np.asarray(recon.dataobj)
    assert np.isfinite(values).all() and values.std() > 0
    corners = values[np.ix_(*([0, n - 1] for n in SHAPE))]
    assert np.all(corners == 0)  # outside the foreground box the inverted crop pads with zeros

    tokens = np.load(out / "oblique_case_tokens.npz")
    # the 3 mm, RAS-reoriented, foreground-cropped image that was tokenized
    spatial = tuple(int(s) for s in tokens["spatial_shape"])
    assert tuple(tokens["grid_shape"]) == tokens["indices"].shape == tuple(math.ceil(s / 4) for s in spatial)
    assert tokens["indices"].dtype in (np.int16, np.int32)
    assert tokens["indices"].min() >= 0 and tokens["indices"].max() < 1000
    assert list(tokens["fsq_levels"]) == [8, 5, 5, 5]
    assert int(tokens["downsampling_factor"]) == 4
    assert list(tokens["roi_size"]) == [32, 32, 32]
    affine = tokens["affine"]
    assert affine.shape == (4, 4)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 3.0)  # --pixdim 3 mm
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert str(tokens["source_file"]).endswith("oblique_case.nii.gz")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_glob_input_without_tokens(models: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        _write_volume(tmp_path / "in" / f"{name}.nii.gz", seed=ord(name))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    _infer(models, out, str(tmp_path / "in" / "*.nii.gz"), "--save_tokens", "false")
    assert sorted(p.name for p in out.iterdir()) == ["a_recon.nii.gz", "b_recon.nii.gz", "run_record_inference.json"]


def test_missing_input_file_fails_naming_it(models: Path, tmp_path: Path) -> None:
    present = tmp_path / "present.nii.gz"
    _write_volume(present)
    missing = tmp_path / "missing_case.nii.gz"
    result = run_bundle(
        AUTOENCODER_BUNDLE,
        ["inference.json"],
        *TINY_AUTOENCODER,
        "--ckpt_dir", str(models),
        "--output_dir", str(tmp_path / "out"),
        "--input_files", f"['{present}','{missing}']",
        expect_failure=True,
    )  # fmt: skip
    assert f"no such file: {missing}" in result.stderr
    assert not (tmp_path / "out").exists()  # failed before any volume was written


def test_inference_properties(models: Path, tmp_path: Path) -> None:
    _write_volume(tmp_path / "case.nii.gz")
    workflow = ConfigWorkflow(
        config_file=str(AUTOENCODER_BUNDLE / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(AUTOENCODER_BUNDLE),
        ckpt_dir=str(models),
        output_dir=str(tmp_path / "out"),
        input_files=str(tmp_path / "case.nii.gz"),
        num_workers=0,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
