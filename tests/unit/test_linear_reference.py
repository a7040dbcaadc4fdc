"""Stage 1's linear reference: block PCA recovers what lies in its subspace, rounds like FSQ, and scores honestly."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import linear_reference
from linear_reference import BlockPCA, score_block_codes


def _rank_two_volume(seed: int, shape: tuple[int, int, int] = (6, 8, 4)) -> torch.Tensor:
    """A volume ``[1, *shape]`` in [0, 1] whose every 2×2×2 block is ``mean + a·u + b·v`` for fixed u, v."""
    directions = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))).Q * 0.3
    weights = torch.rand(math.prod(n // 2 for n in shape), 2, generator=torch.Generator().manual_seed(seed)) - 0.5
    blocks = (0.5 + weights @ directions.T).double()
    return linear_reference._unblock(blocks, shape, 2)


def _fitted(volumes: list[torch.Tensor], factor: int = 2) -> BlockPCA:
    pca = BlockPCA(factor)
    for volume in volumes:
        pca.update(volume)
    return pca.fit()


def test_blocks_round_trip_with_padding() -> None:
    volume = torch.rand(1, 5, 7, 9)
    blocks = linear_reference._blocks(volume, 2)
    assert blocks.shape == (3 * 4 * 5, 8)
    torch.testing.assert_close(linear_reference._unblock(blocks, (5, 7, 9), 2), volume)


def test_pca_recovers_exactly_the_components_the_data_use() -> None:
    volumes = [_rank_two_volume(seed) for seed in range(3)]
    pca = _fitted(volumes)
    held_out = _rank_two_volume(seed=7)
    torch.testing.assert_close(pca.reconstruct(held_out, (2, None)), held_out, atol=1e-5, rtol=0)
    assert (pca.reconstruct(held_out, (1, None)) - held_out).abs().max() > 1e-2
    # every component kept: the identity, whatever the data (odd shape, padding cropped off)
    noise = torch.rand(1, 5, 7, 3)
    torch.testing.assert_close(pca.reconstruct(noise, (8, None)), noise, atol=1e-5, rtol=0)


def test_rounding_uses_at_most_the_levels_and_converges_to_the_unrounded_code() -> None:
    volumes = [torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    pca = _fitted(volumes)
    coarse = pca.reconstruct(volumes[0], (2, [3, 2]))
    distinct = torch.unique(linear_reference._blocks(coarse, 2).round(decimals=5), dim=0)
    assert 1 < distinct.shape[0] <= 3 * 2
    # fine levels: only the blocks beyond the 0.1/99.9 % quantiles (clipped there) differ noticeably
    fine = pca.reconstruct(volumes[0], (2, [4096, 4096]))
    assert (fine - pca.reconstruct(volumes[0], (2, None))).pow(2).mean() < 1e-5


def test_the_quantile_sample_is_every_stride_th_block(monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = [torch.rand(1, 8, 8, 6, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    monkeypatch.setattr(linear_reference, "SAMPLE_NUMBERS", 8 * 100)  # 100 blocks; the volumes hold 384
    thinned = _fitted(volumes)
    every_block = torch.cat([linear_reference._blocks(v, 2) for v in volumes])
    assert thinned._stride == 4
    torch.testing.assert_close(torch.cat(thinned._sample), every_block[:: thinned._stride])
    monkeypatch.setattr(linear_reference, "SAMPLE_NUMBERS", 1 << 22)
    torch.testing.assert_close(thinned.components.abs(), _fitted(volumes).components.abs())  # exact sums


def test_score_block_codes_ranks_codes_by_what_they_keep() -> None:
    volumes = [_rank_two_volume(seed, shape=(12, 12, 12)) for seed in range(2)]
    calls = []

    def stream():
        calls.append(1)
        yield from volumes

    (psnr_one, ssim_one), (psnr_two, ssim_two), (psnr_rounded, _) = score_block_codes(
        stream, 2, [(1, None), (2, None), (2, [5, 5])]
    )
    assert len(calls) == 2  # one pass to fit, one to score: nothing is held in memory
    assert psnr_two > 60 and ssim_two == pytest.approx(1.0, abs=1e-4)
    assert psnr_one < psnr_rounded < psnr_two and ssim_one < ssim_two


def test_bad_use_fails_with_a_clear_message() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        BlockPCA(2).reconstruct(torch.rand(1, 4, 4, 4), (1, None))
    with pytest.raises(ValueError, match="at least two blocks"):
        BlockPCA(2).fit()
    pca = _fitted([torch.rand(1, 4, 4, 4)])
    with pytest.raises(ValueError, match="levels must give 2 values"):
        pca.reconstruct(torch.rand(1, 4, 4, 4), (2, [5]))
    with pytest.raises(ValueError, match="must keep 0 to 8"):
        pca.reconstruct(torch.rand(1, 4, 4, 4), (9, None))
