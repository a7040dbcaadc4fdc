"""AutoencoderFSQ: shapes, API consistency, gradients, MAISI options, autocast, errors."""

from __future__ import annotations

import pytest
import torch

from prod9_ext import AutoencoderFSQ


def tiny_autoencoder(**overrides) -> AutoencoderFSQ:
    kwargs = dict(
        num_channels=(8, 16, 16),
        num_res_blocks=(1, 1, 1),
        attention_levels=(False, False, False),
        norm_num_groups=8,
        fsq_levels=(8, 5, 5, 5),
    )
    kwargs.update(overrides)
    return AutoencoderFSQ(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 6, 5], [7, 5, 5, 5, 5], [8, 6, 5]])
def test_shapes_and_valid_tokens(levels: list[int]) -> None:
    model = tiny_autoencoder(fsq_levels=levels).eval()
    x = torch.rand(2, 1, 16, 24, 8)
    with torch.no_grad():
        reconstruction, codes, indices = model(x)
    assert model.downsampling_factor == 4
    assert reconstruction.shape == x.shape
    assert codes.shape == (2, len(levels), 4, 6, 2)
    assert indices.shape == (2, 4, 6, 2)
    assert indices.min() >= 0 and indices.max() < model.codebook_size
    assert torch.equal(model.quantize(codes), codes)


def test_api_pieces_agree() -> None:
    model = tiny_autoencoder().eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        z_mu, z_sigma = model.encode(x)
        assert torch.count_nonzero(z_sigma) == 0
        indices = model.encode_to_indices(x)
        assert torch.equal(model.embed(model.quantize(z_mu)), indices)
        codes = model.quantizer.indices_to_codes(indices)
        assert torch.equal(model.decode(codes), model.decode_indices(indices))
        assert torch.equal(model.reconstruct(x), model.decode(codes))


def test_gradient_reaches_encoder_through_quantizer() -> None:
    model = tiny_autoencoder()
    reconstruction, _, _ = model(torch.rand(1, 1, 16, 16, 16))
    torch.nn.functional.l1_loss(reconstruction, torch.rand_like(reconstruction)).backward()
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in encoder_grads)
    assert sum(float(g.abs().sum()) for g in encoder_grads if g is not None) > 0
    # every parameter takes part (no unused KL branch, which would break DDP)
    assert all(p.grad is not None for p in model.parameters())


def test_kl_branch_removed() -> None:
    model = tiny_autoencoder()
    assert not hasattr(model, "quant_conv_log_sigma")
    assert not any("log_sigma" in key for key in model.state_dict())


@pytest.mark.parametrize(
    "options",
    [
        dict(num_splits=2, dim_split=1),
        dict(use_checkpointing=True),
        dict(num_splits=2, dim_split=2),
        dict(fused_group_norm=False),
    ],
)
def test_maisi_memory_options_give_same_result(options: dict) -> None:
    torch.manual_seed(0)
    plain = tiny_autoencoder().eval()
    other = tiny_autoencoder(**options).eval()
    other.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.reconstruct(x), other.reconstruct(x), atol=1e-5)
    if options.get("use_checkpointing"):  # block-by-block recomputation gives the plain gradients
        for model in (plain, other):
            reconstruction, _, _ = model.train()(x)
            (reconstruction - x).square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), other.parameters(), strict=True):
            assert q.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_checkpointing_recomputes_block_by_block_only_while_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import prod9_ext.autoencoder as module

    calls: list[torch.nn.Module] = []

    def counting(block, x, **kwargs):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, x, **kwargs)

    monkeypatch.setattr(module, "checkpoint", counting)
    model = tiny_autoencoder(use_checkpointing=True)
    model.train()(torch.rand(1, 1, 32, 32, 32))[0].mean().backward()
    assert calls == [*model.encoder.blocks, *model.decoder.blocks]
    with torch.no_grad():
        model(torch.rand(1, 1, 32, 32, 32))
    assert len(calls) == len(model.encoder.blocks) + len(model.decoder.blocks)  # nothing to recompute without grad


def test_fused_group_norm_replaces_maisi_loop() -> None:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    fused, looped = tiny_autoencoder(), tiny_autoencoder(fused_group_norm=False)
    assert not any(isinstance(m, MaisiGroupNorm3D) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in fused.modules()) == sum(
        isinstance(m, MaisiGroupNorm3D) for m in looped.modules()
    )
    assert fused.state_dict().keys() == looped.state_dict().keys()


def test_autocast_quantizes_in_float32() -> None:
    model = tiny_autoencoder().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruction, codes, indices = model(torch.rand(1, 1, 16, 16, 16))
    assert codes.dtype == torch.float32
    assert torch.equal(model.quantize(codes), codes)
    assert torch.isfinite(reconstruction.float()).all()
    assert indices.max() < model.codebook_size


def test_conflicting_latent_channels() -> None:
    with pytest.raises(ValueError, match="latent_channels=3"):
        tiny_autoencoder(latent_channels=3)
    assert tiny_autoencoder(latent_channels=4).quantizer.num_channels == 4


def test_downsampling_factor_follows_num_channels() -> None:
    model = tiny_autoencoder(num_channels=(8, 8, 8, 8), num_res_blocks=(1, 1, 1, 1), attention_levels=[False] * 4)
    assert model.downsampling_factor == 8
    with torch.no_grad():
        assert model.encode_to_indices(torch.rand(1, 1, 16, 16, 16)).shape == (1, 2, 2, 2)


def test_checkpoint_with_other_levels_is_refused() -> None:
    saved = tiny_autoencoder(fsq_levels=(8, 8, 8, 5)).state_dict()
    with pytest.raises(ValueError, match="fsq_levels"):
        tiny_autoencoder().load_state_dict(saved)


@pytest.mark.parametrize("use_convtranspose", [False, True])
def test_trace_follows_the_input_shape_with_either_upsampling(use_convtranspose: bool) -> None:
    # the CPU demo upsamples by transposed convolution, the BraTS default by interpolation: both must export
    model = tiny_autoencoder(use_convtranspose=use_convtranspose).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.rand(1, 1, 16, 16, 16))
        for shape in ((1, 1, 16, 16, 16), (2, 1, 24, 8, 32)):  # the traced shape and another one
            x = torch.rand(shape)
            expected, got = model(x), traced(x)
            assert got[0].shape == x.shape
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[2], expected[2])
