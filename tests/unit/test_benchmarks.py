"""The benchmark tables run at toy sizes and hold the rows they promise (timings are not checked)."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_decoding
import bench_diffusion
import bench_generation
import bench_stage1
import bench_summary
import bench_tokenizer
import bench_training
import benchmark

TINY_STAGE1 = dict(num_channels=(8, 8, 8), num_res_blocks=(1, 1, 1), norm_num_groups=4, fsq_levels=(8, 5, 5, 5))
TINY_STAGE2 = dict(num_layers=1, hidden_dim=32, num_heads=2, ffn_dim=64, patch_size=2, dropout=0.0)


def _rows(table: str) -> list[list[str]]:
    """The body rows of a markdown table, as lists of cells."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.fixture
def tiny_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink every generator (prod9, AR and diffusion) and the diffusion step counts to toy sizes."""
    for name, value in {"WIDTH": 32, "DEPTH": 1, "HEADS": 2, "FFN": 64}.items():
        monkeypatch.setattr(bench_generation, name, value)
    unet = dict(bench_diffusion.UNET, channels=(16, 16, 16), num_head_channels=(0, 8, 8), norm_num_groups=8)
    monkeypatch.setattr(bench_diffusion, "UNET", unet)
    monkeypatch.setattr(bench_diffusion, "SAMPLERS", {"DDIM": 3, "RFlow": 2, "DDPM": 6})
    monkeypatch.setattr(bench_decoding, "STAGE1", TINY_STAGE1)
    monkeypatch.setattr(bench_decoding, "SOURCE_DECODER_CHANNELS", 4)


def test_generation_table_rows(tiny_generators: None) -> None:
    table, data = bench_generation.generation_table(
        grids=((4, 4, 4), (8, 4, 4)),
        steps=(2, 12),
        repeats=1,
        large_tokens=64,
        large_repeats=1,
        full_ar_tokens=64,
        ar_prefix=16,
        ddpm_prefix_steps=2,
    )
    rows = _rows(table)
    # per grid: prod9 at 12 and 2 steps, each ± guidance (+ one patch-2 row on the small grids), 3 diffusion, 1 AR,
    # then the two sides' decoding
    assert [row[0] for row in rows] == ["4³"] * 11 + ["8×4×4"] * 11
    assert all(len(row) == 8 for row in rows)
    for grid in data["grids"]:
        methods = [row["method"] for row in grid["rows"]]
        assert grid["rows"][0]["calls"].startswith("12 steps") and grid["rows"][0]["time_over_prod9_12"] == 1
        prod9_decoding, peer_decoding = (row["seconds"]["median"] for row in grid["decoding"])
        assert "16×16×16 voxels" in grid["decoding"][0]["method"] or grid["grid"] != [4, 4, 4]
        for row in grid["rows"]:
            added = prod9_decoding if row["method"].startswith("prod9") else peer_decoding
            assert row["seconds_with_decoding"] == pytest.approx(row["seconds"]["median"] + added)
        assert grid["rows"][0]["time_with_decoding_over_prod9_12"] == 1
        assert sum("prod9 MaskGiT" in m for m in methods) == 5
        for scheduler in ("DDIMScheduler", "RFlowScheduler", "DDPMScheduler"):
            assert sum(scheduler in m for m in methods) == 1
        notes = {row["method"]: row["note"] for row in grid["rows"]}
        ddpm = next(m for m in methods if "DDPM" in m)
        assert "extrapolated" in notes[ddpm] and "first 2 of 6 steps" in notes[ddpm]
        assert "VQVAETransformerInferer" in methods[-1]
    assert data["grids"][0]["rows"][-1]["note"] == "measured"  # 64 tokens: AR sampled in full
    assert "first 16 tokens timed" in data["grids"][1]["rows"][-1]["note"]  # 128 tokens: from one 16-token slice


def test_generation_table_with_bf16_autocast(tiny_generators: None) -> None:
    """The GPU profile's code path (bf16 autocast on every side) runs on the CPU too."""
    table, data = bench_generation.generation_table(
        grids=((4, 4, 4),), steps=(12,), repeats=1, amp=True, decoding=False
    )
    assert data["amp"] is True and data["decoding"] is False
    assert len(_rows(table)) == 2 + 3 + 1 + 1  # prod9 ± guidance, p=2, 3 diffusion samplers, AR; no decoding rows
    assert "seconds_with_decoding" not in data["grids"][0]["rows"][0]


