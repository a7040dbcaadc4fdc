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
    "stage2_train_decoder": "stage 2: train the source-aware decoder",
    "peer_regression": "peer: train and score the regression U-Nets (prod9's training time)",
}
PEER_SSIM_MARGIN = 0.03  # prod9 counts as level with the regression peer within this much SSIM


def _task_title(step: str, tasks: dict[str, tuple[str, list[str]]]) -> str:
    """``stage2_evaluate_t2_from_t1`` -> ``stage 2: score T1 → T2 on the held-out cases``."""
    for task, (target, sources) in tasks.items():
        name = f"{' + '.join(s.upper() for s in sources)} → {target.upper()}"
        if step == f"stage2_evaluate_{task}":
            return f"stage 2: score {name} on the held-out cases"
        if step.startswith(f"stage2_synthesise_{task}_"):
            return f"stage 2: synthesise {name} NIfTI files, {step.removeprefix(f'stage2_synthesise_{task}_')}"
        if step.startswith(f"score_{task}_"):
            return f"score {name}, {step.removeprefix(f'score_{task}_')}"
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


ROW_TITLES = {
    "mean": "prod9, expected code, source-aware decoder",
    "sample": "prod9, one MaskGiT sample",
    "mean_of_4_samples": "prod9, mean of 4 MaskGiT samples",
    "mean_stage1_decoder": "prod9, expected code, stage 1's decoder (no source-aware decoder)",
    "token_swap": "ablation: expected code of another case, source-aware decoder",
    "peer": "regression peer",
    "copy_the_source": "copy the source closest to the target",
}
PROD9_ROWS = ("mean", "sample", "mean_of_4_samples")
COMPARISON_ROWS = ("source", "prod9 sample", "prod9 expected code", "regression peer", "real")


def _verdicts(name: str, scores: dict[str, dict], best: str) -> list[str]:
    """The task's verdicts: prod9's best row against the peer, and what the tokens contribute (token swap)."""
    prod9, peer, swap = scores[best], scores["peer"], scores["token_swap"]
    lines = []
    for key, label, higher in (("psnr", "PSNR", True), ("ssim", "SSIM", True), ("ssim_tumour", "tumour SSIM", True),
                               ("hfen", "HFEN", False)):  # fmt: skip
        ours, theirs = prod9[key], peer[key]
        if ours is None or theirs is None:
            continue
        standing = "is level with or ahead of" if (ours >= theirs if higher else ours <= theirs) else "**is behind**"
        lines.append(
            f"- {name}, {label}: prod9's best row ({ROW_TITLES[best]}) {standing} the regression peer "
            f"({_fmt(ours)} vs {_fmt(theirs)})."
        )
    own = scores["mean"]  # the same decoding as the swap, with the case's own codes
    gap = own["ssim"] - swap["ssim"]
    tumour_gap = (own["ssim_tumour"] or math.nan) - (swap["ssim_tumour"] or math.nan)
    lines.append(
        f"- {name}: decoding with another case's expected code instead of the case's own costs {gap:.3f} SSIM "
        f"({tumour_gap:.3f} in the tumour): what the tokens contribute beyond the sources."
    )
    return lines


