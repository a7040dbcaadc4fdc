"""MONAI's autoregressive peer: ``DecoderOnlyTransformer`` + ``VQVAETransformerInferer``, one forward per token.

The inferer has no key-value cache: step ``L`` runs a causal forward over the whole prefix of ``L`` tokens, so a grid
of ``N`` tokens costs ``sum_{L=1..N} f(L)`` for a forward cost ``f(L)`` that grows linearly (MLP) and quadratically
(attention) with ``L``. Grids above ``full_tokens`` (tens of minutes on a CPU) are timed on their first slices (a
real ``sample`` call over those slices with the full-grid model) and the remaining steps are added from a fit
``f(L) = a + b L + c L²`` to single forwards measured at lengths up to ``N``; the row says so.

The transformer runs with ``use_flash_attention=True`` (``scaled_dot_product_attention``, MONAI's fastest
setting). The inferer decodes with a VQVAE at the end; a tiny one (8 channels) here, so that decoding costs next to
nothing, as on prod9's side where decoding is excluded.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from bench_utils import Timing, Workload, autocast, millions_of_parameters, time_call
from monai.inferers import VQVAETransformerInferer
from monai.networks.nets import VQVAE, DecoderOnlyTransformer
from monai.utils.ordering import Ordering

FIT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)  # forward lengths for the cost fit, as fractions of N


def ar_models(
    num_tokens: int, width: int, depth: int, heads: int, vocab: int, device: torch.device
) -> tuple[DecoderOnlyTransformer, VQVAE]:
    """MONAI's AR transformer (MLP 4 × width, SDPA attention) and a tiny VQVAE for the inferer to decode with."""
    torch.manual_seed(0)
    transformer = DecoderOnlyTransformer(
        num_tokens=vocab + 1,  # + the begin-of-sequence token
        max_seq_len=num_tokens,
        attn_layers_dim=width,
        attn_layers_depth=depth,
        attn_layers_heads=heads,
        use_flash_attention=True,
    )
    vqvae = VQVAE(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(8,),
        num_res_layers=1,
        num_res_channels=(8,),
        downsample_parameters=((2, 4, 1, 1),),
        upsample_parameters=((2, 4, 1, 1, 0),),
        num_embeddings=vocab,
        embedding_dim=4,
    )
    return transformer.to(device).eval(), vqvae.to(device).eval()


def ar_sample(
    transformer: DecoderOnlyTransformer, vqvae: VQVAE, grid: tuple[int, ...], device: torch.device, amp: bool
) -> None:
    """One sample of a ``grid`` of tokens in raster order, with MONAI's inferer."""
    ordering = Ordering(ordering_type="raster_scan", spatial_dims=3, dimensions=(1, *grid))
    start = torch.full((1, 1), vqvae.num_embeddings, dtype=torch.long, device=device)
    with autocast(device, amp):
        VQVAETransformerInferer().sample(grid, start, vqvae, transformer, ordering, verbose=False)


def forward_cost_fit(
    transformer: DecoderOnlyTransformer, lengths: list[int], device: torch.device, amp: bool, repeats: int
) -> dict[str, list]:
    """Least-squares ``f(L) = a + b L + c L²`` (seconds) per statistic, from single forwards at ``lengths``."""
    timings = []
    for length in lengths:
        x = torch.randint(0, transformer.num_tokens - 1, (1, length), device=device)

        def forward(x: torch.Tensor = x) -> None:
            with torch.no_grad(), autocast(device, amp):
                transformer(x)

        timings.append(time_call(forward, repeats=repeats))
    x = np.array(lengths, dtype=np.float64)
    design = np.stack([np.ones_like(x), x, x**2], axis=1)
    fits = {
        stat: np.linalg.lstsq(design, [getattr(t, stat) for t in timings], rcond=None)[0]
        for stat in ("median", "min", "max")
    }
    return {"lengths": lengths, "seconds": [t.__dict__ for t in timings], **{k: v.tolist() for k, v in fits.items()}}


def sum_cost(coefficients: list[float], first: int, last: int) -> float:
    """``sum_{L=first..last} (a + b L + c L²)``: the fitted cost of the AR steps with prefixes first..last."""
    a, b, c = coefficients
    lengths = np.arange(first, last + 1, dtype=np.float64)
    return float(a * len(lengths) + b * lengths.sum() + c * (lengths**2).sum())


def ar_workload(
    grid: tuple[int, int, int],
    width: int,
    depth: int,
    heads: int,
    vocab: int,
    full_tokens: int,
    prefix: int,
    fit_repeats: int,
    device: torch.device,
    amp: bool = False,
) -> Workload:
    """MONAI's AR sampling of ``grid``: measured in full up to ``full_tokens`` tokens, else from ``prefix`` tokens."""
    n = math.prod(grid)
    transformer, vqvae = ar_models(n, width, depth, heads, vocab, device)
    label = "MONAI DecoderOnlyTransformer (SDPA attention) + VQVAETransformerInferer"
    slice_grid = (1, *grid[1:])  # the first slice in raster order
    common = dict(
        label=label,
        params_m=millions_of_parameters(transformer),
        calls=f"{n} calls",
        warm=partial(ar_sample, transformer, vqvae, slice_grid, device, amp),
    )
    if n <= full_tokens:
        return Workload(run=partial(ar_sample, transformer, vqvae, grid, device, amp), **common)
    prefix_grid = (max(1, min(grid[0], prefix // math.prod(grid[1:]))), *grid[1:])
    k = math.prod(prefix_grid)

    def report(measured: Timing) -> tuple[Timing, str, dict]:
        lengths = [round(n * f) for f in FIT_FRACTIONS]
        fit = forward_cost_fit(transformer, lengths, device, amp, fit_repeats)
        stats = ("median", "min", "max")
        timing = Timing(*(getattr(measured, s) + sum_cost(fit[s], k + 1, n) for s in stats), repeats=measured.repeats)
        note = (
            f"**extrapolated**: first {k} tokens timed ({measured.median:.1f} s; the fit predicts "
            f"{sum_cost(fit['median'], 1, k):.1f} s), the other {n - k} steps added from a quadratic fit of forward "
            f"time against prefix length (single forwards at L = {', '.join(map(str, lengths))})"
        )
        return timing, note, {"prefix": k, "prefix_seconds": measured.__dict__, "forward_fit": fit}

    return Workload(run=partial(ar_sample, transformer, vqvae, prefix_grid, device, amp), report=report, **common)