def test_tokenizer_table_rows() -> None:
    table, data = bench_tokenizer.tokenizer_table(steps=2, roi=16, phantom_cases=3, spacing=6.0)
    rows = _rows(table)
    assert [row[0] for row in rows] == list(bench_tokenizer.TOKENIZERS)
    assert data["validation_cases"] == 1 and data["validation_volumes"] == 4
    for row in data["rows"]:
        assert 0 < row["usage"] <= 1 and 1 <= row["perplexity"] <= 1000
        assert row["tokens"] > 0 and row["psnr"] == row["psnr"]  # not NaN


def test_training_table_rows() -> None:
    table, data = bench_training.training_table(
        stage1_roi=(24, 24, 24),
        stage1_batch=1,
        stage1_network=TINY_STAGE1,
        stage2_grids=((4, 4, 2),),
        stage2_batch=2,
        stage2_network=TINY_STAGE2,
        repeats=1,
    )
    names = [row[0] for row in _rows(table)]
    workloads = [
        "stage 1, 1 case × 4 contrasts × 24³, L1 + SSIM",
        "stage 1, 1 case × 4 contrasts × 24³, + patch discriminator (after the adversarial warm-up)",
        "stage 2, 2 cases × 4×4×2 target tokens (+ 3 source grids)",
    ]
    assert names == [f"{w}, {precision}" for w in workloads for precision in ("float32", "bf16 autocast")]
    rows = data["rows"]
    assert [row["amp"] for row in rows] == [False, True] * 3
    assert rows[0]["voxels_per_second"] > 0 and rows[4]["tokens_per_second"] > 0
    for full, half in zip(rows[::2], rows[1::2], strict=True):  # the speed-up is the ratio of the two medians
        assert full["bf16_speed_up"] is None
        ratio = full["seconds_per_step"]["median"] / half["seconds_per_step"]["median"]
        assert half["bf16_speed_up"] == pytest.approx(ratio)


