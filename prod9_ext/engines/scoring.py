"""Whole-brain scores of a synthesised volume against the real one, the same for every method (BraSyn's protocol).

:func:`score_synthesis` is what the quickstart report puts in each row (prod9, the regression peer, copy-the-source),
from volumes on the case's original file grid, all computed over the brain rather than an ROI crop:

- both volumes go through :func:`brasyn_normalise`: each is clipped to its own 0.5 / 99.5 percentiles over the brain
  and scaled to [0, 1], so a method is not judged on its intensity scale (BraSyn 2023/2024); voxels outside the brain
  are set to 0 in both;
- ``psnr``: data range 1, mean squared error over the brain voxels;
- ``ssim``: MONAI's SSIM map (:func:`monai.metrics.regression.compute_ssim_and_cs`, Gaussian window 7, sigma 1.5,
  valid positions only) averaged over the brain, as :class:`~prod9_ext.engines.RegionSSIMMetric` averages it over a
  region; ``ssim_tumour`` over the tumour (``seg > 0``; NaN for a case without one) and ``ssim_non_tumour`` over the
  rest of the brain;
- ``hfen``: :func:`hfen`, the high-frequency error norm: 0 for a perfect edge map, raised by blur.

The brain is :func:`brain_mask`: the voxels where any real contrast of the case is nonzero (skull-stripped data are
zero outside the brain). The union rather than the target alone, so that a dark target voxel that happens to be 0
(cerebrospinal fluid in FLAIR, stored as integers) stays in the brain, and every target of a case is scored on the
same voxels.

``scripts/score_synthesis.py`` applies it to a folder of ``<case>_<target>_synth.nii.gz`` files, or to the
copy-the-source baseline (:func:`closest_source`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs
from scipy.ndimage import gaussian_laplace

__all__ = [
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "Volume",
    "brain_mask",
    "brasyn_normalise",
    "closest_source",
    "hfen",
    "score_synthesis",
]

Volume = np.ndarray | torch.Tensor
"""A 3D volume ``[X, Y, Z]``, as a numpy array or a torch tensor (any real or boolean dtype)."""

SSIM_WINDOW = 7
"""Side of the SSIM's Gaussian window, in voxels (BraSyn's, and prod9's validation)."""
SSIM_SIGMA = 1.5
"""Sigma of the SSIM's Gaussian window, in voxels."""


def _array(volume: Volume, name: str) -> np.ndarray:
    """``volume`` as a float32 numpy array, checked to be 3D."""
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume [X, Y, Z], got shape {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


def brain_mask(volumes: Sequence[Volume]) -> np.ndarray:
    """The voxels (boolean ``[X, Y, Z]``) where any of ``volumes`` (a case's real contrasts) is nonzero.

    Raises:
        ValueError: no volume, volumes of different shapes, or no nonzero voxel.
    """
    if not volumes:
        raise ValueError("brain_mask needs at least one volume")
    arrays = [_array(volume, f"volume {i}") for i, volume in enumerate(volumes)]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"the contrasts differ in shape: {sorted(shapes)}")
    mask = np.logical_or.reduce([array != 0 for array in arrays])
    if not mask.any():
        raise ValueError("every voxel of every contrast is 0: no brain to score")
    return mask


