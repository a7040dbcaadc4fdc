"""The BraSyn task with one prod9 model: each contrast missing in turn, segmentation Dice, and uncertainty maps.

Runs on the models that ``scripts/quickstart.py`` trained (the demo trains stage 2 and the source-aware decoder with
every contrast as a target), on the quickstart's scored cases (the phantoms' test split):

1. prod9 synthesises each BraSyn task (the missing contrast from the other three) and T1 -> T2 from T1 alone, twice:
   the expected code (``--decode_mode mean``) and ``K`` MaskGiT samples (``--num_samples K --save_samples true``:
   their mean, their voxel-wise std and the samples themselves);
2. the regression peer (``scripts/regression_peer.py --design multitask``: one MONAI ``BasicUNet`` for every task,
   with an availability plane per source) trains for prod9's training wall time, read from the quickstart's records;
3. a MONAI ``SegResNet`` (``scripts/train_segmenter.py``) learns the BraTS regions from the training cases' four
   real contrasts;
4. every synthesis is scored on the whole brain (BraSyn's protocol, :func:`prod9_ext.engines.score_synthesis`), the
   segmenter's Dice is measured with the four real contrasts, with each synthesis in place of its real contrast, and
   with that contrast zeroed, and the spread of the samples is checked against the error of their mean
   (:func:`prod9_ext.engines.calibration`, :func:`prod9_ext.engines.sample_diversity`).

    python scripts/brasyn_eval.py                          # after bash scripts/quickstart.sh
    python scripts/brasyn_eval.py --quickstart_dir outputs/quickstart --output_dir outputs/brasyn --num_samples 4

Writes ``<output_dir>/report.md`` (tables, a picture per task with the std and error maps, the command and time of
every step) and ``<output_dir>/brasyn.json`` (every figure). Each finished step leaves a record in
``<output_dir>/steps/``; a rerun skips it. ``--smoke`` runs on a ``quickstart.py --smoke`` output with tiny budgets.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from brasyn_report import write_report
from quickstart import (
    HELD_OUT,
    PROD9_TRAINING,
    SMOKE_DECODER,
    SMOKE_TRANSFORMER,
    TRANSFORMER,
    Runner,
    Step,
    _bundle_run,
    _list,
    _scored_folders,
    scored_split,
)
from regression_peer import BRASYN_TASKS, MODALITIES
from train_segmenter import contrasts, mean_dice

import prod9_ext.data
from prod9_ext.atomic import atomic_write_text
from prod9_ext.engines import (
    brain_mask,
    calibration,
    closest_source,
    error_summary,
    load_segmenter,
    region_dice,
    sample_diversity,
    score_synthesis,
    segment,
    write_nifti,
)

__all__ = ["build_steps", "evaluate", "main", "prediction_file"]

PROD9_ROWS = ("prod9_expected_code", "prod9_one_sample", "prod9_mean_of_k")
ROWS = (*PROD9_ROWS, "peer")
SCORES = ("psnr", "ssim", "ssim_tumour", "ssim_non_tumour", "hfen")
SMOKE_SECONDS = 15.0  # the peer's and the segmenter's training budget with --smoke


def prediction_file(out: Path, task: str, row: str, case: str) -> Path:
    """Where the prediction of ``row`` for ``case`` lies (``prod9_one_sample``: the first sample, written by
    :func:`_first_samples`)."""
    target = BRASYN_TASKS[task][0]
    folder = {
        "prod9_expected_code": out / "prod9" / task / "expected_code",
        "prod9_one_sample": out / "prod9" / task / "first_sample",
        "prod9_mean_of_k": out / "prod9" / task / "samples",
        "peer": out / "peer" / task,
    }[row]
    return folder / f"{case}_{target}_synth.nii.gz"


def build_steps(
    out: Path, quickstart: Path, dataset_dir: Path, split: str, num_samples: int, smoke: bool, peer_seconds: float,
    segmenter_seconds: float, peer_design: str,
) -> list[Step]:  # fmt: skip
    """The commands: prod9's two inference runs per task, the peer, the segmenter."""
    models = quickstart / "transformer" / "models"
    stage1 = ["--autoencoder_weights", str(quickstart / "autoencoder" / "models" / "model.pt")]
    extra = [*SMOKE_TRANSFORMER, "--decoder_channels", SMOKE_DECODER[-1]] if smoke else []
    if smoke:  # the stage-1 network of a smoke quickstart is described by its overlay
        overlay = str(quickstart / "smoke_autoencoder.json")
        stage1 += ["--autoencoder_config", _list(["train.json", "demo.json", overlay])]
    decodings = {
        "expected_code": ["--decode_mode", "mean"],
        "samples": ["--decode_mode", "sample", "--num_samples", str(num_samples), "--save_samples", "true"],
    }
    steps = []
    for task, (target, sources) in BRASYN_TASKS.items():
        for name, decoding in decodings.items():
            infer = ["--dataset_dir", str(dataset_dir), *stage1, "--ckpt_dir", str(models)]
            infer += ["--output_dir", str(out / "prod9" / task / name), "--target_modality", target]
            infer += ["--source_modalities", _list(sources), "--overwrite", "true", "--input_files", HELD_OUT]
            command = _bundle_run(TRANSFORMER, ["inference.json", "demo.json"], *infer, *decoding, *extra)
            steps.append(Step(f"prod9_{task}_{name}", command, TRANSFORMER))
    peer = [sys.executable, "scripts/regression_peer.py", "--dataset_dir", str(dataset_dir), "--split", split]
    peer += ["--output_dir", str(out / "peer"), "--seconds", f"{peer_seconds:.0f}", "--design", peer_design]
    peer += ["--tasks", _list(list(BRASYN_TASKS))]
    steps.append(Step("peer_regression", peer))
    segmenter = [sys.executable, "scripts/train_segmenter.py", "--dataset_dir", str(dataset_dir)]
    segmenter += ["--output", str(out / "segmenter" / "segmenter.pt"), "--seconds", f"{segmenter_seconds:.0f}"]
    steps.append(Step("segmenter_train", segmenter))
    return steps


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing prediction; rerun python scripts/brasyn_eval.py")
    return np.asarray(nib.load(path).get_fdata(dtype=np.float32))


