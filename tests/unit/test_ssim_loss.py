"""The separable SSIM loss equals MONAI's SSIMLoss in value and gradient, and refuses inputs it cannot filter."""

from __future__ import annotations

import pytest
import torch
from monai.losses import SSIMLoss

from prod9_ext.engines import SeparableSSIMLoss


@pytest.mark.parametrize(
    ("shape", "win_size", "data_range"),
    [
        ((4, 1, 32, 32, 32), 7, 1.0),
        ((2, 3, 20, 17, 25), 7, 1.0),
        ((1, 2, 12, 9, 11), 4, 2.0),  # even window, other data range
        ((3, 2, 40, 33), 7, 1.0),  # 2D
    ],
)
def test_matches_monai_in_value_and_gradient(shape: tuple[int, ...], win_size: int, data_range: float) -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=generator) * data_range
    # a prediction near the target, so that SSIM is far from 0 and the gradient is informative
    noisy = (target + 0.1 * data_range * torch.randn(shape, generator=generator)).requires_grad_()
    same = noisy.detach().clone().requires_grad_()
    spatial_dims = len(shape) - 2
    expected = SSIMLoss(spatial_dims=spatial_dims, data_range=data_range, win_size=win_size)(noisy, target)
    actual = SeparableSSIMLoss(spatial_dims=spatial_dims, data_range=data_range, win_size=win_size)(same, target)
    expected.backward()
    actual.backward()
    assert 0.05 < float(expected.detach()) < 0.95
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(same.grad, noisy.grad, atol=1e-8, rtol=1e-4)


def test_identical_images_have_zero_loss_and_the_loss_is_float32_under_bf16_inputs() -> None:
    image = torch.rand(2, 1, 10, 10, 10)
    assert float(SeparableSSIMLoss()(image, image)) == pytest.approx(0.0, abs=1e-6)
    loss = SeparableSSIMLoss()(image.bfloat16(), image)
    assert loss.dtype == torch.float32


def test_bad_inputs_fail_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="at least win_size 7"):
        SeparableSSIMLoss()(torch.rand(1, 1, 6, 8, 8), torch.rand(1, 1, 6, 8, 8))
    with pytest.raises(ValueError, match="input and target must both be"):
        SeparableSSIMLoss()(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        SeparableSSIMLoss(spatial_dims=1)
