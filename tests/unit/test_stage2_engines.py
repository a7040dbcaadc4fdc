"""Stage-2 engine pieces: token cache, training conditions, synthesis metrics, inference datalist, start-up checks."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_ext import AutoencoderFSQ, AutoencoderInferenceWrapper, MaskGiTScheduler, SlidingWindowConfig
from prod9_ext.engines import (
    MaskGiTIteration,
    RegionSSIMMetric,
    Stage1Tokenizer,
    TokenAccuracyMetric,
    check_stage2_setup,
    load_network_weights,
    modality_ids,
    pretokenize,
    synthesis_datalist,
)


def _tokenizer(fingerprint: str = "abc") -> Stage1Tokenizer:
    autoencoder = AutoencoderFSQ(
        num_channels=(8, 8), num_res_blocks=(1, 1), norm_num_groups=4, attention_levels=(False, False)
    ).eval()
    wrapper = AutoencoderInferenceWrapper(autoencoder, SlidingWindowConfig(roi_size=(16, 16, 16), overlap=0.0))
    return Stage1Tokenizer(wrapper, autoencoder.codebook_size, 2, fingerprint, "weights.pt", [1.0, 1.0, 1.0])


class _CountingPreprocessing:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item: dict) -> dict:
        self.calls += 1
        generator = torch.Generator().manual_seed(len(item["case"]))
        return {key: torch.rand(1, 12, 16, 10, generator=generator) for key in ("t1", "t2")}


def test_pretokenize_caches_and_invalidates_on_a_new_tokenizer(tmp_path: Path) -> None:
    cases = [{"case": "A"}, {"case": "BB"}]
    preprocessing = _CountingPreprocessing()
    first = pretokenize(cases, preprocessing, _tokenizer("one"), ["t1", "t2"], tmp_path, {"pixdim": [3, 3, 3]})
    assert preprocessing.calls == 2
    assert [e["case"] for e in first] == ["A", "BB"]
    assert first[0]["tokens"].shape == (2, 6, 8, 5) and first[0]["tokens"].dtype == np.int16
    again = pretokenize(cases, preprocessing, _tokenizer("one"), ["t1", "t2"], tmp_path, {"pixdim": [3, 3, 3]})
    assert preprocessing.calls == 2  # read from the cache
    np.testing.assert_array_equal(again[1]["tokens"], first[1]["tokens"])
    pretokenize(cases, preprocessing, _tokenizer("two"), ["t1", "t2"], tmp_path, {"pixdim": [3, 3, 3]})
    assert preprocessing.calls == 4  # another stage-1 model: encoded again, in its own folder
    pretokenize(cases, preprocessing, _tokenizer("two"), ["t1", "t2"], tmp_path, {"pixdim": [2, 2, 2]})
    assert preprocessing.calls == 6  # other tokenizing settings: encoded again
    assert len(list(tmp_path.iterdir())) == 3


def test_training_conditions_never_give_the_target_as_a_source() -> None:
    scheduler = MaskGiTScheduler(vocab_size=10, source_drop_prob=0.5)
    iteration = MaskGiTIteration(scheduler, slot_modalities=[0, 1, 2, 3], target_modalities=[2, 3])
    tokens = torch.arange(4)[None, :, None, None, None].expand(64, 4, 2, 2, 2).clone()  # slot i holds token i
    generator = torch.Generator().manual_seed(0)
    target_tokens, target, sources, source_modalities = iteration.conditions(tokens, generator)
    assert sources is not None and source_modalities is not None
    assert set(target.tolist()) == {2, 3}
    assert torch.equal(target_tokens[:, 0, 0, 0], target)  # the target's own grid
    for row, t in zip(source_modalities, target, strict=True):
        assert int(t) not in row.tolist()
        assert set(row.tolist()) <= {-1, 0, 1, 2, 3}
    subsets = {tuple(row.tolist()) for row in source_modalities}
    assert len(subsets) > 4  # sources dropped at random: many different subsets


def test_single_slot_has_no_sources_and_bad_targets_are_refused() -> None:
    iteration = MaskGiTIteration(MaskGiTScheduler(vocab_size=10), slot_modalities=[0])
    _, target, sources, source_modalities = iteration.conditions(torch.zeros(3, 1, 2, 2, 2, dtype=torch.long))
    assert sources is None and source_modalities is None and target.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="target_modalities"):
        MaskGiTIteration(MaskGiTScheduler(vocab_size=10), slot_modalities=[0, 2], target_modalities=[3])
    assert modality_ids("brats", ["t2", "flair"]) == [2, 3]
    assert modality_ids("medmnist3d", ["image"]) == [0]
    with pytest.raises(ValueError, match="pd"):
        modality_ids("brats", ["pd"])


def test_region_ssim_and_token_accuracy() -> None:
    image = torch.rand(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(image)
    mask[..., 5:15, 5:15, 5:15] = 1
    metric = RegionSSIMMetric(win_size=7)
    assert metric(image, torch.cat([image, mask], dim=1)).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (image + 0.3 * torch.randn_like(image)).clamp(0, 1)
    assert metric(noisy, torch.cat([image, mask], dim=1)).item() < 0.9
    assert math.isnan(metric(image, torch.cat([image, torch.zeros_like(mask)], dim=1)).item())
    assert metric.aggregate().item() == pytest.approx((1.0 + metric.get_buffer()[1].item()) / 2)  # NaN left out
    accuracy = TokenAccuracyMetric()
    grid = torch.randint(0, 5, (1, 4, 4, 4))
    changed = grid.clone()
    changed[0, 0, 0, :2] = (grid[0, 0, 0, :2] + 1) % 5
    assert accuracy(changed, grid).item() == pytest.approx(62 / 64)


def _write_case(folder: Path, modalities: list[str]) -> None:
    folder.mkdir(parents=True)
    for modality in modalities:
        image = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.float32), np.eye(4))
        nib.save(image, folder / f"{folder.name}_{modality}.nii.gz")


def test_synthesis_datalist(tmp_path: Path) -> None:
    _write_case(tmp_path / "P1", ["t1", "t2"])
    _write_case(tmp_path / "P2", ["t1"])
    cases = synthesis_datalist(str(tmp_path / "P*"), ["t1"])
    assert [c["case"] for c in cases] == ["P1", "P2"] and "t2" in cases[0] and "t2" not in cases[1]
    given = synthesis_datalist([{"t1": str(tmp_path / "P2" / "P2_t1.nii.gz")}], ["t1"])
    assert given[0]["case"] == "P2"
    with pytest.raises(FileNotFoundError, match="case P2 has no t2"):
        synthesis_datalist([str(tmp_path / "P1"), str(tmp_path / "P2")], ["t1", "t2"])
    with pytest.raises(FileNotFoundError, match="no case folder or NIfTI file matches"):
        synthesis_datalist(str(tmp_path / "Q*"), ["t1"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "P1_flair_synth.nii.gz").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite true"):
        synthesis_datalist(str(tmp_path / "P*"), ["t1"], out, "flair")
    assert len(synthesis_datalist(str(tmp_path / "P*"), ["t1"], out, "flair", overwrite=True)) == 2


def test_synthesis_datalist_of_nifti_files(tmp_path: Path) -> None:
    """One source modality: a file, a glob or a list of files are cases named after the file, as stage 1 names them."""
    _write_case(tmp_path / "P1", ["t1", "t2"])
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("patient1_t1.nii.gz", "patient2-t1n.nii", "scan.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.float32), np.eye(4)), loose / name)
    (loose / "notes.txt").write_text("ignored")
    single = synthesis_datalist(str(loose / "patient1_t1.nii.gz"), ["t1"])
    assert single == [{"case": "patient1", "t1": str(loose / "patient1_t1.nii.gz")}]
    assert [c["case"] for c in synthesis_datalist(str(loose / "*"), ["t1"])] == ["patient1", "patient2", "scan"]
    listed = synthesis_datalist([str(loose / "scan.nii.gz"), str(tmp_path / "P1")], ["t1"])
    assert [c["case"] for c in listed] == ["scan", "P1"]
    given = synthesis_datalist(
        [{"t1": str(tmp_path / "P1" / "P1_t1.nii.gz")}, {"t1": str(loose / "scan.nii.gz")}], ["t1"]
    )
    assert [c["case"] for c in given] == ["P1", "scan"]  # a dict is named after its source file, not its folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "patient1_t2_synth.nii.gz").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"patient1_t2_synth\.nii\.gz exists"):
        synthesis_datalist(str(loose / "patient1_t1.nii.gz"), ["t1"], out, "t2")
    with pytest.raises(ValueError, match=r"patient1_t1.nii.gz is one image but source_modalities \['t1', 't2'\]"):
        synthesis_datalist(str(loose / "patient1_t1.nii.gz"), ["t1", "t2"])
    with pytest.raises(FileNotFoundError, match=r"no such case folder or NIfTI file .*missing_t1\.nii\.gz"):
        synthesis_datalist([str(loose / "missing_t1.nii.gz")], ["t1"])
    with pytest.raises(ValueError, match="two cases are named 'scan'"):
        synthesis_datalist([str(loose / "scan.nii.gz"), {"t1": str(loose / "scan.nii.gz")}], ["t1"])
    (loose / "broken_t1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"broken_t1\.nii\.gz"):
        synthesis_datalist(str(loose / "broken_t1.nii.gz"), ["t1"])


def test_start_up_checks_name_the_key() -> None:
    tokenizer = _tokenizer()
    check_stage2_setup(tokenizer, 1000, [8, 8, 4], [16, 16, 8], ["t1", "t2"])
    with pytest.raises(ValueError, match="vocab_size 512"):
        check_stage2_setup(tokenizer, 512, [8, 8, 4], [16, 16, 8], ["t1"])
    with pytest.raises(ValueError, match="multiple of the stage-1 downsampling factor 2"):
        check_stage2_setup(tokenizer, 1000, [8, 8, 4], [16, 15, 8], ["t1"])
    with pytest.raises(ValueError, match="latent_shape"):
        check_stage2_setup(tokenizer, 1000, [8, 8, 8], [16, 16, 8], ["t1"])
    with pytest.raises(ValueError, match="modalities"):
        check_stage2_setup(tokenizer, 1000, [8, 8, 4], [16, 16, 8], ["t1", "dwi"])


def test_load_network_weights_errors_name_the_file(tmp_path: Path) -> None:
    network = torch.nn.Linear(2, 1)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_network_weights(tmp_path / "missing.pt", network)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable PyTorch checkpoint"):
        load_network_weights(truncated, network)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}}, wrapped)
    assert torch.equal(load_network_weights(wrapped, network).weight, torch.ones(1, 2))
