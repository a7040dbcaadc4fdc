"""Synthesis for MONAI's ``SupervisedEvaluator``: sample the target's tokens given the sources' voxels, decode; scores.

One path serves stage-2 validation, ``evaluate.json`` and ``inference.json``: :class:`SynthesisInferer` holds the
stage-1 tokenizer, the sampler and the task (target and source modalities), and :func:`synthesis_iteration` is the
evaluator's ``iteration_update``. Images come from the same preprocessing as training, whole: validation,
``evaluate.json`` and inference all keep the whole foreground box.

Images of any size: the transformer sees token grids of its ``latent_shape`` only (ROI / downsampling factor), so an
image is padded to at least the ROI (and to whole tokens), and the target's token grid is filled window by window
(windows of ``latent_shape`` over the grid, ``overlap`` apart, each reading the source voxels under it), then decoded
whole, by stage 1's decoder or the source-aware one (``source_decoder``), and cropped back. Sampling fills the
windows in turn, each conditioned on the tokens its earlier neighbours fixed in their overlap (MaskGiT outpainting),
so the grid is one consistent sample; the expected-code decoding blends the windows' expected codes with
``blend_mode`` weights. An image no larger than the ROI is one window: the plain model.

Scores MONAI does not have: :class:`RegionSSIMMetric` (SSIM inside a region, the tumour, as BraSyn reports it) and
:class:`TokenAccuracyMetric`. Both are ``CumulativeIterationMetric`` subclasses, so MONAI's ``IgniteMetricHandler``
wraps them and ``MetricsSaver`` writes their per-case values like any built-in metric.

Neighbours: which cases to synthesise and where the volumes go is :mod:`prod9_ext.engines.synthesis_io`; the
tokenizer and the training of the transformer are :mod:`~prod9_ext.engines.stage2_training`; the sampler is
:class:`prod9_ext.MaskGiTSampler`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.metrics import CumulativeIterationMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.metrics.utils import do_metric_reduction
from monai.utils import CommonKeys as Keys
from torch import nn

from prod9_ext.data.brats import modality_id
from prod9_ext.engines.stage1_training import unwrap_parallel
from prod9_ext.engines.stage2_training import Stage1Tokenizer
from prod9_ext.maskgit import MaskGiTSampler
from prod9_ext.source_decoder import SourceAwareDecoder
from prod9_ext.transformer import TransformerDecoder

__all__ = [
    "DECODE_MODES",
    "RegionSSIMMetric",
    "SynthesisInferer",
    "TokenAccuracyMetric",
    "synthesis_iteration",
    "token_windows",
    "with_region",
]

DECODE_MODES = ("sample", "mean")
BLEND_MODES = ("gaussian", "constant")


def _centring_margins(spatial: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int]]:
    """``(before, after)`` zero margins per axis that centre an image of ``spatial`` voxels in at least ``roi``."""
    margins = []
    for size, length in zip(spatial, roi, strict=True):
        extra = max(0, int(length) - int(size))
        margins.append((extra // 2, extra - extra // 2))
    return margins


def token_windows(grid: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Windows of size ``window`` that cover a token ``grid`` (each axis at least as long as the window).

    Along each axis the windows start every ``max(1, int(window * (1 - overlap)))`` positions, and the last one ends
    at the grid's end; the windows are listed in row-major order of their starts (first axis slowest).
    """
    if any(g < w for g, w in zip(grid, window, strict=True)):
        raise ValueError(f"token grid {list(grid)} is smaller than the window {list(window)}")
    starts = []
    for size, length in zip(grid, window, strict=True):
        step = max(1, int(length * (1 - overlap)))
        axis = list(range(0, size - length + 1, step))
        if axis[-1] != size - length:
            axis.append(size - length)
        starts.append(axis)
    return [
        tuple(slice(start, start + length) for start, length in zip(corner, window, strict=True))
        for corner in itertools.product(*starts)
    ]


