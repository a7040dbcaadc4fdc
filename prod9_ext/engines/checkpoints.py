"""Checkpoints that survive a kill, finding the one a run resumes from, and loading one with a clear error.

A resumed run continues where the interrupted one stopped: :class:`BestMetricState` keeps the evaluator's best key
metric in the training checkpoint, and :class:`AtomicCheckpointSaver` reads it back, so ``model.pt`` is replaced only by
a better model; the saver also takes over the checkpoint the run resumed from, so ``n_saved`` counts it (and deletes it
once a newer one is written). :class:`CheckedCheckpointLoader` loads checkpoints made before an entry was added.

Neighbours: the other handlers a bundle attaches (learning rates, early stopping, metric files, snapshots, the run
record) are in :mod:`prod9_ext.engines.handlers`; stage 2 loads the stage-1 weights through
:func:`load_network_weights` in :mod:`~prod9_ext.engines.stage2_training`.
"""

from __future__ import annotations

import inspect
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from prod9_ext.engines.stage1_training import unwrap_parallel

__all__ = [
    "AtomicCheckpointSaver",
    "BestMetricState",
    "CheckedCheckpointLoader",
    "check_checkpoint",
    "latest_checkpoint",
    "load_network_weights",
    "read_checkpoint",
]


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
    """MONAI's ``CheckpointSaver`` whose files are never lost or half-written when a run is killed, and that resumes.

    MONAI writes with ``atomic=False`` and deletes the previous file before writing the next, so a kill while
    saving leaves a truncated ``model.pt`` or no checkpoint. Here every file is written to a temporary name in the
    same folder and renamed over the old one, and superseded files are deleted only after that.

    A new process knows nothing of the files an earlier run saved. So, in a resumed run:

    - the interval checkpoint the run resumed from (``checkpoint_epoch=N.pt`` for the trainer's restored epoch N) counts
      towards ``n_saved``: it is deleted once ``n_saved`` newer ones are written, never before;
    - a key-metric file with a fixed name (``key_metric_filename``, e.g. ``model.pt``) is replaced only by a model
      better than the evaluator's restored ``best_metric`` (see :class:`BestMetricState`), as in the uninterrupted run.

    Arguments are those of :class:`monai.handlers.CheckpointSaver`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        arguments = inspect.signature(CheckpointSaver.__init__).bind(self, *args, **kwargs).arguments
        self._key_metric_name: str | None = arguments.get("key_metric_name")
        self._key_metric_sign = -1 if arguments.get("key_metric_negative_sign", False) else 1
        self._resume_checked = False
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                filename = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename)

    def attach(self, engine: Engine) -> None:
        """Attach as MONAI's saver does, plus what takes over the files of the run this one resumes."""
        super().attach(engine)
        if self._interval_checkpoint is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self._take_over_resumed_checkpoint)
        if self._key_metric_checkpoint is not None:
            engine.add_event_handler(Events.STARTED, self._take_over_best_model)

    def _take_over_resumed_checkpoint(self, engine: Engine) -> None:
        """At the first epoch: count the checkpoint of the restored epoch (or iteration) as one this saver wrote.

        Run at ``EPOCH_STARTED`` rather than ``STARTED`` so that it follows the loader whatever their order.
        """
        if self._resume_checked:
            return
        self._resume_checked = True
        checkpoint = self._interval_checkpoint
        done = engine.state.epoch - 1 if self.epoch_level else engine.state.iteration
        if checkpoint is None or checkpoint._saved or done <= 0:
            return
        name = "checkpoint" if len(self.save_dict) > 1 else next(iter(self.save_dict))
        prefix = f"{checkpoint.filename_prefix}_" if checkpoint.filename_prefix else ""
        filename = f"{prefix}{name}_{checkpoint.score_name}={done}.{checkpoint.ext}"
        if (Path(self.save_dir) / filename).is_file():
            checkpoint._saved.append(Checkpoint.Item(done, filename))

    def _take_over_best_model(self, engine: Engine) -> None:
        """Before a validation: if the evaluator has a best metric this saver has not saved (a resumed run), record
        the existing key-metric file with that score, so that only a better model replaces it."""
        checkpoint = self._key_metric_checkpoint
        filename = getattr(checkpoint.save_handler, "filename", None) if checkpoint is not None else None
        best, epoch = getattr(engine.state, "best_metric", None), getattr(engine.state, "best_metric_epoch", -1)
        metric = getattr(engine.state, "key_metric_name", None)
        if checkpoint is None or checkpoint._saved or filename is None or not isinstance(best, numbers.Real):
            return
        if not isinstance(epoch, int) or epoch < 1 or self._key_metric_name not in (None, metric):
            return
        if (Path(self.save_dir) / filename).is_file():
            checkpoint._saved.append(Checkpoint.Item(self._key_metric_sign * float(best), filename))
            self.logger.info(f"{filename}: the best {metric} so far is {best:.4f} (epoch {epoch}); kept until beaten.")


