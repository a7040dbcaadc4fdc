"""Input checks that turn a bad scanner file into one line naming the file, before it reaches a network.

Two stages, so that a run stops before it writes anything whenever that can be known:

* :func:`check_image_file` reads only the header (and, for ``.nii.gz``, the gzip trailer, which records the
  uncompressed size): the file exists, is an image nibabel reads, is complete, and holds one 3D volume.
  :func:`check_datalist` runs it on every image of a datalist when the datalist is built.
* ``LoadImaged(keys, reader=CheckedNibabelReader)`` names the file when its voxel data cannot be decompressed
  (damage the header check cannot see), and :class:`CheckImaged` (right after it) looks at the voxels with
  :func:`check_volume`: one 3D volume, no NaN or Inf, not constant.

Every error is a ``FileNotFoundError`` or ``ValueError`` whose message is one line that starts with the file (and the
datalist key) and says what to do.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import PathLike
from monai.data import MetaTensor, NibabelReader
from monai.transforms import MapTransform
from monai.utils import ensure_tuple
from nibabel.spatialimages import SpatialImage

__all__ = ["CheckImaged", "CheckedNibabelReader", "check_datalist", "check_image_file", "check_volume"]

_CHUNK = 1 << 20


def check_image_file(path: str | os.PathLike, key: str | None = None) -> None:
    """Check one image file from its header, without reading the voxels.

    Args:
        path: the image file (NIfTI ``.nii`` / ``.nii.gz`` or another format nibabel reads).
        key: the datalist key of the file (e.g. ``"t1"``), named in the error.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a folder, not an image nibabel reads, truncated or corrupt, empty (0 voxels), 2D, or more than
            one volume (4D).
    """
    name = _name(path, key)
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{name}: no such file.")
    if file.is_dir():
        raise ValueError(f"{name}: is a folder, not an image file.")
    try:
        image = nib.load(file)  # type: ignore[attr-defined]
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error ...
        raise ValueError(f"{name}: not a readable NIfTI image ({_first_line(err)}).") from err
    if not isinstance(image, SpatialImage):
        raise ValueError(f"{name}: not a volume image (nibabel reads it as {type(image).__name__}).")
    _check_shape(tuple(int(s) for s in image.shape), name)
    _check_complete(image, name)


def check_volume(array: Any, filename: str | os.PathLike, key: str | None = None) -> None:
    """Check the voxels of one loaded volume: one 3D volume, finite, not constant.

    Args:
        array: the volume as loaded (``LoadImaged`` output, no channel axis yet): ``[X, Y, Z]`` or ``[X, Y, Z, 1]``.
        filename: the file it came from, named in the error.
        key: its datalist key, named in the error.

    Raises:
        ValueError: not one 3D volume, NaN or Inf voxels, or every voxel the same value.
    """
    name = _name(filename, key)
    values = array.as_tensor() if isinstance(array, MetaTensor) else torch.as_tensor(array)
    _check_shape(tuple(values.shape), name)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        nan = int(torch.isnan(values).sum())
        inf = values.numel() - nan - int(finite.sum())
        raise ValueError(
            f"{name}: {nan} NaN and {inf} Inf voxels; replace them first (e.g. numpy.nan_to_num) or drop the file."
        )
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ValueError(f"{name}: every voxel is {low:g}; the volume is blank.")


def check_datalist(datalist: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """:func:`check_image_file` on ``item[key]`` for every item and every key it has of ``keys``."""
    for item in datalist:
        for key in keys:
            if key in item:
                check_image_file(item[key], key)


class CheckImaged(MapTransform):
    """Dictionary transform running :func:`check_volume` on each key; place it right after ``LoadImaged``.

    The file name comes from the ``MetaTensor``'s ``filename_or_obj``. The data pass through unchanged.

    Args:
        keys: keys of the loaded images to check.
        allow_missing_keys: do not raise for absent keys.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = image.meta.get("filename_or_obj", "<array>") if isinstance(image, MetaTensor) else "<array>"
            check_volume(image, str(source), str(key))
        return d


class CheckedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` whose errors are one line naming the file (``LoadImaged(keys, reader=...)``).

    nibabel reads the voxels only when MONAI asks for them, so a damaged ``.nii.gz`` whose header and size look right
    fails there with a bare ``zlib`` or ``EOFError`` message; here it names the file. Arguments are those of
    :class:`monai.data.NibabelReader`.
    """

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        try:
            return super().read(data, **kwargs)
        except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error ...
            files = ", ".join(map(str, ensure_tuple(data)))
            raise ValueError(f"{files}: not a readable NIfTI image ({_first_line(err)}).") from err

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        try:
            return super().get_data(img)
        except Exception as err:
            files = ", ".join(str(image.get_filename()) for image in ensure_tuple(img))
            reason = _first_line(err)
            raise ValueError(f"{files}: the voxel data cannot be read, corrupt or truncated ({reason}).") from err


def _check_shape(shape: Sequence[int], name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``shape`` is one 3D volume (trailing 1s allowed).

    ``shape`` is the image's own shape, spatial axes first (as in the file): ``(X, Y, Z)`` or ``(X, Y, Z, 1)``.
    """
    shape = tuple(shape)
    if math.prod(shape) == 0:
        raise ValueError(f"{name}: empty image (shape {shape}, 0 voxels).")
    if len(shape) < 3 or 1 in shape[:3]:
        raise ValueError(f"{name}: 2D image (shape {shape}); prod9 needs a 3D volume.")
    volumes = math.prod(shape[3:])
    if volumes > 1:
        raise ValueError(
            f"{name}: 4D image with {volumes} volumes (shape {shape}); prod9 needs one 3D volume: save one, e.g. "
            f"nibabel.save(img.slicer[..., 0], 'volume0.nii.gz') for the volume at index 0."
        )


def _check_complete(image: Any, name: str) -> None:
    """Raise ``ValueError`` when the voxel data on disk are shorter than the header says, or not valid gzip."""
    offset = getattr(image.dataobj, "offset", None)
    data_file = image.file_map["image"].filename
    if offset is None or data_file is None:  # not a file-backed array: nothing to measure
        return
    expected = int(offset) + math.prod(image.shape) * np.dtype(image.get_data_dtype()).itemsize
    if str(data_file).endswith(".gz"):
        _check_gzip(data_file, expected, name)
    elif (size := os.path.getsize(data_file)) < expected:
        raise ValueError(f"{name}: truncated ({size} of {expected} bytes); copy or download it again.")


def _check_gzip(path: str, expected: int, name: str) -> None:
    """Raise ``ValueError`` unless the gzip file holds at least ``expected`` bytes.

    The trailer records the uncompressed size (modulo 2**32) of the last gzip member, so a complete single-member
    file is settled by reading 4 bytes; a mismatch (a truncated file, or several members) by reading the stream.
    """
    with open(path, "rb") as file:
        file.seek(-4, os.SEEK_END)
        (trailer,) = struct.unpack("<I", file.read(4))
    if trailer == expected % 2**32:
        return
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
    except EOFError as err:
        message = f"{name}: truncated (the gzip stream ends early; the header needs {expected} bytes)"
        raise ValueError(f"{message}; copy or download it again.") from err
    except (OSError, zlib.error) as err:
        raise ValueError(f"{name}: corrupt gzip data ({_first_line(err)}); copy or download it again.") from err
    if size < expected:
        raise ValueError(f"{name}: truncated ({size} of {expected} bytes); copy or download it again.")


def _name(path: str | os.PathLike, key: str | None) -> str:
    return f"{os.fspath(path)} (key '{key}')" if key else os.fspath(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
