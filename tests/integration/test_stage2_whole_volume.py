"""Stage-2 inference covers the whole brain whatever the ROI, and takes NIfTI files as stage 1's inference does.

The MNI152 2009 T1 at 1 mm (a brain 155 mm tall) through the tiny models' 48 x 64 x 48 ROI at 3 mm (144 mm tall),
with untrained networks (only the geometry is under test): every brain voxel of the input must come out synthesised,
on the input's grid, whether stage 1's decoder or the source-aware decoder (an untrained one: it decodes as stage 1,
window by window with the sources' voxels) makes the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from prod9_ext.source_decoder import SourceAwareDecoder, save_source_decoder
from tests.integration.conftest import (
    TINY_AUTOENCODER_SETTINGS,
    TINY_TRANSFORMER,
    TRANSFORMER_BUNDLE,
    run_bundle,
    tiny_autoencoder,
)
from tests.unit.test_synthesis_windows import decode_to_a_constant

NETWORK_AND_ROI = TINY_TRANSFORMER[:10]  # the network and ROI; inference has no batch size or warm-up


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Untrained tiny stage-1 and stage-2 weights written as the bundles would; the overrides that use them."""
    root = tmp_path_factory.mktemp("untrained")
    config = root / "tiny_autoencoder.json"
    config.write_text(json.dumps(TINY_AUTOENCODER_SETTINGS))
    torch.manual_seed(0)
    torch.save(decode_to_a_constant(tiny_autoencoder()).state_dict(), root / "autoencoder.pt")
    overrides = {
        "autoencoder_config": ["train.json", str(config)],
        "autoencoder_weights": str(root / "autoencoder.pt"),
        "device": "$torch.device('cpu')",
        **{
            key.lstrip("-"): json.loads(value)
            for key, value in zip(NETWORK_AND_ROI[::2], NETWORK_AND_ROI[1::2], strict=True)
        },
    }
    parser = ConfigParser()
    parser.read_config(str(TRANSFORMER_BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(TRANSFORMER_BUNDLE), **overrides})
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    tokenizer = parser.get_parsed_content("tokenizer")
    decoder = SourceAwareDecoder(tokenizer.wrapper.autoencoder, num_modalities=4, channels=parser["decoder_channels"])
    save_source_decoder(decoder, root / "models" / "source_decoder.pt", tokenizer.fingerprint)
    return [
        "--autoencoder_config", json.dumps(overrides["autoencoder_config"]),
        "--autoencoder_weights", overrides["autoencoder_weights"],
        "--ckpt_dir", str(root / "models"),
        "--source_modalities", "['t1']",
        "--target_modality", "t2",
        *NETWORK_AND_ROI,
        "--sampler#steps", "2",
        "--num_workers", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mni_t1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``patient1_t1.nii.gz``: the skull-stripped MNI152 2009 T1 at 1 mm (197 x 233 x 189)."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    t1 = np.where(mask, np.asarray(template.dataobj, dtype=np.int16) + 1, 0).astype(np.int16)
    path = tmp_path_factory.mktemp("inputs") / "patient1_t1.nii.gz"
    nib.save(nib.Nifti1Image(t1, template.affine), path)
    return path


def _assert_whole_brain_on_the_input_grid(output: Path, source: Path) -> None:
    written, original = nib.load(output), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    brain = np.asarray(original.dataobj) > 0
    synthesised = np.asarray(written.dataobj)
    assert np.isfinite(synthesised).all()
    assert (synthesised[brain] != 0).all(), f"{int((synthesised[brain] == 0).sum())} brain voxels left at 0"


def test_mni_brain_is_taller_than_the_roi(mni_t1: Path) -> None:
    """The premise: the brain does not fit the ROI, so a crop to the ROI would cut slices off."""
    image = nib.load(mni_t1)
    rows = np.argwhere(np.asarray(image.dataobj) > 0)
    height_mm = (rows[:, 2].max() - rows[:, 2].min() + 1) * float(image.header.get_zooms()[2])
    roi_height_mm = json.loads(NETWORK_AND_ROI[1])[2] * TINY_AUTOENCODER_SETTINGS["pixdim"][2]
    assert height_mm > roi_height_mm


@pytest.mark.parametrize(
    "use_source_decoder", ["true", pytest.param("false", marks=pytest.mark.slow)]
)  # stage 1's decoder: test_maskgit_bundle's inference runs it (use_source_decoder false) in the default run
def test_one_nifti_file_gives_its_whole_brain_expected_code(
    models: list[str], mni_t1: Path, tmp_path: Path, use_source_decoder: str
) -> None:
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json"],
        *models,
        "--input_files", str(mni_t1),
        "--output_dir", str(tmp_path),
        "--decode_mode", "mean",
        "--use_source_decoder", use_source_decoder,
    )  # fmt: skip
    _assert_whole_brain_on_the_input_grid(tmp_path / "patient1_t2_synth.nii.gz", mni_t1)


@pytest.mark.slow
def test_a_glob_of_nifti_files_gives_whole_brain_samples(models: list[str], mni_t1: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.load(mni_t1), inputs / "patient1_t1.nii.gz")
    nib.save(nib.load(mni_t1), inputs / "patient2_t1.nii")
    (inputs / "notes.txt").write_text("not an image")
    run_bundle(
        TRANSFORMER_BUNDLE,
        ["inference.json"],
        *models,
        "--input_files", str(inputs / "*"),
        "--output_dir", str(tmp_path / "out"),
        "--decode_mode", "sample",
    )  # fmt: skip
    for name, source in (("patient1", "patient1_t1.nii.gz"), ("patient2", "patient2_t1.nii")):
        _assert_whole_brain_on_the_input_grid(tmp_path / "out" / f"{name}_t2_synth.nii.gz", inputs / source)
