"""Handlers a bundle attaches to its engines beyond MONAI's, and the files they write.

- Training: :class:`LearningRateState` (learning rates in the logs), :class:`ResumableEarlyStop` (early stopping
  that a resumed run continues).
- Outputs of an evaluation: :class:`MetricsJsonWriter` (``metrics.json``), :class:`AtomicMetricsSaver` (MONAI's CSV
  files), :class:`VolumeSnapshot` / :func:`save_mid_slices` (PNGs of mid slices), :class:`AtomicNibabelWriter`
  (NIfTI files, the ``writer`` of MONAI's ``SaveImage``).
- :class:`RunRecord`: what a run was (resolved config, versions, git commit), written when its engine starts.

Every file is written under a temporary name and renamed (:mod:`prod9_ext.atomic`). In a multi-GPU run, the bundles
turn the handlers that log or write off on every process but the first (``"_disabled_": "$@rank > 0"``).
Neighbours: checkpoints are :mod:`prod9_ext.engines.checkpoints`; the metrics of stage 1 and stage 2 are in
:mod:`~prod9_ext.engines.stage1_inference` and :mod:`~prod9_ext.engines.synthesis`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.config import PathLike
from monai.data import NibabelWriter
from monai.handlers import EarlyStopHandler, MetricsSaver, stopping_fn_from_metric

from prod9_ext.atomic import atomic_output, atomic_write_text
from prod9_ext.engines.config_keys import running_config

__all__ = [
    "PACKAGES",
    "AtomicMetricsSaver",
    "AtomicNibabelWriter",
    "LearningRateState",
    "MetricsJsonWriter",
    "ResumableEarlyStop",
    "RunRecord",
    "VolumeSnapshot",
    "git_state",
    "package_versions",
    "run_record",
    "save_mid_slices",
    "write_run_record",
]


class LearningRateState:
    """Put each optimizer's learning rate in ``engine.state`` for MONAI's stats handlers to log.

    At the start of every iteration ``engine.state.<name>`` becomes the learning rate of the optimizer's first
    parameter group, the rate that iteration uses; a ``StatsHandler`` or ``TensorBoardStatsHandler`` with
    ``state_attributes=[<name>, ...]`` writes it at the end of each epoch.

    Args:
        optimizers: ``{state attribute: optimizer}``, e.g. ``{"learning_rate": @optimizer}``.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("optimizers must name at least one optimizer.")
        self.optimizers = dict(optimizers)

    def attach(self, engine: Engine) -> None:
        """Record the rates at ``ITERATION_STARTED`` of ``engine``."""
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for name, optimizer in self.optimizers.items():
            setattr(engine.state, name, float(optimizer.param_groups[0]["lr"]))