class BestMetricState:
    """The evaluator's best key metric and its epoch, as an entry of the training checkpoint.

    MONAI's evaluator keeps them in ``engine.state`` only, so a resumed run would take its first validation for a new
    best ("Got new best metric") however bad it is. Put one in the trainer's checkpoint dict, e.g.
    ``"best_metric": {"_target_": "prod9_ext.engines.BestMetricState", "evaluator": "@validate#evaluator"}``.

    Args:
        evaluator: the validation engine (a MONAI ``Workflow``, with ``state.best_metric`` and
            ``state.best_metric_epoch``).
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, float | int]:
        """``{"best_metric": float, "best_metric_epoch": int}`` (-1 and -1 before the first validation)."""
        state = self.evaluator.state
        best, epoch = getattr(state, "best_metric", -1), getattr(state, "best_metric_epoch", -1)
        return {"best_metric": float(best), "best_metric_epoch": int(epoch)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the evaluator's best metric and its epoch."""
        state = self.evaluator.state
        setattr(state, "best_metric", float(state_dict["best_metric"]))  # noqa: B010 (not a declared State field)
        setattr(state, "best_metric_epoch", int(state_dict["best_metric_epoch"]))  # noqa: B010


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that names the file and what does not fit, in one line, when loading fails.

    Before loading, every ``nn.Module`` of ``load_dict`` is compared with its entry in the checkpoint
    (:func:`check_checkpoint`): a checkpoint of another network (the other bundle's, or a training checkpoint where
    weights are expected), of other ``num_channels`` or ``fsq_levels``, or a truncated file is refused with the
    keys or shapes that differ. Errors the loading itself raises (e.g. the FSQ quantizer's check of its levels) are
    re-raised with the file's name. Entries named in ``optional`` may be absent from the checkpoint (one made before
    they were added): the objects keep their fresh state and one line is logged.

    Args:
        load_path, load_dict, name, map_location, strict, strict_shape: as :class:`monai.handlers.CheckpointLoader`.
        optional: names in ``load_dict`` that a checkpoint may lack, e.g. ``["early_stop", "best_metric"]``.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        name: str | None = None,
        map_location: Any = None,
        strict: bool = True,
        strict_shape: bool = True,
        optional: Sequence[str] = (),
    ) -> None:
        super().__init__(load_path, load_dict, name, map_location, strict, strict_shape)
        unknown = [entry for entry in optional if entry not in load_dict]
        if unknown:
            raise ValueError(f"optional names {unknown} that load_dict does not hold (it holds {_listing(load_dict)}).")
        self.optional = tuple(optional)

    def __call__(self, engine: Engine) -> None:
        checkpoint = read_checkpoint(self.load_path, self.map_location)
        absent = [entry for entry in self.optional if isinstance(checkpoint, Mapping) and entry not in checkpoint]
        present = {key: obj for key, obj in self.load_dict.items() if key not in absent}
        check_checkpoint(self.load_path, checkpoint, present)
        if absent:
            self.logger.warning(
                f"{self.load_path}: no {', '.join(map(repr, absent))} entry (a checkpoint of an earlier version); "
                "starting afresh there."
            )
        everything, self.load_dict = self.load_dict, present
        try:
            super().__call__(engine)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"{self.load_path}: cannot be loaded ({_first_line(err)}).") from err
        finally:
            self.load_dict = everything


