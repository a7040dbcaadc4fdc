"""Checkpoints that survive a kill, and finding the one a run resumes from."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint"]


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """Path of the newest ``<prefix>_epoch=N.pt`` under ``ckpt_dir`` (highest N), as MONAI's CheckpointSaver names it.

    Raises:
        FileNotFoundError: naming ``ckpt_dir`` when it holds no such checkpoint (nothing to resume).
    """
    pattern = re.compile(rf"^{re.escape(prefix)}_epoch=(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob(f"{prefix}_epoch=*.pt") if (m := pattern.match(p.name))]
    if not found:
        raise FileNotFoundError(
            f"resume was asked but {ckpt_dir} holds no {prefix}_epoch=N.pt checkpoint; run without --resume."
        )
    return str(max(found)[1])


class _AtomicDiskSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` that removes superseded files only *after* the new one is in place.

    Ignite's ``Checkpoint`` asks its saver to remove the old file before it saves the new one; a kill in between
    would leave no checkpoint at all. Here removals wait for the next successful save.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        super().__call__(checkpoint, name, metadata)
        for old in self._superseded:
            if old != name:
                super().remove(old)
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        self._superseded.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are never lost or half-written when a run is killed.

    MONAI writes with ``atomic=False`` and deletes the previous file before writing the next, so a kill while
    saving leaves a truncated ``model.pt`` or no checkpoint. Here every file is written to a temporary name in the
    same folder and renamed over the old one, and superseded files are deleted only after that. Arguments are those
    of :class:`monai.handlers.CheckpointSaver`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                filename = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename)
