"""The headline figures of a benchmark run, against their targets, as one short markdown table.

    python scripts/bench_summary.py benchmarks/results.json

``scripts/benchmark.py`` prints it after its tables; ``scripts/gpu_check.sh`` prints it last. Tables missing from
the results (not run, or cut off by a time limit) are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
from bench_utils import markdown_table

# Speed-up targets of prod9 at 12 steps over each peer (issue 31: with decoding, at 16³ and 24×24×18); None: none.
SPEEDUP_TARGETS: dict[str, float | None] = {"DDIMScheduler": 5.0, "RFlowScheduler": 3.0, "DDPMScheduler": None}
TARGET_GRIDS = ([16, 16, 16], [24, 24, 18])
AR_TARGET = 100.0


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def _generation_rows(data: dict) -> list[list[str]]:
    """prod9's 12-step time and its speed-up over each peer, with decoding where the run timed it (the targets' terms;
    the autoregressive target is on the latent grid, since it predates decoding)."""
    rows = []
    for grid in data["grids"]:
        name = "×".join(map(str, grid["grid"]))
        first, *others = grid["rows"]
        decoded = "seconds_with_decoding" in first
        seconds = first["seconds_with_decoding"] if decoded else first["seconds"]["median"]
        rows.append([f"prod9 12 steps, {name}" + (", with decoding" if decoded else ""), f"{seconds:.3g} s", "", ""])
        for row in others:
            peer = next((key for key in SPEEDUP_TARGETS if key in row["method"]), None)
            if peer is None and "VQVAETransformerInferer" not in row["method"]:
                continue  # prod9's other step counts
            target = AR_TARGET if peer is None else SPEEDUP_TARGETS[peer]
            with_decoding = decoded and peer is not None
            speedup = row["time_with_decoding_over_prod9_12" if with_decoding else "time_over_prod9_12"]
            label = peer.replace("Scheduler", "") if peer else "autoregressive"
            judged = target and (grid["grid"] in TARGET_GRIDS if with_decoding else grid["grid"] == [16, 16, 16])
            rows.append(
                [
                    f"speed-up over {label}, {name}"
                    + (", with decoding" if with_decoding else "")
                    + (" (extrapolated)" if row["note"] != "measured" else ""),
                    f"{speedup:.1f}×",
                    f"≥ {target:g}×" if judged else "",
                    _verdict(speedup >= target) if judged else "",  # type: ignore[operator]
                ]
            )
    return rows


def _tokenizer_rows(data: dict) -> list[list[str]]:
    fsq, vq = data["rows"]
    usage_met = fsq["usage"] >= 0.95 and fsq["usage"] > vq["usage"]
    return [
        [
            "codebook usage FSQ / VQ-VAE",
            f"{100 * fsq['usage']:.1f}% / {100 * vq['usage']:.1f}%",
            "FSQ ≥ 95% and > VQ",
            _verdict(usage_met),
        ],
        ["perplexity FSQ / VQ-VAE", f"{fsq['perplexity']:.0f} / {vq['perplexity']:.0f}", "", ""],
        ["PSNR FSQ / VQ-VAE", f"{fsq['psnr']:.2f} / {vq['psnr']:.2f} dB", "", ""],
    ]


def _training_rows(data: dict) -> list[list[str]]:
    return [
        [
            row["workload"] + (", bf16 autocast" if row.get("amp") else ""),
            f"{row['steps_per_second']:.3g} steps/s, {row['peak_mib']:.0f} MiB",
            "",
            "",
        ]
        for row in data["rows"]
    ]


def _stage1_rows(tables: dict) -> list[list[str]]:
    rows = []
    if "autoencoder_overhead" in tables:
        ratio = tables["autoencoder_overhead"]["time_ratio"]
        rows.append(["FSQ / KL fwd+bwd time", f"{ratio:.3f}", "≤ 1.05", _verdict(ratio <= 1.05)])
    if "sliding_window_scaling" in tables:
        scaling = tables["sliding_window_scaling"]["rows"]
        ratio = scaling[-1]["peak_mib"] / scaling[0]["peak_mib"]
        shape = "×".join(map(str, scaling[-1]["shape"]))
        rows.append([f"sliding-window peak memory, {shape} / one window", f"{ratio:.2f}", "≤ 2", _verdict(ratio <= 2)])
    return rows


def summary_table(results: dict) -> str:
    """The headline figures found in ``results`` (the JSON that ``benchmark.py`` writes)."""
    tables = results.get("tables", {})
    rows = []
    if "generation_table" in tables:
        rows += _generation_rows(tables["generation_table"])
    if "tokenizer_table" in tables:
        rows += _tokenizer_rows(tables["tokenizer_table"])
    if "training_table" in tables:
        rows += _training_rows(tables["training_table"])
    rows += _stage1_rows(tables)
    return markdown_table(["figure", "measured", "target", ""], rows)


def main(results: str = "benchmarks/results.json") -> None:
    """Print the summary of a results file."""
    print(summary_table(json.loads(Path(results).read_text())))


if __name__ == "__main__":
    fire.Fire(main)
