"""Stage-2 engine pieces: token cache, training conditions, synthesis metrics, inference datalist, start-up checks."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from prod9_ext import (
    AutoencoderFSQ,
    AutoencoderInferenceWrapper,
    MaskGiTScheduler,
    SlidingWindowConfig,
    TransformerDecoder,
)
from prod9_ext.engines import (
    MaskGiTIteration,
    RegionSSIMMetric,
    Stage1Tokenizer,
    TokenAccuracyMetric,
    TokenVoxelCropd,
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


class _OddSizedPreprocessing(_CountingPreprocessing):
    """Images of 11 x 16 x 9 voxels: not whole tokens along two axes (factor 2)."""

    def __call__(self, item: dict) -> dict:
        self.calls += 1
        generator = torch.Generator().manual_seed(len(item["case"]))
        return {key: torch.rand(1, 11, 16, 9, generator=generator) for key in ("t1", "t2")}


def _counting_encoder(tokenizer: Stage1Tokenizer) -> list[int]:
    """Count the tokenizer's ``encode_to_indices`` calls (the encodings of the cache)."""
    calls = [0]
    original = tokenizer.wrapper.encode_to_indices

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    tokenizer.wrapper.encode_to_indices = counted  # type: ignore[method-assign]
    return calls


def test_pretokenize_writes_memory_mapped_voxels_beside_the_tokens_and_reuses_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = [{"case": "A"}, {"case": "BB"}]
    preprocessing, tokenizer = _OddSizedPreprocessing(), _tokenizer("one")
    encodings = _counting_encoder(tokenizer)
    first = pretokenize(cases, preprocessing, tokenizer, ["t1", "t2"], tmp_path)
    assert encodings[0] == 2
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["A.npz", "A.voxels.npy", "BB.npz", "BB.voxels.npy"]
    for entry, case in zip(first, cases, strict=True):
        voxels = entry["voxels"]
        assert isinstance(voxels, np.memmap) and voxels.dtype == np.float16
        assert entry["tokens"].shape == (2, 6, 8, 5) and voxels.shape == (2, 12, 16, 10)  # zero-padded to the grid
        images = _OddSizedPreprocessing()(case)
        expected = np.stack([images[key][0].numpy() for key in ("t1", "t2")]).astype(np.float16)
        np.testing.assert_array_equal(voxels[:, :11, :, :9], expected)
        assert not voxels[:, 11:].any() and not voxels[..., 9:].any()
    with caplog.at_level("INFO", logger="prod9_ext.engines.stage2_training"):
        again = pretokenize(cases, preprocessing, tokenizer, ["t1", "t2"], tmp_path)
    assert encodings[0] == 2 and preprocessing.calls == 2  # nothing encoded or preprocessed again
    assert "0 cases encoded now, 2 reused" in caplog.text
    assert isinstance(again[1]["voxels"], np.memmap)
    np.testing.assert_array_equal(again[1]["voxels"], first[1]["voxels"])
    # A cache from before the voxels: the tokens are kept, the voxels written beside them.
    (folder / "BB.voxels.npy").unlink()
    third = pretokenize(cases, preprocessing, tokenizer, ["t1", "t2"], tmp_path)
    assert encodings[0] == 2 and preprocessing.calls == 3
    np.testing.assert_array_equal(third[1]["voxels"], first[1]["voxels"])


