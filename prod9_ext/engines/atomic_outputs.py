"""Output files written to a temporary name in their folder and renamed into place, so none is ever half-written.

A run killed at any moment leaves each output either as it was before or complete. :func:`atomic_write_text` for
small text files, :class:`AtomicNibabelWriter` as the ``writer`` of MONAI's ``SaveImage``/``SaveImaged``, and
:class:`AtomicMetricsSaver` in place of MONAI's ``MetricsSaver``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine
from monai.config import PathLike
from monai.data import NibabelWriter
from monai.handlers import MetricsSaver

__all__ = ["AtomicMetricsSaver", "AtomicNibabelWriter", "atomic_save_npz", "atomic_write_text", "temporary_name"]


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name next to ``path`` with the same suffixes (``.nii.gz`` stays ``.nii.gz``), unique to this process."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (the folder is created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """``numpy.savez`` (or ``savez_compressed``) of ``arrays`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as file:
            (np.savez_compressed if compressed else np.savez)(file, **arrays)  # type: ignore[arg-type]
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing to a temporary name and renaming; use as ``SaveImaged(writer=...)``."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        temporary = temporary_name(filename)
        try:
            super().write(temporary, verbose=verbose, **obj_kwargs)
            os.replace(temporary, filename)
        finally:
            temporary.unlink(missing_ok=True)


class AtomicMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` writing its CSV files into a temporary folder and renaming each into ``save_dir``.

    Arguments are those of :class:`monai.handlers.MetricsSaver`.
    """

    def __call__(self, engine: Engine) -> None:
        save_dir = self.save_dir
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-metrics-", dir=save_dir)
        try:
            self.save_dir = staging
            super().__call__(engine)
            for name in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, name), os.path.join(save_dir, name))
        finally:
            self.save_dir = save_dir
            shutil.rmtree(staging, ignore_errors=True)
