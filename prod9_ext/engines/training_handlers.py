"""Handlers of a training run that MONAI's leave out: the learning rates in the logs, early stopping that resumes.

Both bundles' ``train.json`` use them; checkpoints (:mod:`prod9_ext.engines.checkpoints`) save and restore
:class:`ResumableEarlyStop`'s state with the trainer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler, stopping_fn_from_metric

__all__ = ["LearningRateState", "ResumableEarlyStop"]


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
