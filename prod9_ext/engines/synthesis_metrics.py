"""Synthesis scores MONAI does not have: SSIM inside a region (the tumour, as BraSyn reports it), token accuracy.

Both are ``CumulativeIterationMetric`` subclasses, so MONAI's ``IgniteMetricHandler`` wraps them and
``MetricsSaver`` writes their per-case values like any built-in metric.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.metrics.utils import do_metric_reduction

__all__ = ["RegionSSIMMetric", "TokenAccuracyMetric", "with_region"]


def with_region(region_key: str = "seg") -> Callable[[list[dict]], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``output_transform`` for :class:`RegionSSIMMetric`: ``(pred, [label, region])`` from decollated outputs."""

    def transform(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds = [item["pred"] for item in output]
        references = [torch.cat([item["label"], item[region_key].to(item["label"].dtype)]) for item in output]
        return preds, references

    return transform


class _PerItemMean(CumulativeIterationMetric):
    """One value per item; ``aggregate`` is the mean over items, NaN values left out (MONAI's reduction)."""

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("nothing to aggregate: the metric saw no item")
        return do_metric_reduction(data, "mean")[0]


class RegionSSIMMetric(_PerItemMean):
    """Mean of the SSIM map over a region: ``y`` carries the reference in channel 0 and the region mask in channel 1.

    The SSIM map is MONAI's (``compute_ssim_and_cs``, Gaussian window ``win_size``, valid positions only), averaged
    over the voxels whose mask is nonzero. An item with an empty region scores NaN, which MONAI's mean reduction
    leaves out.

    Args:
        spatial_dims: 2 or 3.
        data_range: intensity range of the images.
        win_size: Gaussian window size.
        kernel_sigma: Gaussian window sigma.
    """

    def __init__(self, spatial_dims: int = 3, data_range: float = 1.0, win_size: int = 7, kernel_sigma: float = 1.5):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.data_range = data_range
        self.win_size = win_size
        self.kernel_sigma = kernel_sigma

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.shape[1] != 2 or y_pred.shape[1] != 1 or y.shape[2:] != y_pred.shape[2:]:
            raise ValueError(f"need y_pred [B, 1, *spatial] and y [B, 2, *spatial], got {y_pred.shape} and {y.shape}")
        reference, mask = y[:, :1].float(), y[:, 1:] > 0
        ssim_map, _ = compute_ssim_and_cs(
            y_pred.float(),
            reference,
            spatial_dims=self.spatial_dims,
            kernel_size=[self.win_size] * self.spatial_dims,
            kernel_sigma=[self.kernel_sigma] * self.spatial_dims,
            data_range=self.data_range,
        )
        half = self.win_size // 2
        inner = (slice(None), slice(None), *[slice(half, n - half) for n in mask.shape[2:]])
        region = mask[inner].to(ssim_map.dtype)
        count = region.flatten(1).sum(1, keepdim=True)
        total = (ssim_map * region).flatten(1).sum(1, keepdim=True)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


class TokenAccuracyMetric(_PerItemMean):
    """Fraction of positions where two token grids ``[B, *grid]`` agree (sampled against the real target's)."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.shape != y.shape:
            raise ValueError(f"token grids differ in shape: {tuple(y_pred.shape)} and {tuple(y.shape)}")
        return (y_pred == y).flatten(1).float().mean(1, keepdim=True)