class SynthesisInferer(Inferer):
    """Synthesise a target image from source images (or from a class label, or from nothing).

    Args:
        tokenizer: the stage-1 tokenizer (encodes the sources, decodes the sampled tokens).
        sampler: the MaskGiT sampler.
        target_modality: the modality to produce (``t1``, ``t1ce``, ``t2``, ``flair``; ``image`` for MedMNIST 3D).
        source_modalities: the batch keys of the sources, e.g. ``["t1"]``; empty or None: unconditional (or
            class-conditional, with a ``label`` in the batch).
        seed: sampling seed; item ``i`` of a run uses ``seed + i``, so results do not depend on batch order
            elsewhere in the run.
        decode: how the target's token grid becomes an image. ``"sample"``: MaskGiT's iterative parallel decoding
            (``sampler.sample``), one draw from the model: sharp and varied, and a guess wherever the model is
            unsure. ``"mean"``: one model call on the all-masked grid (``sampler.predict``); each position gets its
            expected FSQ code under the predicted distribution, and the decoder reads these continuous codes: the
            least-squares estimate of each position's code, smooth where the model is unsure, deterministic, and
            ``sampler.steps`` times cheaper. The mean of FSQ codes lies in the box of the level grid, between codes
            the decoder was trained on. For synthesis scored against a real image; not for generation.
        overlap: fraction of a token window shared with its neighbour along each axis, in ``[0, 1)``, for images
            larger than the ROI (see the module docstring).
        blend_mode: weights of the windows' expected codes where they overlap (``decode="mean"``): ``"gaussian"``
            (centres count most) or ``"constant"``.
        source_decoder: a :class:`~prod9_ext.source_decoder.SourceAwareDecoder` that decodes the target's codes
            with the present sources' voxels (windowed like stage 1's decoder); None: stage 1's decoder.
        swap_codes: an ablation that shows what the tokens contribute: each item is decoded with its own sources but
            with the codes synthesised for the *previous* item of the run (centred on this item's token grid, edges
            replicated); the first item keeps its own. Give the run its last case first as well (a donor), and
            every case is decoded with another case's codes.
        num_samples: ``K`` MaskGiT samples per item (``decode="sample"``); ``pred`` is their voxel-wise mean and
            ``pred_std`` their standard deviation (``K > 1``). Sample ``k`` continues the item's generator, so the
            first sample is the one ``K = 1`` gives.
        save_samples: also output ``pred_samples``, the ``K`` samples themselves as channels ``[B, K, *spatial]``
            (sample diversity, a single sample beside the mean).

    Output of :meth:`synthesize`: ``pred`` (synthesised image, ``[B, 1, *spatial]`` in [0, 1], the input's shape),
    ``tokens`` (the sampled grid of the image padded to at least the ROI; with ``decode="mean"`` the index of the
    code nearest to each expected code) and, when the batch holds the real target: ``label`` (real image),
    ``target_tokens`` (its tokens, on the same grid as ``tokens``) and, with sources, ``source`` (the copy-the-source
    baseline: the source image closest to the target in mean squared error).
    """

    def __init__(
        self,
        tokenizer: Stage1Tokenizer,
        sampler: MaskGiTSampler,
        target_modality: str,
        source_modalities: Sequence[str] | None = None,
        seed: int = 0,
        decode: str = "sample",
        overlap: float = 0.5,
        blend_mode: str = "gaussian",
        source_decoder: SourceAwareDecoder | None = None,
        num_samples: int = 1,
        swap_codes: bool = False,
        save_samples: bool = False,
    ) -> None:
        super().__init__()
        if num_samples < 1 or (num_samples > 1 and decode != "sample"):
            raise ValueError(f"num_samples must be >= 1, and 1 unless decode is 'sample'; got {num_samples}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {list(DECODE_MODES)}, got {decode!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if blend_mode not in BLEND_MODES:
            raise ValueError(f"blend_mode must be one of {list(BLEND_MODES)}, got {blend_mode!r}")
        sources = list(source_modalities or [])
        modality_id(target_modality, "target_modality")
        for name in sources:
            modality_id(name, "source_modalities")
        if target_modality in sources:
            raise ValueError(f"target_modality {target_modality!r} is also among source_modalities {sources}")
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.target_modality = target_modality
        self.source_modalities = sources
        self.seed = seed
        self.decode = decode
        self.overlap = overlap
        self.blend_mode = blend_mode
        self.source_decoder = source_decoder
        self.num_samples = num_samples
        self.swap_codes = swap_codes
        self.save_samples = save_samples
        self._item = 0
        self._previous_codes: list[torch.Tensor] = []

    def reset(self) -> None:
        """Start a run: the next item samples with ``seed`` again."""
        self._item = 0
        self._previous_codes = []

    @torch.no_grad()
    def synthesize(self, batch: dict[str, Any], network: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """Synthesise the target of every item of ``batch`` (see the class docstring for the outputs)."""
        model = unwrap_parallel(network)
        if not isinstance(model, TransformerDecoder):
            raise TypeError(f"network must be a TransformerDecoder, got {type(model).__name__}")
        reference = batch[self.source_modalities[0]] if self.source_modalities else batch.get(self.target_modality)
        if reference is None:
            raise ValueError(f"the batch holds neither the sources {self.source_modalities} nor the target")
        label = batch.get("label")
        use_class = label is not None and model.num_classes > 0
        class_label = torch.as_tensor(label).to(device).long().reshape(-1) if use_class else None
        spatial = tuple(int(n) for n in reference.shape[2:])
        roi = [int(n) * self.tokenizer.downsampling_factor for n in model.latent_shape]
        margins = _centring_margins(spatial, roi)
        padding = [width for margin in reversed(margins) for width in margin]  # F.pad order: last axis first
        padded = [n + before + after for n, (before, after) in zip(spatial, margins, strict=True)]
        grid = self.tokenizer.grid_shape(padded)
        factor = self.tokenizer.downsampling_factor
        # Far-end zeros up to whole tokens, so the sources' voxels tile the token grid exactly.
        to_grid = [
            width for n, g in zip(reversed(padded), reversed(grid), strict=True) for width in (0, g * factor - n)
        ]
        b = reference.shape[0]
        sources, source_ids, images = None, None, []
        if self.source_modalities:
            images = [torch.as_tensor(batch[key]).float().to(device) for key in self.source_modalities]
            for key, image in zip(self.source_modalities, images, strict=True):
                if tuple(image.shape[2:]) != spatial:
                    raise ValueError(
                        f"source {key!r} has grid {tuple(image.shape[2:])}, the first source {spatial}: resample "
                        "the sources onto one grid"
                    )
            sources = torch.cat([F.pad(F.pad(image, padding), to_grid) for image in images], dim=1)
            ids = [modality_id(key) for key in self.source_modalities]
            source_ids = torch.as_tensor(ids, device=device).expand(b, -1)
        target_ids = torch.full((b,), modality_id(self.target_modality), device=device)
        quantizer = self.tokenizer.wrapper.autoencoder.quantizer
        codebook = quantizer.indices_to_codes(torch.arange(model.vocab_size, device=device))  # [V, C]
        windows = token_windows(grid, model.latent_shape, self.overlap)
        decoded, spread, samples, first_tokens = [], [], [], []
        for i in range(b):  # one generator per item: reproducible whatever the batch size
            item_target = target_ids[i : i + 1]
            conditions = (
                None if sources is None else sources[i : i + 1],
                None if source_ids is None else source_ids[i : i + 1],
                None if class_label is None else class_label[i : i + 1],
            )
            seed = self.seed + self._item
            self._item += 1
            if self.decode == "mean":
                draws = [self._expected_codes(model, grid, windows, item_target, conditions, codebook)]
            else:
                generator = torch.Generator(device).manual_seed(seed)
                draws = [
                    quantizer.indices_to_codes(
                        self._sampled_tokens(model, grid, windows, item_target, conditions, generator)
                    )
                    for _ in range(self.num_samples)
                ]
            if self.swap_codes:
                own = draws
                draws = [_centred(self._previous_codes[0], grid) for _ in draws] if self._previous_codes else draws
                self._previous_codes = own
            first_tokens.append(quantizer.codes_to_indices(draws[0]))
            # The preprocessed images lie in [0, 1]; the decoder's output may overshoot it slightly.
            volumes = torch.cat([self._decode(codes, conditions, item_target, padded) for codes in draws])
            volumes = volumes.float().clamp(0.0, 1.0)
            decoded.append(volumes.mean(dim=0, keepdim=True))
            samples.append(volumes.movedim(0, 1))
            spread.append(volumes.std(dim=0, keepdim=True) if len(draws) > 1 else torch.zeros_like(decoded[-1]))
        tokens = torch.cat(first_tokens)
        synthesised = torch.cat(decoded)
        crop = tuple(slice(before, before + n) for n, (before, _) in zip(spatial, margins, strict=True))
        # A MetaTensor, so that Invertd maps it back to the input's grid with the sources' recorded transforms.
        pred = MetaTensor(synthesised[(..., *crop)].contiguous())
        output: dict[str, torch.Tensor] = {Keys.PRED: pred}
        if self.num_samples > 1:
            output["pred_std"] = MetaTensor(torch.cat(spread)[(..., *crop)].contiguous())
        if self.save_samples:
            output["pred_samples"] = MetaTensor(torch.cat(samples)[(..., *crop)].contiguous())
        output["tokens"] = tokens
        target = batch.get(self.target_modality)
        if isinstance(target, torch.Tensor):  # inference lists the target's file (when any) but does not load it
            target = target.float().to(device)
            output[Keys.LABEL] = target
            output["target_tokens"] = self.tokenizer.wrapper.encode_to_indices(F.pad(target, padding))
            if self.source_modalities:
                errors = torch.stack([((image - target) ** 2).flatten(1).mean(1) for image in images], dim=1)
                closest = errors.argmin(dim=1)
                output["source"] = torch.stack([images[int(k)][i] for i, k in enumerate(closest)])
        return output

    def _expected_codes(
        self,
        model: TransformerDecoder,
        grid: Sequence[int],
        windows: list[tuple[slice, ...]],
        target_ids: torch.Tensor,
        conditions: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        codebook: torch.Tensor,
    ) -> torch.Tensor:
        """Expected FSQ codes ``[1, C, *grid]``: each window's, blended with the window weights where they overlap.

        ``conditions``: the item's source images ``[1, S, *grid * f]``, source modality ids and class label (or None).
        """
        sources, source_ids, class_label = conditions
        latent = tuple(model.latent_shape)
        if len(windows) == 1:  # the plain model, no blending
            probs = self.sampler.predict(model, (1, *latent), target_ids, sources, source_ids, class_label)
            return (probs @ codebook).transpose(1, 2).reshape(1, -1, *latent)
        device = codebook.device
        weight = compute_importance_map(latent, mode=self.blend_mode, device=device)
        total = torch.zeros(1, codebook.shape[1], *grid, device=device)
        weights = torch.zeros(1, 1, *grid, device=device)
        for window in windows:
            window_sources = None if sources is None else sources[(..., *self._voxels(window))]
            probs = self.sampler.predict(model, (1, *latent), target_ids, window_sources, source_ids, class_label)
            total[(..., *window)] += weight * (probs @ codebook).transpose(1, 2).reshape(1, -1, *latent)
            weights[(..., *window)] += weight
        return total / weights

    def _sampled_tokens(
        self,
        model: TransformerDecoder,
        grid: Sequence[int],
        windows: list[tuple[slice, ...]],
        target_ids: torch.Tensor,
        conditions: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Tokens ``Long[1, *grid]`` sampled window by window, each window keeping the tokens already fixed in it."""
        sources, source_ids, class_label = conditions
        latent = tuple(model.latent_shape)
        tokens = torch.full((1, *grid), model.vocab_size, dtype=torch.long, device=target_ids.device)
        for window in windows:
            known = tokens[(slice(None), *window)]
            if not (known == model.vocab_size).any():
                continue
            window_sources = None if sources is None else sources[(..., *self._voxels(window))]
            tokens[(slice(None), *window)] = self.sampler.sample(
                model, (1, *latent), target_ids, window_sources, source_ids, class_label, generator, known
            )
        return tokens

    def _voxels(self, window: tuple[slice, ...]) -> tuple[slice, ...]:
        """A window of the token grid as a window of the voxel grid."""
        factor = self.tokenizer.downsampling_factor
        return tuple(slice(w.start * factor, w.stop * factor) for w in window)

    def _decode(
        self,
        codes: torch.Tensor,
        conditions: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        target_ids: torch.Tensor,
        padded: Sequence[int],
    ) -> torch.Tensor:
        """One item's codes ``[1, C, *grid]`` → image ``[1, 1, *padded]``, with the sources' voxels when there is a
        source-aware decoder."""
        if self.source_decoder is None:
            return self.tokenizer.wrapper.decode(codes, padded)
        sources, source_ids, _ = conditions
        decoder = self.source_decoder
        slots = codes.new_zeros(1, decoder.num_modalities, *(n * decoder.factor for n in codes.shape[2:]))
        present = torch.zeros(1, decoder.num_modalities, dtype=torch.bool, device=codes.device)
        if sources is not None and source_ids is not None:
            slots[:, source_ids[0]] = sources[0].to(slots.dtype)
            present[:, source_ids[0]] = True
        config = self.tokenizer.wrapper.config
        image = decoder.decode_windows(codes, slots, present, target_ids, config.roi_size, config.overlap, config.mode)
        return image[(..., *(slice(0, n) for n in padded))]

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("SynthesisInferer works on whole batches: use synthesis_iteration")


def _centred(codes: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``codes [1, C, *other grid]`` centred on ``grid``: cropped where longer, edge-replicated where shorter."""
    for axis, size in enumerate(grid, start=2):
        extra = size - codes.shape[axis]
        if extra < 0:
            start = -extra // 2
            codes = codes.narrow(axis, start, size)
        elif extra > 0:
            widths = [0, 0] * (codes.ndim - 2)
            position = 2 * (codes.ndim - 1 - axis)  # F.pad lists the last axis first
            widths[position : position + 2] = [extra // 2, extra - extra // 2]
            codes = F.pad(codes, widths, mode="replicate")
    return codes


def synthesis_iteration(
    engine: SupervisedEvaluator, batchdata: dict[str, Any]
) -> list[dict[str, Any]] | dict[str, Any]:
    """``iteration_update`` of the stage-2 evaluators: the inferer's outputs, plus ``seg`` when the batch has it."""
    inferer = engine.inferer
    if not isinstance(inferer, SynthesisInferer):
        raise TypeError(f"the evaluator's inferer must be SynthesisInferer, got {inferer!r}")
    if engine.state.iteration == 1:
        inferer.reset()
    device = engine.state.device
    with engine.mode(engine.network), torch.autocast(device.type, enabled=engine.amp, **engine.amp_kwargs):
        output: dict[str, Any] = inferer.synthesize(batchdata, engine.network, device)
    if "seg" in batchdata and Keys.LABEL in output:
        output["seg"] = torch.as_tensor(batchdata["seg"]).to(device)
    engine.state.output = output
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes on this event
    return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned


def with_region(region_key: str = "seg") -> Callable[[list[dict]], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``output_transform`` for :class:`RegionSSIMMetric`: ``(pred, [label, region])`` from decollated outputs."""

    def transform(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds = [item["pred"] for item in output]
        references = [torch.cat([item["label"], item[region_key].to(item["label"].dtype)]) for item in output]
        return preds, references

    return transform


class _PerItemMean(CumulativeIterationMetric):
    """One value per item; ``aggregate`` is the mean over items, NaN values left out (MONAI's reduction)."""

    def aggregate(self) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("nothing to aggregate: the metric saw no item")
        return do_metric_reduction(data, "mean")[0]


class RegionSSIMMetric(_PerItemMean):
    """Mean of the SSIM map over a region: ``y`` carries the reference in channel 0 and the region mask in channel 1.

    The SSIM map is MONAI's (``compute_ssim_and_cs``, Gaussian window ``win_size``, valid positions only), averaged
    over the voxels whose mask is nonzero. An item with an empty region scores NaN, which MONAI's mean reduction
    leaves out.

    Args:
        spatial_dims: 2 or 3.
        data_range: intensity range of the images.
        win_size: Gaussian window size.
        kernel_sigma: Gaussian window sigma.
    """

    def __init__(self, spatial_dims: int = 3, data_range: float = 1.0, win_size: int = 7, kernel_sigma: float = 1.5):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.data_range = data_range
        self.win_size = win_size
        self.kernel_sigma = kernel_sigma

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.shape[1] != 2 or y_pred.shape[1] != 1 or y.shape[2:] != y_pred.shape[2:]:
            raise ValueError(f"need y_pred [B, 1, *spatial] and y [B, 2, *spatial], got {y_pred.shape} and {y.shape}")
        reference, mask = y[:, :1].float(), y[:, 1:] > 0
        ssim_map, _ = compute_ssim_and_cs(
            y_pred.float(),
            reference,
            spatial_dims=self.spatial_dims,
            kernel_size=[self.win_size] * self.spatial_dims,
            kernel_sigma=[self.kernel_sigma] * self.spatial_dims,
            data_range=self.data_range,
        )
        half = self.win_size // 2
        inner = (slice(None), slice(None), *[slice(half, n - half) for n in mask.shape[2:]])
        region = mask[inner].to(ssim_map.dtype)
        count = region.flatten(1).sum(1, keepdim=True)
        total = (ssim_map * region).flatten(1).sum(1, keepdim=True)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


class TokenAccuracyMetric(_PerItemMean):
    """Fraction of positions where two token grids ``[B, *grid]`` agree (sampled against the real target's)."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.shape != y.shape:
            raise ValueError(f"token grids differ in shape: {tuple(y_pred.shape)} and {tuple(y.shape)}")
        return (y_pred == y).flatten(1).float().mean(1, keepdim=True)
