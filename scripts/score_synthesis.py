"""Score synthesised volumes against the real ones on the whole brain, the same way for every method.

Every row of the quickstart report goes through this script: prod9's inference, the regression peer, the
copy-the-source baseline. Each case of ``--split`` is scored on its original file grid with
:func:`prod9_ext.engines.score_synthesis` (BraSyn's normalisation, PSNR over the brain, SSIM over the brain, inside and
outside the tumour, HFEN); the brain is every voxel where one of the case's real contrasts is nonzero.

    # a folder of <case>_<target>_synth.nii.gz, each on the grid of the case's files (what prod9's inference and
    # scripts/regression_peer.py write)
    python scripts/score_synthesis.py --dataset_dir outputs/quickstart/data --split test --target t2 \\
        --pred_dir outputs/quickstart/synthesis_t2 --output outputs/quickstart/scores/prod9_t2.json --sources "['t1']"

    # copy-the-source: per case, the source closest to the target (mean squared error after normalisation)
    python scripts/score_synthesis.py --dataset_dir outputs/quickstart/data --split test --target t2 \\
        --copy_source --output outputs/quickstart/scores/copy_t2.json --sources "['t1']"

The output JSON::

    {"target": "t2", "sources": ["t1"], "split": "test", "method": "<pred_dir>" or "copy_source",
     "mean": {"psnr", "ssim", "ssim_tumour", "ssim_non_tumour", "hfen"},
     "cases": {"<case>": {"psnr", "ssim", "ssim_tumour", "ssim_non_tumour", "hfen"[, "source"]}, ...}}

``mean`` averages each score over the cases that have a value; a score without one (``ssim_tumour`` of a case
without a tumour, or of every case) is ``null``. A prediction equal to the target has an infinite PSNR (``Infinity``).
A missing prediction, or one on another grid than the case's files (shape or affine), stops the run with one line that
names the file, as every bad argument or file does (``PROD9_TRACEBACK=1`` shows the traceback too).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.utils import str2bool

import prod9_ext.data
from prod9_ext.atomic import atomic_write_text
from prod9_ext.data import MODALITIES, check_image_file, check_modalities
from prod9_ext.engines import (
    brain_mask,
    closest_source,
    error_summary,
    score_synthesis,
    synthesis_output_path,
)

__all__ = ["AFFINE_TOLERANCE_MM", "main", "score_case"]

logger = logging.getLogger("score_synthesis")

AFFINE_TOLERANCE_MM = 1e-2
"""Largest difference between a prediction's affine and its case's, entry by entry (mm), for the same grid."""


def _read(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxels (float32, the file's own axis order) and the affine of a NIfTI file."""
    image: nib.Nifti1Image = nib.load(path)  # type: ignore[assignment]
    return np.asarray(image.get_fdata(dtype=np.float32)), np.asarray(image.affine)


def _read_prediction(path: Path, case: str, target: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The voxels of the prediction ``path``, checked to be on the grid (``shape``, ``affine``) of the real target."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prediction of case {case} (expected <case>_{target}_synth.nii.gz)")
    check_image_file(path, "prediction")
    voxels, pred_affine = _read(path)
    if voxels.shape != shape:
        raise ValueError(f"{path}: shape {voxels.shape}, but the real {target} of case {case} has {shape}")
    if not np.allclose(pred_affine, affine, atol=AFFINE_TOLERANCE_MM, rtol=0.0):
        raise ValueError(
            f"{path}: affine {pred_affine[:3].round(3).tolist()} is not the real {target}'s "
            f"{affine[:3].round(3).tolist()} (not on the case's grid)"
        )
    return voxels


