"""MaskGiTScheduler (training masks) and MaskGiTSampler (decoding), the sampler driven by a recording fake model."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from prod9_ext.fsq import FiniteScalarQuantizer
from prod9_ext.maskgit import IGNORE_INDEX, MASK_SCHEDULES, MaskGiTSampler, MaskGiTScheduler, mask_schedule
from prod9_ext.transformer import TransformerDecoder

V = 10
GRID = (4, 4, 3)
N = math.prod(GRID)
SCHEDULES = sorted(MASK_SCHEDULES)
# Mean mask fraction E[gamma(r)] for r ~ U(0, 1).
MEAN_FRACTION = {"cosine": 2 / math.pi, "linear": 0.5, "sqrt": 1 / 3, "log2": 1 / math.log(2) - 1}


class RecordingModel:
    """Fixed random logits per position (different with and without conditions); records every call."""

    vocab_size = V

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.cond_logits = torch.randn(N, V, generator=g) * 2
        self.uncond_logits = torch.randn(N, V, generator=g) * 2
        self.calls: list[dict] = []

    def __call__(
        self, tokens, target_modality, sources=None, source_modalities=None, class_label=None, drop_condition=None
    ):
        self.calls.append({"tokens": tokens.clone(), "target_modality": target_modality, "drop": drop_condition})
        b = tokens.shape[0]
        dropped = torch.zeros(b, dtype=torch.bool) if drop_condition is None else drop_condition
        return torch.where(dropped[:, None, None], self.uncond_logits, self.cond_logits).expand(b, N, V)


def _sample(sampler: MaskGiTSampler, model=None, seed: int = 0, batch: int = 3) -> torch.Tensor:
    model = model or RecordingModel()
    g = torch.Generator().manual_seed(seed)
    return sampler.sample(model, (batch, *GRID), torch.zeros(batch, dtype=torch.long), generator=g)


# --- schedules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_endpoints_and_monotonicity(name: str) -> None:
    gamma = mask_schedule(name)
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    values = gamma(r)
    assert values[0].item() == pytest.approx(1.0)
    assert values[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(values[1:] < values[:-1])


def test_unknown_schedule_raises() -> None:
    with pytest.raises(ValueError, match="'cubic'"):
        mask_schedule("cubic")


# --- scheduler ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_mask_counts_follow_schedule(name: str) -> None:
    scheduler = MaskGiTScheduler(V, schedule=name)
    tokens = torch.randint(0, V, (2000, 8, 8, 8))
    masked, targets = scheduler.mask(tokens, generator=torch.Generator().manual_seed(0))
    counts = (masked == V).flatten(1).sum(1)
    assert counts.min() >= 1 and counts.max() <= 512
    assert counts.float().mean().item() / 512 == pytest.approx(MEAN_FRACTION[name], abs=0.03)
    assert torch.equal((targets != IGNORE_INDEX), (masked == V))


def test_mask_targets_and_reproducibility() -> None:
    scheduler = MaskGiTScheduler(V)
    tokens = torch.randint(0, V, (4, *GRID))
    masked, targets = scheduler.mask(tokens, generator=torch.Generator().manual_seed(3))
    is_masked = masked == V
    assert torch.equal(masked[~is_masked], tokens[~is_masked])
    assert torch.equal(targets[is_masked], tokens[is_masked])
    assert torch.all(targets[~is_masked] == IGNORE_INDEX)
    again = scheduler.mask(tokens, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[0], masked) and torch.equal(again[1], targets)


def test_loss_only_on_masked_positions() -> None:
    scheduler = MaskGiTScheduler(V)
    tokens = torch.randint(0, V, (2, *GRID))
    _, targets = scheduler.mask(tokens, generator=torch.Generator().manual_seed(0))
    flat_targets = targets.flatten(1)
    logits = torch.randn(2, N, V)
    loss = scheduler.loss(logits, targets)
    masked = flat_targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[masked], flat_targets[masked])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = logits.clone()
    changed[~masked] = torch.randn_like(changed[~masked]) * 10
    assert scheduler.loss(changed, targets).item() == pytest.approx(loss.item(), rel=1e-6)


def test_condition_dropping_frequency() -> None:
    scheduler = MaskGiTScheduler(V, cond_drop_prob=0.1)
    drop = scheduler.drop_condition(20000, generator=torch.Generator().manual_seed(0))
    assert drop.dtype == torch.bool
    assert drop.float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_source_dropping_sees_every_subset() -> None:
    scheduler = MaskGiTScheduler(V, source_drop_prob=0.5)
    modalities = torch.tensor([[0, 1, 2, -1]]).repeat(8000, 1)
    dropped = scheduler.drop_sources(modalities, generator=torch.Generator().manual_seed(0))
    assert torch.all(dropped[:, 3] == -1)
    assert torch.all((dropped == modalities) | (dropped == -1))
    subsets = ((dropped[:, :3] >= 0).long() * torch.tensor([1, 2, 4])).sum(1)
    frequencies = torch.bincount(subsets, minlength=8).float() / len(subsets)
    assert torch.allclose(frequencies, torch.full((8,), 1 / 8), atol=0.02)  # empty subset (0) included


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [({"schedule": "cubic"}, "cubic"), ({"cond_drop_prob": 1.5}, "1.5"), ({"source_drop_prob": -0.1}, "-0.1")],
)
def test_scheduler_bad_arguments(kwargs: dict, value: str) -> None:
    with pytest.raises(ValueError, match=value):
        MaskGiTScheduler(V, **kwargs)


# --- sampler ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_sampler_calls_model_exactly_steps_times(steps: int) -> None:
    model = RecordingModel()
    _sample(MaskGiTSampler(steps=steps), model)
    assert len(model.calls) == steps
    assert all(call["drop"] is None for call in model.calls)


def test_guided_sampler_batches_cond_and_uncond_in_one_call() -> None:
    model = RecordingModel()
    _sample(MaskGiTSampler(steps=5, guidance_scale=2.0), model, batch=3)
    assert len(model.calls) == 5
    for call in model.calls:
        assert call["tokens"].shape[0] == 6
        assert call["drop"].tolist() == [False] * 3 + [True] * 3
        assert torch.equal(call["tokens"][:3], call["tokens"][3:])


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [3, 8])
def test_sampler_masked_counts_fixed_tokens_and_completion(name: str, steps: int) -> None:
    model = RecordingModel()
    out = _sample(MaskGiTSampler(steps=steps, scheduler_type=name), model)
    gamma = MASK_SCHEDULES[name]
    assert torch.all(model.calls[0]["tokens"] == V)
    states = [call["tokens"] for call in model.calls[1:]] + [out]  # tokens after steps 0 .. steps-1
    for step, state in enumerate(states):
        expected = (
            0
            if step == steps - 1
            else math.floor(gamma(torch.tensor((step + 1) / steps, dtype=torch.float64)).item() * N)
        )
        assert (state == V).flatten(1).sum(1).tolist() == [expected] * 3
    for earlier, later in itertools.pairwise(states):
        fixed = earlier != V
        assert torch.equal(later[fixed], earlier[fixed])
    assert out.dtype == torch.long and out.shape == (3, *GRID)
    assert out.min() >= 0 and out.max() < V


def test_sampler_reproducible_with_generator() -> None:
    sampler = MaskGiTSampler(steps=6)
    assert torch.equal(_sample(sampler, seed=7), _sample(sampler, seed=7))
    assert not torch.equal(_sample(sampler, seed=7), _sample(sampler, seed=8))


def test_guidance_changes_output_and_zero_reproduces_unguided() -> None:
    unguided = _sample(MaskGiTSampler(steps=6), seed=2)
    assert torch.equal(_sample(MaskGiTSampler(steps=6, guidance_scale=0.0), seed=2), unguided)
    guided = _sample(MaskGiTSampler(steps=6, guidance_scale=3.0), seed=2)
    ramped = _sample(MaskGiTSampler(steps=6, guidance_scale=3.0, guidance_ramp="linear"), seed=2)
    assert not torch.equal(guided, unguided)
    assert not torch.equal(ramped, guided)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_candidates_follow_softmax_with_temperature(temperature: float) -> None:
    """One step fixes every token at its sampled candidate: frequencies match ``softmax(logits / temperature)``."""
    model = RecordingModel()
    out = _sample(MaskGiTSampler(steps=1, temperature=temperature), model, batch=4000).flatten(1)
    frequencies = torch.stack([torch.bincount(out[:, i], minlength=V) for i in range(N)]).float() / len(out)
    expected = torch.softmax(model.cond_logits / temperature, dim=-1)
    assert torch.allclose(frequencies, expected, atol=0.03)


def test_low_temperature_gives_argmax() -> None:
    out = _sample(MaskGiTSampler(steps=4, temperature=1e-4))
    assert torch.equal(out[0], RecordingModel().cond_logits.argmax(-1).view(GRID))


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"steps": 0}, "0"),
        ({"scheduler_type": "cubic"}, "cubic"),
        ({"guidance_scale": -1.0}, "-1.0"),
        ({"temperature": 0.0}, "0.0"),
        ({"temperature": -2.0}, "-2.0"),
        ({"guidance_ramp": "cosine"}, "cosine"),
    ],
)
def test_sampler_bad_arguments(kwargs: dict, value: str) -> None:
    with pytest.raises(ValueError, match=value):
        MaskGiTSampler(**kwargs)


@pytest.mark.parametrize("voxels", [(4, 4, 4), (8, 8, 7), (8, 8, 3), (2, 2, 2), (8, 8)])
@pytest.mark.parametrize("method", ["sample", "predict"])
def test_sampler_rejects_sources_off_the_token_grid(method: str, voxels: tuple[int, ...]) -> None:
    """Source voxels must be the token grid (4, 4, 3) times one whole factor along every axis."""
    sources = torch.zeros(1, 1, *voxels)
    call = getattr(MaskGiTSampler(), method)
    with pytest.raises(ValueError, match=rf"source voxel grid {re.escape(str(voxels))} is not the target token grid"):
        call(RecordingModel(), (1, *GRID), torch.zeros(1, dtype=torch.long), sources=sources)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_sampler_takes_sources_on_the_token_grid_times_a_factor(factor: int) -> None:
    sources = torch.rand(1, 2, *(n * factor for n in GRID))
    model = RecordingModel()
    tokens = MaskGiTSampler(steps=2).sample(
        model, (1, *GRID), torch.zeros(1, dtype=torch.long), sources, torch.tensor([[0, 1]])
    )
    assert tokens.shape == (1, *GRID) and len(model.calls) == 2


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_predict_is_one_call_on_the_all_masked_grid(temperature: float) -> None:
    model = RecordingModel()
    probs = MaskGiTSampler(steps=12, temperature=temperature).predict(
        model, (2, *GRID), torch.zeros(2, dtype=torch.long)
    )
    assert len(model.calls) == 1
    assert torch.all(model.calls[0]["tokens"] == V)
    assert probs.shape == (2, N, V)
    expected = torch.softmax(model.cond_logits / temperature, dim=-1)
    assert torch.allclose(probs, expected.expand(2, N, V), atol=1e-6)


@pytest.mark.parametrize("ramp", [None, "linear"])
def test_guided_predict_uses_the_full_guidance_scale(ramp: str | None) -> None:
    model = RecordingModel()
    sampler = MaskGiTSampler(steps=6, guidance_scale=2.0, guidance_ramp=ramp)
    probs = sampler.predict(model, (1, *GRID), torch.zeros(1, dtype=torch.long))
    assert len(model.calls) == 1 and model.calls[0]["drop"].tolist() == [False, True]
    guided = model.uncond_logits + 3.0 * (model.cond_logits - model.uncond_logits)
    assert torch.allclose(probs[0], torch.softmax(guided, dim=-1), atol=1e-6)


def test_full_mask_probability_masks_every_token_of_that_share_of_samples() -> None:
    scheduler = MaskGiTScheduler(V, full_mask_prob=0.4)
    tokens = torch.randint(0, V, (4000, 4, 4, 4))
    masked, targets = scheduler.mask(tokens, generator=torch.Generator().manual_seed(0))
    full = (masked == V).flatten(1).all(dim=1)
    # The cosine schedule alone masks all 64 tokens for r < 2/pi * acos(63/64) (about 11 % of samples).
    alone = MaskGiTScheduler(V).mask(tokens, generator=torch.Generator().manual_seed(0))[0]
    share_alone = (alone == V).flatten(1).all(dim=1).float().mean().item()
    assert full.float().mean().item() == pytest.approx(0.4 + 0.6 * share_alone, abs=0.03)
    assert torch.equal(targets[full], tokens[full])


def test_sampler_computes_a_models_conditions_once_and_samples_as_the_plain_call() -> None:
    """A model with ``condition``/``logits`` gets one ``condition`` call per run and the same samples as through
    its plain ``__call__``; with guidance, on the ``[cond; uncond]`` batch."""
    torch.manual_seed(0)
    model = TransformerDecoder(1, 16, 2, 32, V, GRID, 4, token_dim=4, source_factor=2).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    counted = {"condition": 0}
    original = model.condition

    def condition(*args, **kwargs):
        counted["condition"] += 1
        return original(*args, **kwargs)

    model.condition = condition  # type: ignore[method-assign]
    plain = lambda *args, **kwargs: TransformerDecoder.__call__(model, *args, **kwargs)  # noqa: E731
    plain.vocab_size = V  # type: ignore[attr-defined]
    sources, modalities = torch.rand(2, 1, *(2 * n for n in GRID)), torch.tensor([[0], [1]])
    for w in (0.0, 1.5):
        sampler = MaskGiTSampler(4, guidance_scale=w)
        runs = [
            sampler.sample(
                m, (2, *GRID), torch.tensor([2, 3]), sources, modalities, generator=torch.Generator().manual_seed(5)
            )
            for m in (model, plain)
        ]
        assert torch.equal(runs[0], runs[1])
    assert counted["condition"] == 2 + 2 * 4  # one per cached run; one per step for the plain calls (2 runs x 4)


def test_code_loss_adds_the_squared_distance_of_the_expected_code_to_the_target_code() -> None:
    """``code_loss_weight``: cross-entropy plus w * |sum_v p(v) code(v) - code(target)|^2 over the masked tokens."""
    levels = [2, 5]  # V = 10
    plain, weighted = MaskGiTScheduler(V), MaskGiTScheduler(V, fsq_levels=levels, code_loss_weight=0.5)
    logits = torch.randn(2, N, V, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, V, (2, *GRID), generator=torch.Generator().manual_seed(1))
    targets.view(2, -1)[:, ::3] = IGNORE_INDEX
    codes = FiniteScalarQuantizer(levels).indices_to_codes(torch.arange(V))
    kept = targets.flatten() != IGNORE_INDEX
    expected = torch.softmax(logits.reshape(-1, V)[kept], dim=-1) @ codes
    distance = (expected - codes[targets.flatten()[kept]]).square().sum(dim=-1).mean()
    assert torch.allclose(weighted.loss(logits, targets), plain.loss(logits, targets) + 0.5 * distance, atol=1e-6)
    # A sharper prediction of the right token lowers the term.
    sharp = logits.clone().reshape(-1, V)
    sharp[kept, targets.flatten()[kept]] += 20
    assert weighted.loss(sharp.view_as(logits), targets) < weighted.loss(logits, targets)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"code_loss_weight": 1.0},
        {"code_loss_weight": 1.0, "fsq_levels": [3, 4]},
        {"code_loss_weight": -1.0, "fsq_levels": [2, 5]},
    ],
)
def test_code_loss_needs_matching_fsq_levels_and_a_non_negative_weight(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="code_loss_weight"):
        MaskGiTScheduler(V, **kwargs)
