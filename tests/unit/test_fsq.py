"""FiniteScalarQuantizer: codebook, index round trips, idempotency, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from prod9_ext import FiniteScalarQuantizer

LEVEL_SETS = [[8, 5, 5, 5], [8, 8, 8, 6, 5], [7, 5, 5, 5, 5], [8, 6, 5], [2, 3], [4]]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_codebook_size(levels: list[int]) -> None:
    assert FiniteScalarQuantizer(levels).codebook_size == math.prod(levels)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_indices_codes_round_trip_over_whole_codebook(levels: list[int]) -> None:
    q = FiniteScalarQuantizer(levels)
    indices = torch.arange(q.codebook_size).view(1, -1, 1)
    codes = q.indices_to_codes(indices)
    assert codes.shape == (1, len(levels), q.codebook_size, 1)
    assert torch.equal(q.codes_to_indices(codes), indices)
    # every code is distinct and lies on the grid in [-1, 1]
    assert torch.unique(codes.flatten(2), dim=2).shape[2] == q.codebook_size
    assert codes.min() == -1 and codes.max() == 1


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_per_channel_grid_has_levels_values(levels: list[int]) -> None:
    q = FiniteScalarQuantizer(levels)
    codes = q(torch.linspace(-3, 3, 2001).expand(1, len(levels), -1).contiguous())
    for channel, level in enumerate(levels):
        expected = torch.linspace(-1, 1, level)
        assert torch.allclose(torch.unique(codes[0, channel]), expected, atol=1e-6)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_quantize_is_idempotent(levels: list[int]) -> None:
    q = FiniteScalarQuantizer(levels)
    z = torch.randn(3, len(levels), 5, 6, 7) * 2
    codes = q(z)
    assert torch.equal(q(codes), codes)
    all_codes = q.indices_to_codes(torch.arange(q.codebook_size).view(1, -1))
    assert torch.equal(q(all_codes), all_codes)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_indices_in_range_and_spatial_shape(levels: list[int]) -> None:
    q = FiniteScalarQuantizer(levels)
    indices = q.codes_to_indices(q(torch.randn(2, len(levels), 3, 4, 5) * 3))
    assert indices.dtype == torch.long
    assert indices.shape == (2, 3, 4, 5)
    assert indices.min() >= 0 and indices.max() < q.codebook_size


def test_rounding_is_nearest_grid_point_inside_range() -> None:
    q = FiniteScalarQuantizer([5])
    z = torch.tensor([-1.0, -0.6, -0.2, 0.1, 0.4, 0.8]).view(1, 1, -1)
    assert torch.allclose(q(z).flatten(), torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.5, 1.0]))


def test_straight_through_gradient() -> None:
    q = FiniteScalarQuantizer([8, 5, 5, 5])
    z = (torch.randn(2, 4, 3, 3, 3) * 0.5).requires_grad_()
    q(z).sum().backward()
    assert z.grad is not None
    inside = z.detach().abs() < 1
    assert torch.allclose(z.grad[inside], torch.ones_like(z.grad[inside]))
    # tails keep a smaller, non-zero gradient
    far = torch.full((1, 4, 1), 1.3, requires_grad=True)
    q(far).sum().backward()
    assert far.grad is not None and (far.grad > 0).all() and (far.grad < 1).all()


def test_quantizes_in_float32_under_autocast() -> None:
    q = FiniteScalarQuantizer([8, 5, 5, 5])
    z = torch.randn(1, 4, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = q(z.bfloat16())
    assert codes.dtype == torch.float32
    assert torch.equal(q(codes), codes)


@pytest.mark.parametrize("levels", [[1, 5], [8, 0], [8, 2.5], [], [True, 3]])
def test_bad_levels(levels: list) -> None:
    with pytest.raises(ValueError, match="level"):
        FiniteScalarQuantizer(levels)


def test_wrong_channel_count_names_shape() -> None:
    q = FiniteScalarQuantizer([8, 5, 5, 5])
    with pytest.raises(ValueError, match=r"4 channels.*\(1, 3, 2, 2, 2\)"):
        q(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        q.codes_to_indices(torch.zeros(1, 5, 2))


def test_out_of_range_indices_are_refused() -> None:
    q = FiniteScalarQuantizer([8, 5, 5, 5])
    with pytest.raises(ValueError, match="1000"):
        q.indices_to_codes(torch.tensor([[0, 1000]]))


def test_checkpoint_with_other_levels_is_refused() -> None:
    saved = FiniteScalarQuantizer([8, 8, 8, 5]).state_dict()
    with pytest.raises(ValueError, match=r"\[8, 8, 8, 5\]"):
        FiniteScalarQuantizer([8, 5, 5, 5]).load_state_dict(saved)
    FiniteScalarQuantizer([8, 8, 8, 5]).load_state_dict(saved)
