"""Training the source-aware decoder: (target codes as stage 2 gives them, sources' voxels) → the real target.

The decoder (:class:`prod9_ext.source_decoder.SourceAwareDecoder`) trains after stage 2, on the same token cache
and its memory-mapped voxels (:mod:`~prod9_ext.engines.stage2_training`): ``configs/train_decoder.json`` is an
overlay of the stage-2 ``train.json``. Per sample, :class:`SourceDecoderIteration` draws a target and a random
subset of the other contrasts as sources, and feeds the decoder codes such as inference will give it:

- with probability ``expected_prob``, the expected codes of the trained transformer on the all-masked grid given
  those sources (what ``decode_mode mean`` decodes);
- otherwise the real target's codes with a random fraction (up to ``corrupt_max``) replaced by random codes (what
  a MaskGiT sample gets wrong).

The loss is L1 plus ``ssim_weight`` times ``1 - SSIM`` against the real target. The transformer is frozen.
:class:`SourceDecoderSaver` writes the decoder's own weights file, with the stage-1 fingerprint, after every epoch.

Neighbours: inference decodes with the trained decoder through :class:`~prod9_ext.engines.synthesis.SynthesisInferer`
(``source_decoder``), loaded by :func:`load_source_decoder_for`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn

from prod9_ext.engines.stage1_training import SeparableSSIMLoss, unwrap_parallel
from prod9_ext.engines.stage2_training import Stage1Tokenizer
from prod9_ext.maskgit import MaskGiTSampler
from prod9_ext.source_decoder import SourceAwareDecoder, load_source_decoder, save_source_decoder
from prod9_ext.transformer import TransformerDecoder

__all__ = ["SourceDecoderIteration", "SourceDecoderSaver", "build_source_decoder", "load_source_decoder_for"]


def build_source_decoder(
    tokenizer: Stage1Tokenizer, num_modalities: int = 4, channels: int = 16, device: str | torch.device = "cpu"
) -> SourceAwareDecoder:
    """A fresh :class:`SourceAwareDecoder` on the tokenizer's autoencoder (decodes exactly as stage 1 at first)."""
    return SourceAwareDecoder(tokenizer.wrapper.autoencoder, num_modalities, channels).to(device)


def load_source_decoder_for(
    tokenizer: Stage1Tokenizer,
    weights: str | os.PathLike,
    num_modalities: int = 4,
    channels: int = 16,
    device: str | torch.device = "cpu",
    enabled: bool = True,
) -> SourceAwareDecoder | None:
    """The trained decoder of ``weights`` on the tokenizer's autoencoder, in eval mode; None when not ``enabled``.

    Raises:
        FileNotFoundError: no such weights file.
        ValueError: the file was trained with another stage 1 (fingerprint), or does not fit.
    """
    if not enabled:
        return None
    autoencoder = tokenizer.wrapper.autoencoder
    decoder = load_source_decoder(weights, autoencoder, tokenizer.fingerprint, num_modalities, channels)
    return decoder.to(device).eval().requires_grad_(False)


