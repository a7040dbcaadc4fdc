"""MaskGiT masking for training (``MaskGiTScheduler``) and iterative decoding (``MaskGiTSampler``).

Both share a mask schedule ``gamma(r)``: ``r`` in [0, 1] is the progress through decoding, ``gamma(r)`` the
fraction of tokens still masked, with ``gamma(0) = 1`` and ``gamma(1) = 0`` (Chang et al., MaskGIT, 2022).
Training draws ``r ~ U(0, 1)`` and masks ``ceil(gamma(r) * N)`` tokens, so it sees the mask ratios that sampling
will pass through. Tokens are FSQ indices in ``[0, V)``; the mask id is ``V``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from prod9_ext.fsq import FiniteScalarQuantizer

IGNORE_INDEX = -100

MASK_SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # Concave: few tokens are fixed in the first steps, when the prediction is least informed (the paper's best).
    "cosine": lambda r: torch.cos(r * math.pi / 2),
    "linear": lambda r: 1 - r,
    # Convex: many tokens are fixed early.
    "sqrt": lambda r: 1 - torch.sqrt(r),
    "log2": lambda r: 1 - torch.log2(1 + r),
}


def mask_schedule(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The schedule ``gamma`` called ``name``: a tensor of ratios in [0, 1] → mask fractions in [0, 1]."""
    if name not in MASK_SCHEDULES:
        raise ValueError(f"unknown mask schedule {name!r}; choose one of {sorted(MASK_SCHEDULES)}")
    return MASK_SCHEDULES[name]


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


