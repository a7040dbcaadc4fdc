"""Stage 1 on CUDA: bf16 autocast in the model and in MONAI's trainer, and CPU and CUDA giving the same results."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import PatchDiscriminator

from prod9_ext import AutoencoderFSQ, AutoencoderInferenceWrapper, SlidingWindowConfig
from prod9_ext.engines import AutoencoderGanIteration, StackModalities

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 matmuls and convolutions on CUDA (no TF32), so that CPU and CUDA can be compared closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _autoencoder() -> AutoencoderFSQ:
    torch.manual_seed(0)
    return AutoencoderFSQ(
        num_channels=(16, 32, 64), num_res_blocks=(1, 1, 1), norm_num_groups=8, fsq_levels=(8, 5, 5, 5)
    ).eval()


def test_bf16_autocast_forward_backward() -> None:
    model = _autoencoder().to(CUDA).train()
    x = torch.rand(2, 1, 32, 32, 32, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reconstruction, codes, indices = model(x)
    assert codes.dtype == torch.float32  # the quantizer works in float32 under autocast
    assert torch.equal(model.embed(model.quantize(codes)), indices)  # codes are fixed points
    assert int(indices.min()) >= 0 and int(indices.max()) < model.codebook_size
    loss = torch.nn.functional.l1_loss(reconstruction.float(), x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_autocast_close_to_float32() -> None:
    model = _autoencoder().to(CUDA)
    x = torch.rand(1, 1, 32, 32, 32, device=CUDA)
    with torch.no_grad():
        z32 = model.encode(x)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z16 = model.encode(x)[0].float()
    assert (z16 - z32).abs().max() <= 0.05 * z32.abs().max()


def test_cpu_and_cuda_agree() -> None:
    model = _autoencoder()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        z_cpu = model.encode(x)[0]
        codes = model.quantize(z_cpu)
        image_cpu = model.decode(codes)
        model.to(CUDA)
        z_cuda = model.encode(x.to(CUDA))[0].cpu()
        image_cuda = model.decode(codes.to(CUDA)).cpu()
        tokens_cuda = model.embed(model.quantize(z_cuda.to(CUDA))).cpu()
    torch.testing.assert_close(z_cuda, z_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(image_cuda, image_cpu, rtol=1e-4, atol=1e-4)
    # a latent within float error of a rounding boundary may round the other way: almost every token agrees
    assert (tokens_cuda == model.embed(codes)).float().mean() >= 0.99


def test_sliding_window_cpu_and_cuda_agree() -> None:
    model = _autoencoder()
    config = SlidingWindowConfig((32, 32, 32), overlap=0.25)
    x = torch.rand(1, 1, 40, 48, 36)
    with torch.no_grad():
        tokens_cpu = AutoencoderInferenceWrapper(model, config).encode_to_indices(x)
        tokens_cuda = AutoencoderInferenceWrapper(model.to(CUDA), config).encode_to_indices(x.to(CUDA)).cpu()
    assert tokens_cuda.shape == tokens_cpu.shape
    assert (tokens_cuda == tokens_cpu).float().mean() >= 0.99


def test_trainer_step_with_bf16_amp() -> None:
    """MONAI's trainer with ``amp`` (bf16 autocast, its GradScaler) runs prod9's stage-1 step, discriminator on."""
    model = _autoencoder().to(CUDA)
    discriminator = PatchDiscriminator(3, num_layers_d=3, channels=16, in_channels=1, out_channels=1).to(CUDA)
    iteration = AutoencoderGanIteration(
        discriminator, torch.optim.Adam(discriminator.parameters(), 1e-4), adv_warmup_iterations=0
    )
    keys = ["t1", "t2"]
    batches = [{key: torch.rand(1, 1, 32, 32, 32) for key in keys} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=CUDA,
        max_epochs=1,
        train_data_loader=batches,
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-4),
        loss_function=iteration.reconstruction_loss,
        iteration_update=iteration,
        prepare_batch=StackModalities(keys),
        amp=True,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    trainer.run()
    output = trainer.state.output
    output = output[0] if isinstance(output, list) else output
    assert torch.isfinite(torch.as_tensor(output["loss"]))
    assert torch.isfinite(torch.as_tensor(output["d_loss"]))
