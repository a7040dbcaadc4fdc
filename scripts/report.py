"""The quickstart's report: metrics of both stages beside the copy-the-source baseline, pictures, times, commands."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from linear_reference import BlockCode, held_out_volumes, score_block_codes

from prod9_ext.atomic import atomic_write_text

STEP_TITLES = {
    "phantoms": "build the phantom data set",
    "stage1_train": "stage 1: train the FSQ autoencoder",
    "stage1_evaluate": "stage 1: reconstruct the held-out cases",
    "stage2_train": "stage 2: tokenize the training cases, train the MaskGiT transformer",
    "peer_regression": "peer: train and score the regression U-Nets (prod9's training time)",
}
PEER_SSIM_MARGIN = 0.03  # prod9 counts as level with the regression peer within this much SSIM


def _task_title(step: str, tasks: dict[str, tuple[str, list[str]]]) -> str:
    """``stage2_evaluate_t2_from_t1`` -> ``stage 2: score T1 → T2 on the held-out cases``."""
    for task, (target, sources) in tasks.items():
        name = f"{' + '.join(s.upper() for s in sources)} → {target.upper()}"
        if step == f"stage2_evaluate_{task}":
            return f"stage 2: score {name} on the held-out cases"
        if step == f"stage2_synthesise_{task}":
            return f"stage 2: synthesise {name} NIfTI files"
    return step.replace("_", " ")


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"report: {path} is missing; rerun the quickstart to produce it")
    return json.loads(path.read_text())


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _verdict(synthesis: float, baseline: float) -> str:
    return "beats" if synthesis > baseline else "**does not beat**"


def _method(folder: Path) -> str:
    """How the evaluation in ``folder`` turned predicted tokens into an image, from its run record's config."""
    config = _load(folder / "run_record_evaluate.json")["config"]
    sampler = config["sampler"]
    guidance = f"guidance {sampler['guidance_scale']:g}"
    if config.get("decode_mode", "sample") == "mean":
        return f"prod9, expected code (1 call, {guidance})"
    return f"prod9, MaskGiT sample ({sampler['steps']} steps, {guidance}, temperature {sampler['temperature']:g})"


def _bottleneck(config: dict) -> tuple[list[int], int, str]:
    """The stage-1 config's FSQ levels, downsampling factor and block name (e.g. ``2×2×2``)."""
    factor = 2 ** (len(config["network_def"]["num_channels"]) - 1)
    return list(config["network_def"]["fsq_levels"]), factor, "×".join([str(factor)] * 3)


def _stage1_references(
    config: dict, levels: list[int], factor: int, block: str
) -> tuple[list[str], list[tuple[float, float]]]:
    """Block-PCA codes with the stage-1 bottleneck's size, scored on its held-out volumes: (row titles, scores).

    The codes keep C = ``len(levels)`` numbers per ``f×f×f`` block rounded to the FSQ levels (an untrained linear
    tokenizer), the same unrounded, and C + 1 unrounded.
    """
    channels = len(levels)
    codes: list[BlockCode] = [(channels, levels), (channels, None)]
    titles = [f"block PCA, {channels} numbers per {block} block rounded to {levels} levels"]
    titles.append(f"block PCA, {channels} numbers per block, unrounded")
    if channels < factor**3:
        codes.append((channels + 1, None))
        titles.append(f"block PCA, {channels + 1} numbers per block, unrounded")
    volumes = held_out_volumes(
        config["dataset"],
        config["dataset_dir"],
        config["pixdim"],
        config["modalities"],
        config["medmnist_flag"],
        config["medmnist_size"],
        config.get("split", "validation"),
    )
    return titles, score_block_codes(volumes, factor, codes)


