"""Generation time per volume on the same latent grid: prod9 MaskGiT against MONAI's latent diffusion and AR stacks.

prod9: ``TransformerDecoder`` (hidden 256, 8 layers, 8 heads, MLP 1024, vocabulary 1000 with its FSQ levels
[8, 5, 5, 5], the token-resolution path at 32 channels as the bundles configure it; patch size 1 up to 8³ tokens,
2 above) with ``MaskGiTSampler``, 8/12/16 steps, with and without classifier-free guidance, conditioned on
three source images (T1, T1ce, T2 → FLAIR) at voxel resolution, ``source_factor`` voxels per token along each axis
(4: the bundles' three-level stage 1), read by the space-to-depth source encoder inside every timed run. Peers (see
``bench_diffusion`` and ``bench_autoregressive``): MONAI's ``DiffusionModelUNet`` with DDIM-50, RFlow-30 and
DDPM-1000, and MONAI's ``DecoderOnlyTransformer`` of the same width and depth as prod9's with
``VQVAETransformerInferer``. Each row is timed up to the latent grid, and with decoding: prod9's source-aware decoder
against the peers' stage-1 encoding of the sources and decoding of the sample (``bench_decoding``), timed in the same
round-robin and added to each side's rows.

On each grid all rows are timed round-robin (one call of each, then again), after one short warm-up call of each, so
that machine drift hits every side of a ratio alike. The ratio columns divide each row's median by prod9's 12-step
row without guidance on the same grid (without and with decoding): for a peer it is MaskGiT's speed-up.

    python scripts/bench_generation.py              # prints the table
"""

from __future__ import annotations

import math
from functools import partial

import fire
import torch
from bench_autoregressive import ar_workload
from bench_decoding import decoding_workloads
from bench_diffusion import diffusion_workloads
from bench_utils import Workload, autocast, markdown_table, millions_of_parameters, time_interleaved

from prod9_ext import MaskGiTSampler, TransformerDecoder

WIDTH, DEPTH, HEADS, FFN, VOCAB = 256, 8, 8, 1024, 1000
FSQ_LEVELS, TOKEN_DIM = [8, 5, 5, 5], 32  # the stage-1 default codebook; the stage-2 token path of the bundles
NUM_SOURCES = 3
GRIDS = ((8, 8, 8), (16, 16, 16), (24, 24, 18))  # 24×24×18: a 192×192×144 brain at 8× downsampling
SOURCE_FACTOR = 4  # voxels per token along each axis of the bundles' stage 1 (three levels)


def _maskgit_sample(
    sampler: MaskGiTSampler, model: TransformerDecoder, conditions: dict, amp: bool, device: torch.device
) -> None:
    generator = torch.Generator(device).manual_seed(0)
    with autocast(device, amp):
        sampler.sample(model, (1, *model.latent_shape), generator=generator, **conditions)


def maskgit_workloads(
    grid: tuple[int, int, int],
    steps: tuple[int, ...],
    guidance_scale: float,
    device: torch.device,
    amp: bool,
    source_factor: int = SOURCE_FACTOR,
) -> list[Workload]:
    """prod9 rows, 12 steps unguided first; patch size 1 up to 8³ (plus one patch-2 row), 2 above; ± guidance.

    The sources are images of ``grid * source_factor`` voxels: each run encodes them (once, as the sampler does).
    """
    voxels = [n * source_factor for n in grid]
    conditions = {
        "target_modality": torch.tensor([3], device=device),
        "sources": torch.rand(1, NUM_SOURCES, *voxels, device=device),
        "source_modalities": torch.tensor([list(range(NUM_SOURCES))], device=device),
    }
    small = math.prod(grid) <= 8**3
    ordered = (12, *[s for s in steps if s != 12])
    configs = [(1 if small else 2, w, count) for w in (0.0, guidance_scale) for count in ordered]
    if small:
        configs.append((2, 0.0, 12))
    models: dict[int, TransformerDecoder] = {}
    workloads = []
    for p, w, count in configs:
        if p not in models:
            torch.manual_seed(0)
            models[p] = TransformerDecoder(
                DEPTH,
                WIDTH,
                HEADS,
                FFN,
                VOCAB,
                grid,
                4,
                patch_size=p,
                fsq_levels=FSQ_LEVELS,
                token_dim=TOKEN_DIM,
                source_factor=source_factor,
            )
            models[p] = models[p].to(device).eval()
        label = f"prod9 MaskGiT p={p} ({math.prod(grid) // p**3} positions)" + (f", guidance w={w}" if w else "")
        calls = f"{count} steps / {count} calls" + (" (batch 2)" if w else "")
        workloads.append(
            Workload(
                label=label,
                params_m=millions_of_parameters(models[p]),
                calls=calls,
                run=partial(
                    _maskgit_sample, MaskGiTSampler(count, guidance_scale=w), models[p], conditions, amp, device
                ),
                warm=partial(_maskgit_sample, MaskGiTSampler(1, guidance_scale=w), models[p], conditions, amp, device),
            )
        )
    return workloads


