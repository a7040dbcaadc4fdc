"""Synthesis of images larger than the stage-2 ROI: windows over the token grid, outpainting, blended mean codes."""

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
from prod9_ext.engines.synthesis import token_windows

LEVELS = (5, 5, 5)
V = math.prod(LEVELS)
ROI = (8, 8, 8)
LATENT = (4, 4, 4)  # downsampling 2
IMAGE = (13, 6, 11)  # larger than the ROI along x and z, smaller along y
GRID = (7, 4, 6)  # ceil((13, 8, 11) / 2): y padded to the ROI
STEPS = 3


def _tokenizer(constant_output: bool = False) -> Stage1Tokenizer:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(
        num_channels=(8, 8),
        num_res_blocks=(1, 1),
        norm_num_groups=4,
        attention_levels=(False, False),
        fsq_levels=LEVELS,
    ).eval()
    if constant_output:
        decode_to_a_constant(autoencoder)
    wrapper = AutoencoderInferenceWrapper(autoencoder, SlidingWindowConfig(roi_size=ROI, overlap=0.5))
    return Stage1Tokenizer(wrapper, V, 2, "fingerprint", "weights.pt", [1.0, 1.0, 1.0])


def decode_to_a_constant(autoencoder: torch.nn.Module, value: float = 0.5) -> torch.nn.Module:
    """Make the decoder's last convolution output ``value`` everywhere: synthesis clamps to [0, 1], so an untrained
    decoder's negative output would read as 0, which these tests take for a voxel the windows never covered."""
    last = [m for m in autoencoder.decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)
    return autoencoder


def _transformer() -> TransformerDecoder:
    torch.manual_seed(1)
    return TransformerDecoder(
        num_layers=1,
        hidden_dim=24,
        num_heads=2,
        ffn_dim=24,
        vocab_size=V,
        latent_shape=LATENT,
        num_modalities=4,
        source_factor=2,
    ).eval()


