"""How well the spread of several samples tells where a synthesis is wrong, and how different the samples are.

A regression gives one estimate; prod9 gives ``K`` posterior samples, their mean and their voxel-wise standard
deviation. The deviation is only worth showing if it is high where the mean is wrong. Over the brain voxels of one
case:

- :func:`calibration`: the Spearman rank correlation between the std and the absolute error of the mean, and the mean
  error of the 10 % of voxels with the highest std divided by the mean error of the rest (> 1: the std points at the
  errors);
- :func:`sample_diversity`: the mean SSIM between every pair of samples (1: identical samples; lower: more varied).

Intensities go through :func:`~prod9_ext.engines.scoring.brasyn_normalise` first, as in scoring; the std is scaled
by the factor that normalises the mean, so the error and the spread share one scale.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import spearmanr

from prod9_ext.engines.scoring import Volume, _array, _region_mean, _ssim_map, brasyn_normalise

__all__ = ["calibration", "sample_diversity"]


def calibration(mean: Volume, std: Volume, real: Volume, brain: Volume, top_fraction: float = 0.1) -> dict[str, float]:
    """Calibration of ``std`` (the spread of the samples) against the error of ``mean``, over the ``brain``.

    Args:
        mean: the mean of the samples ``[X, Y, Z]``.
        std: their voxel-wise standard deviation ``[X, Y, Z]``, in ``mean``'s intensity scale.
        real: the real target ``[X, Y, Z]``.
        brain: the brain mask ``[X, Y, Z]`` (nonzero inside).
        top_fraction: share of brain voxels with the highest std compared with the rest, in (0, 1).

    Returns:
        ``spearman`` (rank correlation of std and absolute error; NaN when either is constant),
        ``top_error_ratio`` (mean error of the top ``top_fraction`` by std over the mean error of the rest; inf when
        the rest is exact), ``top_error`` and ``rest_error`` (those two means, in the normalised scale).
    """
    if not 0.0 < top_fraction < 1.0:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    arrays = {name: _array(v, name) for name, v in {"mean": mean, "std": std, "real": real, "brain": brain}.items()}
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the volumes differ in shape: {shapes}")
    mask = arrays["brain"] != 0
    if not mask.any():
        raise ValueError("the brain mask is empty")
    if (arrays["std"][mask] < 0).any():
        raise ValueError("std has negative values")
    low, high = np.percentile(arrays["mean"][mask], [0.5, 99.5])
    scale = 1.0 / (high - low) if high > low else 0.0
    error = np.abs(brasyn_normalise(arrays["mean"], mask) - brasyn_normalise(arrays["real"], mask))[mask]
    spread = arrays["std"][mask] * scale
    varies = spread.min() < spread.max() and error.min() < error.max()
    rho = float(np.asarray(spearmanr(spread, error)[0])) if varies else math.nan
    order = np.argsort(-spread, kind="stable")
    top = max(1, round(top_fraction * len(order)))
    top_error, rest_error = float(error[order[:top]].mean()), float(error[order[top:]].mean())
    ratio = top_error / rest_error if rest_error > 0 else math.inf
    return {"spearman": rho, "top_error_ratio": ratio, "top_error": top_error, "rest_error": rest_error}


def sample_diversity(samples: Volume, brain: Volume) -> float:
    """Mean SSIM over the brain between every pair of ``samples`` ``[K, X, Y, Z]`` (``K >= 2``), each normalised."""
    stack = samples.detach().cpu().numpy() if not isinstance(samples, np.ndarray) else np.asarray(samples)
    if stack.ndim != 4 or stack.shape[0] < 2:
        raise ValueError(f"samples must be [K, X, Y, Z] with K >= 2, got shape {tuple(stack.shape)}")
    mask = _array(brain, "brain") != 0
    normalised = [brasyn_normalise(sample, mask) for sample in stack]
    scores = [_region_mean(_ssim_map(a, b), mask) for a, b in itertools.combinations(normalised, 2)]
    return float(np.mean(scores))
