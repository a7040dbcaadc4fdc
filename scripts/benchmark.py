"""prod9 benchmarks: every table side by side with the peer named in its issue, measured in one run.

    python scripts/benchmark.py                 # all tables, written to benchmarks/results.json
    python scripts/benchmark.py --only stage1   # one group: stage1, sampling

Each figure is the median of several repeats after a warm-up, with min and max. Record the printed tables in
BENCHMARKS.md together with the machine they came from.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import fire
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_sampling
import bench_stage1

GROUPS: dict[str, list[tuple[str, Callable[[], tuple[str, dict]]]]] = {
    "stage1": [
        ("AutoencoderFSQ against MAISI's KL autoencoder (same encoder/decoder)", bench_stage1.autoencoder_overhead),
        ("Sliding-window encode+decode against volume size", bench_stage1.sliding_window_scaling),
    ],
    "sampling": [
        (
            "MaskGiT sampling against MONAI's autoregressive transformer (same width and depth)",
            bench_sampling.sampling_table,
        ),
    ],
}


def machine() -> str:
    """A one-line description of where the figures come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(only: str | None = None, output: str = "benchmarks/results.json", threads: int = 2) -> None:
    """Run the benchmark groups (all, or ``only`` one of them), print markdown tables, save JSON results."""
    torch.set_num_threads(threads)
    if only is not None and only not in GROUPS:
        raise ValueError(f"--only must be one of {sorted(GROUPS)}, got {only!r}.")
    selected = {only: GROUPS[only]} if only else GROUPS
    results: dict[str, dict] = {"machine": machine()}
    print(f"# prod9 benchmarks on {results['machine']}\n")
    for group, tables in selected.items():
        for title, table_fn in tables:
            table, data = table_fn()
            print(f"## {title}\n\n{table}\n", flush=True)
            results[f"{group}: {title}"] = data
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)
    print(f"results written to {path}")


if __name__ == "__main__":
    fire.Fire(main)