def _first_samples(out: Path, cases: list[dict]) -> None:
    """Write the first of the ``K`` samples of every case and task as a volume of its own (``prod9_one_sample``)."""
    for task, (target, _) in BRASYN_TASKS.items():
        for case in cases:
            path = prediction_file(out, task, "prod9_one_sample", case["case"])
            if not path.is_file():
                image = nib.load(out / "prod9" / task / "samples" / f"{case['case']}_{target}_synth_samples.nii.gz")
                first = np.asarray(image.dataobj, dtype=np.float32).reshape(*image.shape[:3], -1)[..., 0]
                write_nifti(path, torch.from_numpy(first)[None], image.affine)


def _mean_over_cases(per_case: dict[str, dict[str, float]]) -> dict[str, float | None]:
    keys = next(iter(per_case.values())).keys()
    means = {}
    for key in keys:
        values = [v[key] for v in per_case.values() if v[key] is not None and np.isfinite(v[key])]
        means[key] = float(np.mean(values)) if values else None
    return means


def _synthesis_scores(out: Path, cases: list[dict]) -> tuple[dict, dict]:
    """Whole-brain scores of every row and task, and the calibration and diversity of prod9's samples."""
    scores: dict[str, dict] = {}
    uncertainty: dict[str, dict] = {}
    for task, (target, sources) in BRASYN_TASKS.items():
        rows: dict[str, dict[str, dict]] = {row: {} for row in (*ROWS, "copy_the_source")}
        spread: dict[str, dict] = {}
        for case in cases:
            name = case["case"]
            real = {key: _read(Path(case[key])) for key in MODALITIES}
            brain, seg = brain_mask(list(real.values())), _read(Path(case["seg"]))
            for row in ROWS:
                pred = _read(prediction_file(out, task, row, name))
                rows[row][name] = score_synthesis(pred, real[target], seg, brain)
            copied = closest_source({key: real[key] for key in sources}, real[target], brain)
            rows["copy_the_source"][name] = score_synthesis(real[copied], real[target], seg, brain)
            folder = out / "prod9" / task / "samples"
            mean = _read(prediction_file(out, task, "prod9_mean_of_k", name))
            samples = nib.load(folder / f"{name}_{target}_synth_samples.nii.gz")
            stack = np.moveaxis(np.asarray(samples.dataobj, dtype=np.float32).reshape(*samples.shape[:3], -1), -1, 0)
            if len(stack) > 1:
                std = _read(folder / f"{name}_{target}_synth_std.nii.gz")
                spread[name] = {
                    **calibration(mean, std, real[target], brain),
                    "diversity_ssim": sample_diversity(stack, brain),
                }
        scores[task] = {row: {"mean": _mean_over_cases(v), "cases": v} for row, v in rows.items()}
        print(
            f"[brasyn] scored {task}: SSIM "
            + ", ".join(f"{row} {scores[task][row]['mean']['ssim']:.3f}" for row in ROWS),
            flush=True,
        )
        uncertainty[task] = {"mean": _mean_over_cases(spread), "cases": spread} if spread else {}
    return scores, uncertainty


