"""The BraSyn segmenter's pieces: BraTS regions, Dice conventions, windowed segmentation, its checkpoint."""

from __future__ import annotations

import pytest
import torch

from prod9_ext.engines import (
    BRATS_REGIONS,
    brats_regions,
    build_segmenter,
    load_segmenter,
    region_dice,
    save_segmenter,
    segment,
)


def _labels(enhancing: int = 4) -> torch.Tensor:
    """``[1, 1, 8, 8, 8]``: a necrotic core (1) inside an enhancing rim (``enhancing``) inside oedema (2)."""
    seg = torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
    seg[..., 1:7, 1:7, 1:7] = 2
    seg[..., 2:6, 2:6, 2:6] = enhancing
    seg[..., 3:5, 3:5, 3:5] = 1
    return seg


def test_regions_follow_brats_and_the_2023_enhancing_label_counts_as_2021s() -> None:
    regions = brats_regions(_labels())
    assert BRATS_REGIONS == ("TC", "WT", "ET") and regions.shape == (1, 3, 8, 8, 8)
    assert [int(regions[0, k].sum()) for k in range(3)] == [4**3, 6**3, 4**3 - 2**3]
    assert torch.equal(brats_regions(_labels(enhancing=3)), regions)


def test_dice_is_one_when_exact_and_follows_brats_for_empty_regions() -> None:
    seg = _labels()
    assert region_dice(brats_regions(seg), seg) == {"TC": 1.0, "WT": 1.0, "ET": 1.0}
    no_enhancing = seg.clone()
    no_enhancing[no_enhancing == 4] = 1
    empty_both = region_dice(brats_regions(no_enhancing), no_enhancing)
    assert empty_both["ET"] == 1.0  # absent from labels and prediction
    missed = region_dice(brats_regions(seg), no_enhancing)
    assert missed["ET"] == 0.0 and missed["WT"] == 1.0  # predicted where the labels have none
    half = brats_regions(seg).clone()
    half[:, 1, :4] = False  # half the whole tumour
    assert region_dice(half, seg)["WT"] == pytest.approx(2 * 0.5 / 1.5)


def test_segment_covers_any_size_in_windows_and_the_checkpoint_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    network = build_segmenter(init_filters=8)
    image = torch.rand(1, 4, 20, 28, 12)
    regions = segment(network, image, roi_size=(16, 16, 16))
    assert regions.shape == (1, 3, 20, 28, 12) and regions.dtype == torch.bool
    path = tmp_path / "segmenter.pt"
    save_segmenter(network, path, {"init_filters": 8, "roi_size": [16, 16, 16], "pixdim": [3.0, 3.0, 3.0]})
    loaded, settings = load_segmenter(path)
    assert settings["roi_size"] == [16, 16, 16]
    assert torch.equal(segment(loaded, image, roi_size=(16, 16, 16)), regions)


def test_a_missing_or_foreign_segmenter_checkpoint_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"segmenter checkpoint .*missing\.pt: no such file; train it with"):
        load_segmenter(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="not a file written by save_segmenter"):
        load_segmenter(other)


def test_a_width_the_group_norm_cannot_split_is_refused() -> None:
    with pytest.raises(ValueError, match="init_filters must be a positive multiple of 8"):
        build_segmenter(init_filters=4)