def _coordinates(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``[M, *shape]`` whose value at ``(m, x, y, z)`` is ``m * 10^6 + x * 10^4 + y * 100 + z``."""
    m, x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (m * 10**6 + x * 10**4 + y * 100 + z).astype(dtype)


@pytest.mark.parametrize("memory_mapped", [True, False])
def test_token_voxel_crop_takes_the_same_window_of_both(tmp_path: Path, memory_mapped: bool) -> None:
    """The voxels' crop is the factor-times box of the tokens' crop, at a random place, from a memory map too."""
    factor, roi = 2, (3, 4, 2)
    tokens = _coordinates((2, 6, 8, 5), np.int32)
    voxels = _coordinates((2, 12, 16, 10), np.float32)
    if memory_mapped:
        np.save(tmp_path / "case.voxels.npy", voxels)
        voxels = np.load(tmp_path / "case.voxels.npy", mmap_mode="r")
        assert isinstance(voxels, np.memmap)
    crop = TokenVoxelCropd(roi, factor)
    starts = set()
    for seed in range(12):
        crop.set_random_state(seed)
        out = crop({"tokens": tokens, "voxels": voxels, "case": "A"})
        assert out["case"] == "A"
        assert isinstance(out["tokens"], torch.Tensor) and out["tokens"].shape == (2, *roi)
        assert isinstance(out["voxels"], torch.Tensor) and out["voxels"].dtype == torch.float32
        assert out["voxels"].shape == (2, *(n * factor for n in roi))
        corner = int(out["tokens"][0, 0, 0, 0])
        start = (corner // 10**4, corner // 100 % 100, corner % 100)
        starts.add(start)
        token_box = tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True))
        voxel_box = tuple(slice(s * factor, (s + r) * factor) for s, r in zip(start, roi, strict=True))
        np.testing.assert_array_equal(out["tokens"].numpy(), tokens[(slice(None), *token_box)])
        np.testing.assert_array_equal(out["voxels"].numpy(), np.asarray(voxels)[(slice(None), *voxel_box)])
        assert not np.shares_memory(out["voxels"].numpy(), voxels)  # a copy, never a view of the (read-only) map
    assert len(starts) > 3  # random windows
    with pytest.raises(ValueError, match=r"do not cover tokens \(2, 6, 8, 5\) at factor 2"):
        crop({"tokens": tokens, "voxels": np.zeros((2, 12, 16, 9), np.float32)})
    with pytest.raises(ValueError, match=r"token grid \[6, 8, 5\] is smaller than the crop \[3, 9, 2\]"):
        TokenVoxelCropd((3, 9, 2), factor)({"tokens": tokens, "voxels": voxels})


def test_training_conditions_never_give_the_target_as_a_source() -> None:
    scheduler = MaskGiTScheduler(vocab_size=10, source_drop_prob=0.5)
    iteration = MaskGiTIteration(scheduler, slot_modalities=[0, 1, 2, 3], target_modalities=[2, 3])
    tokens = torch.arange(4)[None, :, None, None, None].expand(64, 4, 2, 2, 2).clone()  # slot i holds token i
    voxels = torch.rand(64, 4, 4, 4, 4)
    generator = torch.Generator().manual_seed(0)
    target_tokens, target, sources, source_modalities = iteration.conditions(tokens, voxels, generator)
    assert sources is voxels and source_modalities is not None  # the voxels of every slot, absent ones marked -1
    assert set(target.tolist()) == {2, 3}
    assert torch.equal(target_tokens[:, 0, 0, 0], target)  # the target's own grid
    for row, t in zip(source_modalities, target, strict=True):
        assert int(t) not in row.tolist()
        assert set(row.tolist()) <= {-1, 0, 1, 2, 3}
    subsets = {tuple(row.tolist()) for row in source_modalities}
    assert len(subsets) > 4  # sources dropped at random: many different subsets


def test_the_targets_voxels_in_a_training_batch_cannot_reach_the_logits() -> None:
    """No leak through training: the batch holds every slot's voxels, the target's included; changing the target's
    voxels leaves the logits of the drawn conditions unchanged, changing a source's does not."""
    torch.manual_seed(0)
    model = TransformerDecoder(1, 16, 2, 32, 10, (2, 2, 2), 4, token_dim=4, source_factor=2).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    iteration = MaskGiTIteration(MaskGiTScheduler(vocab_size=10, source_drop_prob=0.0), slot_modalities=[0, 1, 2, 3])
    tokens, voxels = torch.randint(0, 10, (8, 4, 2, 2, 2)), torch.rand(8, 4, 4, 4, 4)

    def logits(batch_voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = iteration.conditions(tokens, batch_voxels, torch.Generator().manual_seed(1))
        target_tokens, target, sources, source_modalities = drawn
        masked = torch.full_like(target_tokens, 10)
        return model(masked, target, sources, source_modalities), target

    reference, target = logits(voxels)
    rows = torch.arange(8)
    changed = voxels.clone()
    changed[rows, target] = torch.rand(8, 4, 4, 4) * 3  # slot i holds modality i
    assert torch.equal(logits(changed)[0], reference)
    source_changed = voxels.clone()
    source_changed[rows, (target + 1) % 4] = changed[rows, target]
    assert not torch.allclose(logits(source_changed)[0], reference, atol=1e-4)


def test_single_slot_has_no_sources_and_bad_targets_are_refused() -> None:
    iteration = MaskGiTIteration(MaskGiTScheduler(vocab_size=10), slot_modalities=[0])
    tokens, voxels = torch.zeros(3, 1, 2, 2, 2, dtype=torch.long), torch.zeros(3, 1, 4, 4, 4)
    _, target, sources, source_modalities = iteration.conditions(tokens, voxels)
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
