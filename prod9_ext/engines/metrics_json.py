"""Evaluator handler writing mean and per-item metrics to JSON (MONAI's MetricsSaver writes the CSVs)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["MetricsJsonWriter"]


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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(result, indent=2))
        temporary.replace(path)