def _comparison(out: Path, task: str, target: str, source: str, case: str) -> Path | None:
    """``<out>/comparison_<task>.png``: source, prod9 sample, prod9 expected code, peer and real rows for ``case``,
    each on its file's grid with BraSyn's normalisation."""
    import nibabel as nib
    import numpy as np

    from prod9_ext.data import load_datalist
    from prod9_ext.engines import brain_mask, brasyn_normalise, save_mid_slices

    entry = next(item for item in load_datalist("brats", out / "data", "test") if item["case"] == case)
    files = [
        Path(entry[source]),
        out / "synthesis" / task / "sample" / f"{case}_{target}_synth.nii.gz",
        out / "synthesis" / task / "mean" / f"{case}_{target}_synth.nii.gz",
        out / "peer" / task / f"{case}_{target}_synth.nii.gz",
        Path(entry[target]),
    ]
    if not all(f.is_file() for f in files):
        return None
    volumes = [np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files]
    brain = brain_mask([np.asarray(nib.load(entry[key]).dataobj) for key in ("t1", "t1ce", "t2", "flair")])
    rows = [(title, brasyn_normalise(v, brain)) for title, v in zip(COMPARISON_ROWS, volumes, strict=True)]
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
        "## Stage 2: cross-modality synthesis, whole brain",
        "",
        "Every row is scored the same way by `scripts/score_synthesis.py`, on each case's whole brain in its file's "
        "grid, BraSyn's protocol: each volume clipped to its 0.5 / 99.5 % percentiles inside the brain and scaled to "
        "[0, 1]; PSNR and SSIM (7-voxel Gaussian window) over the brain, SSIM also inside the tumour (all labels > 0) "
        "and outside it; HFEN = ‖LoG(pred − real)‖ / ‖LoG(real)‖ (σ 1.5), lower is sharper and better placed edges. "
        "One posterior sample sits below the expected-code estimate by construction (the perception-distortion "
        "trade-off); the mean of several samples moves towards it.",
        "",
        "| task | method | PSNR (dB) | SSIM | tumour SSIM | non-tumour SSIM | HFEN |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts, pictures = [], []
    peer_folder = out / "peer"
    peer = _load(peer_folder / "metrics.json") if (peer_folder / "metrics.json").is_file() else {}
    for task, (target, sources) in tasks.items():
        name = f"{' + '.join(s.upper() for s in sources)} → {target.upper()}"
        scores = {row: _load(out / "scores" / task / f"{row}.json")["mean"] for row in ROW_TITLES}
        titles = dict(ROW_TITLES)
        sampler = _load(out / "synthesis" / task / "sample" / "run_record_inference.json")["config"]["sampler"]
        titles["sample"] = f"prod9, one MaskGiT sample ({sampler['steps']} steps)"
        if task in peer:
            row = peer[task]
            titles["peer"] = (
                f"regression peer: MONAI BasicUNet, L1 + SSIM, {row['train_seconds'] / 60:.1f} min "
                f"({row['iterations']} iterations)"
            )
        for row, title in titles.items():
            m = scores[row]
            lines.append(
                f"| {name} | {title} | {_fmt(m['psnr'], 2)} | {_fmt(m['ssim'])} | {_fmt(m['ssim_tumour'])} | "
                f"{_fmt(m['ssim_non_tumour'])} | {_fmt(m['hfen'])} |"
            )
        best = max(PROD9_ROWS, key=lambda row: scores[row]["ssim"])
        verdicts += _verdicts(name, scores, best)
        case = sorted(_load(out / "scores" / task / "mean.json")["cases"])[0]
        comparison = _comparison(out, task, target, sources[0], case)
        if comparison is not None:
            pictures.append(f"**{case}, {name}** (rows: {', '.join(COMPARISON_ROWS)}; three mid planes)")
            pictures += ["", f"![{case} {task}]({os.path.relpath(comparison, out)})", ""]
        evaluation = _load(out / "transformer" / f"evaluate_{task}" / "metrics.json")
        accuracy = evaluation["mean"]["val_token_accuracy"]
        for item in sorted(evaluation["per_item"]):
            png = out / "transformer" / f"evaluate_{task}" / "cases" / f"{item}.png"
            if png.is_file():
                pictures.append(f"**{item}, {name}** (`evaluate.json`; rows: closest source, synthesised, real)")
                pictures += ["", f"![{item} {task}]({os.path.relpath(png, out)})", ""]
        verdicts.append(
            f"- {name}: the expected code's nearest tokens match the real target's at {_fmt(accuracy)} of the "
            "token grid (`evaluate.json`)."
        )
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
    folders = ", ".join(f"`{os.path.relpath(out / 'synthesis' / task, out)}/<row>/`" for task in tasks)
    lines += [
        f"Synthesised volumes (NIfTI, on each input file's grid), one folder per row: {folders}; the mean of 4 "
        "samples comes with their voxel-wise standard deviation (`*_synth_std.nii.gz`).",
        "",
    ]

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