def _peer_comparison(out: Path, task: str, case: str, peer_folder: Path) -> Path | None:
    """``<out>/comparison_<task>.png``: source, prod9, peer and real rows for ``case``, all on the scored grid."""
    import nibabel as nib
    import numpy as np

    snapshots = out / "transformer" / f"evaluate_{task}" / "cases"
    files = [snapshots / f"{case}_{key}.npy" for key in ("source", "pred", "label")]
    peer_file = peer_folder / task / f"{case}.nii.gz"
    if not all(f.is_file() for f in [*files, peer_file]):
        return None
    from prod9_ext.engines import save_mid_slices

    source, pred, label = (np.load(f) for f in files)
    peer = np.asarray(nib.load(peer_file).dataobj, dtype=np.float32)
    rows = [("source", source), ("prod9", pred), ("regression peer", peer.reshape(label.shape)), ("real", label)]
    path = out / f"comparison_{task}.png"
    save_mid_slices(path, rows)
    return path


def write_report(
    out: Path, tasks: dict[str, tuple[str, list[str]]], records: Path, smoke: bool = False, split: str = "test"
) -> Path:
    """Write ``<out>/report.md`` from the metrics files of the runs and the step records; return its path.

    ``split`` names the cases every table scores (``test``: cases no training or choice of settings saw).
    """
    stage1_folder = out / "autoencoder" / "evaluate"
    stage1 = _load(stage1_folder / "metrics.json")["mean"]
    stage1_config = _load(stage1_folder / "run_record_evaluate.json")["config"]
    levels, factor, block = _bottleneck(stage1_config)
    scoring_started = time.perf_counter()
    titles, references = _stage1_references(stage1_config, levels, factor, block)
    scoring_seconds = time.perf_counter() - scoring_started
    lines = ["# prod9 quickstart report", ""]
    if smoke:
        lines += ["**Smoke run** (tiny networks, one or two epochs): the numbers below only show the chain works.", ""]
    lines += [
        f"Held-out cases only (the {split} split, never used for training or for choosing settings). "
        "Intensities are scaled to [0, 1] per volume (0.5-99.5 % inside "
        "the brain), as the preprocessing does; SSIM with a 7-voxel Gaussian window; tumour SSIM averages the SSIM "
        "map over the tumour label (all labels > 0), as BraSyn reports it. The baseline copies the source closest "
        "to the target (lowest mean squared error) as the prediction.",
        "",
        "## Stage 1: FSQ autoencoder reconstruction",
        "",
        "| code | PSNR (dB) | SSIM | codebook usage | perplexity |",
        "|---|---|---|---|---|",
        f"| prod9 FSQ autoencoder, {levels} levels per {block} block | {_fmt(stage1['val_psnr'], 2)} | "
        f"{_fmt(stage1['val_ssim'])} | {_fmt(100 * stage1['val_codebook_usage'], 1)} % | "
        f"{_fmt(stage1['val_codebook_perplexity'], 1)} |",
        *[f"| {title} | {psnr:.2f} | {ssim:.3f} | | |" for title, (psnr, ssim) in zip(titles, references, strict=True)],
        "",
        "Block PCA keeps the top principal components of every voxel block, fitted to these held-out volumes (so no "
        "linear code of that size does better on them). Rounded to the FSQ levels (evenly between each component's "
        "0.1 and 99.9 % quantiles) it is an untrained linear tokenizer with stage 1's token budget: the baseline "
        "for stage 1. Unrounded, it shows how far a code of that size gets without a non-linear decoder. "
        "`python scripts/linear_reference.py` prints it for every size.",
        "",
        "## Stage 2: cross-modality synthesis",
        "",
        "| task | method | PSNR (dB) | SSIM | tumour SSIM | token accuracy |",
        "|---|---|---|---|---|---|",
    ]
    verdicts, pictures = [], []
    peer_folder = out / "peer"
    peer = _load(peer_folder / "metrics.json") if (peer_folder / "metrics.json").is_file() else {}
    for task, (target, sources) in tasks.items():
        folder = out / "transformer" / f"evaluate_{task}"
        metrics = _load(folder / "metrics.json")
        mean = metrics["mean"]
        name = f"{' + '.join(s.upper() for s in sources)} → {target.upper()}"
        lines.append(
            f"| {name} | {_method(folder)} | {_fmt(mean['val_psnr'], 2)} | {_fmt(mean['val_ssim'])} | "
            f"{_fmt(mean.get('val_ssim_tumour', math.nan))} | {_fmt(mean['val_token_accuracy'])} |"
        )
        if task in peer:
            row = peer[task]
            lines.append(
                f"| {name} | regression peer: MONAI BasicUNet, L1 + SSIM, {row['train_seconds'] / 60:.1f} min "
                f"({row['iterations']} iterations) | {_fmt(row['psnr'], 2)} | {_fmt(row['ssim'])} | "
                f"{_fmt(row.get('ssim_tumour', math.nan))} | |"
            )
            gap = mean["val_ssim"] - row["ssim"]
            standing = "above" if gap >= 0 else ("within" if gap >= -PEER_SSIM_MARGIN else "**below**")
            verdicts.append(
                f"- {name}: prod9's SSIM is {standing} the regression peer's "
                f"({_fmt(mean['val_ssim'])} vs {_fmt(row['ssim'])}, difference {gap:+.3f}; level means within "
                f"{PEER_SSIM_MARGIN})."
            )
            first_case = sorted(metrics["per_item"])[0]
            comparison = _peer_comparison(out, task, first_case, peer_folder)
            if comparison is not None:
                pictures.append(f"**{first_case}, {name}** (rows: source, prod9, regression peer, real)")
                pictures += ["", f"![{first_case} {task} beside the peer]({os.path.relpath(comparison, out)})", ""]
        lines.append(
            f"| {name} | copy the source | {_fmt(mean['baseline_psnr'], 2)} | {_fmt(mean['baseline_ssim'])} | | |"
        )
        verdicts.append(
            f"- {name}: synthesis {_verdict(mean['val_psnr'], mean['baseline_psnr'])} the baseline on PSNR "
            f"({_fmt(mean['val_psnr'], 2)} vs {_fmt(mean['baseline_psnr'], 2)} dB) and "
            f"{_verdict(mean['val_ssim'], mean['baseline_ssim'])} it on SSIM "
            f"({_fmt(mean['val_ssim'])} vs {_fmt(mean['baseline_ssim'])})."
        )
        for case in sorted(metrics["per_item"]):
            png = folder / "cases" / f"{case}.png"
            if png.is_file():
                pictures.append(f"**{case}, {name}** (rows: closest source, synthesised, real; three mid planes)")
                pictures += ["", f"![{case} {task}]({os.path.relpath(png, out)})", ""]
    psnr_goal = "meets" if stage1["val_psnr"] >= 28 else "**misses**"
    baseline_psnr, baseline_ssim = references[0]
    lines += [
        "",
        f"- Stage 1 {_verdict(stage1['val_psnr'], baseline_psnr)} the rounded block-PCA tokenizer on PSNR "
        f"({_fmt(stage1['val_psnr'], 2)} vs {baseline_psnr:.2f} dB) and {_verdict(stage1['val_ssim'], baseline_ssim)} "
        f"it on SSIM ({_fmt(stage1['val_ssim'])} vs {baseline_ssim:.3f}).",
        *verdicts,
        f"- Stage-1 reconstruction PSNR {psnr_goal} the 28 dB goal ({_fmt(stage1['val_psnr'], 2)} dB).",
        "",
    ]
    lines += ["Synthesised volumes (NIfTI, on each input file's grid): " + ", ".join(
        f"`{os.path.relpath(out / 'synthesis' / task, out)}/`" for task in tasks
    ) + ".", ""]  # fmt: skip

    lines += ["## Wall time and commands", "", "| step | minutes |", "|---|---|"]
    total = 0.0
    commands = []
    for path in sorted(records.glob("*.json"), key=lambda p: p.stat().st_mtime):
        record = json.loads(path.read_text())
        total += record["seconds"]
        title = STEP_TITLES.get(path.stem) or _task_title(path.stem, tasks)
        lines.append(f"| {title} | {record['seconds'] / 60:.1f} |")
        commands += [f"# {title}", record["command"]]
    total += scoring_seconds
    lines.append(f"| report: score the block-PCA codes on the held-out cases | {scoring_seconds / 60:.1f} |")
    lines += [f"| **total** | **{total / 60:.1f}** |", "", "Rerun any step from the repository root:", "", "```bash"]
    lines += [*commands, "```", "", "## Cases", "", *pictures]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
