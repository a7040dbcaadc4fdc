"""SynthesisInferer's two ways from predicted tokens to an image: a MaskGiT sample, or the expected FSQ code."""

from __future__ import annotations

import math

import pytest
import torch

from prod9_ext import (
    AutoencoderFSQ,
    AutoencoderInferenceWrapper,
    MaskGiTSampler,
    SlidingWindowConfig,
    TransformerDecoder,
)
from prod9_ext.engines import Stage1Tokenizer, SynthesisInferer

LEVELS = (5, 5, 5)
V = math.prod(LEVELS)
IMAGE = (8, 8, 8)
GRID = (4, 4, 4)  # downsampling 2
N = math.prod(GRID)
STEPS = 4


class FixedLogits(TransformerDecoder):
    """A TransformerDecoder whose every call returns the same ``[N, V]`` logits; counts its calls (the sampler
    calls ``logits`` once per step after ``condition`` once per run)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__(
            num_layers=1, hidden_dim=24, num_heads=2, ffn_dim=24, vocab_size=V, latent_shape=GRID, num_modalities=4
        )
        self.register_buffer("fixed", logits)
        self.fixed: torch.Tensor
        self.calls = 0

    def logits(  # type: ignore[override]
        self, tokens: torch.Tensor, conditioning: object, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.calls += 1
        logits = self.fixed.expand(tokens.shape[0], -1, -1)
        return logits if where is None else logits[where]


def _tokenizer() -> Stage1Tokenizer:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(
        num_channels=(8, 8),
        num_res_blocks=(1, 1),
        norm_num_groups=4,
        attention_levels=(False, False),
        fsq_levels=LEVELS,
    ).eval()
    wrapper = AutoencoderInferenceWrapper(autoencoder, SlidingWindowConfig(roi_size=IMAGE, overlap=0.0))
    return Stage1Tokenizer(wrapper, V, 2, "fingerprint", "weights.pt", [1.0, 1.0, 1.0])


def _synthesize(tokenizer: Stage1Tokenizer, model: FixedLogits, decode: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    batch = {key: torch.rand(1, 1, *IMAGE, generator=generator) for key in ("t1", "t2")}
    inferer = SynthesisInferer(tokenizer, MaskGiTSampler(steps=STEPS), "t2", ["t1"], decode=decode)
    return inferer.synthesize(batch, model, torch.device("cpu"))


def test_mean_of_a_certain_model_is_its_sample_in_one_call() -> None:
    tokenizer = _tokenizer()
    chosen = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    logits = 40.0 * torch.nn.functional.one_hot(chosen, V).float()
    sampling, averaging = FixedLogits(logits), FixedLogits(logits)
    sampled = _synthesize(tokenizer, sampling, "sample")
    mean = _synthesize(tokenizer, averaging, "mean")
    assert (sampling.calls, averaging.calls) == (STEPS, 1)
    assert torch.equal(sampled["tokens"].flatten(), chosen)
    assert torch.equal(mean["tokens"].flatten(), chosen)
    assert mean["pred"].shape == (1, 1, *IMAGE)
    torch.testing.assert_close(mean["pred"].as_tensor(), sampled["pred"].as_tensor(), atol=1e-5, rtol=0)


def test_mean_decodes_the_expected_code_between_two_likely_tokens() -> None:
    tokenizer = _tokenizer()
    quantizer = tokenizer.wrapper.autoencoder.quantizer
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randint(0, V, (2, N), generator=generator)
    second = torch.where(second == first, (first + 1) % V, second)
    logits = torch.full((N, V), -40.0)
    logits[torch.arange(N), first] = logits[torch.arange(N), second] = 0.0  # two tokens at 1/2 each
    pred = _synthesize(tokenizer, FixedLogits(logits), "mean")["pred"].as_tensor()

    def codes(indices: torch.Tensor) -> torch.Tensor:
        return quantizer.indices_to_codes(indices.view(1, *GRID))

    with torch.no_grad():
        # synthesis clamps to the images' intensity range [0, 1]
        midway = tokenizer.wrapper.decode((codes(first) + codes(second)) / 2, IMAGE).clamp(0, 1)
        either = [tokenizer.wrapper.decode(codes(indices), IMAGE).clamp(0, 1) for indices in (first, second)]
    torch.testing.assert_close(pred, midway, atol=1e-5, rtol=0)
    assert all((pred - image).abs().max() > 1e-2 for image in either)


def test_unknown_decode_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'median'"):
        SynthesisInferer(_tokenizer(), MaskGiTSampler(), "t2", ["t1"], decode="median")
