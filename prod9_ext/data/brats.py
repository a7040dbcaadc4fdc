"""BraTS datalists: one folder per case, BraTS 2021 or BraTS 2023 file names.

A case folder ``<root>/<case>/`` holds one NIfTI file (``.nii`` or ``.nii.gz``) per modality::

    BraTS 2021: <case>_t1   <case>_t1ce   <case>_t2   <case>_flair   <case>_seg
    BraTS 2023: <case>-t1n  <case>-t1c    <case>-t2w  <case>-t2f     <case>-seg

:func:`load_brats_datalist` turns such a folder into a MONAI datalist: a list of dicts with the keys ``case``,
``t1``, ``t1ce``, ``t2``, ``flair`` (absolute paths) and ``seg`` where the case has a segmentation.

A held-out test set is read only from a ``"test"`` list in the folder's ``dataset.json`` (the phantom generator
writes one): it is never drawn from the folder, never part of ``"all"`` and never cut into folds, so test cases
are not used for validation or for choosing settings.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["BRATS_DATA_DIR_ENV", "MODALITIES", "case_files", "check_modalities", "load_brats_datalist", "modality_id"]

logger = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Datalist keys of the four contrasts, in the order stage 2 indexes them: T1, T1ce, T2, FLAIR."""

SINGLE_IMAGE = "image"
"""The key of the one image of a single-modality item (MedMNIST 3D); its stage-2 modality id is 0."""


def modality_id(name: str, key: str = "modality") -> int:
    """The stage-2 modality id of an image key: its place in :data:`MODALITIES` (T1 0, T1ce 1, T2 2, FLAIR 3), or 0
    for ``"image"``, the one image of a MedMNIST 3D item.

    Raises:
        ValueError: naming the config ``key`` and ``name`` when it is neither.
    """
    if name == SINGLE_IMAGE:
        return 0
    if name not in MODALITIES:
        raise ValueError(f"{key}: {name!r} is not one of {list(MODALITIES)}")
    return MODALITIES.index(name)


def check_modalities(modalities: object, key: str = "modalities") -> list[str]:
    """``modalities`` as a list: a non-empty list of BraTS datalist keys drawn from :data:`MODALITIES`.

    Raises:
        ValueError: naming the config ``key`` and the value otherwise.
    """
    if isinstance(modalities, str) or not isinstance(modalities, (list, tuple)) or not modalities:
        raise ValueError(f"{key} must be a non-empty list drawn from {list(MODALITIES)}, got {modalities!r}.")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"{key} must be a non-empty list drawn from {list(MODALITIES)}, got {list(modalities)!r}.")
    return list(modalities)


BRATS_DATA_DIR_ENV = "BRATS_DATA_DIR"
"""Environment variable that names the dataset folder when ``dataset_dir`` is not given."""

_DATALIST_FILE = "dataset.json"
_SPLITS = ("training", "validation", "test", "all")

# File-name suffix (after the case name) -> datalist key, for both naming schemes.
_SUFFIX_TO_KEY: dict[str, str] = {
    "_t1": "t1",
    "_t1ce": "t1ce",
    "_t2": "t2",
    "_flair": "flair",
    "_seg": "seg",
    "-t1n": "t1",
    "-t1c": "t1ce",
    "-t2w": "t2",
    "-t2f": "flair",
    "-seg": "seg",
}
_FILE_PATTERN = re.compile(
    r"^(?P<stem>.+?)(?P<suffix>" + "|".join(sorted(_SUFFIX_TO_KEY, key=len, reverse=True)) + r")\.nii(\.gz)?$"
)

Split = Literal["training", "validation", "test", "all"]


