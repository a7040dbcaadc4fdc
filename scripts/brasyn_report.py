"""``outputs/brasyn/report.md`` from the figures of ``scripts/brasyn_eval.py``: tables, pictures, goals, steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

import prod9_ext.data
from prod9_ext.atomic import atomic_write_text
from prod9_ext.engines import BRATS_REGIONS, brain_mask, brasyn_normalise, save_mid_slices

__all__ = ["write_report"]

NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
ROW_TITLES = {
    "prod9_expected_code": "prod9, expected code",
    "prod9_one_sample": "prod9, one sample",
    "prod9_mean_of_k": "prod9, mean of {k} samples",
    "peer": "regression peer ({design})",
    "copy_the_source": "copy the source (oracle pick)",
}
PROD9_ROWS = ("prod9_expected_code", "prod9_one_sample", "prod9_mean_of_k")
GOALS = {"spearman": 0.3, "top_error_ratio": 2.0, "wt_drop": 0.05}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _task_title(target: str, sources: list[str]) -> str:
    return f"{' + '.join(NAMES[s] for s in sources)} → {NAMES[target]}"


def _title(row: str, figures: dict) -> str:
    return ROW_TITLES[row].format(k=figures["num_samples"], design=figures["peer_design"])


def _picture(out: Path, data: Path, figures: dict, task: str) -> Path:
    """``<out>/pictures/<task>.png``: the first case's source, syntheses, real target, |error| and std maps."""
    target, sources = figures["tasks"][task]
    case = figures["cases"][0]
    entry = next(c for c in prod9_ext.data.load_datalist("brats", data, figures["split"]) if c["case"] == case)
    real = {m: np.asarray(nib.load(entry[m]).dataobj, dtype=np.float32) for m in NAMES}
    brain = brain_mask(list(real.values()))
    folder = out / "prod9" / task
    files = {
        f"source {NAMES[sources[0]]}": Path(entry[sources[0]]),
        "prod9, one sample": folder / "first_sample" / f"{case}_{target}_synth.nii.gz",
        f"prod9, mean of {figures['num_samples']}": folder / "samples" / f"{case}_{target}_synth.nii.gz",
        "prod9, expected code": folder / "expected_code" / f"{case}_{target}_synth.nii.gz",
        "regression peer": out / "peer" / task / f"{case}_{target}_synth.nii.gz",
        f"real {NAMES[target]}": Path(entry[target]),
    }
    volumes = {title: np.asarray(nib.load(path).dataobj, dtype=np.float32) for title, path in files.items()}
    rows = [(title, brasyn_normalise(volume, brain)) for title, volume in volumes.items()]
    mean = rows[2][1]
    error = np.abs(mean - rows[-1][1])
    low, high = np.percentile(volumes[rows[2][0]][brain], [0.5, 99.5])
    std = np.asarray(nib.load(folder / "samples" / f"{case}_{target}_synth_std.nii.gz").dataobj, np.float32)
    std = np.where(brain, std / max(high - low, 1e-8), 0.0)
    top = max(float(np.percentile(error[brain], 99)), float(np.percentile(std[brain], 99)), 1e-6)
    rows += [
        (f"|error| of the mean (white = {top:.2f})", np.clip(error / top, 0, 1)),
        ("std of the samples (same scale)", np.clip(std / top, 0, 1)),
    ]
    path = out / "pictures" / f"{task}.png"
    save_mid_slices(path, rows)
    return path


