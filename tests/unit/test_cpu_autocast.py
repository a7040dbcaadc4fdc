"""``amp`` means bf16 autocast on the engine's own device, the CPU included (the CPU demo turns it on where fast)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.networks.nets import PatchDiscriminator
from torch import nn

from prod9_ext import (
    AutoencoderFSQ,
    AutoencoderInferenceWrapper,
    MaskGiTScheduler,
    SlidingWindowConfig,
    TransformerDecoder,
)
from prod9_ext.engines import (
    AutoencoderGanIteration,
    AutoencoderSlidingWindowInferer,
    Bf16Trainer,
    MaskGiTIteration,
    StackModalities,
    Stage1Tokenizer,
    autoencoder_eval_iteration,
    bf16_is_fast,
    pretokenize,
)

CPU = torch.device("cpu")
KEYS = ["t1", "t2"]


def _autoencoder() -> AutoencoderFSQ:
    torch.manual_seed(0)
    return AutoencoderFSQ(
        num_channels=(8, 8), num_res_blocks=(1, 1), norm_num_groups=4, attention_levels=(False, False)
    )


def _output_dtypes(module: nn.Module, kind: type[nn.Module]) -> list[torch.dtype]:
    """The output dtype of every call of ``module``'s first ``kind`` layer, recorded as the engine runs."""
    dtypes: list[torch.dtype] = []
    layer = next(m for m in module.modules() if isinstance(m, kind))
    layer.register_forward_hook(lambda _module, _inputs, output: dtypes.append(output.dtype))
    return dtypes


def _last_output(engine: SupervisedTrainer | SupervisedEvaluator) -> dict:
    output = engine.state.output
    return output[0] if isinstance(output, list) else output


def _run_without_scaler(trainer: SupervisedTrainer) -> None:
    """Run ``trainer``: bf16 needs no ``GradScaler``, so none is made, and torch has nothing to warn about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run()
    assert trainer.scaler is None
    assert not [w for w in caught if "GradScaler" in str(w.message)]


@pytest.mark.parametrize("amp", [False, True])
def test_stage1_training_step_autocasts_on_the_cpu(amp: bool) -> None:
    model = _autoencoder()
    before = [p.detach().clone() for p in model.parameters()]
    discriminator = PatchDiscriminator(3, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    iteration = AutoencoderGanIteration(discriminator, torch.optim.Adam(discriminator.parameters(), 1e-4))
    dtypes = _output_dtypes(model, nn.Conv3d)
    trainer = Bf16Trainer(
        device=CPU,
        max_epochs=1,
        train_data_loader=[{key: torch.rand(1, 1, 16, 16, 16) for key in KEYS}],
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-3),
        loss_function=iteration.reconstruction_loss,
        iteration_update=iteration,
        prepare_batch=StackModalities(KEYS),
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    _run_without_scaler(trainer)
    assert dtypes == [torch.bfloat16 if amp else torch.float32]
    assert math.isfinite(float(_last_output(trainer)["loss"]))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))  # it learned


@pytest.mark.parametrize("amp", [False, True])
def test_stage1_evaluation_autocasts_and_scores_in_float32(amp: bool) -> None:
    model = _autoencoder()
    dtypes = _output_dtypes(model, nn.Conv3d)
    evaluator = SupervisedEvaluator(
        device=CPU,
        val_data_loader=[{key: torch.rand(1, 1, 16, 16, 24) for key in KEYS}],
        network=model,
        prepare_batch=StackModalities(KEYS),
        iteration_update=autoencoder_eval_iteration,
        inferer=AutoencoderSlidingWindowInferer((16, 16, 16), overlap=0.5),
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    evaluator.run()
    assert set(dtypes) == {torch.bfloat16 if amp else torch.float32}
    pred = _last_output(evaluator)["pred"]
    assert pred.dtype == torch.float32 and pred.shape == (1, 16, 16, 24)


@pytest.mark.parametrize("amp", [False, True])
def test_stage2_training_step_autocasts_on_the_cpu(amp: bool) -> None:
    torch.manual_seed(0)
    vocab, grid = 125, (4, 4, 4)
    model = TransformerDecoder(
        vocab_size=vocab, latent_shape=grid, num_modalities=4, num_layers=1, hidden_dim=32, num_heads=2, ffn_dim=64,
        source_factor=2,
    )  # fmt: skip
    dtypes = _output_dtypes(model, nn.Linear)
    scheduler = MaskGiTScheduler(vocab)
    trainer = Bf16Trainer(
        device=CPU,
        max_epochs=1,
        train_data_loader=[
            {"tokens": torch.randint(0, vocab, (2, 4, *grid)), "voxels": torch.rand(2, 4, *(2 * n for n in grid))}
        ],
        network=model,
        optimizer=torch.optim.AdamW(model.parameters(), 1e-4),
        loss_function=scheduler.loss,
        iteration_update=MaskGiTIteration(scheduler, slot_modalities=[0, 1, 2, 3]),
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    _run_without_scaler(trainer)
    assert dtypes and set(dtypes) == {torch.bfloat16 if amp else torch.float32}
    assert math.isfinite(float(_last_output(trainer)["loss"]))


def test_tokens_encoded_with_and_without_amp_are_cached_apart(tmp_path: Path) -> None:
    model = _autoencoder().eval()
    wrapper = AutoencoderInferenceWrapper(model, SlidingWindowConfig(roi_size=(16, 16, 16), overlap=0.0))
    tokenizer = Stage1Tokenizer(wrapper, model.codebook_size, 2, "abc", "weights.pt", [1.0, 1.0, 1.0])
    calls = []

    def preprocessing(item: dict) -> dict:
        calls.append(item["case"])
        return {key: torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(1)) for key in KEYS}

    full = pretokenize([{"case": "A"}], preprocessing, tokenizer, KEYS, tmp_path, amp=False)
    half = pretokenize([{"case": "A"}], preprocessing, tokenizer, KEYS, tmp_path, amp=True)
    assert calls == ["A", "A"] and len(list(tmp_path.iterdir())) == 2  # a bf16 encoding never reads float32 tokens
    assert full[0]["tokens"].shape == half[0]["tokens"].shape == (2, 8, 8, 8)
    assert np.mean(full[0]["tokens"] == half[0]["tokens"]) > 0.5  # the same codes, up to bf16 rounding


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "fast"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_bf16_is_fast_follows_the_cpu_features(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, fast: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert bf16_is_fast("cpu") is fast
    assert bf16_is_fast("meta") is False