def load_network_weights(
    path: str | os.PathLike, network: nn.Module, map_location: Any = None, name: str = "model"
) -> nn.Module:
    """Load a bundle's weights file (a bare state dict, or ``{name: state dict}``) into ``network``.

    Raises:
        FileNotFoundError, ValueError: one line naming ``path`` and what does not fit (see :func:`check_checkpoint`).
    """
    checkpoint = read_checkpoint(path, map_location)
    check_checkpoint(path, checkpoint, {name: network})
    state = checkpoint.get(name, checkpoint)
    try:
        unwrap_parallel(network).load_state_dict(state)
    except (RuntimeError, ValueError) as err:  # e.g. the FSQ quantizer's check of its levels
        raise ValueError(f"{path}: cannot be loaded ({_first_line(err)}).") from err
    return network


def read_checkpoint(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (check ckpt_dir).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError ... for damaged files
        reason = _first_line(err)
        raise ValueError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({reason}).") from err


def check_checkpoint(path: str | os.PathLike, checkpoint: Any, load_dict: Mapping[str, Any]) -> None:
    """Raise one-line ``ValueError`` naming ``path`` unless ``checkpoint`` has a fitting entry for ``load_dict``.

    As MONAI's ``CheckpointLoader`` does, a single object whose name is not a key of the checkpoint takes the whole
    checkpoint (a plain ``state_dict`` such as ``model.pt``). Modules must match key for key and shape for shape.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    names = list(load_dict)
    entries = {names[0]: checkpoint} if len(names) == 1 and names[0] not in checkpoint else checkpoint
    absent = [name for name in names if name not in entries]
    if absent:
        raise ValueError(f"{path}: has no {', '.join(map(repr, absent))} entry (it holds {_listing(entries)}).")
    for name, obj in load_dict.items():
        if isinstance(obj, nn.Module):
            _check_state_dict(path, name, unwrap_parallel(obj), entries[name])


def _check_state_dict(path: str | os.PathLike, name: str, module: nn.Module, saved: Any) -> None:
    what = f"{path}: does not fit {name!r} ({type(module).__name__})"
    if not isinstance(saved, Mapping):
        raise ValueError(f"{what}: the entry is a {type(saved).__name__}, not a state dict.")
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        same_layout = set(_prefixes(list(saved))) == set(_prefixes(list(expected)))
        verdict = "the same network with other network_def settings" if same_layout else "another network's checkpoint"
        raise ValueError(
            f"{what}: keys missing: {_summary(missing, same_layout)}, unexpected: {_summary(unexpected, same_layout)}; "
            f"{verdict}."
        )
    differing = [k for k in expected if tuple(torch.as_tensor(saved[k]).shape) != tuple(expected[k].shape)]
    if differing:
        key = differing[0]
        found, wanted = list(torch.as_tensor(saved[key]).shape), list(expected[key].shape)
        raise ValueError(
            f"{what}: {len(differing)} tensors differ in shape, e.g. {key} is {found} in the checkpoint and {wanted} "
            "in the network (other network_def settings?)."
        )


def _summary(keys: list[str], example: bool) -> str:
    """``'3 (e.g. encoder.conv.weight)'`` or ``'3 (under encoder, decoder)'``; ``'0'`` for none."""
    if not keys:
        return "0"
    return f"{len(keys)} (e.g. {keys[0]})" if example else f"{len(keys)} (under {', '.join(_prefixes(keys))})"


def _prefixes(keys: list[str]) -> list[str]:
    """The distinct first components of dotted keys, in order, e.g. ``['encoder', 'decoder']``."""
    return list(dict.fromkeys(k.split(".")[0] for k in keys))


def _listing(entries: Mapping) -> str:
    names = [str(k) for k in entries]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
