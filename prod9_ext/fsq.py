"""Finite Scalar Quantization (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each latent channel ``i`` is bounded to ``levels[i]`` values and rounded with a straight-through gradient. The
implicit codebook is the product of the per-channel grids, so ``codebook_size == prod(levels)`` and every code is
used by construction: there are no embeddings to collapse.

Two choices differ from the paper on purpose:

* The grid is symmetric for every level count: channel ``i`` takes the values ``(k - h) / h`` for
  ``k in 0..L-1`` and ``h = (L - 1) / 2``, i.e. codes span exactly ``[-1, 1]``. For even ``L`` this puts the
  grid on half-integers in level units, which is the paper's half-level offset written as a grid.
* The bound is the identity on the code range with ``tanh`` tails outside it, instead of ``tanh`` everywhere.
  The paper's bound shrinks the outer codes when they are quantized again (``q(q(z)) != q(z)`` for most level
  sets, even levels collapse); here every code is a fixed point, so targets computed from stored codes match what
  the decoder saw. The tails keep a non-zero gradient for encoder outputs beyond the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FiniteScalarQuantizer"]

# Width of the soft tail in level units: strictly below half a level, so a tail value still rounds to the outer
# grid point even where tanh saturates to 1.0 in floating point.
_TAIL = 0.49


class FiniteScalarQuantizer(nn.Module):
    """Quantize a channels-first latent ``[B, len(levels), *spatial]`` to the FSQ grid.

    Args:
        levels: number of values per latent channel, each an integer >= 2 (e.g. ``[8, 5, 5, 5]`` for 1000 codes).

    ``forward(z)`` returns codes in ``[-1, 1]`` with the shape of ``z``; gradients pass straight through the
    rounding. Quantization runs in float32 whatever the autocast state.
    """

    levels: torch.Tensor
    half_width: torch.Tensor
    basis: torch.Tensor

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        levels = list(levels)
        if not levels:
            raise ValueError("levels must name at least one channel, got [].")
        for level in levels:
            if isinstance(level, bool) or not float(level).is_integer():
                raise ValueError(f"levels must be integers, got {level!r} in {levels}.")
            if int(level) < 2:
                raise ValueError(f"each level must be >= 2, got {level!r} in {levels}.")
        levels = [int(level) for level in levels]
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long))
        self.register_buffer("half_width", (torch.tensor(levels, dtype=torch.float32) - 1) / 2, persistent=False)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.long), persistent=False)

    @property
    def num_channels(self) -> int:
        """Latent channels this quantizer expects: ``len(levels)``."""
        return self.levels.numel()

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes: ``prod(levels)``."""
        return int(torch.prod(self.levels).item())

    def _per_channel(self, buffer: torch.Tensor, ndim: int) -> torch.Tensor:
        return buffer.view(1, -1, *([1] * (ndim - 2)))

    def _check_channels(self, x: torch.Tensor, name: str) -> None:
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"{name} must be channels-first with {self.num_channels} channels (levels "
                f"{self.levels.tolist()}), got shape {tuple(x.shape)}."
            )

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Map ``z`` (code units) to level units ``[-h - 0.49, h + 0.49]``: identity inside ``[-h, h]``."""
        h = self._per_channel(self.half_width, z.ndim)
        u = z * h
        excess = u.abs() - h
        tail = torch.sign(u) * (h + _TAIL * torch.tanh(excess / _TAIL))
        return torch.where(excess > 0, tail, u)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantize ``z: [B, C, *spatial]`` to codes ``[B, C, *spatial]`` in ``[-1, 1]`` (float32)."""
        self._check_channels(z, "z")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            h = self._per_channel(self.half_width, z.ndim)
            bounded = self.bound(z)
            digits = self._digits_from_level_units(bounded)
            codes = (digits - h) / h
            # Straight-through: the value is exactly the grid code, the gradient is that of the bound.
            return codes + (bounded - bounded.detach()) / h

    def _digits_from_level_units(self, u: torch.Tensor) -> torch.Tensor:
        """Grid index ``k in [0, L-1]`` (as float) of each level-unit value."""
        h = self._per_channel(self.half_width, u.ndim)
        top = self._per_channel(self.levels, u.ndim).to(u.dtype) - 1
        return torch.minimum(torch.clamp(torch.round(u.detach() + h), min=0), top)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, C, *spatial]`` -> mixed-radix indices ``LongTensor[B, *spatial]`` in ``[0, codebook_size)``."""
        self._check_channels(codes, "codes")
        h = self._per_channel(self.half_width, codes.ndim)
        digits = self._digits_from_level_units(codes.detach().float() * h).long()
        return (digits * self._per_channel(self.basis, codes.ndim)).sum(dim=1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``LongTensor[B, *spatial]`` -> codes ``[B, C, *spatial]`` (float32), the exact inverse."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}.")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}] (a mask id left in the grid?)."
            )
        ndim = indices.ndim + 1
        digits = (indices.unsqueeze(1) // self._per_channel(self.basis, ndim)) % self._per_channel(self.levels, ndim)
        h = self._per_channel(self.half_width, ndim)
        return (digits.float() - h) / h

    def extra_repr(self) -> str:
        return f"levels={self.levels.tolist()}, codebook_size={self.codebook_size}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Refuse a checkpoint quantized with other levels: same channel count would otherwise load silently."""
        saved = state_dict.get(prefix + "levels")
        if saved is not None and not torch.equal(saved.to(self.levels.device).long(), self.levels):
            raise ValueError(
                f"checkpoint was trained with fsq_levels {saved.tolist()}, this model has {self.levels.tolist()}."
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
