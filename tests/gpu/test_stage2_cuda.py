"""Stage 2 on CUDA: bf16 autocast in training and sampling, and CPU and CUDA giving the same logits and decodings."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer

from prod9_ext import AutoencoderFSQ, MaskGiTSampler, MaskGiTScheduler, TransformerDecoder
from prod9_ext.engines import MaskGiTIteration
from prod9_ext.source_decoder import SourceAwareDecoder

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
V, GRID = 1000, (8, 8, 8)
FACTOR = 2  # the sources are voxel images on the token grid times FACTOR
VOXELS = tuple(n * FACTOR for n in GRID)


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 matmuls and convolutions on CUDA (no TF32), so that CPU and CUDA can be compared closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(patch_size: int = 2, source_encoder: str = "space_to_depth") -> TransformerDecoder:
    """A small model whose zero-initialised gates and head are randomised, so that every input matters."""
    torch.manual_seed(0)
    model = TransformerDecoder(
        2,
        64,
        4,
        128,
        V,
        GRID,
        num_modalities=4,
        patch_size=patch_size,
        source_factor=FACTOR,
        source_encoder=source_encoder,
        token_dim=16,
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            if torch.all(param == 0):
                param.normal_(std=0.1)
    return model


def _inputs(device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V + 1, (2, *GRID), generator=generator)
    sources = torch.rand(2, 3, *VOXELS, generator=generator)
    inputs = {
        "tokens": tokens,
        "target_modality": torch.tensor([3, 1]),
        "sources": sources,
        "source_modalities": torch.tensor([[0, 1, 2], [0, -1, 2]]),
    }
    return {key: value.to(device) for key, value in inputs.items()}


@pytest.mark.parametrize("source_encoder", ["space_to_depth", "conv"])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_cpu_and_cuda_logits_agree(patch_size: int, source_encoder: str) -> None:
    model = _model(patch_size, source_encoder)
    with torch.no_grad():
        cpu = model(**_inputs(torch.device("cpu")))
        cuda = model.to(CUDA)(**_inputs(CUDA)).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_training_step() -> None:
    model = _model().to(CUDA).train()
    scheduler = MaskGiTScheduler(V)
    inputs = _inputs(CUDA)
    masked, targets = scheduler.mask(inputs.pop("tokens").clamp_max(V - 1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(masked, **inputs)
    loss = scheduler.loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_autocast_logits_close_to_float32() -> None:
    model = _model().to(CUDA)
    inputs = _inputs(CUDA)
    with torch.no_grad():
        full = model(**inputs).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(**inputs).float()
    assert (half - full).abs().max() <= 0.05 * full.abs().max()


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_sampling_under_bf16_autocast(guidance_scale: float) -> None:
    model = _model().to(CUDA)
    inputs = _inputs(CUDA)
    inputs.pop("tokens")
    sampler = MaskGiTSampler(steps=6, guidance_scale=guidance_scale)

    def sample() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sampler.sample(model, (2, *GRID), generator=torch.Generator(CUDA).manual_seed(0), **inputs)

    tokens = sample()
    assert tokens.device.type == "cuda"
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V  # every position filled, no mask id left
    assert torch.equal(sample(), tokens)  # reproducible with a seed


def test_trainer_step_with_bf16_amp() -> None:
    """MONAI's trainer with ``amp`` (bf16 autocast, its GradScaler) runs prod9's stage-2 step."""
    model = _model().to(CUDA)
    scheduler = MaskGiTScheduler(V)
    batches = [{"tokens": torch.randint(0, V, (2, 4, *GRID)), "voxels": torch.rand(2, 4, *VOXELS)} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=CUDA,
        max_epochs=1,
        train_data_loader=batches,
        network=model,
        optimizer=torch.optim.AdamW(model.parameters(), 1e-4),
        loss_function=scheduler.loss,
        iteration_update=MaskGiTIteration(scheduler, slot_modalities=[0, 1, 2, 3]),
        amp=True,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    trainer.run()
    output = trainer.state.output
    output = output[0] if isinstance(output, list) else output
    assert torch.isfinite(torch.as_tensor(output["loss"]))


def _source_decoder() -> tuple[SourceAwareDecoder, dict[str, torch.Tensor]]:
    """A source-aware decoder on a small stage 1 (factor 4), its branches randomised, and its inputs on the CPU."""
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(
        num_channels=(16, 16, 32), num_res_blocks=(1, 1, 1), norm_num_groups=8, fsq_levels=(8, 5, 5, 5)
    ).eval()
    decoder = SourceAwareDecoder(autoencoder, num_modalities=4, channels=8).eval()
    with torch.no_grad():
        for param in decoder.branches.parameters():
            param.normal_(std=0.1)
    generator = torch.Generator().manual_seed(2)
    codes = autoencoder.quantizer.indices_to_codes(torch.randint(0, 1000, (2, 6, 6, 4), generator=generator))
    inputs = {
        "codes": codes,
        "sources": torch.rand(2, 4, 24, 24, 16, generator=generator),
        "present": torch.tensor([[True, True, False, False], [False, True, True, False]]),
        "target_modality": torch.tensor([3, 0]),
    }
    return decoder, inputs


def test_source_decoder_on_cpu_and_cuda_agrees_and_runs_under_bf16() -> None:
    decoder, inputs = _source_decoder()
    with torch.no_grad():
        cpu = decoder(**inputs)
        decoder = decoder.to(CUDA)
        cuda_inputs = {key: value.to(CUDA) for key, value in inputs.items()}
        cuda = decoder(**cuda_inputs)
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = decoder.decode_windows(**cuda_inputs, roi_size=(16, 16, 16)).float()
    assert half.shape == cpu.shape and torch.isfinite(half).all()
