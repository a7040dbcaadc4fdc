"""Stage-2 inference I/O: which cases to synthesise, where the volumes go, and the atomic NIfTI writer.

``bundles/maskgit_transformer/configs/inference.json`` reads cases named by :func:`synthesis_datalist` (case folders,
NIfTI files or dicts of files) and writes ``<output_dir>/<case>_<target>_synth.nii.gz`` with :class:`SaveSynthesisd`,
on the input's grid (shape, affine): ``patient1_t1.nii.gz`` synthesised as T2 gives ``patient1_t2_synth.nii.gz``.
``generate.json`` writes unconditional or class-conditional samples with :func:`generate_volumes`.

Neighbours: the synthesis itself is :mod:`prod9_ext.engines.synthesis`; the stage-1 tokenizer that decodes the
tokens is :mod:`~prod9_ext.engines.stage2_training`'s.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from prod9_ext.data.brats import case_files, modality_id
from prod9_ext.data.validation import check_datalist
from prod9_ext.engines.handlers import AtomicNibabelWriter
from prod9_ext.engines.stage2_training import Stage1Tokenizer
from prod9_ext.maskgit import MaskGiTSampler
from prod9_ext.transformer import TransformerDecoder

__all__ = [
    "SaveSynthesisd",
    "case_meta",
    "case_name",
    "generate_volumes",
    "synthesis_datalist",
    "synthesis_output_path",
    "write_nifti",
]


def case_meta(batch: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``[{"filename_or_obj": case name}, ...]`` of a decollated batch: how ``MetricsSaver`` names its rows."""
    return [{"filename_or_obj": str(item.get("case", index))} for index, item in enumerate(batch)]


def synthesis_output_path(output_dir: str | os.PathLike, case: str, target_modality: str) -> Path:
    """``<output_dir>/<case>_<target>_synth.nii.gz``."""
    return Path(output_dir) / f"{case}_{target_modality}_synth.nii.gz"


_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Names a modality goes by at the end of a file name: the datalist key (BraTS 2021) and the BraTS 2023 name.
_MODALITY_NAMES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}


def _is_nifti(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(_NIFTI_SUFFIXES)


def case_name(path: str | os.PathLike, modality: str) -> str:
    """The case a ``modality`` image file belongs to: its file name without ``.nii[.gz]`` and without a trailing
    ``_<modality>`` / ``-<modality>`` (the datalist key or its BraTS 2023 name), e.g. ``patient1_t1.nii.gz`` ->
    ``patient1``, ``BraTS-GLI-00000-000-t1n.nii.gz`` -> ``BraTS-GLI-00000-000``; the folder's name when the file name
    is only the modality (``P001/t1.nii.gz`` -> ``P001``)."""
    name = Path(path).name
    stem = next((name[: -len(suffix)] for suffix in _NIFTI_SUFFIXES if name.endswith(suffix)), name)
    for alias in _MODALITY_NAMES.get(modality, (modality,)):
        if stem == alias:
            return Path(path).parent.name
        for separator in ("_", "-"):
            if stem.endswith(separator + alias):
                return stem[: -len(alias) - 1]
    return stem


def _case_from_entry(
    entry: str | os.PathLike | Mapping[str, str], index: int, source_modalities: Sequence[str]
) -> dict[str, str]:
    if isinstance(entry, Mapping):
        case = dict(entry)
        named = [k for k in (*source_modalities, *case) if k != "case" and k in case]
        if "case" not in case:
            case["case"] = case_name(case[named[0]], named[0]) if named else f"case{index:03d}"
        return case
    path = Path(entry)
    if path.is_dir():
        return {"case": path.name, **case_files(path)}
    if not path.is_file():
        raise FileNotFoundError(f"input_files: no such case folder or NIfTI file {path}")
    if len(source_modalities) != 1:
        raise ValueError(
            f"input_files: {path} is one image but source_modalities {list(source_modalities)} asks for "
            f"{len(source_modalities)}; give case folders or dicts such as {{'t1': ..., 't2': ...}}"
        )
    modality = source_modalities[0]
    return {"case": case_name(path, modality), modality: str(path)}


def synthesis_datalist(
    input_files: str | Sequence[str | Mapping[str, str]],
    source_modalities: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    target_modality: str | None = None,
    overwrite: bool = False,
) -> list[dict[str, str]]:
    """The cases to synthesise, checked before anything runs.

    Args:
        input_files: a NIfTI file, a case folder (BraTS layout) or a glob pattern matching either (other files that
            match are ignored), or a list whose entries are NIfTI files, case folders or dicts ``{"t1": path, ...}``.
            A NIfTI file is the one source image of a case (only with one source modality); its case, which names
            the output, is its file name without the modality suffix (:func:`case_name`: ``patient1_t1.nii.gz`` ->
            ``patient1``). A dict's optional ``"case"`` names its outputs (default: :func:`case_name` of its first
            source file).
        source_modalities: the modalities every case must have.
        output_dir, target_modality: with both, a case whose output file exists is refused unless ``overwrite``.
        overwrite: replace existing outputs.

    Returns:
        ``[{"case": name, "t1": path, ...}, ...]`` with absolute paths.

    Raises:
        FileNotFoundError: the pattern matches nothing, a folder or file does not exist, or a case lacks a source
            (one line naming the case and the modality).
        ValueError: a NIfTI file given with more than one source modality, two cases with one name, or a source
            file that is not a readable, complete 3D volume (one line naming the file).
        FileExistsError: an output exists and ``overwrite`` is false.
    """
    if isinstance(input_files, (str, os.PathLike)):
        pattern = os.fspath(input_files)
        matches = sorted(glob.glob(pattern))
        entries: list[Any] = [p for p in matches if os.path.isdir(p) or (os.path.isfile(p) and _is_nifti(p))]
        if not entries:
            raise FileNotFoundError(f"input_files: no case folder or NIfTI file matches {pattern!r}")
    else:
        entries = list(input_files)
        if not entries:
            raise FileNotFoundError("input_files is an empty list")
    cases = []
    for index, entry in enumerate(entries):
        case = _case_from_entry(entry, index, source_modalities)
        for modality in source_modalities:
            path = case.get(modality)
            if path is None:
                raise FileNotFoundError(f"input_files: case {case['case']} has no {modality} image (a source)")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"input_files: case {case['case']}: no such {modality} file {path}")
        cases.append({k: (v if k == "case" else os.path.abspath(v)) for k, v in case.items()})
    names = [case["case"] for case in cases]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"input_files: two cases are named {twice!r} (from {names}); name them with a 'case' key")
    check_datalist(cases, source_modalities)
    if output_dir is not None and target_modality is not None and not overwrite:
        for name in names:
            path = synthesis_output_path(output_dir, name, target_modality)
            if path.exists():
                raise FileExistsError(f"output {path} exists; pass --overwrite true to replace it")
    return cases