class MaskGiTScheduler:
    """Training-time masking and condition dropping for the masked-token transformer.

    Args:
        vocab_size: ``V``; the mask id is ``V``.
        schedule: mask schedule name (``cosine``, ``linear``, ``sqrt``, ``log2``).
        cond_drop_prob: probability that a sample gets the "no condition" state (classifier-free guidance).
        source_drop_prob: probability that each present source slot is dropped independently. At 0.5 every subset
            of the present sources, the empty one included, is equally likely.
        full_mask_prob: probability that a sample has all its tokens masked instead of a ratio from the schedule.
            Synthesis by expected codes (``MaskGiTSampler.predict``) makes one call on the all-masked grid, which
            the schedule alone trains on a few percent of samples.
        fsq_levels: the tokenizer's FSQ levels; needed by ``code_loss_weight``.
        code_loss_weight: weight of a second loss term on the masked tokens, the squared distance between the
            expected code under the predicted distribution (``sum_v p(v) code(v)``, what synthesis by expected codes
            decodes) and the target's code, summed over the FSQ channels. Cross-entropy alone values a near miss
            in code space no more than a far one; this term pulls the expected code onto the target.
    """

    def __init__(
        self,
        vocab_size: int,
        schedule: str = "cosine",
        cond_drop_prob: float = 0.1,
        source_drop_prob: float = 0.5,
        full_mask_prob: float = 0.0,
        fsq_levels: Sequence[int] | None = None,
        code_loss_weight: float = 0.0,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
        _check_probability("cond_drop_prob", cond_drop_prob)
        _check_probability("source_drop_prob", source_drop_prob)
        _check_probability("full_mask_prob", full_mask_prob)
        if code_loss_weight < 0:
            raise ValueError(f"code_loss_weight must be >= 0, got {code_loss_weight}")
        self.codes: torch.Tensor | None = None
        if code_loss_weight > 0:
            if fsq_levels is None or math.prod(fsq_levels) != vocab_size:
                raise ValueError(
                    f"code_loss_weight needs fsq_levels whose product is vocab_size {vocab_size}, got {fsq_levels}"
                )
            self.codes = FiniteScalarQuantizer(fsq_levels).indices_to_codes(torch.arange(vocab_size))
        self.code_loss_weight = code_loss_weight
        self.gamma = mask_schedule(schedule)
        self.mask_id = vocab_size
        self.cond_drop_prob = cond_drop_prob
        self.source_drop_prob = source_drop_prob
        self.full_mask_prob = full_mask_prob

    def mask(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks ``ceil(gamma(r) * N)`` random tokens per sample (at least one), with ``r ~ U(0, 1)`` per sample;
        all ``N`` with probability ``full_mask_prob``.

        Args:
            tokens: ``Long[B, *grid]`` with ``N = prod(grid)``.
            generator: on ``tokens.device``, for reproducible masks.

        Returns:
            ``masked_tokens`` (mask id at masked positions) and ``targets`` (the tokens at masked positions,
            ``IGNORE_INDEX`` elsewhere), both ``Long[B, *grid]``.
        """
        flat = tokens.flatten(1)
        b, n = flat.shape
        ratio = torch.rand(b, generator=generator, device=tokens.device, dtype=torch.float64)
        num_masked = torch.ceil(self.gamma(ratio) * n).long().clamp(1, n)
        if self.full_mask_prob > 0:
            full = torch.rand(b, generator=generator, device=tokens.device) < self.full_mask_prob
            num_masked = num_masked.masked_fill(full, n)
        scores = torch.rand(b, n, generator=generator, device=tokens.device)
        is_masked = scores.argsort(dim=1).argsort(dim=1) < num_masked[:, None]
        masked = flat.masked_fill(is_masked, self.mask_id).view_as(tokens)
        targets = flat.masked_fill(~is_masked, IGNORE_INDEX).view_as(tokens)
        return masked, targets

    def drop_condition(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``Bool[B]``: True with probability ``cond_drop_prob`` (pass to the model as ``drop_condition``)."""
        return torch.rand(batch_size, generator=generator, device=device) < self.cond_drop_prob

    def drop_sources(self, source_modalities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``Long[B, S]`` modality ids with each present slot set to -1 (absent) with prob ``source_drop_prob``."""
        drop = (
            torch.rand(source_modalities.shape, generator=generator, device=source_modalities.device)
            < self.source_drop_prob
        )
        return source_modalities.masked_fill(drop, -1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the masked tokens only: ``logits [B, N, V]``, ``targets [B, *grid]`` from ``mask``;
        plus ``code_loss_weight`` times the expected-code term when it is set."""
        logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        if self.codes is None:
            return loss
        masked = targets != IGNORE_INDEX
        codes = self.codes.to(logits.device)
        expected = torch.softmax(logits[masked], dim=-1) @ codes
        return loss + self.code_loss_weight * (expected - codes[targets[masked]]).square().sum(dim=-1).mean()


class MaskedTokenModel(Protocol):
    """What the sampler needs from a model: ``vocab_size`` and ``TransformerDecoder``'s call signature."""

    vocab_size: int

    def __call__(
        self,
        tokens: torch.Tensor,
        target_modality: torch.Tensor,
        sources: torch.Tensor | None = None,
        source_modalities: torch.Tensor | None = None,
        class_label: torch.Tensor | None = None,
        drop_condition: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class ConditionedTokenModel(Protocol):
    """A model whose conditions can be computed once and reused over calls (``TransformerDecoder``)."""

    def condition(
        self,
        target_modality: torch.Tensor,
        sources: torch.Tensor | None = None,
        source_modalities: torch.Tensor | None = None,
        class_label: torch.Tensor | None = None,
        drop_condition: torch.Tensor | None = None,
    ) -> Any: ...

    def logits(self, tokens: torch.Tensor, conditioning: Any, where: torch.Tensor | None = None) -> torch.Tensor: ...


def _checked_shape(shape: Sequence[int], sources: torch.Tensor | None) -> tuple[int, ...]:
    """``shape`` as a tuple, after checking that the source images ``[B, S, H, W, D]`` cover the target's token grid
    ``shape[1:]`` with the same whole number of voxels per token along every axis."""
    shape = tuple(shape)
    if sources is not None:
        voxels, grid = tuple(sources.shape[2:]), shape[1:]
        factors = {v // g for v, g in zip(voxels, grid, strict=False)} if len(voxels) == len(grid) else set()
        if len(factors) != 1 or any(v != g * next(iter(factors)) for v, g in zip(voxels, grid, strict=True)):
            raise ValueError(f"source voxel grid {voxels} is not the target token grid {grid} times one factor")
    return shape


class MaskGiTSampler:
    """Iterative parallel decoding: start all masked, fix the most confident tokens step by step.

    At step ``t`` (of ``steps``) the model reads the whole grid and gives the logits of the masked positions (only
    those: see ``TransformerDecoder.logits``); a candidate is sampled at each from ``softmax(logits / temperature)``;
    its confidence is its log-probability plus Gumbel noise scaled by ``temperature * (1 - t / steps)`` (annealed to
    zero when ``gumbel_anneal``, constant ``temperature`` otherwise); fixed tokens get infinite confidence. The most
    confident candidates are fixed so that ``floor(gamma((t + 1) / steps) * N)`` tokens remain masked, none after the
    last step. A fixed token never changes.

    Classifier-free guidance (``guidance_scale`` = w > 0): each step makes one call on the batch ``[cond; uncond]``
    (uncond: ``drop_condition`` True) and uses ``uncond + (1 + w) * (cond - uncond)`` logits, so ``w = 0`` is the
    conditional model. With ``guidance_ramp="linear"`` the scale at step ``t`` is ``w * (t + 1) / steps``: weak
    while the layout is decided, full at the end.

    Args:
        steps: number of decoding steps = number of model calls.
        scheduler_type: mask schedule name, as in ``MaskGiTScheduler``.
        temperature: sampling temperature (> 0).
        guidance_scale: classifier-free guidance weight ``w`` (0: off, no unconditional call).
        guidance_ramp: None or False for a constant scale, ``"linear"`` for the ramp above.
        gumbel_anneal: anneal the confidence noise to zero over the steps.
    """

    def __init__(
        self,
        steps: int = 12,
        scheduler_type: str = "cosine",
        temperature: float = 1.0,
        guidance_scale: float = 0.0,
        guidance_ramp: str | bool | None = None,
        gumbel_anneal: bool = True,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if guidance_ramp not in (None, False, "linear"):
            raise ValueError(f"guidance_ramp must be None, False or 'linear', got {guidance_ramp!r}")
        self.steps = steps
        self.gamma = mask_schedule(scheduler_type)
        self.temperature = temperature
        self.guidance_scale = guidance_scale
        self.guidance_ramp = guidance_ramp == "linear"
        self.gumbel_anneal = gumbel_anneal

    def num_masked_after(self, step: int, num_tokens: int) -> int:
        """Tokens still masked after step ``step`` (0-based): ``floor(gamma((step + 1) / steps) * N)``."""
        if step >= self.steps - 1:
            return 0
        ratio = torch.tensor((step + 1) / self.steps, dtype=torch.float64)
        return math.floor(float(self.gamma(ratio)) * num_tokens)

    @torch.no_grad()
    def sample(
        self,
        model: MaskedTokenModel,
        shape: Sequence[int],
        target_modality: torch.Tensor,
        sources: torch.Tensor | None = None,
        source_modalities: torch.Tensor | None = None,
        class_label: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        known_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generates ``Long[B, h, w, d]`` token grids of the target modality.

        Args:
            model: e.g. ``TransformerDecoder``; putting it in ``eval()`` mode is the caller's job.
            shape: ``(B, h, w, d)``.
            target_modality: ``Long[B]``; its device is where sampling runs.
            sources, source_modalities, class_label: conditions, passed to the model as they are.
            generator: on the sampling device, for reproducible samples.
            known_tokens: ``Long[B, h, w, d]``, tokens already decided (the mask id ``V`` where the grid is to be
                filled): they are kept, the model sees them, and the schedule runs over the masked positions only
                (MaskGiT's outpainting). None: start all masked.
        """
        shape = _checked_shape(shape, sources)
        device = target_modality.device
        mask_id = model.vocab_size
        if known_tokens is None:
            tokens = torch.full(shape, mask_id, dtype=torch.long, device=device)
        elif tuple(known_tokens.shape) != shape:
            raise ValueError(f"known_tokens shape {tuple(known_tokens.shape)} differs from shape {shape}")
        else:
            tokens = known_tokens.to(device=device, dtype=torch.long, copy=True)
        flat = tokens.view(shape[0], -1)  # shares storage with tokens
        num_tokens = flat.shape[1]
        masked_at_start = (flat == mask_id).sum(dim=1).tolist()
        call = self._bind(model, target_modality, sources, source_modalities, class_label)
        for step in range(self.steps):
            is_masked = flat == mask_id
            logits = self._guided(call(self._batch(tokens), self._batch(is_masked)), step)  # masked tokens only
            log_probs = self._log_softmax(logits)
            drawn = self._categorical(log_probs, generator)
            drawn_confidence = log_probs.gather(-1, drawn[:, None]).squeeze(-1)
            noise_scale = self.temperature * ((1 - step / self.steps) if self.gumbel_anneal else 1.0)
            drawn_confidence = drawn_confidence + noise_scale * self._gumbel(drawn_confidence, generator)
            candidates = flat.masked_scatter(is_masked, drawn)
            confidence = torch.full(flat.shape, math.inf, device=device).masked_scatter(is_masked, drawn_confidence)
            still_masked = [self.num_masked_after(step, n) for n in masked_at_start]
            num_fixed = num_tokens - torch.tensor(still_masked, device=device)[:, None]
            rank = confidence.argsort(dim=1, descending=True).argsort(dim=1)
            flat.copy_(torch.where(is_masked & (rank < num_fixed), candidates, flat))
        return tokens

    @torch.no_grad()
    def predict(
        self,
        model: MaskedTokenModel,
        shape: Sequence[int],
        target_modality: torch.Tensor,
        sources: torch.Tensor | None = None,
        source_modalities: torch.Tensor | None = None,
        class_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token probabilities ``[B, N, V]`` of every position of an all-masked ``(B, h, w, d)`` grid, in one call.

        Each position's distribution given the conditions alone (``softmax(logits / temperature)``, guided at the
        full ``guidance_scale`` when w > 0); positions in row-major order of the grid. Nothing is sampled.
        """
        shape = _checked_shape(shape, sources)
        tokens = torch.full(shape, model.vocab_size, dtype=torch.long, device=target_modality.device)
        call = self._bind(model, target_modality, sources, source_modalities, class_label)
        logits = self._guided(call(self._batch(tokens), None), self.steps - 1)
        return self._log_softmax(logits).exp()

    def _bind(
        self,
        model: MaskedTokenModel,
        target_modality: torch.Tensor,
        sources: torch.Tensor | None,
        source_modalities: torch.Tensor | None,
        class_label: torch.Tensor | None,
    ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """``(tokens, where) → logits`` with the conditions bound; with guidance, on the batch ``[cond; uncond]``.

        ``where`` (``Bool[B, N]`` or None) selects the tokens whose logits are returned (``[M, V]``; all of them,
        ``[B, N, V]``, when None). A model with ``condition`` and ``logits`` (``TransformerDecoder``) computes the
        conditions' part once per run instead of once per step, and only the selected tokens' logits.
        """
        drop = None
        if self.guidance_scale > 0:

            def twice(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else torch.cat([x, x])

            b = target_modality.shape[0]
            drop = torch.arange(2 * b, device=target_modality.device) >= b
            target_modality, sources = twice(target_modality), twice(sources)  # type: ignore[assignment]
            source_modalities, class_label = twice(source_modalities), twice(class_label)
        conditions = {
            "sources": sources,
            "source_modalities": source_modalities,
            "class_label": class_label,
            "drop_condition": drop,
        }
        if isinstance(model, ConditionedTokenModel):
            conditioning = model.condition(target_modality, **conditions)
            return lambda tokens, where: model.logits(tokens, conditioning, where)

        def call(tokens: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
            logits = model(tokens, target_modality, **conditions)
            return logits if where is None else logits[where]

        return call

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (or a mask over them) as the bound call takes them: twice over with guidance."""
        return torch.cat([x, x]) if self.guidance_scale > 0 else x

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``log_softmax(logits / temperature)`` in float32 (no division at temperature 1)."""
        logits = logits.float()
        return torch.log_softmax(logits if self.temperature == 1 else logits / self.temperature, dim=-1)

    def _guided(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Logits of step ``step``: ``uncond + (1 + w) * (cond - uncond)`` from ``[cond; uncond]`` (halves of the
        first dimension)."""
        if self.guidance_scale == 0:
            return logits
        cond, uncond = logits.float().chunk(2)
        scale = self.guidance_scale * ((step + 1) / self.steps if self.guidance_ramp else 1.0)
        return uncond + (1 + scale) * (cond - uncond)

    @staticmethod
    def _categorical(log_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One draw per row of ``log_probs [..., V]`` → ``Long[...]``, by inverting the cumulative distribution.

        One uniform number per token instead of ``torch.multinomial``'s per-row set-up: several times faster for the
        thousands of rows of a 3D grid.
        """
        cdf = log_probs.exp().cumsum(dim=-1)
        u = torch.rand(*cdf.shape[:-1], 1, generator=generator, device=cdf.device) * cdf[..., -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)

    @staticmethod
    def _gumbel(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Standard Gumbel noise ``-log(E)``, ``E ~ Exp(1)``, shaped like ``like``."""
        exponential = torch.empty_like(like).exponential_(generator=generator)
        return -torch.log(exponential.clamp_min(torch.finfo(like.dtype).tiny))
