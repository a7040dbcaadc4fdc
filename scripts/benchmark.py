"""prod9 benchmarks: every table side by side with the peer named in its issue, measured in one run.

    python scripts/benchmark.py                         # all tables, written to benchmarks/results.json
    python scripts/benchmark.py --only generation       # one group: generation, tokenizer, training, stage1
    python scripts/benchmark.py --device cuda --profile gpu --output benchmarks/results_cuda.json

``--profile cpu`` (the default) runs every table at the sizes chosen for the 2-core CPU machine; ``--profile gpu``
runs the tables that matter on a GPU at real sizes (stage 1 at 128³ with bf16 autocast, stage 2 at 16³ and 24×24×18
tokens). Each figure is the median of several repeats after a warm-up, with min and max; the results file is
rewritten after every table, so a run cut short keeps what it measured. Record the printed tables in BENCHMARKS.md
together with the machine they came from.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads that wait for a
# descheduled sibling make 2-thread runs many times slower and erratic. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_generation
import bench_stage1
import bench_summary
import bench_tokenizer
import bench_training
import fire
import torch

from prod9_ext.atomic import atomic_write_text

TableFn = Callable[..., tuple[str, dict]]

GROUPS: dict[str, list[tuple[str, TableFn]]] = {
    "generation": [
        (
            "Generation time per volume: prod9 MaskGiT against MONAI latent diffusion and autoregressive sampling",
            bench_generation.generation_table,
        ),
    ],
    "tokenizer": [("Tokenizer: FSQ against MONAI's VQ-VAE at 1000 codes", bench_tokenizer.tokenizer_table)],
    "training": [("Training throughput at the demo settings", bench_training.training_table)],
    "stage1": [
        ("AutoencoderFSQ against MAISI's KL autoencoder (same encoder/decoder)", bench_stage1.autoencoder_overhead),
        ("SSIM loss: MONAI's SSIMLoss against prod9's separable filtering", bench_stage1.ssim_loss_table),
        ("Decoder upsampling: interpolation against transposed convolution", bench_stage1.upsampling_table),
        ("Sliding-window encode+decode against volume size", bench_stage1.sliding_window_scaling),
    ],
}
ALIASES = {"sampling": "generation"}  # the group's name before diffusion joined it

# Per profile: the tables it runs and their arguments (an empty dict: the table's defaults).
PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        **{fn.__name__: {} for tables in GROUPS.values() for _, fn in tables},
        "generation_table": dict(large_repeats=3),  # one timing of the diffusion UNet at 24×24×18 is too noisy to rank
    },
    "gpu": {
        "generation_table": dict(
            grids=((16, 16, 16), (24, 24, 18)),
            repeats=3,
            large_repeats=2,
            full_ar_tokens=4096,
            ar_prefix=864,
            ddpm_prefix_steps=200,
            amp=True,
        ),
        "training_table": dict(
            stage1_roi=(128, 128, 128),
            stage1_batch=1,
            stage2_grids=((16, 16, 16), (24, 24, 18)),
            # train.json's transformer (the demo's is smaller)
            stage2_network=dict(num_layers=12, hidden_dim=512, num_heads=8, ffn_dim=2048, patch_size=2, dropout=0.1),
            repeats=10,
            amp=True,
        ),
        "autoencoder_overhead": dict(size=128, amp=True),
        "ssim_loss_table": dict(inputs=((8, 1, 64, 64, 64), (4, 1, 128, 128, 128))),
        "upsampling_table": dict(batch_size=4, size=128),
        "sliding_window_scaling": dict(repeats=3),
    },
}


def machine(device: str) -> str:
    """A one-line description of where the figures come from."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _write(results: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(results, indent=2, default=str))


def main(
    only: str | None = None,
    output: str = "benchmarks/results.json",
    threads: int = 2,
    device: str = "cpu",
    profile: str = "cpu",
) -> None:
    """Run the benchmark groups (all, or ``only`` one), print markdown tables and a summary, save JSON results."""
    torch.set_num_threads(threads)
    group = ALIASES.get(only, only) if only else None
    if group is not None and group not in GROUPS:
        raise ValueError(f"--only must be one of {sorted([*GROUPS, *ALIASES])}, got {only!r}.")
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {sorted(PROFILES)}, got {profile!r}.")
    sizes = PROFILES[profile]
    selected = [
        (name, title, fn)
        for name, tables in GROUPS.items()
        if group in (None, name)
        for title, fn in tables
        if fn.__name__ in sizes
    ]
    results: dict = {"machine": machine(device), "device": device, "profile": profile, "tables": {}}
    path = Path(output)
    print(f"# prod9 benchmarks on {results['machine']}, profile {profile}\n")
    for name, title, fn in selected:
        start = time.perf_counter()
        table, data = fn(device=device, **sizes[fn.__name__])
        seconds = time.perf_counter() - start
        print(f"## {name}: {title}\n\n{table}\n\n({seconds:.0f} s)\n", flush=True)
        results["tables"][fn.__name__] = {"group": name, "title": title, "wall_seconds": seconds, **data}
        _write(results, path)
    print(f"## Summary\n\n{bench_summary.summary_table(results)}\n")
    print(f"results written to {path}")


if __name__ == "__main__":
    fire.Fire(main)