def write_nifti(path: str | os.PathLike, image: torch.Tensor, affine: Any) -> None:
    """Write ``image`` ``[1, *spatial]`` (float32) with ``affine`` to a temporary name, then rename it to ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = AtomicNibabelWriter(output_dtype=np.float32)
    writer.set_data_array(torch.as_tensor(image).detach().float().cpu(), channel_dim=0)
    writer.set_metadata({"affine": torch.as_tensor(affine).detach().cpu().double()}, resample=False)
    writer.write(str(path), verbose=False)


class SaveSynthesisd(MapTransform):
    """Postprocessing transform: write each synthesised volume as ``<output_dir>/<case>_<target>_synth.nii.gz``.

    Put it after ``Invertd``, so the image is on the input file's grid and its affine is the input's. Keys after
    the first are written beside it, named by what follows ``pred_``: ``pred_std`` (the voxel-wise standard
    deviation of several samples) as ``<case>_<target>_synth_std.nii.gz``.

    Args:
        keys: key(s) of the synthesised image(s) (``[1, *spatial]``; affine from the metadata or ``<key>_meta_dict``).
        output_dir: folder of the outputs (created when missing).
        target_modality: part of the file name.
        case_key: key of the case name in the (merged batch and output) item.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        target_modality: str,
        case_key: str = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.target_modality = target_modality
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            meta = image.meta if isinstance(image, MetaTensor) else d.get(f"{key}_meta_dict", {})
            if "affine" not in meta:
                raise ValueError(f"{key!r} carries no affine: put SaveSynthesisd after Invertd")
            path = synthesis_output_path(self.output_dir, str(d[self.case_key]), self.target_modality)
            if key != self.keys[0]:
                path = path.with_name(path.name.replace("_synth.", f"_synth_{str(key).removeprefix('pred_')}."))
            write_nifti(path, image, meta["affine"])
        return d


@torch.no_grad()
def generate_volumes(
    network: TransformerDecoder,
    tokenizer: Stage1Tokenizer,
    sampler: MaskGiTSampler,
    output_dir: str | os.PathLike,
    num_samples: int = 1,
    target_modality: str = "image",
    class_label: int | None = None,
    pixdim: Sequence[float] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    prefix: str = "sample",
) -> list[Path]:
    """Unconditional or class-conditional samples: ``<output_dir>/<prefix>_<i>.nii.gz`` (i = 0, 1, ...).

    Each sample fills the transformer's whole ``latent_shape`` (image size = ``latent_shape`` x downsampling factor)
    with no source, sampled with generator seed ``seed + i`` and decoded by the stage-1 tokenizer; the affine is
    ``diag(pixdim)`` (identity without ``pixdim``). ``target_modality`` is a BraTS modality, or ``"image"`` for
    single-modality data (MedMNIST 3D).

    Raises:
        ValueError: ``num_samples`` < 1, or a ``class_label`` outside the model's classes.
        FileExistsError: a sample file exists and ``overwrite`` is false (checked before sampling).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    num_classes = network.num_classes
    if class_label is not None and not 0 <= int(class_label) < num_classes:
        raise ValueError(f"class_label {class_label} is not a class of this model (num_classes={num_classes})")
    paths = [Path(output_dir) / f"{prefix}_{i:03d}.nii.gz" for i in range(num_samples)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output {existing[0]} exists; pass --overwrite true to replace it")
    device = torch.device(device)
    network.eval()
    latent_shape = network.latent_shape
    spatial = [n * tokenizer.downsampling_factor for n in latent_shape]
    affine = np.diag([*[float(p) for p in (pixdim or (1.0, 1.0, 1.0))], 1.0])
    target = torch.tensor([modality_id(target_modality, "target_modality")], device=device)
    label = None if class_label is None else torch.tensor([int(class_label)], device=device)
    for i, path in enumerate(paths):
        generator = torch.Generator(device).manual_seed(seed + i)
        tokens = sampler.sample(network, (1, *latent_shape), target, class_label=label, generator=generator)
        image = tokenizer.wrapper.decode_indices(tokens, spatial)[0]
        write_nifti(path, image, affine)
    return paths
