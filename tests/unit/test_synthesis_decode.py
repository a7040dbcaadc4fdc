"""SynthesisInferer's ways from predicted tokens to an image: a MaskGiT sample (or the mean and spread of several), the
expected FSQ code, and the token-swap ablation; sources that are not on one grid are refused."""

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
            num_layers=1,
            hidden_dim=24,
            num_heads=2,
            ffn_dim=24,
            vocab_size=V,
            latent_shape=GRID,
            num_modalities=4,
            source_factor=2,
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


def _sensitive_transformer() -> TransformerDecoder:
    """A small transformer whose zero-initialised gates and head are randomised: its logits depend on the sources."""
    torch.manual_seed(2)
    model = TransformerDecoder(1, 24, 2, 24, V, GRID, num_modalities=4, token_dim=8, source_factor=2).eval()
    with torch.no_grad():
        for param in model.parameters():
            if torch.all(param == 0):
                param.normal_(std=0.3)
    return model


def _two_cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return {key: torch.rand(2, 1, *IMAGE, generator=generator) for key in ("t1", "t2")}


def test_several_samples_give_their_mean_and_spread() -> None:
    tokenizer, model, batch = _tokenizer(), _sensitive_transformer(), _two_cases()
    one, two = (
        SynthesisInferer(tokenizer, MaskGiTSampler(steps=STEPS), "t2", ["t1"], num_samples=k).synthesize(
            batch, model, torch.device("cpu")
        )
        for k in (1, 2)
    )
    assert "pred_std" not in one
    assert two["pred_std"].shape == two["pred"].shape == (2, 1, *IMAGE)
    assert (two["pred_std"] >= 0).all() and two["pred_std"].amax() > 1e-3  # two draws of a model that is unsure
    assert torch.equal(two["tokens"], one["tokens"])  # the first sample is the one num_samples=1 gives
    assert not torch.allclose(two["pred"].as_tensor(), one["pred"].as_tensor())  # the mean of two draws


def test_saved_samples_are_the_draws_behind_the_mean_and_spread() -> None:
    tokenizer, model, batch = _tokenizer(), _sensitive_transformer(), _two_cases()
    inferer = SynthesisInferer(tokenizer, MaskGiTSampler(steps=STEPS), "t2", ["t1"], num_samples=3, save_samples=True)
    output = inferer.synthesize(batch, model, torch.device("cpu"))
    samples = output["pred_samples"].as_tensor()
    assert samples.shape == (2, 3, *IMAGE)
    torch.testing.assert_close(samples.mean(1, keepdim=True), output["pred"].as_tensor())
    torch.testing.assert_close(samples.std(1, keepdim=True), output["pred_std"].as_tensor())
    assert not torch.equal(samples[:, 0], samples[:, 1])  # distinct draws


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"num_samples": 0}, "num_samples"), ({"num_samples": 2, "decode": "mean"}, "num_samples")]
)
def test_bad_number_of_samples_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SynthesisInferer(_tokenizer(), MaskGiTSampler(), "t2", ["t1"], **kwargs)


def test_a_target_among_the_sources_is_refused() -> None:
    with pytest.raises(ValueError, match=r"target_modality 't2' is also among source_modalities \['t1', 't2'\]"):
        SynthesisInferer(_tokenizer(), MaskGiTSampler(), "t2", ["t1", "t2"])


def test_swapped_codes_decode_the_second_case_with_the_first_cases_tokens() -> None:
    """With stage 1's decoder the sources do not enter decoding: the second case, swapped, is the first case's
    synthesis exactly; the first case keeps its own."""
    tokenizer, model, batch = _tokenizer(), _sensitive_transformer(), _two_cases()
    plain, swapped = (
        SynthesisInferer(tokenizer, MaskGiTSampler(steps=STEPS), "t2", ["t1"], swap_codes=swap).synthesize(
            batch, model, torch.device("cpu")
        )
        for swap in (False, True)
    )
    assert not torch.equal(plain["tokens"][0], plain["tokens"][1])  # two cases, two syntheses
    torch.testing.assert_close(swapped["pred"][0], plain["pred"][0])
    assert torch.equal(swapped["tokens"][1], plain["tokens"][0])
    torch.testing.assert_close(swapped["pred"][1], plain["pred"][0])
    assert (swapped["pred"][1] - plain["pred"][1]).abs().amax() > 1e-3


def test_sources_on_different_grids_are_refused_in_one_line() -> None:
    batch = {"t1": torch.rand(1, 1, *IMAGE), "t1ce": torch.rand(1, 1, 8, 8, 6)}
    inferer = SynthesisInferer(_tokenizer(), MaskGiTSampler(steps=STEPS), "t2", ["t1", "t1ce"])
    with pytest.raises(ValueError) as caught:
        inferer.synthesize(batch, _sensitive_transformer(), torch.device("cpu"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("source 't1ce' has grid (8, 8, 6), the first source (8, 8, 8)")