def _segmentation_input(case: dict, replaced: str | None, path: Path | None, pixdim: list[float]) -> dict:
    """The case preprocessed for the segmenter, ``replaced`` read from ``path`` (masked to the other contrasts'
    brain), or zeroed when ``path`` is None; the foreground box comes from a real contrast."""
    item = dict(case)
    if replaced is not None and path is not None:
        item[replaced] = str(path)
    order = [m for m in MODALITIES if m != replaced] + ([replaced] if replaced else [])
    data = prod9_ext.data.preprocessing("brats", order, None, pixdim, train=False, seg=True)(item)
    batch = {key: torch.as_tensor(data[key])[None] for key in (*MODALITIES, "seg")}
    if replaced is not None:
        others = torch.cat([batch[m] for m in MODALITIES if m != replaced], dim=1)
        keep = (others != 0).any(dim=1, keepdim=True)
        batch[replaced] = batch[replaced] * keep if path is not None else torch.zeros_like(batch[replaced])
    return batch


def _dice(out: Path, cases: list[dict]) -> dict:
    """The segmenter's Dice per region: real contrasts, each synthesis in place of its contrast, the contrast zeroed."""
    network, settings = load_segmenter(out / "segmenter" / "segmenter.pt")
    pixdim, roi = list(settings["pixdim"]), list(settings["roi_size"])
    device = torch.device("cpu")

    def dice_of(case: dict, replaced: str | None = None, path: Path | None = None) -> dict[str, float]:
        batch = _segmentation_input(case, replaced, path, pixdim)
        return region_dice(segment(network, contrasts(batch, device), roi), batch["seg"])

    result: dict = {"real": mean_dice([dice_of(case) for case in cases])}
    result["zeroed"] = {m: mean_dice([dice_of(case, m) for case in cases]) for m in MODALITIES}
    print(f"[brasyn] Dice with the real contrasts: {json.dumps(result['real'])}", flush=True)
    for task, (target, _) in BRASYN_TASKS.items():
        result[task] = {
            row: mean_dice([dice_of(case, target, prediction_file(out, task, row, case["case"])) for case in cases])
            for row in ROWS
        }
        print(
            f"[brasyn] Dice {task}: WT " + ", ".join(f"{r} {d['WT']:.3f}" for r, d in result[task].items()), flush=True
        )
    return result