def load_brats_datalist(
    dataset_dir: str | os.PathLike | None = None,
    split: Split = "training",
    val_fraction: float = 0.2,
    seed: int = 0,
    fold: int | None = None,
    num_folds: int | None = None,
    skip_incomplete: bool = False,
) -> list[dict[str, str]]:
    """List the cases of a BraTS-style folder as a MONAI datalist.

    The training/validation split comes from ``<dataset_dir>/dataset.json`` when that file exists (its
    ``"training"`` and ``"validation"`` entries name the cases by their ``"case"`` key); otherwise the sorted
    case names are shuffled with ``seed`` and the last ``round(val_fraction * n)`` become the validation set.
    With ``fold`` and ``num_folds`` the shuffled cases (from ``dataset.json`` or the folder) are cut into
    ``num_folds`` near-equal folds instead, and fold ``fold`` is the validation set.

    The ``"test"`` split is the ``"test"`` list of ``dataset.json`` and nothing else: no seeded split or fold makes
    one, and its cases may not appear in the training or validation lists.

    Args:
        dataset_dir: folder with one sub-folder per case; default: the ``BRATS_DATA_DIR`` environment variable.
        split: ``"training"``, ``"validation"``, ``"test"`` (the held-out ``"test"`` list of ``dataset.json``) or
            ``"all"`` (training and validation, training first; never the test cases).
        val_fraction: validation share of the seeded split, in ``[0, 1)``; ignored with ``dataset.json`` or folds.
        seed: seed of the shuffle behind the seeded split and the folds.
        fold: index of the validation fold, in ``[0, num_folds)``; needs ``num_folds``.
        num_folds: number of folds (at least 2); needs ``fold``.
        skip_incomplete: leave out (with a logged warning) a case that lacks a modality, instead of raising.

    Returns:
        One dict per case, in split order: ``case`` (the folder name), ``t1``, ``t1ce``, ``t2``, ``flair``
        (absolute paths) and ``seg`` when the case has one.

    Raises:
        ValueError: bad ``split``/``val_fraction``/``fold``/``num_folds``, no ``dataset_dir`` and no
            ``BRATS_DATA_DIR``, a case missing a modality (without ``skip_incomplete``), two files for one
            modality, a malformed ``dataset.json``, a test case also listed for training or validation, or
            ``split="test"`` without a ``dataset.json`` that has a ``"test"`` list.
        FileNotFoundError: ``dataset_dir`` does not exist or holds no case, or ``dataset.json`` names a case
            folder that does not exist.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    root = _resolve_dataset_dir(dataset_dir)
    datalist_file = root / _DATALIST_FILE
    if split == "test":
        return _collect_cases(root, _test_from_datalist_file(datalist_file), skip_incomplete)
    if datalist_file.is_file():
        training, validation, _ = _split_from_datalist_file(datalist_file)
    else:
        training, validation = _seeded_split(_find_case_names(root), val_fraction, seed)
    if fold is not None or num_folds is not None:
        training, validation = _fold_split(training + validation, fold, num_folds, seed)
    names = {"training": training, "validation": validation, "all": training + validation}[split]
    return _collect_cases(root, names, skip_incomplete)


def _resolve_dataset_dir(dataset_dir: str | os.PathLike | None) -> Path:
    """The dataset folder as an absolute path: ``dataset_dir``, else ``$BRATS_DATA_DIR``."""
    if dataset_dir is None:
        env_value = os.environ.get(BRATS_DATA_DIR_ENV)
        if not env_value:
            raise ValueError(
                f"No BraTS dataset folder: pass dataset_dir or set the {BRATS_DATA_DIR_ENV} environment variable."
            )
        dataset_dir = env_value
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"BraTS dataset folder {root} does not exist (set by dataset_dir or {BRATS_DATA_DIR_ENV})."
        )
    return root


def _find_case_names(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold at least one BraTS-named NIfTI file."""
    names = sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and any(_FILE_PATTERN.match(f.name) for f in entry.iterdir())
    )
    if not names:
        raise FileNotFoundError(
            f"BraTS dataset folder {root} holds no case folders with BraTS-named NIfTI files "
            f"(set by dataset_dir or {BRATS_DATA_DIR_ENV})."
        )
    return names


def _split_from_datalist_file(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    """Case names of the ``"training"``, ``"validation"`` and ``"test"`` lists of a datalist JSON file.

    The test list is ``None`` when the file has no ``"test"`` key; its cases may not be in the other two lists.
    """
    with open(path) as f:
        content = json.load(f)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: must hold a JSON object with 'training' and 'validation' lists.")
    splits = []
    for key in ("training", "validation", "test"):
        entries = content.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "case" in e for e in entries):
            raise ValueError(f"{path}: {key!r} must be a list of dicts that each have a 'case' key.")
        splits.append([str(e["case"]) for e in entries])
    training, validation, test = splits
    overlap = sorted(set(test) & set(training + validation))
    if overlap:
        raise ValueError(f"{path}: test cases also listed for training or validation: {', '.join(overlap)}.")
    return training, validation, (test if "test" in content else None)


