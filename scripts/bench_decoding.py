"""Decoding a generated latent grid into a volume, each side's way: the cost every generator pays after sampling.

prod9 decodes with its source-aware decoder (:class:`prod9_ext.source_decoder.SourceAwareDecoder`: stage 1's decoder
plus a small encoder of the sources' voxels); its sources entered the transformer as voxels, so nothing else is
encoded. A latent-diffusion or autoregressive peer conditions on the sources' latents, so it runs stage 1's encoder
on the three sources, and then stage 1's decoder on the sample. Both use the stage 1 of the bundles' defaults
(``STAGE1``: channels [64, 128, 256], two res blocks per level, four voxels per token along each axis), whole-volume
forward passes at batch 1 (sources at batch 3 for the peer's encoder).
"""

from __future__ import annotations

from functools import partial

import torch
from bench_utils import Workload, autocast, millions_of_parameters

from prod9_ext import AutoencoderFSQ
from prod9_ext.source_decoder import SourceAwareDecoder

# configs/train.json of the autoencoder bundle (use_convtranspose False, no attention).
STAGE1: dict = dict(num_channels=(64, 128, 256), num_res_blocks=(2, 2, 2), norm_num_groups=16, fsq_levels=(8, 5, 5, 5))
SOURCE_DECODER_CHANNELS = 16  # configs/train.json of the transformer bundle: decoder_channels
NUM_MODALITIES = 4


def _stage1(device: torch.device) -> AutoencoderFSQ:
    torch.manual_seed(0)
    return AutoencoderFSQ(attention_levels=(False,) * len(STAGE1["num_channels"]), **STAGE1).to(device).eval()


def _prod9_decode(decoder: SourceAwareDecoder, codes: torch.Tensor, sources: torch.Tensor, amp: bool) -> None:
    present = torch.tensor([[True, True, True, False]], device=codes.device)
    target = torch.tensor([3], device=codes.device)
    with torch.no_grad(), autocast(codes.device, amp):
        decoder(codes, sources, present, target)


def _peer_encode_decode(autoencoder: AutoencoderFSQ, codes: torch.Tensor, sources: torch.Tensor, amp: bool) -> None:
    with torch.no_grad(), autocast(codes.device, amp):
        autoencoder.encode(sources[0, :3, None])
        autoencoder.decode(codes)


def decoding_workloads(grid: tuple[int, int, int], device: torch.device, amp: bool = False) -> list[Workload]:
    """``[prod9's decoding, a latent peer's source encoding and decoding]`` of one ``grid`` of tokens."""
    autoencoder = _stage1(device)
    factor = autoencoder.downsampling_factor
    generator = torch.Generator().manual_seed(0)
    codes = autoencoder.quantizer.indices_to_codes(
        torch.randint(0, autoencoder.codebook_size, (1, *grid), generator=generator)
    ).to(device)
    sources = torch.rand(1, NUM_MODALITIES, *(n * factor for n in grid), generator=generator).to(device)
    decoder = SourceAwareDecoder(autoencoder, NUM_MODALITIES, SOURCE_DECODER_CHANNELS).to(device).eval()
    voxels = "×".join(str(n * factor) for n in grid)
    prod9 = partial(_prod9_decode, decoder, codes, sources, amp)
    peer = partial(_peer_encode_decode, autoencoder, codes, sources, amp)
    return [
        Workload(f"decoding, prod9: source-aware decoder to {voxels} voxels", millions_of_parameters(decoder),
                 "1 call", prod9, prod9),
        Workload(f"decoding, latent peers: stage-1 encoder of 3 sources + decoder to {voxels} voxels",
                 millions_of_parameters(autoencoder), "2 calls", peer, peer),
    ]  # fmt: skip