def test_training_sizes_come_from_the_demo_overlays() -> None:
    demo = bench_training._demo()
    configs = bench_training.BUNDLES / "maskgit_transformer" / "configs"
    overlay = json.loads((configs / "demo.json").read_text())
    full = json.loads((configs / "train.json").read_text())
    for key, value in demo["stage2_network"].items():  # the overlay wins, train.json fills the rest
        assert value == overlay.get(f"network_def#{key}", full["network_def"][key]), key
    assert demo["stage2_network"]["num_layers"] == overlay["network_def#num_layers"]
    factor = 2 ** (len(demo["stage1_network"]["num_channels"]) - 1)
    assert demo["stage2_grids"] == (tuple(n // factor for n in overlay["roi_size"]),)


def test_stage1_tables_rows() -> None:
    table, _ = bench_stage1.autoencoder_overhead(size=16, repeats=1)
    assert [row[0] for row in _rows(table)] == [
        "MONAI AutoencoderKlMaisi (KL)",
        "prod9 AutoencoderFSQ",
        "prod9 AutoencoderFSQ, fused GroupNorm (default)",
    ]
    table, _ = bench_stage1.sliding_window_scaling(roi=16, shapes=((16, 16, 16), (28, 16, 16)))
    assert [row[:2] for row in _rows(table)] == [["16×16×16", "1"], ["28×16×16", "2"]]
    table, results = bench_stage1.ssim_loss_table(inputs=((2, 1, 12, 12, 12),), repeats=1)
    assert [row[0] for row in _rows(table)] == ["2×1×12×12×12"]
    row = results["rows"][0]
    assert row["speed_up"] == pytest.approx(row["monai"]["median"] / row["prod9"]["median"])
    table, results = bench_stage1.upsampling_table(batch_size=1, size=16, repeats=1, precisions=(False,))
    assert [row[0] for row in _rows(table)] == [
        "interpolation + convolution (MAISI's default), float32",
        "transposed convolution (the demo), float32",
    ]
    row = results["rows"][0]
    assert row["ratio"] == pytest.approx(row["transposed"]["median"] / row["interpolation"]["median"])


def test_profiles_name_existing_tables() -> None:
    tables = {fn.__name__ for entries in benchmark.GROUPS.values() for _, fn in entries}
    for sizes in benchmark.PROFILES.values():
        assert set(sizes) <= tables
    assert set(benchmark.ALIASES.values()) <= set(benchmark.GROUPS)
    with pytest.raises(ValueError, match="--only"):
        benchmark.main(only="nothing")


def test_cpu_profile_times_every_generation_grid_three_times() -> None:
    """The CPU table's ratios at 24×24×18 are medians of 3 interleaved repeats, like those of the smaller grids."""
    sizes = benchmark.PROFILES["cpu"]["generation_table"]
    defaults = inspect.signature(bench_generation.generation_table).parameters
    for key in ("repeats", "large_repeats"):
        assert sizes.get(key, defaults[key].default) >= 3


def test_main_writes_results_and_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``benchmark.py --only`` runs one group's tables, writes their data and ends with the summary table."""

    def autoencoder_overhead(device: str = "cpu") -> tuple[str, dict]:
        return "| a |\n|---|\n| 1 |", {"time_ratio": 1.01}

    monkeypatch.setattr(benchmark, "GROUPS", {"stage1": [("overhead", autoencoder_overhead)]})
    monkeypatch.setattr(benchmark, "PROFILES", {"cpu": {"autoencoder_overhead": {}}})
    threads = torch.get_num_threads()
    try:
        benchmark.main(only="stage1", output=str(tmp_path / "results.json"))
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tables"]["autoencoder_overhead"]["time_ratio"] == 1.01
    printed = capsys.readouterr().out
    assert printed.index("## Summary") > printed.index("## stage1: overhead")
    assert "| FSQ / KL fwd+bwd time | 1.010 | ≤ 1.05 | met |" in printed


def test_summary_reads_every_table() -> None:
    generation = {
        "grids": [
            {
                "grid": [16, 16, 16],
                "rows": [
                    {"method": "prod9", "seconds": {"median": 1.0}, "time_over_prod9_12": 1.0, "note": "measured"},
                    {"method": "x, DDIMScheduler", "time_over_prod9_12": 6.0, "note": "measured"},
                    {"method": "x, RFlowScheduler", "time_over_prod9_12": 2.5, "note": "measured"},
                    {"method": "VQVAETransformerInferer", "time_over_prod9_12": 900.0, "note": "extrapolated"},
                ],
            },
            {
                "grid": [24, 24, 18],
                "rows": [
                    {"method": "prod9", "seconds": {"median": 3.0}, "seconds_with_decoding": 5.0, "note": "measured"},
                    _decoded("x, DDIMScheduler", 3.5, 2.9),
                    _decoded("x, RFlowScheduler", 2.1, 3.1),
                ],
            },
        ]
    }
    tokenizer = {
        "rows": [
            {"usage": 0.97, "perplexity": 700, "psnr": 30.0},
            {"usage": 0.4, "perplexity": 100, "psnr": 29.0},
        ]
    }
    results = {"tables": {"generation_table": generation, "tokenizer_table": tokenizer}}
    rows = _rows(bench_summary.summary_table(results))
    verdicts = {row[0]: row[-1] for row in rows}
    assert verdicts["speed-up over DDIM, 16×16×16"] == "met"
    assert verdicts["speed-up over RFlow, 16×16×16"] == "**missed**"
    assert verdicts["speed-up over autoregressive, 16×16×16 (extrapolated)"] == "met"
    assert verdicts["codebook usage FSQ / VQ-VAE"] == "met"
    # with decoding timed, the targets are judged on the ratio with decoding, on 24×24×18 as well
    assert verdicts["speed-up over DDIM, 24×24×18, with decoding"] == "**missed**"
    assert verdicts["speed-up over RFlow, 24×24×18, with decoding"] == "met"
    assert "prod9 12 steps, 24×24×18, with decoding" in verdicts


def _decoded(method: str, latent_ratio: float, decoded_ratio: float) -> dict:
    return {
        "method": method,
        "time_over_prod9_12": latent_ratio,
        "time_with_decoding_over_prod9_12": decoded_ratio,
        "note": "measured",
    }
