"""Sampling-speed table: prod9 MaskGiT against MONAI's autoregressive VQVAETransformerInferer, same grids.

Both sides use a transformer of the same width and depth (hidden 256, 8 layers, 8 heads, MLP 1024, vocabulary
1000). MONAI's side runs with ``use_flash_attention=True`` (``scaled_dot_product_attention``, its fastest setting)
and, where the full run is measured, also with its default attention. MaskGiT makes ``steps`` calls over
``N / p³`` positions; the autoregressive transformer makes ``N`` calls over a growing prefix (no key-value cache in
MONAI's inferer), so its cost is ``sum_{L=1..N} f(L)`` for a forward cost ``f(L)`` that grows linearly (MLP) and
quadratically (attention) with the prefix length ``L``.

Runs longer than ``full_ar_tokens`` (16³: tens of minutes on a CPU) are timed on the first ``prefix`` tokens
(a real ``sample`` call over a ``prefix``-token grid with the 16³ model) and the remaining steps are added from a
fit ``f(L) = a + b L + c L²`` to single forwards measured at lengths up to ``N``. The table says so.

    python scripts/bench_sampling.py              # prints the table
"""

from __future__ import annotations

import math
from functools import partial

import fire
import numpy as np
import torch
from bench_utils import Timing, markdown_table, time_call
from monai.inferers import VQVAETransformerInferer
from monai.networks.nets import VQVAE, DecoderOnlyTransformer
from monai.utils.ordering import Ordering

from prod9_ext import MaskGiTSampler, TransformerDecoder

WIDTH, DEPTH, HEADS, FFN, VOCAB = 256, 8, 8, 1024, 1000
FIT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)  # forward lengths for the cost fit, as fractions of N


def _prod9_model(grid: tuple[int, int, int], patch_size: int, device: torch.device) -> TransformerDecoder:
    torch.manual_seed(0)
    model = TransformerDecoder(DEPTH, WIDTH, HEADS, FFN, VOCAB, grid, num_modalities=4, patch_size=patch_size)
    return model.to(device).eval()


def _monai_models(num_tokens: int, sdpa: bool, device: torch.device) -> tuple[DecoderOnlyTransformer, VQVAE]:
    """MONAI's AR transformer (``sdpa``: its fastest attention, else its default) and a tiny VQVAE to decode."""
    torch.manual_seed(0)
    transformer = DecoderOnlyTransformer(
        num_tokens=VOCAB + 1,  # + the begin-of-sequence token
        max_seq_len=num_tokens,
        attn_layers_dim=WIDTH,
        attn_layers_depth=DEPTH,
        attn_layers_heads=HEADS,
        use_flash_attention=sdpa,
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
        num_embeddings=VOCAB,
        embedding_dim=4,
    )
    return transformer.to(device).eval(), vqvae.to(device).eval()


def _ar_sample(transformer, vqvae, grid: tuple[int, int, int], device: torch.device) -> None:
    ordering = Ordering(ordering_type="raster_scan", spatial_dims=3, dimensions=(1, *grid))
    start = torch.full((1, 1), VOCAB, dtype=torch.long, device=device)
    VQVAETransformerInferer().sample(grid, start, vqvae, transformer, ordering, verbose=False)


def _forward_cost_fit(
    transformer: DecoderOnlyTransformer, lengths: list[int], device: torch.device, repeats: int
) -> dict[str, list]:
    """Least-squares ``f(L) = a + b L + c L²`` (seconds) per statistic, from single forwards at ``lengths``."""
    timings = []
    for length in lengths:
        x = torch.randint(0, VOCAB, (1, length), device=device)
        with torch.no_grad():
            timings.append(time_call(lambda x=x: transformer(x), repeats=repeats))
    x = np.array(lengths, dtype=np.float64)
    design = np.stack([np.ones_like(x), x, x**2], axis=1)
    fits = {
        stat: np.linalg.lstsq(design, [getattr(t, stat) for t in timings], rcond=None)[0]
        for stat in ("median", "min", "max")
    }
    return {"lengths": lengths, "seconds": [t.__dict__ for t in timings], **{k: v.tolist() for k, v in fits.items()}}


def _sum_cost(coefficients: list[float], first: int, last: int) -> float:
    """``sum_{L=first..last} (a + b L + c L²)``: the fitted cost of the AR steps with prefixes first..last."""
    a, b, c = coefficients
    lengths = np.arange(first, last + 1, dtype=np.float64)
    return float(a * len(lengths) + b * lengths.sum() + c * (lengths**2).sum())


