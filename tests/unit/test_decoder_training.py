"""Training the source-aware decoder: SourceDecoderIteration's inputs and step, the saver and the loaders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedTrainer

from prod9_ext import (
    AutoencoderFSQ,
    AutoencoderInferenceWrapper,
    MaskGiTSampler,
    SlidingWindowConfig,
    TransformerDecoder,
)
from prod9_ext.engines import (
    SourceDecoderIteration,
    SourceDecoderSaver,
    Stage1Tokenizer,
    build_source_decoder,
    load_source_decoder_for,
)
from prod9_ext.source_decoder import SourceAwareDecoder, load_source_decoder

LEVELS = (5, 5, 5)
V = math.prod(LEVELS)
GRID = (4, 4, 4)
M = 4


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer(fingerprint: str = "stage1-abc") -> Stage1Tokenizer:
    torch.manual_seed(0)
    autoencoder = AutoencoderFSQ(
        num_channels=(8, 8),
        num_res_blocks=(1, 1),
        norm_num_groups=4,
        attention_levels=(False, False),
        fsq_levels=LEVELS,
    ).eval()
    wrapper = AutoencoderInferenceWrapper(autoencoder, SlidingWindowConfig(roi_size=(8, 8, 8), overlap=0.0))
    return Stage1Tokenizer(wrapper, V, 2, fingerprint, "weights.pt", [1.0, 1.0, 1.0])


def _transformer() -> TransformerDecoder:
    """A tiny stage 2 with randomised gates and head: its expected codes are not all the centre of the box."""
    torch.manual_seed(1)
    model = TransformerDecoder(1, 24, 2, 48, V, GRID, M, token_dim=8, source_factor=2, fsq_levels=LEVELS)
    with torch.no_grad():
        for param in model.parameters():
            if torch.all(param == 0):
                param.normal_(std=0.5)
    return model.eval()


def _iteration(tokenizer: Stage1Tokenizer, **kwargs) -> SourceDecoderIteration:
    codebook = tokenizer.wrapper.autoencoder.quantizer.indices_to_codes(torch.arange(V))
    return SourceDecoderIteration(_transformer(), MaskGiTSampler(steps=2), codebook, [0, 1, 2, 3], **kwargs)


def _batch(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, V, (size, M, *GRID), generator=generator),
        "voxels": torch.rand(size, M, *(2 * n for n in GRID), generator=generator),
    }


@pytest.mark.parametrize(
    "kwargs",
    [{"expected_prob": 1.0}, {"expected_prob": 0.0, "corrupt_max": 1.0}, {}],
    ids=["expected", "corrupted", "mixed"],
)
def test_inputs_give_codes_in_the_box_and_never_the_target_as_a_source(kwargs: dict) -> None:
    tokenizer = _tokenizer()
    iteration = _iteration(tokenizer, target_modalities=[2, 3], **kwargs)
    batch = _batch(24)
    torch.manual_seed(5)
    with torch.no_grad():
        codes, slots, present, target_modality, target = iteration.inputs(
            batch["tokens"], batch["voxels"], torch.Generator().manual_seed(0)
        )
    assert codes.shape == (24, len(LEVELS), *GRID)
    assert codes.min() >= -1.0 and codes.max() <= 1.0  # in the box of the level grid
    assert set(target_modality.tolist()) == {2, 3}
    rows = torch.arange(24)
    assert not present[rows, target_modality].any()  # the target's own slot is never present
    assert present.any() and not present.all(dim=1).any()
    assert torch.equal(slots, batch["voxels"])  # slot m holds modality m
    assert torch.equal(target, batch["voxels"][rows, target_modality][:, None])
    if kwargs.get("expected_prob") == 1.0:  # continuous codes between the levels
        levels = (codes + 1) * 2  # 5 levels: k / 2 - 1
        assert not torch.allclose(levels, levels.round(), atol=1e-3)


def test_uncorrupted_codes_are_the_targets_own() -> None:
    tokenizer = _tokenizer()
    iteration = _iteration(tokenizer, expected_prob=0.0, corrupt_max=0.0)
    batch = _batch(6)
    codes, _, _, target_modality, _ = iteration.inputs(batch["tokens"], batch["voxels"])
    own = batch["tokens"][torch.arange(6), target_modality]
    assert torch.equal(tokenizer.wrapper.autoencoder.quantizer.codes_to_indices(codes), own)


def test_expected_codes_are_the_transformers_given_the_drawn_sources() -> None:
    tokenizer = _tokenizer()
    iteration = _iteration(tokenizer, expected_prob=1.0, source_drop_prob=0.0)
    batch = _batch(3)
    codes, _, present, target_modality, _ = iteration.inputs(batch["tokens"], batch["voxels"])
    source_modalities = torch.where(present, torch.arange(M), -1)
    probs = MaskGiTSampler(steps=2).predict(
        iteration.transformer, (3, *GRID), target_modality, batch["voxels"], source_modalities
    )
    expected = (probs @ iteration.codebook).transpose(1, 2).reshape(codes.shape)
    torch.testing.assert_close(codes, expected)


def test_one_training_step_changes_the_decoder_and_never_shows_it_the_target(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    decoder = build_source_decoder(tokenizer, num_modalities=M, channels=4)
    assert isinstance(decoder, SourceAwareDecoder)
    before = {name: param.detach().clone() for name, param in decoder.named_parameters()}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    decoder.register_forward_pre_hook(lambda _, args: seen.append((args[2].clone(), args[3].clone())))
    iteration = _iteration(tokenizer)
    transformer_before = {name: p.detach().clone() for name, p in iteration.transformer.named_parameters()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[_batch(2, seed=1)],
        network=decoder,
        optimizer=torch.optim.AdamW(decoder.parameters(), lr=1e-3),
        loss_function=torch.nn.L1Loss(),
        iteration_update=iteration,
    )
    path = tmp_path / "source_decoder.pt"
    SourceDecoderSaver(decoder, path, tokenizer.fingerprint).attach(trainer)
    trainer.run()
    output = trainer.state.output
    output = output[0] if isinstance(output, list) else output
    assert torch.isfinite(torch.as_tensor(output["loss"]))
    assert len(seen) == 1
    present, target_modality = seen[0]
    assert not present[torch.arange(len(target_modality)), target_modality].any()
    changed = [name for name, param in decoder.named_parameters() if not torch.equal(param, before[name])]
    assert any(name.startswith("branches.") for name in changed)  # the zero-initialised branches start to learn
    for name, param in iteration.transformer.named_parameters():  # the transformer is frozen
        assert torch.equal(param, transformer_before[name]) and not param.requires_grad
    # The saver wrote the decoder's own file after the epoch, with its stage 1's fingerprint.
    loaded = load_source_decoder(path, tokenizer.wrapper.autoencoder, tokenizer.fingerprint, M, channels=4)
    for name, param in loaded.state_dict().items():
        assert torch.equal(param, decoder.state_dict()[name])


def test_loader_for_a_tokenizer(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    path = tmp_path / "source_decoder.pt"
    assert load_source_decoder_for(tokenizer, path, enabled=False) is None  # no file needed when not used
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_source_decoder_for(tokenizer, path, channels=4)
    decoder = build_source_decoder(tokenizer, channels=4)
    SourceDecoderSaver(decoder, path, tokenizer.fingerprint)(None)  # type: ignore[arg-type]
    loaded = load_source_decoder_for(tokenizer, path, channels=4)
    assert loaded is not None and not loaded.training
    assert not any(param.requires_grad for param in loaded.parameters())
    with pytest.raises(ValueError, match=rf"{path} were trained with another stage 1"):
        load_source_decoder_for(_tokenizer("stage1-other"), path, channels=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source_drop_prob": 1.5}, "source_drop_prob"),
        ({"expected_prob": -0.1}, "expected_prob"),
        ({"corrupt_max": 2.0}, "corrupt_max"),
        ({"target_modalities": [5]}, "target_modalities"),
        ({"target_modalities": []}, "target_modalities"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _iteration(_tokenizer(), **kwargs)
    with pytest.raises(TypeError, match="SourceAwareDecoder"):
        SourceDecoderSaver(torch.nn.Linear(1, 1), "x.pt", "abc")


def _coordinates(channels: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[1, channels, *shape]`` whose value at ``(c, x, y, z)`` is ``1 + c * 10^6 + x * 10^4 + y * 100 + z``."""
    c, x, y, z = torch.meshgrid(torch.arange(channels), *(torch.arange(n) for n in shape), indexing="ij")
    return (1 + c * 10**6 + x * 10**4 + y * 100 + z).double()[None]


