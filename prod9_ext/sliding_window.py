"""Tokenize and reconstruct volumes of any size with bounded memory, window by window.

Encoding blends the *continuous* latent of overlapping windows and quantizes once, so every token is a valid FSQ
code (blending codes would land between grid points). Decoding runs windows in latent space with the latent ROI
``roi_size / f`` and blends the decoded images.

The ROI is also what the autoencoder was trained on: MAISI's GroupNorm normalises over the whole window, so tokens
from other window sizes differ. Tokenize with the training ROI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from torch import nn

from prod9_ext.autoencoder import AutoencoderFSQ

__all__ = ["AutoencoderInferenceWrapper", "SlidingWindowConfig"]


@dataclass(frozen=True)
class SlidingWindowConfig:
    """Window settings shared by encoding and decoding.

    Args:
        roi_size: image window, one size per spatial axis, each divisible by the autoencoder's downsampling factor.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.
        sw_batch_size: windows run through the network at once.
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
    """

    roi_size: Sequence[int]
    overlap: float = 0.5
    sw_batch_size: int = 1
    mode: str = "gaussian"

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}.")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}.")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"mode must be 'gaussian' or 'constant', got {self.mode!r}.")
        if any(int(s) < 1 for s in self.roi_size):
            raise ValueError(f"roi_size must be positive, got {list(self.roi_size)}.")
        object.__setattr__(self, "roi_size", tuple(int(s) for s in self.roi_size))


class AutoencoderInferenceWrapper(nn.Module):
    """Sliding-window ``encode`` / ``decode`` / ``reconstruct`` around an :class:`AutoencoderFSQ`.

    Inputs of any spatial size are padded at the far end to a multiple of the downsampling factor ``f`` (and the
    result cropped back); the token grid is ``ceil(size / f)`` per axis. An axis shorter than the ROI is run as one
    window of its own (padded) size, so a volume that fits one window gives exactly the plain model's result.

    ``forward(x)`` is :meth:`reconstruct`, so the wrapper can stand in for the network in MONAI evaluators.
    """

    def __init__(self, autoencoder: AutoencoderFSQ, config: SlidingWindowConfig) -> None:
        super().__init__()
        factor = autoencoder.downsampling_factor
        if len(config.roi_size) != autoencoder.spatial_dims:
            raise ValueError(
                f"roi_size {list(config.roi_size)} must have {autoencoder.spatial_dims} entries, one per spatial axis."
            )
        bad = [s for s in config.roi_size if s % factor]
        if bad:
            raise ValueError(
                f"roi_size {list(config.roi_size)} must be divisible by the downsampling factor {factor} (got {bad})."
            )
        steps = [int(s * (1 - config.overlap)) for s in config.roi_size]
        if any(step % factor for step in steps):
            raise ValueError(
                f"overlap {config.overlap} with roi_size {list(config.roi_size)} gives window steps {steps} that are "
                f"not multiples of the downsampling factor {factor}: windows would fall between latent voxels. "
                f"Choose an overlap such as 0.5 or 0.25 that keeps int(roi * (1 - overlap)) divisible by {factor}."
            )
        self.autoencoder = autoencoder
        self.config = config
        self.factor = factor

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        if x.ndim != 2 + self.autoencoder.spatial_dims:
            raise ValueError(
                f"{name} must be [B, C, *spatial] with {self.autoencoder.spatial_dims} spatial axes, "
                f"got shape {tuple(x.shape)}."
            )

    def _inferer(self, spatial: Sequence[int], roi_size: Sequence[int]) -> SlidingWindowInferer:
        """A MONAI inferer whose ROI shrinks to ``spatial`` along axes shorter than ``roi_size``."""
        return SlidingWindowInferer(
            roi_size=[min(r, s) for r, s in zip(roi_size, spatial, strict=True)],
            sw_batch_size=self.config.sw_batch_size,
            overlap=self.config.overlap,
            mode=self.config.mode,
        )

    def grid_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid of an image of ``spatial_shape``: ``ceil(size / f)`` per axis."""
        return tuple(math.ceil(s / self.factor) for s in spatial_shape)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, *spatial]`` -> blended continuous latent ``[B, len(levels), *grid]`` (not quantized)."""
        self._check_input(x, "x")
        grid = self.grid_shape(x.shape[2:])
        padding: list[int] = []
        for size, tokens in zip(reversed(x.shape[2:]), reversed(grid), strict=True):
            padding += [0, tokens * self.factor - size]
        padded = F.pad(x, padding)
        inferer = self._inferer(padded.shape[2:], self.config.roi_size)
        return inferer(padded, lambda window: self.autoencoder.encode(window)[0])  # type: ignore[return-value]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> FSQ codes ``[B, len(levels), *grid]``: continuous latents blended, then quantized once."""
        return self.autoencoder.quantize(self.encode_latent(x))

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> token indices ``LongTensor[B, *grid]``."""
        return self.autoencoder.embed(self.encode(x))

    def decode(self, codes: torch.Tensor, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Codes ``[B, len(levels), *grid]`` -> image ``[B, C_out, *grid * f]``, cropped to ``spatial_shape``."""
        self._check_input(codes, "codes")
        latent_roi = [s // self.factor for s in self.config.roi_size]
        inferer = self._inferer(codes.shape[2:], latent_roi)
        image = inferer(codes, self.autoencoder.decode)
        assert isinstance(image, torch.Tensor)
        if spatial_shape is not None:
            image = image[(..., *(slice(0, s) for s in spatial_shape))]
        return image

    def decode_indices(self, indices: torch.Tensor, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Token indices ``LongTensor[B, *grid]`` -> image, cropped to ``spatial_shape`` when given."""
        return self.decode(self.autoencoder.quantizer.indices_to_codes(indices), spatial_shape)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode and decode ``x``; the result has exactly ``x``'s shape (channels: the decoder's)."""
        return self.decode(self.encode(x), x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)