class ResumableEarlyStop(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` on the validation evaluator, off for ``patience`` 0 or None, saved in checkpoints.

    The training stops when the evaluator's ``metric_name`` has not improved (by more than ``min_delta``) for
    ``patience`` validations in a row. :meth:`attach` takes the *trainer*, as the other handlers a bundle attaches in
    its ``run`` list, and listens to ``evaluator`` (the evaluator cannot take the trainer in the config: the trainer
    already refers to it through its ``ValidationHandler``). :meth:`state_dict` holds the count of validations without
    improvement and the best score, so a resumed run stops where the uninterrupted one would.

    Args:
        patience: validations without improvement before stopping; 0 or None: never stop early.
        metric_name: the evaluator's metric, higher is better (e.g. the key metric ``"val_ssim"``).
        evaluator: the engine that computes ``metric_name``.
        min_delta: the least change that counts as an improvement.
    """

    def __init__(self, patience: int | None, metric_name: str, evaluator: Engine, min_delta: float = 0.0) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 0):
            raise ValueError(f"early_stop_patience must be an integer >= 0 or null, got {patience!r}.")
        super().__init__(
            patience=patience or 0, score_function=stopping_fn_from_metric(metric_name), min_delta=min_delta
        )
        self.evaluator = evaluator

    @property
    def enabled(self) -> bool:
        """Whether the handler may stop the training (``patience`` > 0)."""
        return self.patience > 0

    def attach(self, engine: Engine) -> None:
        """Stop ``engine`` (the trainer) early, judging by each run of the evaluator; nothing when off."""
        if not self.enabled:
            return
        self.set_trainer(engine)
        super().attach(self.evaluator)

    def state_dict(self) -> dict[str, Any]:
        """Validations without improvement and the best score so far (empty when off or not attached yet)."""
        return dict(self._handler.state_dict()) if self._handler is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the count of a checkpoint; a checkpoint of a run without early stopping starts it afresh."""
        if self._handler is not None and state_dict:
            self._handler.load_state_dict(state_dict)


class MetricsJsonWriter:
    """After an evaluation, write ``<output_dir>/metrics.json``: ``{"mean": {...}, "per_item": {name: {...}}}``.

    Per-item values come from ``engine.state.metric_details`` (MONAI metric handlers with ``save_details``), named by
    ``item_names(engine.state.batch)`` collected over the epoch. The file is written to a temporary name and renamed.
    """

    def __init__(self, output_dir: str | os.PathLike, item_names: Callable[[Any], list[dict]] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.item_names = item_names
        self._names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect_names(self, engine: Engine) -> None:
        if self.item_names is not None:
            self._names += [str(meta["filename_or_obj"]) for meta in self.item_names(engine.state.batch)]

    def __call__(self, engine: Engine) -> None:
        per_item: dict[str, dict[str, float]] = {}
        for metric, details in (getattr(engine.state, "metric_details", None) or {}).items():
            values = torch.as_tensor(details).reshape(len(details), -1).float().mean(dim=1).tolist()
            for index, value in enumerate(values):
                name = self._names[index] if index < len(self._names) else str(index)
                per_item.setdefault(name, {})[metric] = value
        result = {"mean": {k: float(v) for k, v in engine.state.metrics.items()}, "per_item": per_item}
        atomic_write_text(self.output_dir / "metrics.json", json.dumps(result, indent=2))


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
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)


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
    array = torch.as_tensor(volume).detach().float().cpu().numpy()
    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        np.save(file, array)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing to a temporary name and renaming; use as ``SaveImaged(writer=...)``."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_output(filename) as temporary:
            super().write(temporary, verbose=verbose, **obj_kwargs)


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


PACKAGES = ("prod9", "torch", "monai", "pytorch-ignite", "nibabel", "numpy")
"""Distributions whose versions a run record holds (besides Python)."""

_SOURCE_DIR = Path(__file__).resolve().parents[1]


class RunRecord:
    """Ignite handler: the record of this run (:func:`run_record`, taken when built), written when the engine starts.

    A bundle attaches a :class:`RunRecord` handler to its engine, last among the handlers that load anything::

        {"_target_": "prod9_ext.engines.RunRecord", "output_dir": "@output_dir", "workflow": "train"}

    It takes the config when the bundle builds it and writes ``<output_dir>/run_record_train.json`` when the engine
    starts, i.e. after the inputs and the checkpoint were checked, so a run refused at start-up writes nothing::

        {"workflow": "train", "created": "2025-01-31T12:00:00+00:00", "command": [...sys.argv],
         "config": {... the config files merged, with the command-line overrides, before evaluation ...},
         "versions": {"python": "3.11.7", "prod9": "0.1.0", "torch": ..., "monai": ..., ..., "cuda": "12.8"},
         "git": {"commit": "9ca098b...", "dirty": false}}

    ``config`` is what MONAI's ``ConfigParser`` holds for the run: ``$`` expressions and ``@`` references as written,
    command-line values in place, ``_meta_`` from metadata.json. ``git`` is ``null`` outside a git checkout or without
    git; ``dirty`` says whether tracked files differ from the commit.

    Args:
        output_dir: the run's output folder (created when missing).
        workflow: the kind of run, e.g. ``"train"``, ``"evaluate"``, ``"inference"``; names the file.
        parser: the run's config; default: the ``ConfigParser`` building this handler.
    """

    def __init__(self, output_dir: str | os.PathLike, workflow: str, parser: ConfigParser | None = None) -> None:
        self.output_dir = output_dir
        self.record = run_record(workflow, parser)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        write_run_record(self.output_dir, self.record)


def write_run_record(output_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``<output_dir>/run_record_<workflow>.json`` (temporary name, then renamed)."""
    path = Path(output_dir) / f"run_record_{record['workflow']}.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=repr) + "\n")
    return path


def run_record(workflow: str, parser: ConfigParser | None = None) -> dict[str, Any]:
    """The record of this run: workflow, time, command line, config, package versions, git state.

    ``parser`` defaults to the ``ConfigParser`` evaluating the calling config expression (:func:`running_config`).
    """
    parser = parser or running_config()
    return {
        "workflow": workflow,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "config": copy.deepcopy(parser.get()),
        "versions": package_versions(),
        "git": git_state(),
    }


def package_versions() -> dict[str, str | None]:
    """``{"python": ..., "<distribution>": version or None when not installed, "cuda": torch's CUDA or None}``."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_state(directory: str | os.PathLike = _SOURCE_DIR) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": uncommitted changes to tracked files}`` of the checkout holding ``directory``.

    ``directory`` defaults to the prod9_ext source. ``None`` when it is not in a git checkout or git is missing.
    """
    try:
        commit = _git(directory, "rev-parse", "HEAD")
        dirty = bool(_git(directory, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(directory: str | os.PathLike, *arguments: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(directory), *arguments], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()
