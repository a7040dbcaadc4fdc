"""SourceAwareDecoder: stage 1's decoder with zero-initialised branches fed by the sources' voxels (ControlNet-style).

Tokens carry the target's contrast and pathology at 8-10 bits per ``f³`` voxels; they cannot carry the sub-token
anatomy that bounds stage 1's reconstruction. The sources (the same patient's other contrasts) carry that anatomy
voxel by voxel. This decoder reads both: stage 1's decoder runs on the target's codes as before, and after each of
its blocks a branch adds features computed from the present sources' voxels at that block's resolution. Every branch
ends in a convolution initialised to zero, so at initialisation the decoder decodes exactly as stage 1 does, and
training only adds (MONAI's ``ControlNet``, ``ControlNetMaisi``).

The decoder is a copy: stage 1's weights file, and the token caches named after it, stay valid. Its own weights
file records the stage-1 fingerprint it was trained on (:func:`save_source_decoder`, :func:`load_source_decoder`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from prod9_ext.atomic import atomic_output
from prod9_ext.autoencoder import AutoencoderFSQ
from prod9_ext.transformer import depth_to_space, space_to_depth

__all__ = ["SourceAwareDecoder", "load_source_decoder", "save_source_decoder"]


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv3d:
    conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
    return conv


class SourceAwareDecoder(nn.Module):
    """Decode target codes with the present sources' voxels: ``(codes, sources, present, target) → image``.

    Args:
        autoencoder: the trained stage-1 :class:`AutoencoderFSQ`; its ``post_quant_conv`` and ``decoder`` are copied
            (the original is left untouched).
        num_modalities: source slots, one per modality id (BraTS: T1, T1ce, T2, FLAIR).
        channels: width of the source encoder at full resolution; it doubles at each halving, as stage 1's does.

    The source encoder reads ``[sources, present flags, target one-hot]`` (absent slots are zero, the target's own
    slot included) with a 3×3×3 convolution at voxel resolution and one strided convolution per halving down to the
    token grid. After every decoder block but the output norm and convolution, a zero-initialised 1×1 convolution
    of the encoder's features at that block's resolution is added to the block's output.
    """

    def __init__(self, autoencoder: AutoencoderFSQ, num_modalities: int, channels: int = 16) -> None:
        super().__init__()
        if num_modalities < 1 or channels < 1:
            raise ValueError(f"num_modalities and channels must be >= 1, got {num_modalities} and {channels}")
        self.num_modalities = num_modalities
        self.factor = autoencoder.downsampling_factor
        self.code_channels = len(autoencoder.quantizer.levels)
        self.post_quant_conv = copy.deepcopy(autoencoder.post_quant_conv)
        blocks = autoencoder.decoder.blocks
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"the autoencoder's decoder blocks must be an nn.ModuleList, got {type(blocks).__name__}")
        self.blocks: nn.ModuleList = copy.deepcopy(blocks)
        levels = self.factor.bit_length() - 1  # halvings from voxels to tokens
        widths = [channels * 2**k for k in range(levels + 1)]
        self.encoder = nn.ModuleList()
        in_channels = 3 * num_modalities
        for k, width in enumerate(widths):
            self.encoder.append(
                nn.Sequential(
                    nn.Conv3d(in_channels, width, kernel_size=3, stride=1 if k == 0 else 2, padding=1),
                    nn.SiLU(),
                    nn.Conv3d(width, width, kernel_size=3, padding=1),
                    nn.SiLU(),
                )
            )
            in_channels = width
        # Which resolution level each decoder block ends at, and its width: probe the copy once on a tiny input.
        probe = torch.zeros(1, self.code_channels, 1, 1, 1)
        self.block_levels: list[int] = []
        branches = []
        with torch.no_grad():
            x = self.post_quant_conv(probe)
            for block in self.blocks[:-2]:
                x = block(x)
                level = levels - (x.shape[2].bit_length() - 1)
                self.block_levels.append(level)
                branches.append(_zero_conv(widths[level], x.shape[1]))
        self.branches = nn.ModuleList(branches)

    def parameter_groups(self, learning_rate: float, stage1_lr_scale: float = 1.0) -> list[dict]:
        """Optimizer parameter groups: the new source encoder and branches at ``learning_rate``, the copy of stage 1's
        decoder at ``learning_rate * stage1_lr_scale``; 0 freezes the copy (ControlNet's locked base model).

        Sets ``requires_grad`` to match: a copy of the tokenizer's frozen stage 1 starts frozen, and only a scale > 0
        lets it train.
        """
        if learning_rate <= 0 or stage1_lr_scale < 0:
            raise ValueError(
                f"learning_rate must be > 0 and stage1_lr_scale >= 0, got {learning_rate} and {stage1_lr_scale}"
            )
        new = [*self.encoder.parameters(), *self.branches.parameters()]
        copied = [*self.post_quant_conv.parameters(), *self.blocks.parameters()]
        for parameter in new:
            parameter.requires_grad_(True)
        for parameter in copied:
            parameter.requires_grad_(stage1_lr_scale > 0)
        groups: list[dict] = [{"params": new, "lr": learning_rate}]
        if stage1_lr_scale > 0:
            groups.append({"params": copied, "lr": learning_rate * stage1_lr_scale})
        return groups

    def source_features(
        self, sources: torch.Tensor, present: torch.Tensor, target_modality: torch.Tensor
    ) -> list[torch.Tensor]:
        """The encoder's features at every resolution, full resolution first."""
        if sources.shape[1] != self.num_modalities or present.shape != sources.shape[:2]:
            raise ValueError(
                f"need sources [B, {self.num_modalities}, *spatial] and present [B, {self.num_modalities}], got "
                f"{tuple(sources.shape)} and {tuple(present.shape)}"
            )
        keep = present.to(sources.dtype)[:, :, None, None, None]
        target = nn.functional.one_hot(target_modality, self.num_modalities).to(sources.dtype)
        ones = torch.ones_like(sources[:, :1])
        x = torch.cat([sources * keep, keep * ones, target[:, :, None, None, None] * ones], dim=1)
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        return features

    def forward(
        self, codes: torch.Tensor, sources: torch.Tensor, present: torch.Tensor, target_modality: torch.Tensor
    ) -> torch.Tensor:
        """Decode.

        Args:
            codes: ``[B, C, h, w, d]`` FSQ codes of the target (or expected codes, continuous in the same box).
            sources: ``[B, M, h*f, w*f, d*f]`` voxels, slot ``m`` holding modality ``m`` (any value where absent).
            present: ``Bool[B, M]``, which slots are present sources; the target's own slot must be False.
            target_modality: ``Long[B]``, the modality the codes describe.

        Returns:
            The image ``[B, 1, h*f, w*f, d*f]``.
        """
        expected = tuple(n * self.factor for n in codes.shape[2:])
        if tuple(sources.shape[2:]) != expected:
            raise ValueError(
                f"sources grid {tuple(sources.shape[2:])} is not the codes grid {tuple(codes.shape[2:])} times "
                f"{self.factor} ({expected})"
            )
        if bool(present[torch.arange(len(target_modality)), target_modality].any()):
            raise ValueError("the target's own modality is marked present among the sources")
        features = self.source_features(sources, present, target_modality)
        x = self.post_quant_conv(codes)
        for block, level, branch in zip(self.blocks[:-2], self.block_levels, self.branches, strict=True):
            x = block(x) + branch(features[level])
        for block in self.blocks[-2:]:
            x = block(x)
        return x

    def decode_windows(
        self,
        codes: torch.Tensor,
        sources: torch.Tensor,
        present: torch.Tensor,
        target_modality: torch.Tensor,
        roi_size: Sequence[int],
        overlap: float = 0.5,
        mode: str = "gaussian",
    ) -> torch.Tensor:
        """``forward`` window by window with MONAI's ``SlidingWindowInferer`` over the token grid.

        The sources travel with the codes as channels (space-to-depth, lossless), so each window sees exactly its
        own voxels; ``roi_size`` is the image window (each side a multiple of ``f``), shrunk along shorter axes.
        """
        latent_roi = [min(int(r) // self.factor, n) for r, n in zip(roi_size, codes.shape[2:], strict=True)]
        inferer = SlidingWindowInferer(roi_size=latent_roi, sw_batch_size=1, overlap=overlap, mode=mode)
        images = []
        for i in range(codes.shape[0]):  # windows of one item at a time: each item has its own sources and target
            stacked = torch.cat([codes[i : i + 1].float(), space_to_depth(sources[i : i + 1].float(), self.factor)], 1)

            def window(x: torch.Tensor, item: int = i) -> torch.Tensor:
                voxels = depth_to_space(x[:, self.code_channels :], self.factor)
                return self(
                    x[:, : self.code_channels], voxels, present[item : item + 1], target_modality[item : item + 1]
                )

            image = inferer(stacked, window)
            assert isinstance(image, torch.Tensor)
            images.append(image)
        return torch.cat(images)


def save_source_decoder(decoder: SourceAwareDecoder, path: str | os.PathLike, fingerprint: str) -> None:
    """Write the decoder's weights with the stage-1 ``fingerprint`` they were trained on, atomically."""
    with atomic_output(path) as temporary:
        torch.save({"source_decoder": decoder.state_dict(), "stage1_fingerprint": fingerprint}, temporary)


def load_source_decoder(
    path: str | os.PathLike, autoencoder: AutoencoderFSQ, fingerprint: str, num_modalities: int, channels: int = 16
) -> SourceAwareDecoder:
    """A :class:`SourceAwareDecoder` on ``autoencoder`` with the weights of ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file was trained with another stage 1 (its fingerprint differs) or does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"source_decoder_weights: no such file {path}; train it first (configs/train_decoder.json)"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "source_decoder" not in saved:
        raise ValueError(f"source_decoder_weights {path} is not a source-aware decoder file")
    if saved.get("stage1_fingerprint") != fingerprint:
        raise ValueError(
            f"source_decoder_weights {path} were trained with another stage 1 (fingerprint "
            f"{saved.get('stage1_fingerprint')}, this stage 1: {fingerprint}); retrain the decoder"
        )
    decoder = SourceAwareDecoder(autoencoder, num_modalities, channels)
    try:
        decoder.load_state_dict(saved["source_decoder"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"source_decoder_weights {path} do not fit this decoder: {first}") from None
    return decoder