def score_case(
    case: dict, target: str, pred_dir: str | Path | None = None, sources: Sequence[str] = ()
) -> Mapping[str, float | str]:
    """Scores of one datalist case: its prediction in ``pred_dir``, or (without ``pred_dir``) copy-the-source.

    Args:
        case: a BraTS datalist dict (``case``, the four contrasts, ``seg`` when the case has one).
        target: the synthesised contrast.
        pred_dir: folder of ``<case>_<target>_synth.nii.gz``; None: copy the source of ``sources`` closest to the
            target (:func:`prod9_ext.engines.closest_source`), named under ``"source"`` in the result.
        sources: the candidate sources of copy-the-source.

    Returns:
        :func:`prod9_ext.engines.score_synthesis`'s scores (and ``"source"`` for copy-the-source).
    """
    real, affine = _read(case[target])
    contrasts = {key: real if key == target else _read(case[key])[0] for key in MODALITIES}
    brain = brain_mask(list(contrasts.values()))
    seg = _read(case["seg"])[0] if "seg" in case else np.zeros_like(real)
    if pred_dir is not None:
        path = synthesis_output_path(pred_dir, case["case"], target)
        return score_synthesis(_read_prediction(path, case["case"], target, real.shape, affine), real, seg, brain)
    source = closest_source({key: contrasts[key] for key in sources}, real, brain)
    return {**score_synthesis(contrasts[source], real, seg, brain), "source": source}


def _mean(values: list[float]) -> float | None:
    """Mean of the values that are not NaN; None when none is left."""
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else None


def _json_value(value: float | str) -> float | str | None:
    """NaN (no value) as None, for JSON's ``null``."""
    return None if isinstance(value, float) and math.isnan(value) else value


def main(
    dataset_dir: str,
    output: str,
    target: str = "t2",
    split: str = "test",
    pred_dir: str | None = None,
    sources: Sequence[str] | None = None,
    copy_source: bool | str = False,
) -> None:
    """Score every case of ``split`` for ``target`` and write the per-case and mean scores to ``output``.

    Args:
        dataset_dir: the BraTS-layout data folder (``dataset.json`` lists the splits).
        output: the JSON file to write (atomically; its folder is created when missing).
        target: the synthesised contrast: ``t1``, ``t1ce``, ``t2`` or ``flair``.
        split: ``training``, ``validation`` or ``test``.
        pred_dir: the folder of ``<case>_<target>_synth.nii.gz`` predictions, one per case, each on the grid of the
            case's files. Give this or ``copy_source``.
        sources: the contrasts the prediction was made from (recorded in the output), or the candidates of
            copy-the-source; default for copy-the-source: every contrast but the target.
        copy_source: score the copy-the-source baseline instead of predictions (a bool, or ``true`` / ``false``
            as the command line gives it).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    target = check_modalities([target], "target")[0]
    copy_source = str2bool(copy_source)
    if (pred_dir is None) == (not copy_source):
        raise ValueError("give --pred_dir or --copy_source (one of them)")
    if sources is not None:
        sources = check_modalities(sources, "sources")
    elif copy_source:
        sources = [key for key in MODALITIES if key != target]
    if sources is not None and target in sources:
        raise ValueError(f"sources {list(sources)} include the target {target!r}")
    cases = prod9_ext.data.load_datalist("brats", dataset_dir, split)
    if not cases:
        raise ValueError(f"{dataset_dir}: the {split!r} split has no case")
    scores: dict[str, Mapping[str, float | str]] = {}
    for case in cases:
        scores[case["case"]] = score_case(case, target, pred_dir, sources or ())
        logger.info("%s: %s", case["case"], json.dumps(scores[case["case"]]))
    names = ("psnr", "ssim", "ssim_tumour", "ssim_non_tumour", "hfen")
    result = {
        "target": target,
        "sources": sources,
        "split": split,
        "method": "copy_source" if copy_source else str(Path(pred_dir).resolve()),  # type: ignore[arg-type]
        "mean": {name: _mean([float(s[name]) for s in scores.values()]) for name in names},
        "cases": {case: {key: _json_value(value) for key, value in s.items()} for case, s in scores.items()},
    }
    atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    logger.info("mean over %d %s cases: %s", len(cases), split, json.dumps(result["mean"]))


if __name__ == "__main__":
    with error_summary.one_line_errors():
        fire.Fire(main)