def _prod9_rows(size: int, steps: tuple[int, ...], guidance_scale: float, repeats: int, device: torch.device):
    """``(method, calls, Timing)`` rows: patch size 1 up to 8³ (plus one patch-2 row), 2 above, ± guidance."""
    grid, n = (size, size, size), size**3
    conditions = {
        "target_modality": torch.tensor([3], device=device),
        "sources": torch.randint(0, VOCAB, (1, 3, *grid), device=device),
        "source_modalities": torch.tensor([[0, 1, 2]], device=device),
    }

    def run(sampler: MaskGiTSampler, model: TransformerDecoder) -> None:
        generator = torch.Generator(device).manual_seed(0)
        sampler.sample(model, (1, *grid), generator=generator, **conditions)

    patch_size = 1 if size <= 8 else 2
    configs = [(patch_size, w, count) for w in (0.0, guidance_scale) for count in steps]
    if size <= 8:
        configs.append((2, 0.0, 12))
    models: dict[int, TransformerDecoder] = {}
    rows = []
    for p, w, count in configs:
        if p not in models:
            models[p] = _prod9_model(grid, p, device)
        model = models[p]
        params = sum(x.numel() for x in model.parameters()) / 1e6
        label = f"prod9 MaskGiT p={p} ({n // p**3} positions, {params:.1f}M params)" + (
            f", guidance w={w}" if w else ""
        )
        calls = f"{count} steps / {count} calls" + (" (batch 2)" if w else "")
        sampler = MaskGiTSampler(steps=count, guidance_scale=w)
        rows.append((label, calls, time_call(partial(run, sampler, model), repeats=repeats)))
    return rows


def _monai_ar(size: int, sdpa: bool, prefix: int | None, repeats: int, ar_repeats: int, device: torch.device):
    """``(label, Timing, note, details)`` for MONAI's AR sampling of a ``size³`` grid (``prefix`` None: in full)."""
    grid, n = (size, size, size), size**3
    transformer, vqvae = _monai_models(n, sdpa, device)
    params = sum(p.numel() for p in transformer.parameters()) / 1e6
    attention = "SDPA attention" if sdpa else "default attention"
    label = f"MONAI DecoderOnlyTransformer ({attention}, {params:.1f}M params) + VQVAETransformerInferer"
    if prefix is None:
        timing = time_call(partial(_ar_sample, transformer, vqvae, grid, device), repeats=ar_repeats, warmup=0)
        return label, timing, "measured", {}
    prefix_grid = (max(1, prefix // size**2), size, size)  # the first slices of the grid in raster order
    k = math.prod(prefix_grid)
    measured = time_call(partial(_ar_sample, transformer, vqvae, prefix_grid, device), repeats=ar_repeats, warmup=0)
    lengths = [round(n * f) for f in FIT_FRACTIONS]
    fit = _forward_cost_fit(transformer, lengths, device, repeats)
    stats = ("median", "min", "max")
    timing = Timing(*(getattr(measured, s) + _sum_cost(fit[s], k + 1, n) for s in stats), repeats=ar_repeats)
    note = (
        f"extrapolated: first {k} tokens timed ({measured.median:.1f} s; the fit predicts "
        f"{_sum_cost(fit['median'], 1, k):.1f} s), the other {n - k} steps added from a quadratic fit of forward "
        f"time against prefix length (single forwards at L = {', '.join(map(str, lengths))})"
    )
    return label, timing, note, {"prefix": k, "prefix_seconds": measured.__dict__, "forward_fit": fit}


def sampling_table(
    grids: tuple[int, ...] = (8, 16),
    steps: tuple[int, ...] = (12, 8, 16),
    guidance_scale: float = 2.0,
    full_ar_tokens: int = 512,
    prefix: int = 256,
    repeats: int = 3,
    ar_repeats: int = 2,
) -> tuple[str, dict]:
    """Seconds per sample (batch 1): MaskGiT with 3 source grids (T1, T1ce, T2 → FLAIR) against MONAI's AR inferer.

    The last column divides each row's median by prod9's first row on the same grid (its default patch size, 12
    steps, no guidance): for MONAI's row it is the speed-up of MaskGiT.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, results = [], []
    for size in grids:
        prod9 = _prod9_rows(size, steps, guidance_scale, repeats, device)
        base = prod9[0][2].median
        # MONAI's fastest attention everywhere; its default attention too where the full run is measured.
        full = size**3 <= full_ar_tokens
        ar_runs = [
            _monai_ar(size, sdpa, None if full else prefix, repeats, ar_repeats, device)
            for sdpa in ((True, False) if full else (True,))
        ]
        rows += [[f"{size}³", label, calls, str(t), f"{t.median / base:.2f}"] for label, calls, t in prod9]
        rows += [
            [f"{size}³", f"{m}, {note}", f"{size**3} calls", str(t), f"{t.median / base:.0f}"]
            for m, t, note, _ in ar_runs
        ]
        results.append(
            {
                "grid": [size] * 3,
                "prod9": [{"method": m, "calls": c, "seconds": t.__dict__} for m, c, t in prod9],
                "monai_ar": [{"method": m, "seconds": t.__dict__, "note": note, **d} for m, t, note, d in ar_runs],
                "speedup_12_steps": [t.median / base for _, t, _, _ in ar_runs],
            }
        )
    headers = ["grid", "method", "steps / calls", "seconds median [min, max]", "time / prod9 12 steps"]
    return markdown_table(headers, rows), {"width": WIDTH, "depth": DEPTH, "heads": HEADS, "rows": results}


def main(threads: int = 2, **kwargs) -> None:
    """Print the sampling table (``kwargs`` go to ``sampling_table``)."""
    torch.set_num_threads(threads)
    table, _ = sampling_table(**kwargs)
    print(table)


if __name__ == "__main__":
    fire.Fire(main)
