"""Calibration of the samples' spread and their diversity (prod9_ext.engines.uncertainty)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prod9_ext.engines import calibration, sample_diversity

SHAPE = (24, 24, 20)


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real volume, a brain mask, and a per-voxel error size that varies smoothly across the brain."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(np.float64)
    brain = ((grid[0] - 12) ** 2 + (grid[1] - 12) ** 2 + (grid[2] - 10) ** 2) < 9.0**2
    real = np.where(brain, 0.5 + 0.3 * np.sin(grid[0] / 3) + 0.05 * rng.standard_normal(SHAPE), 0.0)
    size = np.where(brain, 0.002 + 0.2 * (grid[0] / SHAPE[0]) ** 4, 0.0)  # errors grow along the first axis
    return real.astype(np.float32), brain, size.astype(np.float32)


def test_a_spread_that_follows_the_error_is_calibrated_and_a_shuffled_one_is_not() -> None:
    real, brain, size = _case()
    rng = np.random.default_rng(1)
    mean = real + size * rng.standard_normal(SHAPE).astype(np.float32) * brain
    good = calibration(mean, size, real, brain)
    assert good["spearman"] > 0.3 and good["top_error_ratio"] > 2.0
    shuffled = size.copy()
    shuffled[brain] = rng.permutation(size[brain])
    bad = calibration(mean, shuffled, real, brain)
    assert abs(bad["spearman"]) < 0.1 and 0.7 < bad["top_error_ratio"] < 1.3
    assert math.isclose(good["top_error"] / good["rest_error"], good["top_error_ratio"])


def test_calibration_ignores_intensity_scale_and_voxels_outside_the_brain() -> None:
    real, brain, size = _case()
    mean = real + size * np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32) * brain
    reference = calibration(mean, size, real, brain)
    outside = np.where(brain, 0.0, 5.0).astype(np.float32)  # large values outside the brain change nothing
    moved = calibration(3.0 * mean + 1.0 + outside, 3.0 * size + outside, real, brain)
    for key in ("spearman", "top_error_ratio", "top_error", "rest_error"):
        assert math.isclose(moved[key], reference[key], rel_tol=1e-4), key


def test_a_constant_spread_has_no_rank_correlation() -> None:
    real, brain, size = _case()
    assert math.isnan(calibration(real + size, np.full(SHAPE, 0.1, np.float32), real, brain)["spearman"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"top_fraction": 1.0}, "top_fraction"), ({"std": -np.ones(SHAPE, np.float32)}, "negative")],
)
def test_calibration_refuses_bad_input(kwargs: dict, match: str) -> None:
    real, brain, size = _case()
    arguments = {"mean": real, "std": size, "real": real, "brain": brain} | kwargs
    with pytest.raises(ValueError, match=match):
        calibration(**arguments)


def test_identical_samples_have_diversity_one_and_noisier_ones_less() -> None:
    real, brain, _ = _case()
    rng = np.random.default_rng(3)
    assert sample_diversity(np.stack([real, real, real]), brain) == pytest.approx(1.0)
    slightly = np.stack([real + 0.02 * rng.standard_normal(SHAPE) * brain for _ in range(3)])
    strongly = np.stack([real + 0.3 * rng.standard_normal(SHAPE) * brain for _ in range(3)])
    assert 1.0 > sample_diversity(slightly, brain) > sample_diversity(strongly, brain)
    with pytest.raises(ValueError, match="K >= 2"):
        sample_diversity(real[None], brain)