def evaluate(out: Path, dataset_dir: Path, split: str) -> dict:
    """Every figure of the report: synthesis scores, uncertainty, Dice (each with its wall time)."""
    cases = list(prod9_ext.data.load_datalist("brats", dataset_dir, split))
    _first_samples(out, cases)
    figures: dict = {"split": split, "cases": [case["case"] for case in cases], "tasks": BRASYN_TASKS}
    started = time.perf_counter()
    figures["synthesis"], figures["uncertainty"] = _synthesis_scores(out, cases)
    figures["seconds_scoring"] = time.perf_counter() - started
    started = time.perf_counter()
    figures["dice"] = _dice(out, cases)
    figures["seconds_dice"] = time.perf_counter() - started
    return figures


def _prod9_training_seconds(quickstart: Path) -> float:
    """prod9's training wall time in the quickstart (stage 1, stage 2, source-aware decoder): the peer's budget."""
    records = [quickstart / "steps" / f"{name}.json" for name in PROD9_TRAINING]
    missing = [str(path) for path in records if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no record of prod9's training; run bash scripts/quickstart.sh first")
    return sum(json.loads(path.read_text())["seconds"] for path in records)


def main(
    quickstart_dir: str = "outputs/quickstart",
    output_dir: str = "outputs/brasyn",
    dataset_dir: str | None = None,
    num_samples: int = 4,
    peer_design: str = "multitask",
    peer_seconds: float | None = None,
    segmenter_seconds: float = 480.0,
    smoke: bool = False,
) -> None:
    """Run the BraSyn evaluation on the quickstart's models and write ``<output_dir>/report.md``.

    Args:
        quickstart_dir: the output folder of ``scripts/quickstart.py`` (its models, data and step records).
        output_dir: where the syntheses, the peer, the segmenter, ``report.md`` and ``brasyn.json`` go.
        dataset_dir: the data folder the quickstart used (default: ``<quickstart_dir>/data``).
        num_samples: ``K``, the MaskGiT samples per case (their mean, std and diversity); at least 2.
        peer_design: ``multitask`` (one U-Net for every task) or ``per_task`` (see ``regression_peer.py``).
        peer_seconds: the peer's training budget; default: prod9's training wall time in the quickstart.
        segmenter_seconds: the segmenter's training budget.
        smoke: the quickstart ran with ``--smoke``: its tiny networks, and tiny budgets here (numbers mean nothing).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (a spread needs two samples), got {num_samples}")
    quickstart = Path(quickstart_dir).resolve()
    out = Path(output_dir).resolve()
    data = Path(dataset_dir).resolve() if dataset_dir else quickstart / "data"
    for needed in (quickstart / "transformer" / "models" / "model.pt", data / "dataset.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found; run bash scripts/quickstart.sh first (or pass its folders)")
    split = scored_split(data, make_data=False)
    seconds = peer_seconds if peer_seconds is not None else _prod9_training_seconds(quickstart)
    if smoke:
        seconds, segmenter_seconds = SMOKE_SECONDS, SMOKE_SECONDS
    runner = Runner(out, tag="brasyn")
    steps = build_steps(out, quickstart, data, split, num_samples, smoke, seconds, segmenter_seconds, peer_design)
    started = time.perf_counter()
    for step in steps:
        runner.run(_scored_folders(step, data, split) if HELD_OUT in step.command else step)
    print("\n[brasyn] scoring, Dice and calibration", flush=True)
    figures = evaluate(out, data, split)
    figures["peer_design"], figures["peer_seconds"], figures["num_samples"] = peer_design, seconds, num_samples
    figures["steps"] = {path.stem: json.loads(path.read_text()) for path in sorted(runner.records.glob("*.json"))}
    atomic_write_text(out / "brasyn.json", json.dumps(figures, indent=2) + "\n")
    report = write_report(out, figures, data, smoke)
    print(f"\n[brasyn] finished in {(time.perf_counter() - started) / 60:.1f} min: {report}", flush=True)


if __name__ == "__main__":
    with error_summary.one_line_errors():
        fire.Fire(main)