class SourceDecoderIteration:
    """``iteration_update`` of the decoder's ``SupervisedTrainer`` (``engine.network`` is the decoder).

    Args:
        transformer: the trained stage-2 model, for the expected codes (frozen, eval mode).
        sampler: its sampler (``predict`` gives the all-masked grid's token probabilities).
        codebook: ``[V, C]`` FSQ codes of the tokens.
        slot_modalities: the modality id of each image slot (``modality_ids``).
        target_modalities: the ids that may be drawn as targets; default: every slot.
        source_drop_prob: each other slot is dropped from the sources with this probability.
        expected_prob: share of samples decoded from the transformer's expected codes.
        corrupt_max: the other samples have a fraction ``U(0, corrupt_max)`` of their codes replaced by random ones.
        ssim_weight: weight of ``1 - SSIM`` beside L1.
        crop_size: the decoder trains on a random window of this many tokens per axis (the same for the batch),
            cut after the transformer has seen the whole crop; None: the whole crop. A decoder is fully
            convolutional, and its cost grows with the volume while the transformer's window is fixed.
    """

    def __init__(
        self,
        transformer: TransformerDecoder,
        sampler: MaskGiTSampler,
        codebook: torch.Tensor,
        slot_modalities: Sequence[int],
        target_modalities: Sequence[int] | None = None,
        source_drop_prob: float = 0.5,
        expected_prob: float = 0.5,
        corrupt_max: float = 0.5,
        ssim_weight: float = 1.0,
        crop_size: Sequence[int] | None = None,
    ) -> None:
        for name, value in (("source_drop_prob", source_drop_prob), ("expected_prob", expected_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not 0.0 <= corrupt_max <= 1.0:
            raise ValueError(f"corrupt_max must lie in [0, 1], got {corrupt_max}")
        targets = list(slot_modalities) if target_modalities is None else list(target_modalities)
        if not targets or any(t not in slot_modalities for t in targets):
            raise ValueError(f"target_modalities {targets} must be a non-empty subset of {list(slot_modalities)}")
        self.transformer = transformer.eval().requires_grad_(False)
        self.sampler = sampler
        self.codebook = codebook.float()
        self.slot_modalities = torch.as_tensor(list(slot_modalities), dtype=torch.long)
        self.target_slots = torch.as_tensor([list(slot_modalities).index(t) for t in targets], dtype=torch.long)
        self.source_drop_prob = source_drop_prob
        self.expected_prob = expected_prob
        self.corrupt_max = corrupt_max
        self.ssim_weight = ssim_weight
        self.ssim = SeparableSSIMLoss(spatial_dims=3, data_range=1.0)
        self.crop_size = None if crop_size is None else [int(n) for n in crop_size]
        if self.crop_size is not None and (len(self.crop_size) != 3 or min(self.crop_size) < 1):
            raise ValueError(f"crop_size must be 3 positive sizes, got {crop_size}")

    def crop(self, tensors: Sequence[torch.Tensor], factor: int, tries: int = 4) -> list[torch.Tensor]:
        """A random window of ``crop_size`` tokens of every tensor: the first on the token grid, the others on the
        voxel grid (``factor`` times larger). Of ``tries`` random windows, the one where the last tensor (the
        target) has the most nonzero voxels: a window of background teaches the decoder nothing."""
        grid = tensors[0].shape[2:]
        if self.crop_size is None or all(c >= n for c, n in zip(self.crop_size, grid, strict=True)):
            return list(tensors)
        sizes = [min(c, n) for c, n in zip(self.crop_size, grid, strict=True)]
        best, best_count = None, -1
        for _ in range(tries):
            starts = [int(torch.randint(0, n - c + 1, ())) for c, n in zip(sizes, grid, strict=True)]
            voxels = tuple(slice(s * factor, (s + c) * factor) for s, c in zip(starts, sizes, strict=True))
            count = int((tensors[-1][(..., *voxels)] != 0).sum())
            if count > best_count:
                best, best_count = starts, count
        assert best is not None
        tokens = tuple(slice(s, s + c) for s, c in zip(best, sizes, strict=True))
        voxels = tuple(slice(s * factor, (s + c) * factor) for s, c in zip(best, sizes, strict=True))
        return [tensors[0][(..., *tokens)], *(t[(..., *voxels)] for t in tensors[1:])]

    def inputs(
        self,
        tokens: torch.Tensor,
        voxels: torch.Tensor,
        generator: torch.Generator | None = None,
        num_modalities: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, slots, present, target_modality, target)`` for a batch of ``tokens [B, M, h, w, d]`` and
        ``voxels [B, M, h*f, w*f, d*f]``; ``slots`` ``[B, num_modalities, ...]`` by modality id (default: up to the
        largest slot modality; the decoder's own count when training it, since a bundle may load fewer contrasts)."""
        b, m = tokens.shape[:2]
        device = tokens.device
        rows = torch.arange(b, device=device)
        target_slot = self.target_slots.to(device)[torch.randint(len(self.target_slots), (b,), device=device)]
        slot_modalities = self.slot_modalities.to(device)
        target_modality = slot_modalities[target_slot]
        keep = torch.rand(b, m, generator=generator, device=device) >= self.source_drop_prob
        keep[rows, target_slot] = False
        source_modalities = torch.where(keep, slot_modalities.expand(b, m), -1)
        codebook = self.codebook.to(device)
        codes = codebook[tokens[rows, target_slot]].movedim(-1, 1)  # [B, C, h, w, d]
        replace = torch.rand(tokens.shape[0], 1, 1, 1, device=device) * self.corrupt_max
        noisy = torch.rand(tokens[:, 0].shape, device=device) < replace
        random_codes = codebook[torch.randint(len(codebook), tokens[:, 0].shape, device=device)].movedim(-1, 1)
        codes = torch.where(noisy[:, None], random_codes, codes)
        use_expected = torch.rand(b, device=device) < self.expected_prob
        if bool(use_expected.any()):
            probs = self.sampler.predict(
                self.transformer, tokens[:, 0].shape, target_modality, voxels, source_modalities
            )  # [B, N, V]
            expected = (probs.float() @ codebook).transpose(1, 2).reshape(codes.shape)
            codes = torch.where(use_expected[:, None, None, None, None], expected, codes)
        num_modalities = num_modalities or int(self.slot_modalities.max()) + 1
        slots = voxels.new_zeros(b, num_modalities, *voxels.shape[2:])
        present = torch.zeros(b, num_modalities, dtype=torch.bool, device=device)
        slots[:, slot_modalities] = voxels
        present[:, slot_modalities] = keep
        target = voxels[rows, target_slot][:, None]
        return codes, slots, present, target_modality, target

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict:
        device = engine.state.device
        tokens = torch.as_tensor(batchdata["tokens"]).to(device).long()
        voxels = torch.as_tensor(batchdata["voxels"]).to(device).float()
        with torch.no_grad(), torch.autocast(device.type, enabled=engine.amp, **engine.amp_kwargs):
            modalities = int(unwrap_parallel(engine.network).num_modalities)  # type: ignore[arg-type]
            codes, slots, present, target_modality, target = self.inputs(tokens, voxels, num_modalities=modalities)
        factor = voxels.shape[2] // tokens.shape[2]
        codes, slots, target = self.crop([codes, slots, target], factor)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device.type, enabled=engine.amp, **engine.amp_kwargs):
            pred = engine.network(codes.float(), slots, present, target_modality)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        pred = pred.float()
        loss = (pred - target).abs().mean() + self.ssim_weight * self.ssim(pred, target)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.optimizer.step()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.state.output = {Keys.LOSS: loss.detach(), Keys.PRED: pred.detach(), Keys.LABEL: target}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class SourceDecoderSaver:
    """Writes the decoder's weights file (:func:`~prod9_ext.source_decoder.save_source_decoder`, atomic, with the
    stage-1 fingerprint) when every epoch completes."""

    def __init__(self, decoder: nn.Module, path: str | os.PathLike, fingerprint: str) -> None:
        if not isinstance(decoder, SourceAwareDecoder):
            raise TypeError(f"decoder must be a SourceAwareDecoder, got {type(decoder).__name__}")
        self.decoder = decoder
        self.path = path
        self.fingerprint = fingerprint

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        save_source_decoder(self.decoder, self.path, self.fingerprint)