def _synthesis_table(figures: dict) -> list[str]:
    lines = [
        "| task | method | PSNR (dB) | SSIM | tumour SSIM | non-tumour SSIM | HFEN |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, rows in figures["synthesis"].items():
        title = _task_title(*figures["tasks"][task])
        for row, scores in rows.items():
            m = scores["mean"]
            lines.append(
                f"| {title} | {_title(row, figures)} | {_fmt(m['psnr'], 2)} | {_fmt(m['ssim'])} | "
                f"{_fmt(m['ssim_tumour'])} | {_fmt(m['ssim_non_tumour'])} | {_fmt(m['hfen'])} |"
            )
    return lines


def _dice_row(title: str, dice: dict[str, float], real: dict[str, float]) -> str:
    mean, real_mean = float(np.mean(list(dice.values()))), float(np.mean(list(real.values())))
    cells = " | ".join(_fmt(dice[r]) for r in BRATS_REGIONS)
    return f"| {title} | {cells} | {_fmt(mean)} | {_fmt(real['WT'] - dice['WT'])} | {_fmt(real_mean - mean)} |"


def _dice_table(figures: dict) -> list[str]:
    dice, real = figures["dice"], figures["dice"]["real"]
    lines = [
        "| input to the segmenter | TC | WT | ET | mean | WT drop | mean drop |",
        "|---|---|---|---|---|---|---|",
        _dice_row("the four real contrasts", real, real),
    ]
    for task, (target, sources) in figures["tasks"].items():
        title = _task_title(target, sources)
        for row in (*PROD9_ROWS, "peer"):
            lines.append(_dice_row(f"{title}: {_title(row, figures)}", dice[task][row], real))
    for modality, scores in dice["zeroed"].items():
        lines.append(_dice_row(f"{NAMES[modality]} zeroed (the floor)", scores, real))
    return lines


def _goals(figures: dict) -> list[str]:
    """One line per goal of the BraSyn evaluation, with the measured figures and whether it is met."""
    lines = []
    real = figures["dice"]["real"]
    for task, (target, sources) in figures["tasks"].items():
        rows = figures["synthesis"][task]
        best = max(PROD9_ROWS, key=lambda r: rows[r]["mean"]["ssim"] or -1.0)
        prod9, peer = rows[best]["mean"]["ssim"], rows["peer"]["mean"]["ssim"]
        verdict = "met" if prod9 is not None and peer is not None and prod9 >= peer else "not met"
        lines.append(
            f"- {_task_title(target, sources)}: SSIM prod9 ({_title(best, figures)}) {_fmt(prod9)} vs peer "
            f"{_fmt(peer)}: **{verdict}**."
        )
        drops = {row: real["WT"] - figures["dice"][task][row]["WT"] for row in (*PROD9_ROWS, "peer")}
        least = min(PROD9_ROWS, key=drops.__getitem__)
        ok = drops[least] <= drops["peer"] and drops[least] <= GOALS["wt_drop"]
        lines.append(
            f"  WT Dice drop from real: prod9 ({_title(least, figures)}) {_fmt(drops[least])}, peer "
            f"{_fmt(drops['peer'])} (goal: at most the peer's and ≤ {GOALS['wt_drop']}): "
            f"**{'met' if ok else 'not met'}**."
        )
        spread = figures["uncertainty"][task].get("mean", {})
        rho, ratio = spread.get("spearman"), spread.get("top_error_ratio")
        calibrated = (
            rho is not None and ratio is not None and rho >= GOALS["spearman"] and ratio >= GOALS["top_error_ratio"]
        )
        lines.append(
            f"  Calibration: Spearman {_fmt(rho)} (goal ≥ {GOALS['spearman']}), top-10 % std error ratio "
            f"{_fmt(ratio, 2)} (goal ≥ {GOALS['top_error_ratio']}): **{'met' if calibrated else 'not met'}**."
        )
    return lines


def write_report(out: Path, figures: dict, data: Path, smoke: bool = False) -> Path:
    """Write ``<out>/report.md`` from ``figures`` (``brasyn_eval.evaluate``'s, with the step records); return it."""
    segmenter = json.loads((out / "segmenter" / "segmenter.pt.json").read_text())
    k, cases = figures["num_samples"], figures["cases"]
    lines = ["# prod9 on the BraSyn task", ""]
    if smoke:
        lines += ["**Smoke run** (tiny networks and budgets): the numbers below only show the chain works.", ""]
    lines += [
        f"{len(cases)} cases of the {figures['split']} split ({', '.join(cases)}), never used for training or for a "
        "choice of settings. One prod9 model (stage 2 and its source-aware decoder trained with every contrast as a "
        f"target) fills in each missing contrast. The regression peer ({figures['peer_design']}: "
        "`scripts/regression_peer.py`) trained for prod9's training wall time, "
        f"{figures['peer_seconds'] / 60:.1f} min.",
        "",
        "## Synthesis, whole brain (BraSyn's protocol)",
        "",
        "Each volume clipped to its 0.5 / 99.5 % percentiles inside the brain and scaled to [0, 1]; PSNR and SSIM "
        "(7-voxel Gaussian window) over the brain, SSIM also inside and outside the tumour; HFEN ‖LoG(pred − real)‖ "
        "/ ‖LoG(real)‖ (σ 1.5 voxels; blur raises it). One sample sits below the mean of several by construction "
        "(the perception–distortion trade-off): it is sharp where the mean is smooth.",
        "",
        *_synthesis_table(figures),
        "",
        "## Segmentation Dice (BraSyn's second score)",
        "",
        f"A MONAI `SegResNet` trained on the training cases' four real contrasts for "
        f"{segmenter['train_seconds'] / 60:.1f} min ({segmenter['iterations']} iterations; validation Dice "
        + ", ".join(f"{r} {_fmt(segmenter['validation_dice'][r])}" for r in BRATS_REGIONS)
        + ") segments each test case with one contrast replaced. Regions TC, WT, ET (MONAI's "
        "`ConvertToMultiChannelBasedOnBratsClasses`); a synthesis is masked to the brain of the other contrasts.",
        "",
        *_dice_table(figures),
        "",
        "## Uncertainty: the spread of the samples",
        "",
        f"Over the brain of each case, from {k} samples: the Spearman correlation between their voxel-wise std and "
        "the absolute error of their mean; the mean error of the 10 % of voxels with the highest std divided by that "
        "of the rest; and the mean SSIM between every pair of samples (1: identical).",
        "",
        "| task | Spearman (std, error) | top-10 % std error / rest | pairwise SSIM of samples |",
        "|---|---|---|---|",
    ]
    for task, spread in figures["uncertainty"].items():
        m = spread.get("mean", {})
        lines.append(
            f"| {_task_title(*figures['tasks'][task])} | {_fmt(m.get('spearman'))} | "
            f"{_fmt(m.get('top_error_ratio'), 2)} | {_fmt(m.get('diversity_ssim'))} |"
        )
    lines += ["", "## Goals", "", *_goals(figures), "", "## Pictures", ""]
    for task in figures["tasks"]:
        path = _picture(out, data, figures, task)
        lines += [f"### {_task_title(*figures['tasks'][task])}", "", f"![{task}]({path.relative_to(out)})", ""]
    lines += ["## Steps", "", "| step | minutes | command |", "|---|---|---|"]
    for name, record in figures["steps"].items():
        lines.append(f"| {name} | {record['seconds'] / 60:.1f} | `{record['command']}` |")
    for name in ("scoring", "dice"):
        lines.append(f"| {name} | {figures[f'seconds_{name}'] / 60:.1f} | `python scripts/brasyn_eval.py` |")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