def test_training_windows_of_codes_and_voxels_are_aligned() -> None:
    """``crop_size``: the codes' window of tokens and the sources' and target's windows of voxels are the same box."""
    iteration = _iteration(_tokenizer(), crop_size=(3, 4, 2))
    codes, slots, target = _coordinates(3, (6, 8, 5)), _coordinates(M, (12, 16, 10)), _coordinates(1, (12, 16, 10))
    torch.manual_seed(0)
    for _ in range(5):
        cropped_codes, cropped_slots, cropped_target = iteration.crop([codes, slots, target], 2)
        assert cropped_codes.shape == (1, 3, 3, 4, 2)
        assert cropped_slots.shape == (1, M, 6, 8, 4) and cropped_target.shape == (1, 1, 6, 8, 4)
        corner = int(cropped_codes[0, 0, 0, 0, 0]) - 1
        start = (corner // 10**4, corner // 100 % 100, corner % 100)
        box = tuple(slice(2 * s, 2 * (s + n)) for s, n in zip(start, (3, 4, 2), strict=True))
        assert torch.equal(cropped_slots, slots[(..., *box)]) and torch.equal(cropped_target, target[(..., *box)])
    whole = _iteration(_tokenizer(), crop_size=(6, 8, 5)).crop([codes, slots, target], 2)
    assert all(a is b for a, b in zip(whole, (codes, slots, target), strict=True))  # no smaller than the grid
    with pytest.raises(ValueError, match="crop_size"):
        _iteration(_tokenizer(), crop_size=(3, 0, 2))
