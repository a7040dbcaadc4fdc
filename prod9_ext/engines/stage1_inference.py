"""Stage-1 validation and inference for MONAI's ``SupervisedEvaluator``: sliding-window reconstruction, codebook
metrics, the input file list and the token files.

:class:`AutoencoderSlidingWindowInferer` reconstructs through :class:`~prod9_ext.AutoencoderInferenceWrapper` and
:func:`autoencoder_eval_iteration` (the evaluators' ``iteration_update``) also outputs the token grid, which
:class:`CodebookUsage` scores. Neighbours: training is :mod:`prod9_ext.engines.stage1_training`; PNG snapshots and
metric files come from :mod:`~prod9_ext.engines.handlers`; stage 2 reads the autoencoder through
:mod:`~prod9_ext.engines.stage2_training`'s tokenizer.

``bundles/autoencoder_fsq/configs/inference.json`` reads NIfTI files named by :func:`inference_datalist`,
reconstructs them with :func:`autoencoder_eval_iteration` and, with ``save_tokens``, writes each
token grid with :class:`SaveTokensd` as ``<name>_tokens.npz``::

    indices              int16 (int32 for codebooks over 32767 codes) [h, w, d], values in [0, prod(fsq_levels))
    fsq_levels           int64 [len(levels)]
    grid_shape           int64 [3], == indices.shape == ceil(spatial_shape / downsampling_factor)
    spatial_shape        int64 [3], the preprocessed image the tokens encode (decode, then crop to it)
    affine               float64 [4, 4], voxel -> world (RAS mm) of that preprocessed image grid
    downsampling_factor  int, image voxels per token along each axis
    roi_size             int64 [3], the sliding-window ROI the tokens were made with
    source_file          str, the input file

Token ``(i, j, k)`` covers the image voxels ``[i*f, (i+1)*f) x ...`` of the preprocessed grid.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys
from torch import nn

from prod9_ext.atomic import atomic_save_npz
from prod9_ext.autoencoder import AutoencoderFSQ
from prod9_ext.data.validation import check_datalist
from prod9_ext.engines.stage1_training import unwrap_parallel
from prod9_ext.sliding_window import AutoencoderInferenceWrapper, SlidingWindowConfig

__all__ = [
    "AutoencoderSlidingWindowInferer",
    "CodebookUsage",
    "SaveTokensd",
    "autoencoder_eval_iteration",
    "inference_datalist",
]


class AutoencoderSlidingWindowInferer(Inferer):
    """Reconstruct through :class:`AutoencoderInferenceWrapper`: blend latents, quantize once, decode by windows.

    Calling it returns the reconstruction (a drop-in MONAI ``Inferer``); :meth:`encode_decode` also returns the
    token grid, for codebook metrics.
    """

    def __init__(
        self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 1, mode: str = "gaussian"
    ) -> None:
        super().__init__()
        self.config = SlidingWindowConfig(roi_size, overlap, sw_batch_size, mode)

    def encode_decode(self, inputs: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``[B, C, *spatial]`` -> ``(reconstruction [B, C, *spatial], indices [B, *grid])``."""
        autoencoder = unwrap_parallel(network)
        if not isinstance(autoencoder, AutoencoderFSQ):
            raise TypeError(f"network must be an AutoencoderFSQ, got {type(autoencoder).__name__}.")
        wrapper = AutoencoderInferenceWrapper(autoencoder, self.config)
        codes = wrapper.encode(inputs)
        return wrapper.decode(codes, inputs.shape[2:]), autoencoder.embed(codes)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.encode_decode(inputs, network)[0]


def autoencoder_eval_iteration(
    engine: SupervisedEvaluator, batchdata: dict[str, Any]
) -> list[dict[str, Any]] | dict[str, Any]:
    """``iteration_update`` of the stage-1 evaluator: outputs ``image``, ``label``, ``pred`` and ``tokens``."""
    if not isinstance(engine.inferer, AutoencoderSlidingWindowInferer):
        raise TypeError(f"the evaluator's inferer must be AutoencoderSlidingWindowInferer, got {engine.inferer!r}.")
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    inputs, targets = batch[0], batch[1]
    with engine.mode(engine.network), torch.autocast(engine.state.device.type, enabled=engine.amp, **engine.amp_kwargs):
        reconstruction, indices = engine.inferer.encode_decode(inputs, engine.network)
    output = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: reconstruction.float(), "tokens": indices}
    engine.state.output = output
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes on this event
    return engine.state.output  # decollated on MODEL_COMPLETED; ignite keeps what is returned