def generation_table(
    grids: tuple[tuple[int, int, int], ...] = GRIDS,
    steps: tuple[int, ...] = (8, 12, 16),
    guidance_scale: float = 2.0,
    repeats: int = 3,
    large_tokens: int = 4096,
    large_repeats: int = 1,
    full_ar_tokens: int = 512,
    ar_prefix: int = 256,
    ddpm_prefix_steps: int = 50,
    device: str = "cpu",
    amp: bool = False,
    source_factor: int = SOURCE_FACTOR,
    decoding: bool = True,
) -> tuple[str, dict]:
    """Seconds per generated latent grid (batch 1) for every method, and each against prod9 at 12 steps.

    Grids above ``large_tokens`` tokens are timed ``large_repeats`` times, the others ``repeats`` times; MONAI's AR
    sampling is measured in full up to ``full_ar_tokens`` tokens and extrapolated from its first ``ar_prefix``
    tokens (rounded to whole slices) above; DDPM is timed on ``ddpm_prefix_steps`` steps and scaled to 1000.
    ``amp``: bf16 autocast on every side. ``source_factor``: voxels per token of prod9's source images.
    ``decoding``: also time each side's decoding (``bench_decoding``) and report every row with it added.
    """
    dev = torch.device(device)
    rows, results = [], []
    for grid in (tuple(g) for g in grids):
        n = math.prod(grid)
        count = repeats if n <= large_tokens else large_repeats
        workloads = [
            *maskgit_workloads(grid, steps, guidance_scale, dev, amp, source_factor),  # type: ignore[arg-type]
            *diffusion_workloads(grid, NUM_SOURCES, ddpm_prefix_steps, dev, amp),  # type: ignore[arg-type]
            ar_workload(grid, WIDTH, DEPTH, HEADS, VOCAB, full_ar_tokens, ar_prefix, count, dev, amp),  # type: ignore[arg-type]
        ]
        decoders = decoding_workloads(grid, dev, amp) if decoding else []  # type: ignore[arg-type]
        every = workloads + decoders
        timings = time_interleaved([w.run for w in every], count, warmups=[w.warm for w in every])
        reported = [w.report(t) for w, t in zip(workloads, timings[: len(workloads)], strict=True)]
        decode_seconds = [t.median for t in timings[len(workloads) :]]
        base = reported[0][0].median
        base_decoded = base + decode_seconds[0] if decoding else None
        name = "×".join(map(str, grid)) if len(set(grid)) > 1 else f"{grid[0]}³"
        entries = []
        for w, (timing, note, details) in zip(workloads, reported, strict=True):
            ratio = timing.median / base
            method = w.label if note == "measured" else f"{w.label}, {note}"
            row = [name, method, f"{w.params_m:.1f}M", w.calls, str(timing), f"{ratio:.3g}"]
            entry = {
                "method": w.label,
                "params_m": w.params_m,
                "calls": w.calls,
                "seconds": timing.__dict__,
                "note": note,
                "time_over_prod9_12": ratio,
                **details,
            }
            if base_decoded is not None:
                decoded = timing.median + decode_seconds[0 if w.label.startswith("prod9") else 1]
                row += [f"{decoded:.4f}", f"{decoded / base_decoded:.3g}"]
                entry |= {"seconds_with_decoding": decoded, "time_with_decoding_over_prod9_12": decoded / base_decoded}
            rows.append(row)
            entries.append(entry)
        decoded_rows = []
        for w, timing in zip(decoders, timings[len(workloads) :], strict=True):
            rows.append([name, w.label, f"{w.params_m:.1f}M", w.calls, str(timing), "", "", ""])
            decoded_rows.append({"method": w.label, "params_m": w.params_m, "seconds": timing.__dict__})
        results.append({"grid": list(grid), "repeats": count, "rows": entries, "decoding": decoded_rows})
    headers = ["grid", "method", "params", "steps / calls", "seconds median [min, max]", "time / prod9 12 steps"]
    if decoding:
        headers += ["with decoding: seconds (medians added)", "with decoding: time / prod9 12 steps"]
    summary = {"device": device, "amp": amp, "source_factor": source_factor, "decoding": decoding, "grids": results}
    return markdown_table(headers, rows), summary


def main(threads: int = 2, **kwargs) -> None:
    """Print the generation table (``kwargs`` go to ``generation_table``)."""
    torch.set_num_threads(threads)
    table, _ = generation_table(**kwargs)
    print(table)


if __name__ == "__main__":
    fire.Fire(main)