def _test_from_datalist_file(path: Path) -> list[str]:
    """Case names of the ``"test"`` list of a datalist JSON file; a one-line ``ValueError`` when there is none."""
    if not path.is_file():
        raise ValueError(f"split 'test' needs a 'test' list in {path}, and that file does not exist.")
    test = _split_from_datalist_file(path)[2]
    if test is None:
        raise ValueError(f"split 'test' needs a 'test' list in {path}, and it has no 'test' key.")
    if not test:
        raise ValueError(f"split 'test' needs a 'test' list in {path}, and its 'test' list is empty.")
    return test


def _seeded_split(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle ``names`` with ``seed``; the last ``round(val_fraction * len(names))`` are validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    shuffled = _shuffled(names, seed)
    num_val = round(val_fraction * len(shuffled))
    return shuffled[: len(shuffled) - num_val], shuffled[len(shuffled) - num_val :]


def _fold_split(names: list[str], fold: int | None, num_folds: int | None, seed: int) -> tuple[list[str], list[str]]:
    """k-fold split of the shuffled ``names``: fold ``fold`` is validation, the other folds training."""
    if fold is None or num_folds is None:
        raise ValueError(f"fold and num_folds go together, got fold={fold} and num_folds={num_folds}.")
    if not 2 <= num_folds <= len(names):
        raise ValueError(f"num_folds must be in [2, {len(names)}] (the number of cases), got {num_folds}.")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}.")
    folds = np.array_split(np.array(_shuffled(sorted(names), seed), dtype=object), num_folds)
    training = [str(n) for i, f in enumerate(folds) if i != fold for n in f]
    return training, [str(n) for n in folds[fold]]


def _shuffled(names: list[str], seed: int) -> list[str]:
    """``names`` in the order of a permutation drawn with ``seed``."""
    order = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in order]


def _collect_cases(root: Path, names: list[str], skip_incomplete: bool) -> list[dict[str, str]]:
    """Datalist entries of the cases ``names`` under ``root``, without the incomplete ones if asked."""
    cases = []
    for name in names:
        try:
            cases.append(_case_entry(root / name))
        except ValueError as err:
            if not skip_incomplete:
                raise
            logger.warning("Skipping incomplete case: %s", err)
    return cases


def _case_entry(case_dir: Path) -> dict[str, str]:
    """``{"case": name, "t1": path, ..., "seg": path}`` for one case folder (``seg`` only when present)."""
    if not case_dir.is_dir():
        raise FileNotFoundError(f"Case folder {case_dir} (listed in {_DATALIST_FILE}) does not exist.")
    found = case_files(case_dir)
    missing = [key for key in MODALITIES if key not in found]
    if missing:
        expected = ", ".join(_expected_names(case_dir.name, key) for key in missing)
        others = sorted(p.name for p in case_dir.iterdir() if p.is_file() and not _FILE_PATTERN.match(p.name))
        unrecognised = f" (files with other names there: {', '.join(others)})" if others else ""
        raise ValueError(f"Case {case_dir.name} in {case_dir.parent} is missing {expected}{unrecognised}.")
    entry = {"case": case_dir.name}
    entry.update({key: found[key] for key in (*MODALITIES, "seg") if key in found})
    return entry


def case_files(case_dir: str | os.PathLike) -> dict[str, str]:
    """The images of one BraTS case folder, whichever are present: ``{"t1": path, ..., "seg": path}``.

    Both namings (2021 ``_t1``/``_t1ce``/``_t2``/``_flair``/``_seg``, 2023 ``-t1n``/``-t1c``/``-t2w``/``-t2f``/
    ``-seg``) are recognised; other files are ignored.

    Raises:
        ValueError: the folder holds two files for one modality.
    """
    folder = Path(case_dir)
    found: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        match = _FILE_PATTERN.match(path.name)
        if match is None or not path.is_file():
            continue
        key = _SUFFIX_TO_KEY[match["suffix"]]
        if key in found:
            raise ValueError(f"Case {folder.name} has two {key} files: {found[key]} and {path}.")
        found[key] = str(path)
    return found


def _expected_names(case: str, key: str) -> str:
    """The file names that would hold modality ``key`` of ``case``, e.g. ``'X_t2.nii[.gz] or X-t2w.nii[.gz]'``."""
    suffixes = [suffix for suffix, k in _SUFFIX_TO_KEY.items() if k == key]
    return " or ".join(f"{case}{suffix}.nii[.gz]" for suffix in suffixes)