class CodebookUsage(Metric):
    """Codebook statistics over an epoch of token grids: fraction of codes used, or perplexity.

    Perplexity is ``exp(entropy)`` of the token histogram: ``codebook_size`` when all codes are equally likely.

    Args:
        codebook_size: number of codes (``prod(fsq_levels)``).
        statistic: ``"usage"`` or ``"perplexity"``.
        output_transform: maps the engine output to the token grids, e.g. ``from_engine(["tokens"])``.
    """

    def __init__(
        self,
        codebook_size: int,
        statistic: str = "usage",
        output_transform: Callable = lambda output: output,
        device: str | torch.device = "cpu",
    ) -> None:
        if statistic not in ("usage", "perplexity"):
            raise ValueError(f"statistic must be 'usage' or 'perplexity', got {statistic!r}.")
        self.codebook_size = int(codebook_size)
        self.statistic = statistic
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._counts = torch.zeros(self.codebook_size, dtype=torch.float64)

    def update(self, output: torch.Tensor | Sequence[torch.Tensor]) -> None:
        tensors = [output] if isinstance(output, torch.Tensor) else [torch.as_tensor(t) for t in output]
        grids = torch.cat([t.flatten() for t in tensors])
        self._counts += torch.bincount(grids.flatten().long().cpu(), minlength=self.codebook_size).double()

    def compute(self) -> float:
        counts = self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        if counts.sum() == 0:
            return math.nan
        if self.statistic == "usage":
            return float((counts > 0).double().mean())
        probabilities = counts[counts > 0] / counts.sum()
        return float(torch.exp(-(probabilities * probabilities.log()).sum()))


_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def inference_datalist(input_files: str | Sequence[str], key: str = "image") -> list[dict[str, str]]:
    """``[{key: path}, ...]`` for a glob pattern (sorted matches) or a list of paths (kept in order).

    Every file's header is checked (:func:`~prod9_ext.data.validation.check_image_file`) before any volume is
    processed.

    Raises:
        FileNotFoundError: naming the pattern that matches nothing or every listed file that does not exist.
        ValueError: naming the first file that is not a readable, complete, single 3D volume.
    """
    if isinstance(input_files, (str, os.PathLike)):
        pattern = os.fspath(input_files)
        paths = sorted(glob.glob(pattern, recursive=True))
        if not paths:
            raise FileNotFoundError(f"input_files: no file matches {pattern!r}.")
    else:
        paths = [os.fspath(p) for p in input_files]
        if not paths:
            raise FileNotFoundError("input_files is an empty list.")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"input_files: no such file: {', '.join(missing)}")
    datalist = [{key: os.path.abspath(p)} for p in paths]
    check_datalist(datalist, [key])
    return datalist


def _stem(filename: str) -> str:
    name = os.path.basename(filename)
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


class SaveTokensd(MapTransform):
    """Postprocessing transform: write the token grid of each volume as ``<output_dir>/<name>_tokens.npz``.

    ``<name>`` is the input file's name without ``.nii.gz`` / ``.nii``, as ``SaveImaged`` names the reconstruction.
    The file is written to a temporary name and renamed, so a reader never sees half a file. See the module
    docstring for the arrays it holds.

    Args:
        keys: key of the token grid ``[h, w, d]`` (one volume, after the evaluator's decollate).
        image_key: key of the preprocessed image (a MetaTensor): its affine, shape and source file name.
        output_dir: folder of the ``.npz`` files (created when missing).
        fsq_levels: the autoencoder's FSQ levels.
        downsampling_factor: image voxels per token along each axis.
        roi_size: the sliding-window ROI of the inferer.
        output_postfix: suffix after ``<name>_``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str,
        output_dir: str | os.PathLike,
        fsq_levels: Sequence[int],
        downsampling_factor: int,
        roi_size: Sequence[int],
        output_postfix: str = "tokens",
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.fsq_levels = np.asarray(fsq_levels, dtype=np.int64)
        self.downsampling_factor = int(downsampling_factor)
        self.roi_size = np.asarray(roi_size, dtype=np.int64)
        self.output_postfix = output_postfix
        codebook_size = int(np.prod(self.fsq_levels))
        self.index_dtype = np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"{self.image_key!r} must be a MetaTensor with the preprocessed image's metadata.")
        source = str(image.meta.get("filename_or_obj", "volume"))
        spatial_shape = np.asarray(image.shape[1:], dtype=np.int64)
        for key in self.key_iterator(d):
            indices = torch.as_tensor(d[key]).detach().cpu().numpy()
            grid_shape = np.asarray(indices.shape, dtype=np.int64)
            expected = -(-spatial_shape // self.downsampling_factor)
            if not np.array_equal(grid_shape, expected):
                raise ValueError(
                    f"token grid {grid_shape.tolist()} does not match image {spatial_shape.tolist()} / "
                    f"{self.downsampling_factor} (expected {expected.tolist()}); pass one volume, not a batch."
                )
            arrays = {
                "indices": indices.astype(self.index_dtype),
                "fsq_levels": self.fsq_levels,
                "grid_shape": grid_shape,
                "spatial_shape": spatial_shape,
                "affine": np.asarray(image.affine.detach().cpu(), dtype=np.float64),
                "downsampling_factor": np.asarray(self.downsampling_factor),
                "roi_size": self.roi_size,
                "source_file": np.asarray(source),
            }
            atomic_save_npz(self.output_dir / f"{_stem(source)}_{self.output_postfix}.npz", arrays, compressed=True)
        return d
