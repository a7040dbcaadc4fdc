"""PNG snapshots of volumes side by side: mid slices in three planes, one row per volume."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["VolumeSnapshot", "save_mid_slices"]


def save_mid_slices(path: str | os.PathLike, volumes: Sequence[tuple[str, torch.Tensor]], dpi: int = 80) -> None:
    """Write a PNG with one row per ``(title, volume)`` (``[*spatial]`` or ``[1, *spatial]`` in [0, 1]) and the
    three orthogonal mid slices in its columns. Written to a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(volumes), 3, figsize=(9, 3 * len(volumes)), squeeze=False)
    for row, (title, volume) in enumerate(volumes):
        volume = torch.as_tensor(volume).detach().float().cpu()
        volume = volume[0] if volume.ndim == 4 else volume
        for axis in range(3):
            plane = volume.select(axis, volume.shape[axis] // 2)
            axes[row, axis].imshow(plane.T.flip(0), cmap="gray", vmin=0, vmax=1)
            axes[row, axis].set_axis_off()
        axes[row, 0].set_title(title, loc="left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    temporary.replace(path)


class VolumeSnapshot:
    """Evaluator handler: PNGs of the volumes of an evaluation, side by side.

    By default, after each evaluation, ``<output_dir>/<prefix>_epoch<N>.png`` of the first item (MONAI's
    ``ValidationHandler`` runs the evaluator with the trainer's epoch, so N is the training epoch). With
    ``per_item``, one ``<output_dir>/<name>.png`` per item instead, named by ``item_names``.

    Args:
        output_dir: folder of the PNGs.
        keys: output keys of the volumes, one row each (missing keys are skipped).
        titles: row titles (default: the keys).
        prefix: file name prefix of the per-evaluation PNG.
        per_item: one PNG per item, after every iteration.
        item_names: with ``per_item``, maps the decollated batch to ``[{"filename_or_obj": name}, ...]``.
        save_volumes: with ``per_item``, also keep each row's volume as ``<output_dir>/<name>_<key>.npy`` (float32,
            the evaluation's grid), so other tools can put their own results beside these.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        keys: Sequence[str] = ("source", "pred", "label"),
        titles: Sequence[str] | None = None,
        prefix: str = "synthesis",
        per_item: bool = False,
        item_names: Callable[[Any], list[dict]] | None = None,
        save_volumes: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.keys = list(keys)
        self.titles = list(titles) if titles is not None else self.keys
        if len(self.titles) != len(self.keys):
            raise ValueError(f"titles {self.titles} and keys {self.keys} differ in length")
        self.prefix = prefix
        self.per_item = per_item
        self.item_names = item_names
        self.save_volumes = save_volumes

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED if self.per_item else Events.EPOCH_COMPLETED, self)

    def _volumes(self, item: Any) -> list[tuple[str, torch.Tensor]]:
        if not isinstance(item, dict):
            return []
        return [(title, item[key]) for key, title in zip(self.keys, self.titles, strict=True) if key in item]

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        if not self.per_item:
            volumes = self._volumes(items[0])
            if volumes:
                save_mid_slices(self.output_dir / f"{self.prefix}_epoch{engine.state.epoch}.png", volumes)
            return
        names = self.item_names(engine.state.batch) if self.item_names is not None else []
        for index, item in enumerate(items):
            volumes = self._volumes(item)
            name = names[index]["filename_or_obj"] if index < len(names) else f"{self.prefix}_{index}"
            if volumes:
                save_mid_slices(self.output_dir / f"{name}.png", volumes)
            if self.save_volumes and isinstance(item, dict):
                for key in (k for k in self.keys if k in item):
                    _save_npy(self.output_dir / f"{name}_{key}.npy", item[key])


def _save_npy(path: Path, volume: Any) -> None:
    """``volume`` as float32 ``.npy``, written to a temporary name and renamed."""
    import numpy as np

    array = torch.as_tensor(volume).detach().float().cpu().numpy()
    temporary = path.with_name(f".{path.stem}.tmp.npy")
    np.save(temporary, array)
    temporary.replace(path)
