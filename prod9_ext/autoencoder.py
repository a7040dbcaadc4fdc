"""AutoencoderFSQ: MONAI's MAISI autoencoder with Finite Scalar Quantization in place of KL sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D
from torch import nn
from torch.utils.checkpoint import checkpoint

from prod9_ext.fsq import FiniteScalarQuantizer

__all__ = ["AutoencoderFSQ"]


class AutoencoderFSQ(AutoencoderKlMaisi):
    """MAISI encoder/decoder whose latent is quantized to discrete FSQ tokens.

    The encoder's ``latent_channels = len(fsq_levels)`` outputs are bounded and rounded by a
    :class:`~prod9_ext.fsq.FiniteScalarQuantizer`; the decoder reconstructs from the codes. The KL branch
    (``quant_conv_log_sigma`` and sampling) is removed, so every parameter takes part in training.

    Args:
        spatial_dims, in_channels, out_channels, num_res_blocks, num_channels, attention_levels, norm_num_groups,
        norm_eps, with_encoder_nonlocal_attn, with_decoder_nonlocal_attn, include_fc, use_combined_linear,
        use_flash_attention, use_convtranspose, num_splits, dim_split, norm_float16, print_info, save_mem: as in
            MONAI's ``AutoencoderKlMaisi`` (defaults here: no splitting, no cache emptying, which MAISI only needs
            for very large volumes on GPU).
        use_checkpointing: activation checkpointing of every encoder and decoder block while training (MAISI
            checkpoints the whole encoder and decoder, whose recomputation then holds all their activations at
            once): backward recomputes one block at a time, so a step keeps the blocks' inputs plus one block's
            activations, at the cost of a second forward pass through each block.
        fused_group_norm: replace MAISI's group norm, which loops over the groups in Python to save GPU memory,
            by torch's fused ``nn.GroupNorm``: the same normalisation and parameter names (checkpoints load
            either way) and a faster training step (BENCHMARKS.md, table 4a). Ignored with ``norm_float16``.
        fsq_levels: values per latent channel, e.g. ``(8, 5, 5, 5)`` (1000 codes).
        latent_channels: optional; when given it must equal ``len(fsq_levels)``.

    Shapes: an image ``[B, in_channels, H, W, D]`` with each side divisible by :attr:`downsampling_factor`
    maps to codes ``[B, len(fsq_levels), H/f, W/f, D/f]`` and indices ``[B, H/f, W/f, D/f]``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] = (2, 2, 2),
        num_channels: Sequence[int] = (64, 128, 256),
        attention_levels: Sequence[bool] = (False, False, False),
        fsq_levels: Sequence[int] = (8, 5, 5, 5),
        latent_channels: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
        include_fc: bool = False,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
        use_checkpointing: bool = False,
        use_convtranspose: bool = False,
        num_splits: int = 1,
        dim_split: int = 0,
        norm_float16: bool = False,
        print_info: bool = False,
        save_mem: bool = False,
        fused_group_norm: bool = True,
    ) -> None:
        if latent_channels is not None and latent_channels != len(fsq_levels):
            raise ValueError(
                f"latent_channels={latent_channels} conflicts with fsq_levels={list(fsq_levels)}: "
                f"the latent has len(fsq_levels)={len(fsq_levels)} channels (omit latent_channels)."
            )
        if len(num_res_blocks) != len(num_channels):
            raise ValueError(
                f"num_res_blocks {list(num_res_blocks)} must have one entry per level of num_channels "
                f"{list(num_channels)}."
            )
        quantizer = FiniteScalarQuantizer(fsq_levels)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            num_channels=num_channels,
            attention_levels=attention_levels,
            latent_channels=len(fsq_levels),
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
            use_checkpointing=use_checkpointing,
            use_convtranspose=use_convtranspose,
            num_splits=num_splits,
            dim_split=dim_split,
            norm_float16=norm_float16,
            print_info=print_info,
            save_mem=save_mem,
        )
        del self.quant_conv_log_sigma
        if fused_group_norm and not norm_float16:
            _fuse_group_norms(self)
        self.quantizer = quantizer
        self.spatial_dims = spatial_dims
        self.downsampling_factor = 2 ** (len(num_channels) - 1)

    @property
    def codebook_size(self) -> int:
        """Number of distinct tokens, ``prod(fsq_levels)``."""
        return self.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[B, C, *spatial]`` -> continuous latent ``(z_mu, z_sigma)``; ``z_sigma`` is zeros (no KL).

        ``z_mu`` is ``[B, len(fsq_levels), *spatial / f]``, not yet quantized.
        """
        z_mu = self.quant_conv_mu(self._through_blocks(self.encoder, x))
        return z_mu, torch.zeros_like(z_mu)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latent -> FSQ codes in ``[-1, 1]`` (straight-through gradient, float32)."""
        return self.quantizer(z)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, C, *latent]`` -> token indices ``LongTensor[B, *latent]``."""
        return self.quantizer.codes_to_indices(codes)

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """FSQ is deterministic: the "sample" of a latent is its quantized code."""
        return self.quantize(z_mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, C, *latent]`` -> image ``[B, out_channels, *latent * f]``."""
        return self._through_blocks(self.decoder, self.post_quant_conv(z))

    def _through_blocks(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``network(x)``; block by block under activation checkpointing when ``use_checkpointing`` and training."""
        if not (self.use_checkpoint and torch.is_grad_enabled()):
            return network(x)
        for block in network.blocks:  # type: ignore[union-attr]
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> token indices ``LongTensor[B, *spatial / f]``."""
        return self.embed(self.quantize(self.encode(x)[0]))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices ``LongTensor[B, *latent]`` -> image."""
        return self.decode(self.quantizer.indices_to_codes(indices))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode, quantize and decode ``x``."""
        return self.decode(self.quantize(self.encode(x)[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Image -> ``(reconstruction, codes, indices)``."""
        codes = self.quantize(self.encode(x)[0])
        return self.decode(codes), codes, self.embed(codes)

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized codes, for MONAI's latent inferers."""
        return self.quantize(self.encode(x)[0])

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


def _fuse_group_norms(module: nn.Module) -> None:
    """Swap every ``MaisiGroupNorm3D`` below ``module`` for an ``nn.GroupNorm`` with the same settings."""
    for name, child in module.named_children():
        if isinstance(child, MaisiGroupNorm3D):
            setattr(module, name, nn.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine))
        else:
            _fuse_group_norms(child)