class OneToken(TransformerDecoder):
    """Predicts token ``token`` with certainty at every position; counts its calls (the sampler's per-step
    ``logits``)."""

    def __init__(self, token: int) -> None:
        super().__init__(
            num_layers=1,
            hidden_dim=24,
            num_heads=2,
            ffn_dim=24,
            vocab_size=V,
            latent_shape=LATENT,
            num_modalities=4,
            source_factor=2,
        )
        self.token = token
        self.calls = 0

    def logits(  # type: ignore[override]
        self, tokens: torch.Tensor, conditioning: object, where: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.calls += 1
        logits = torch.full((tokens.shape[0], tokens[0].numel(), V), -40.0)
        logits[..., self.token] = 40.0
        return logits if where is None else logits[where]


class RecordingSampler(MaskGiTSampler):
    """A sampler that keeps the known tokens and the result of every ``sample`` call."""

    def __init__(self) -> None:
        super().__init__(steps=STEPS)
        self.calls: list[tuple[torch.Tensor | None, torch.Tensor]] = []

    def sample(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        result = super().sample(*args, **kwargs)
        known = kwargs.get("known_tokens", args[7] if len(args) > 7 else None)
        self.calls.append((None if known is None else known.clone(), result.clone()))
        return result


def _brain_batch() -> dict[str, torch.Tensor]:
    """Sources and target: positive inside a box ("the brain") that reaches every face of the image, 0 outside."""
    generator = torch.Generator().manual_seed(3)
    batch = {}
    for key in ("t1", "t2"):
        image = torch.zeros(1, 1, *IMAGE)
        image[..., 0:13, 1:6, 0:11] = 0.2 + 0.8 * torch.rand(1, 1, 13, 5, 11, generator=generator)
        batch[key] = image
    return batch


def test_token_windows_cover_the_grid_and_end_at_its_end() -> None:
    windows = token_windows((13, 16, 13), (12, 16, 12), overlap=0.5)
    assert [tuple(s.start for s in window) for window in windows] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    covered = torch.zeros(7, 4, 6, dtype=torch.bool)
    for window in token_windows(GRID, LATENT, overlap=0.5):
        assert tuple(s.stop - s.start for s in window) == LATENT
        covered[window] = True
    assert covered.all()
    assert len(token_windows(LATENT, LATENT, overlap=0.5)) == 1
    with pytest.raises(ValueError, match=r"\[3, 4, 4\] is smaller than the window \[4, 4, 4\]"):
        token_windows((3, 4, 4), LATENT, overlap=0.5)


def test_sampler_keeps_known_tokens_and_fills_the_rest_in_its_steps() -> None:
    model = _transformer()
    sampler = MaskGiTSampler(steps=STEPS)
    target = torch.tensor([1])
    known = torch.full((1, *LATENT), V)
    known[0, :2] = torch.randint(0, V, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    tokens = sampler.sample(model, (1, *LATENT), target, generator=torch.Generator().manual_seed(0), known_tokens=known)
    assert torch.equal(tokens[0, :2], known[0, :2])
    assert (tokens < V).all()
    plain, all_masked = (
        sampler.sample(model, (1, *LATENT), target, generator=torch.Generator().manual_seed(5), known_tokens=start)
        for start in (None, torch.full((1, *LATENT), V))
    )
    assert torch.equal(plain, all_masked)  # all masked known tokens: the plain sampler
    with pytest.raises(ValueError, match="known_tokens shape"):
        sampler.sample(model, (1, *LATENT), target, known_tokens=torch.full((1, 4, 4, 3), V))


def test_sampling_outpaints_window_after_window_into_one_grid() -> None:
    sampler = RecordingSampler()
    inferer = SynthesisInferer(_tokenizer(), sampler, "t2", ["t1"], decode="sample", overlap=0.5)
    output = inferer.synthesize(_brain_batch(), _transformer(), torch.device("cpu"))
    windows = token_windows(GRID, LATENT, overlap=0.5)
    assert output["pred"].shape == (1, 1, *IMAGE)
    assert output["tokens"].shape == output["target_tokens"].shape == (1, *GRID)
    assert 1 < len(sampler.calls) <= len(windows)
    first_known = sampler.calls[0][0]
    assert first_known is not None and (first_known == V).all()  # the first window starts all masked
    for known, result in sampler.calls[1:]:
        assert known is not None and (known < V).any()  # later windows see what their neighbours fixed...
        assert torch.equal(result[known < V], known[known < V])  # ...and keep it
    final = output["tokens"]
    for _, result in sampler.calls:  # no later window changed a token: each window's sample is in the final grid
        assert any(torch.equal(final[(slice(None), *window)], result) for window in windows)


@pytest.mark.parametrize("blend_mode", ["gaussian", "constant"])
def test_expected_codes_of_every_window_blend_into_valid_codes(blend_mode: str) -> None:
    model = OneToken(token=37)
    inferer = SynthesisInferer(
        _tokenizer(), MaskGiTSampler(steps=STEPS), "t2", ["t1"], decode="mean", blend_mode=blend_mode
    )
    output = inferer.synthesize(_brain_batch(), model, torch.device("cpu"))
    assert model.calls == len(token_windows(GRID, LATENT, overlap=0.5))  # one call per window
    assert torch.equal(output["tokens"], torch.full((1, *GRID), 37))
    assert output["pred"].shape == (1, 1, *IMAGE)


@pytest.mark.parametrize("decode", ["sample", "mean"])
def test_every_brain_voxel_of_an_image_larger_than_the_roi_is_synthesised(decode: str) -> None:
    batch = _brain_batch()
    tokenizer = _tokenizer(constant_output=True)
    inferer = SynthesisInferer(tokenizer, MaskGiTSampler(steps=STEPS), "t2", ["t1"], decode=decode)
    pred = inferer.synthesize(batch, _transformer(), torch.device("cpu"))["pred"]
    assert pred.shape == batch["t1"].shape
    brain = batch["t1"] > 0
    assert (pred[brain] != 0).all()


@pytest.mark.parametrize(("kwargs", "match"), [({"overlap": 1.0}, "overlap"), ({"blend_mode": "max"}, "'max'")])
def test_bad_window_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SynthesisInferer(_tokenizer(), MaskGiTSampler(), "t2", ["t1"], **kwargs)


class SourceRecordingSampler(MaskGiTSampler):
    """A sampler that keeps the sources every ``predict`` call was given."""

    def __init__(self) -> None:
        super().__init__(steps=STEPS)
        self.sources: list[torch.Tensor] = []

    def predict(self, model, shape, target_modality, sources=None, *args, **kwargs):  # type: ignore[override]
        assert sources is not None
        self.sources.append(sources.clone())
        return super().predict(model, shape, target_modality, sources, *args, **kwargs)


def test_each_window_reads_the_source_voxels_under_its_tokens() -> None:
    """The image is centred in the ROI along y (6 → 8 voxels), zero-padded at the far end to whole tokens along x and
    z (13 → 14, 11 → 12); the window of tokens ``[a, b)`` gets the voxels ``[2a, 2b)`` of that padded source."""
    batch = _brain_batch()
    sampler = SourceRecordingSampler()
    inferer = SynthesisInferer(_tokenizer(), sampler, "t2", ["t1"], decode="mean")
    inferer.synthesize(batch, _transformer(), torch.device("cpu"))
    padded = torch.zeros(1, 1, 14, 8, 12)
    padded[:, :, :13, 1:7, :11] = batch["t1"]
    windows = token_windows(GRID, LATENT, overlap=0.5)
    assert len(sampler.sources) == len(windows)
    for window, sources in zip(windows, sampler.sources, strict=True):
        box = tuple(slice(2 * s.start, 2 * s.stop) for s in window)
        assert sources.shape == (1, 1, 8, 8, 8)
        assert torch.equal(sources, padded[(..., *box)])
