"""AutoencoderInferenceWrapper: any size in, valid tokens, exact shapes, one window == plain model, errors."""

from __future__ import annotations

import pytest
import torch

from prod9_ext import AutoencoderFSQ, AutoencoderInferenceWrapper, SlidingWindowConfig


@pytest.fixture(scope="module")
def model() -> AutoencoderFSQ:
    torch.manual_seed(0)
    return AutoencoderFSQ(
        num_channels=(8, 16, 16),
        num_res_blocks=(1, 1, 1),
        attention_levels=(False, False, False),
        norm_num_groups=8,
        fsq_levels=(8, 6, 5),
    ).eval()


@pytest.mark.parametrize("shape", [(37, 45, 29), (16, 16, 16), (33, 17, 50), (5, 7, 3)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_any_size_gives_valid_tokens_and_exact_shape(model: AutoencoderFSQ, shape, mode: str) -> None:
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16), overlap=0.5, mode=mode))
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        codes = wrapper.encode(x)
        indices = wrapper.encode_to_indices(x)
        reconstruction = wrapper.reconstruct(x)
    grid = tuple(-(-s // 4) for s in shape)
    assert wrapper.grid_shape(shape) == grid
    assert codes.shape == (2, 3, *grid) and indices.shape == (2, *grid)
    # quantized once after blending: every token is a grid code
    assert torch.equal(model.quantize(codes), codes)
    assert torch.equal(model.embed(codes), indices)
    assert indices.min() >= 0 and indices.max() < model.codebook_size
    assert reconstruction.shape == x.shape


def test_blends_continuous_latent_then_quantizes(model: AutoencoderFSQ) -> None:
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16), overlap=0.5))
    x = torch.rand(1, 1, 40, 24, 16)
    with torch.no_grad():
        latent = wrapper.encode_latent(x)
        assert not torch.equal(model.quantize(latent), latent)  # continuous, off the grid
        assert torch.equal(wrapper.encode(x), model.quantize(latent))


@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 16, 8), (13, 9, 16)])
def test_one_window_equals_plain_model(model: AutoencoderFSQ, shape) -> None:
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16), overlap=0.25))
    padded = tuple(-(-s // 4) * 4 for s in shape)
    x = torch.zeros(1, 1, *padded)
    x[(..., *(slice(0, s) for s in shape))] = torch.rand(1, 1, *shape)
    with torch.no_grad():
        assert torch.equal(
            wrapper.encode_to_indices(x[(..., *(slice(0, s) for s in shape))]), model.encode_to_indices(x)
        )
        expected = model.reconstruct(x)[(..., *(slice(0, s) for s in shape))]
        assert torch.allclose(wrapper.reconstruct(x[(..., *(slice(0, s) for s in shape))]), expected, atol=1e-5)


def test_decode_indices_matches_decode(model: AutoencoderFSQ) -> None:
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16)))
    indices = torch.randint(0, model.codebook_size, (1, 10, 6, 5))
    with torch.no_grad():
        image = wrapper.decode_indices(indices, (37, 21, 19))
        assert image.shape == (1, 1, 37, 21, 19)
        assert torch.equal(image, wrapper.decode(model.quantizer.indices_to_codes(indices), (37, 21, 19)))


def test_many_windows_track_the_plain_model(model: AutoencoderFSQ) -> None:
    """Windowed tokens differ from whole-volume ones only through GroupNorm statistics: most agree."""
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16), overlap=0.5))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        agreement = (wrapper.encode_to_indices(x) == model.encode_to_indices(x)).float().mean()
    assert agreement > 0.2


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindowConfig((16, 16, 16), overlap=1.0)
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindowConfig((16, 16, 16), overlap=-0.1)
    with pytest.raises(ValueError, match="mode"):
        SlidingWindowConfig((16, 16, 16), mode="average")


def test_bad_wrapper_inputs(model: AutoencoderFSQ) -> None:
    with pytest.raises(ValueError, match=r"\[18, 16, 16\].*4"):
        AutoencoderInferenceWrapper(model, SlidingWindowConfig((18, 16, 16)))
    with pytest.raises(ValueError, match="between latent voxels"):
        AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16), overlap=0.4))
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig((16, 16, 16)))
    with pytest.raises(ValueError, match=r"\(1, 16, 16, 16\)"):
        wrapper.encode(torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="codes"):
        wrapper.decode(torch.zeros(3, 4, 4, 4))