def brasyn_normalise(volume: Volume, brain: Volume, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """``volume`` clipped to its own ``lower`` / ``upper`` percentiles over ``brain`` and scaled to [0, 1].

    The percentiles are those of the brain's voxels only; voxels outside ``brain`` are set to 0. Any increasing
    affine change of the intensities (``a * volume + b``, ``a > 0``) gives the same result. A volume that is constant
    over the brain (equal percentiles) maps to 0.

    Args:
        volume: ``[X, Y, Z]``.
        brain: ``[X, Y, Z]``, nonzero inside the brain.
        lower: lower percentile, in [0, 100).
        upper: upper percentile, in (lower, 100].

    Returns:
        float32 ``[X, Y, Z]`` in [0, 1].
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower} and upper={upper}")
    array, mask = _array(volume, "volume"), _array(brain, "brain") != 0
    if array.shape != mask.shape:
        raise ValueError(f"volume {array.shape} and brain {mask.shape} differ in shape")
    if not mask.any():
        raise ValueError("the brain mask is empty")
    low, high = np.percentile(array[mask], [lower, upper])
    if high <= low:
        return np.zeros(array.shape, np.float32)
    scaled = np.clip((array - low) / (high - low), 0.0, 1.0)
    return np.where(mask, scaled, 0.0).astype(np.float32)


def hfen(pred: Volume, real: Volume, sigma: float = 1.5) -> float:
    """High-frequency error norm: ``‖LoG(pred − real)‖₂ / ‖LoG(real)‖₂``, LoG a Laplacian of Gaussian of ``sigma``.

    The Laplacian of Gaussian (:func:`scipy.ndimage.gaussian_laplace`, in voxels) keeps edges and fine texture, so
    the score is 0 when ``pred``'s edges are ``real``'s, about 1 when they are missing (a flat prediction), and blur
    raises it where an intensity error of the same size would hardly move PSNR. Compare volumes on one intensity
    scale (:func:`brasyn_normalise`). NaN when ``real`` is constant: it has no edge to compare with.
    """
    p, r = _array(pred, "pred"), _array(real, "real")
    if p.shape != r.shape:
        raise ValueError(f"pred {p.shape} and real {r.shape} differ in shape")
    if r.min() == r.max():
        return math.nan
    error = np.linalg.norm(gaussian_laplace((p - r).astype(np.float64), sigma))
    return float(error / np.linalg.norm(gaussian_laplace(r.astype(np.float64), sigma)))


def _ssim_map(pred: np.ndarray, real: np.ndarray) -> torch.Tensor:
    """MONAI's SSIM map of two [0, 1] volumes, ``[X - w + 1, Y - w + 1, Z - w + 1]`` (valid positions, ``w`` 7)."""
    too_small = [n for n in real.shape if n < SSIM_WINDOW]
    if too_small:
        raise ValueError(f"a volume of shape {real.shape} is smaller than the SSIM window ({SSIM_WINDOW} voxels)")
    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(real)[None, None],
        spatial_dims=3,
        kernel_size=[SSIM_WINDOW] * 3,
        kernel_sigma=[SSIM_SIGMA] * 3,
        data_range=1.0,
    )
    return ssim_map[0, 0]


def _region_mean(ssim_map: torch.Tensor, region: np.ndarray) -> float:
    """Mean of ``ssim_map`` over ``region`` (full-size mask), cropped to the map's valid positions as
    :class:`~prod9_ext.engines.RegionSSIMMetric` crops it; NaN for an empty region."""
    half = SSIM_WINDOW // 2
    inner = torch.from_numpy(region[tuple(slice(half, n - half) for n in region.shape)])
    count = int(inner.sum())
    return float(ssim_map[inner].double().sum()) / count if count else math.nan


def score_synthesis(pred: Volume, real: Volume, seg: Volume, brain: Volume) -> dict[str, float]:
    """Score a synthesised volume against the real one over the whole brain (module docstring: BraSyn's protocol).

    Args:
        pred: the synthesised volume ``[X, Y, Z]``, any intensity scale.
        real: the real target ``[X, Y, Z]``, on the same grid.
        seg: the tumour labels ``[X, Y, Z]`` (tumour where ``seg > 0``).
        brain: the brain mask ``[X, Y, Z]`` (:func:`brain_mask` of the case's real contrasts).

    Returns:
        ``psnr`` (dB, data range 1, over the brain; inf when ``pred`` equals ``real`` after normalisation),
        ``ssim`` (SSIM map averaged over the brain), ``ssim_tumour`` (over ``seg > 0``; NaN without a tumour),
        ``ssim_non_tumour`` (over the brain minus the tumour) and ``hfen``, all on the normalised volumes.
    """
    arrays = {name: _array(v, name) for name, v in {"pred": pred, "real": real, "seg": seg, "brain": brain}.items()}
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the volumes differ in shape: {shapes}")
    mask = arrays["brain"] != 0
    tumour = arrays["seg"] > 0
    p, r = brasyn_normalise(arrays["pred"], mask), brasyn_normalise(arrays["real"], mask)
    mse = float(np.mean((p[mask].astype(np.float64) - r[mask]) ** 2))
    ssim_map = _ssim_map(p, r)
    return {
        "psnr": 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf,
        "ssim": _region_mean(ssim_map, mask),
        "ssim_tumour": _region_mean(ssim_map, tumour),
        "ssim_non_tumour": _region_mean(ssim_map, mask & ~tumour),
        "hfen": hfen(p, r),
    }


def closest_source(sources: Mapping[str, Volume], real: Volume, brain: Volume) -> str:
    """The name of the source volume closest to ``real`` in mean squared error over ``brain``, both normalised.

    The copy-the-source baseline copies this one. It is chosen with the real target in hand (an oracle), so the
    baseline is the best a copy can do.
    """
    if not sources:
        raise ValueError("closest_source needs at least one source")
    mask = _array(brain, "brain") != 0
    target = brasyn_normalise(real, mask)[mask].astype(np.float64)
    errors = {name: float(np.mean((brasyn_normalise(v, mask)[mask] - target) ** 2)) for name, v in sources.items()}
    return min(errors, key=errors.__getitem__)
