"""SourceAwareDecoder: stage 1's decoder plus zero-initialised branches fed by the present sources' voxels.

At initialisation it decodes exactly as stage 1; absent slots change nothing; windows blend; its weights file names
its stage 1; and after training it still depends on the tokens (another case's tokens give another volume).
"""

from __future__ import annotations

import math
from pathlib import Path

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
from prod9_ext.source_decoder import SourceAwareDecoder, load_source_decoder, save_source_decoder

LEVELS = (5, 5, 5)
V = math.prod(LEVELS)
M = 4  # modality slots: T1, T1ce, T2, FLAIR


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: one thread avoids the synchronisation cost (and contention) of several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _autoencoder(levels: int = 2) -> AutoencoderFSQ:
    """A tiny stage 1 with ``levels`` resolution levels (downsampling factor ``2 ** (levels - 1)``)."""
    torch.manual_seed(0)
    return AutoencoderFSQ(
        num_channels=(8,) * levels,
        num_res_blocks=(1,) * levels,
        norm_num_groups=4,
        attention_levels=(False,) * levels,
        fsq_levels=LEVELS,
    ).eval()


def _randomised(decoder: SourceAwareDecoder, seed: int = 1) -> SourceAwareDecoder:
    """The zero-initialised branches given random weights, as training would: the sources then reach the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in decoder.branches.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return decoder.eval()


def _inputs(
    autoencoder: AutoencoderFSQ, grid: tuple[int, int, int], batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, sources [B, M, *grid * f], present, target)``: target FLAIR, T1 and T2 present, T1ce absent."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, V, (batch, *grid), generator=generator)
    codes = autoencoder.quantizer.indices_to_codes(indices)
    f = autoencoder.downsampling_factor
    sources = torch.rand(batch, M, *(n * f for n in grid), generator=generator)
    present = torch.tensor([[True, False, True, False]]).expand(batch, M)
    return codes, sources, present, torch.full((batch,), 3)


@pytest.mark.parametrize(("levels", "grid"), [(2, (4, 4, 4)), (3, (2, 3, 2))])
def test_at_initialisation_it_decodes_exactly_as_stage_1(levels: int, grid: tuple[int, int, int]) -> None:
    autoencoder = _autoencoder(levels)
    decoder = SourceAwareDecoder(autoencoder, M, channels=4).eval()
    assert decoder.factor == autoencoder.downsampling_factor == 2 ** (levels - 1)
    assert len(decoder.branches) == len(decoder.blocks) - 2  # a branch after every block but the output norm, conv
    codes, sources, present, target = _inputs(autoencoder, grid)
    with torch.no_grad():
        decoded = decoder(codes, sources, present, target)
        stage1 = autoencoder.decode(codes)
        assert decoded.shape == stage1.shape == (2, 1, *(n * decoder.factor for n in grid))
        torch.testing.assert_close(decoded, stage1)
        # A copy: training the decoder leaves stage 1 (and the token caches made with it) as it was.
        _randomised(decoder)
        for param in decoder.blocks.parameters():
            param.add_(1.0)
        torch.testing.assert_close(autoencoder.decode(codes), stage1)


@pytest.mark.parametrize(("levels", "grid"), [(2, (4, 4, 4)), (3, (2, 3, 2))])
def test_absent_slots_change_nothing_and_present_ones_do(levels: int, grid: tuple[int, int, int]) -> None:
    """No leak: whatever an absent slot holds (the target's own, FLAIR, included) the output is the same."""
    autoencoder = _autoencoder(levels)
    decoder = _randomised(SourceAwareDecoder(autoencoder, M, channels=4))
    codes, sources, present, target = _inputs(autoencoder, grid)
    with torch.no_grad():
        reference = decoder(codes, sources, present, target)
        for absent in (1, 3):  # T1ce (absent), FLAIR (the target)
            changed = sources.clone()
            changed[:, absent] = torch.rand_like(changed[:, absent]) * 4 - 2
            assert torch.equal(decoder(codes, changed, present, target), reference)
        changed = sources.clone()
        changed[:, 0] = torch.rand_like(changed[:, 0]) * 4 - 2  # T1, present
        assert (decoder(codes, changed, present, target) - reference).abs().amax() > 1e-3
        # The sources matter only through the branches: the same change is invisible at initialisation.
        fresh = SourceAwareDecoder(autoencoder, M, channels=4).eval()
        assert torch.equal(fresh(codes, changed, present, target), fresh(codes, sources, present, target))


def test_windows_that_fit_the_grid_once_are_the_whole_forward() -> None:
    autoencoder = _autoencoder()
    decoder = _randomised(SourceAwareDecoder(autoencoder, M, channels=4))
    codes, sources, present, target = _inputs(autoencoder, (4, 4, 4))
    with torch.no_grad():
        whole = decoder(codes, sources, present, target)
        for roi in ((8, 8, 8), (16, 16, 16)):  # the ROI, or larger (shrunk to the grid)
            torch.testing.assert_close(decoder.decode_windows(codes, sources, present, target, roi), whole)


def test_windows_each_see_their_own_sources() -> None:
    """Windows that tile the grid without overlap (constant weights) give each half's own forward: the sources travel
    with the codes, voxel for voxel, and every item keeps its own sources and target."""
    autoencoder = _autoencoder()
    decoder = _randomised(SourceAwareDecoder(autoencoder, M, channels=4))
    codes, sources, present, target = _inputs(autoencoder, (8, 4, 4))
    present = torch.tensor([[True, False, True, False], [False, True, False, False]])
    target = torch.tensor([3, 0])
    with torch.no_grad():
        windowed = decoder.decode_windows(codes, sources, present, target, (8, 8, 8), overlap=0.0, mode="constant")
        halves = [
            decoder(codes[..., i : i + 4, :, :], sources[..., 2 * i : 2 * i + 8, :, :], present, target) for i in (0, 4)
        ]
    assert windowed.shape == (2, 1, 16, 8, 8)
    torch.testing.assert_close(windowed, torch.cat(halves, dim=2))


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_windows_over_a_grid_larger_than_the_roi_blend(mode: str) -> None:
    """Overlapping windows over a grid larger than the ROI: the right shape, and every voxel a weighted mean of the
    windows covering it (a decoder whose output is one value everywhere gives that value everywhere)."""
    autoencoder = _autoencoder()
    decoder = _randomised(SourceAwareDecoder(autoencoder, M, channels=4))
    codes, sources, present, target = _inputs(autoencoder, (7, 5, 6))
    with torch.no_grad():
        windows = decoder.decode_windows(codes, sources, present, target, (8, 8, 8), overlap=0.5, mode=mode)
        assert windows.shape == (2, 1, 14, 10, 12) and torch.isfinite(windows).all()
        assert windows.std() > 1e-3
        last = decoder.blocks[-1].conv.conv
        last.weight.zero_()
        last.bias.fill_(0.25)
        constant = decoder.decode_windows(codes, sources, present, target, (8, 8, 8), overlap=0.5, mode=mode)
    torch.testing.assert_close(constant, torch.full_like(constant, 0.25))


def test_sources_off_the_codes_grid_and_a_present_target_are_refused_in_one_line() -> None:
    autoencoder = _autoencoder()
    decoder = SourceAwareDecoder(autoencoder, M, channels=4).eval()
    codes, sources, present, target = _inputs(autoencoder, (4, 4, 4))
    with pytest.raises(ValueError) as caught:
        decoder(codes, sources[..., :6], present, target)
    assert str(caught.value) == "sources grid (8, 8, 6) is not the codes grid (4, 4, 4) times 2 ((8, 8, 8))"
    with pytest.raises(ValueError, match=r"^the target's own modality is marked present among the sources$"):
        decoder(codes, sources, present.clone().fill_(True), target)
    with pytest.raises(ValueError, match=r"need sources \[B, 4, \*spatial\] and present \[B, 4\]"):
        decoder(codes, sources[:, :3], present[:, :3], torch.ones_like(target))  # T1ce: a slot of the three


def test_weights_file_round_trips_and_names_itself_when_it_does_not_fit(tmp_path: Path) -> None:
    autoencoder = _autoencoder()
    decoder = _randomised(SourceAwareDecoder(autoencoder, M, channels=4))
    path = tmp_path / "models" / "source_decoder.pt"
    path.parent.mkdir()
    save_source_decoder(decoder, path, "stage1-abc")
    assert sorted(p.name for p in path.parent.iterdir()) == ["source_decoder.pt"]  # atomic: no temporary left
    loaded = load_source_decoder(path, autoencoder, "stage1-abc", M, channels=4).eval()
    codes, sources, present, target = _inputs(autoencoder, (4, 4, 4))
    with torch.no_grad():
        assert torch.equal(loaded(codes, sources, present, target), decoder(codes, sources, present, target))

    missing = tmp_path / "nothing_here.pt"
    with pytest.raises(FileNotFoundError) as not_found:
        load_source_decoder(missing, autoencoder, "stage1-abc", M, channels=4)
    with pytest.raises(ValueError) as other_stage1:
        load_source_decoder(path, autoencoder, "stage1-xyz", M, channels=4)
    with pytest.raises(ValueError) as other_width:
        load_source_decoder(path, autoencoder, "stage1-abc", M, channels=8)
    stray = tmp_path / "stray.pt"
    torch.save({"weight": torch.zeros(1)}, stray)
    with pytest.raises(ValueError) as not_a_decoder:
        load_source_decoder(stray, autoencoder, "stage1-abc", M, channels=4)
    for caught, file in ((not_found, missing), (other_stage1, path), (other_width, path), (not_a_decoder, stray)):
        message = str(caught.value)
        assert str(file) in message and "\n" not in message
    assert "another stage 1" in str(other_stage1.value)
    assert "do not fit" in str(other_width.value)


def test_trained_decoder_still_depends_on_the_tokens() -> None:
    """Token dependence survives training: a tiny decoder trained 60 steps on target = stage1(codes) + source / 2
    decodes one case's sources with another case's codes into a clearly different volume.

    The threshold: swapping the codes changes the true target by D = mean |stage1(c_a) - stage1(c_b)| (about 0.28
    here). A decoder that ignored the codes (a regression of the sources) gives 0, the ideal decoder D; requiring more
    than D / 2 leaves room for an imperfect fit and none for a collapse. The decoder is also required to have learned
    the sources (a swap of the sources moves its output by more than half of what it moves the target), so it is not
    stage 1's decoder passing the test untrained.
    """
    autoencoder = _autoencoder().requires_grad_(False)
    decoder = SourceAwareDecoder(autoencoder, 2, channels=4)  # slot 0: the source; modality 1: the target
    generator = torch.Generator().manual_seed(0)

    def cases(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = autoencoder.quantizer.indices_to_codes(torch.randint(0, V, (n, 4, 4, 4), generator=generator))
        source = torch.rand(n, 1, 8, 8, 8, generator=generator)
        with torch.no_grad():
            target = autoencoder.decode(codes) + 0.5 * source
        return codes, source, target

    def decode(codes: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        n = len(codes)
        present = torch.tensor([[True, False]]).expand(n, 2)
        return decoder(
            codes, torch.cat([source, torch.zeros_like(source)], 1), present, torch.ones(n, dtype=torch.long)
        )

    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-2, weight_decay=0.0)
    decoder.train()
    for _ in range(60):
        codes, source, target = cases(4)
        loss = (decode(codes, source) - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    codes, source, target = cases(4)  # held-out cases; case i is given case i-1's codes or sources
    with torch.no_grad():
        own = decode(codes, source)
        swapped_codes = decode(codes.roll(1, 0), source)
        swapped_sources = decode(codes, source.roll(1, 0))
        stage1 = autoencoder.decode(codes)
        code_effect = (stage1 - autoencoder.decode(codes.roll(1, 0))).abs().mean()
    assert (own - target).abs().mean() < 0.5 * (stage1 - target).abs().mean()  # it learned: error below stage 1's
    assert (own - swapped_sources).abs().mean() > 0.5 * (0.5 * (source - source.roll(1, 0))).abs().mean()
    assert (own - swapped_codes).abs().mean() > 0.5 * code_effect


def _tokenizer() -> Stage1Tokenizer:
    autoencoder = _autoencoder()
    wrapper = AutoencoderInferenceWrapper(autoencoder, SlidingWindowConfig(roi_size=(8, 8, 8), overlap=0.0))
    return Stage1Tokenizer(wrapper, V, 2, "fingerprint", "weights.pt", [1.0, 1.0, 1.0])


def _transformer() -> TransformerDecoder:
    torch.manual_seed(1)
    return TransformerDecoder(1, 24, 2, 24, V, (4, 4, 4), num_modalities=M, source_factor=2).eval()


def test_synthesis_with_a_fresh_source_decoder_is_stage_1s_and_with_a_trained_one_reads_the_sources() -> None:
    tokenizer = _tokenizer()
    generator = torch.Generator().manual_seed(3)
    batch = {key: torch.rand(1, 1, 8, 8, 8, generator=generator) for key in ("t1", "t2")}

    def synthesis(source_decoder: SourceAwareDecoder | None, t1: torch.Tensor) -> torch.Tensor:
        inferer = SynthesisInferer(
            tokenizer, MaskGiTSampler(steps=2), "t2", ["t1"], decode="mean", source_decoder=source_decoder
        )
        return inferer.synthesize({**batch, "t1": t1}, _transformer(), torch.device("cpu"))["pred"].as_tensor()

    fresh = SourceAwareDecoder(tokenizer.wrapper.autoencoder, M, channels=4).eval()
    stage1 = synthesis(None, batch["t1"])
    torch.testing.assert_close(synthesis(fresh, batch["t1"]), stage1)
    trained = _randomised(SourceAwareDecoder(tokenizer.wrapper.autoencoder, M, channels=4))
    assert not torch.allclose(synthesis(trained, batch["t1"]), stage1, atol=1e-3)
    brighter = (batch["t1"] + 0.5).clamp(0, 1)
    assert not torch.allclose(synthesis(trained, brighter), synthesis(trained, batch["t1"]), atol=1e-3)


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0])
def test_parameter_groups_give_stage_1s_copy_its_own_rate_or_freeze_it(scale: float) -> None:
    """One optimizer step moves the new branches at the full rate and stage 1's copy at ``scale`` times it (0: not at
    all, ControlNet's locked base); every parameter is in exactly one group."""
    autoencoder = _autoencoder().requires_grad_(False)  # frozen, as the tokenizer's stage 1 is
    decoder = _randomised(SourceAwareDecoder(autoencoder, M, channels=4))
    groups = decoder.parameter_groups(1e-3, scale)
    assert [group["lr"] for group in groups] == ([1e-3] if scale == 0 else [1e-3, 1e-3 * scale])
    grouped = [id(p) for group in groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    copied = [*decoder.post_quant_conv.parameters(), *decoder.blocks.parameters()]
    assert len(grouped) == sum(1 for _ in decoder.parameters()) - (len(copied) if scale == 0 else 0)
    before = [p.detach().clone() for p in copied]
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    codes, sources, present, target = _inputs(autoencoder, (4, 4, 4))
    decoder.train()
    decoder(codes, sources, present, target).square().mean().backward()
    optimizer.step()
    moved = any(not torch.equal(b, p) for b, p in zip(before, copied, strict=True))
    assert moved == (scale > 0)
    assert all(p.requires_grad == (scale > 0) for p in copied)
    with pytest.raises(ValueError, match=r"stage1_lr_scale >= 0, got 0\.001 and -1"):
        decoder.parameter_groups(1e-3, -1)
