"""Files written to a temporary name in their folder and renamed into place, so none is ever half-written.

A run killed at any moment leaves each output either as it was before or complete. :func:`atomic_output` is the one
way prod9 does it; :func:`atomic_write_text`, :func:`atomic_write_bytes` and :func:`atomic_save_npz` are its common
uses. The MONAI writers built on it (``AtomicNibabelWriter``, ``AtomicMetricsSaver``) are in
:mod:`prod9_ext.engines.handlers`; checkpoints use Ignite's own atomic saver (:mod:`prod9_ext.engines.checkpoints`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["atomic_output", "atomic_save_npz", "atomic_write_bytes", "atomic_write_text", "temporary_name"]


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name next to ``path`` with the same suffixes (``.nii.gz`` stays ``.nii.gz``), unique to this process."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name next to ``path`` to write; rename it to ``path`` when the block ends without error.

    The folder is created when missing. Whatever happens, the temporary file is gone afterwards::

        with atomic_output("out/figure.png") as temporary:
            figure.savefig(temporary)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (the folder is created when missing)."""
    with atomic_output(path) as temporary:
        temporary.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file and a rename (the folder is created when missing)."""
    with atomic_output(path) as temporary:
        temporary.write_bytes(content)


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """``numpy.savez`` (or ``savez_compressed``) of ``arrays`` to ``path`` through a temporary file and a rename."""
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        (np.savez_compressed if compressed else np.savez)(file, **arrays)  # type: ignore[arg-type]
