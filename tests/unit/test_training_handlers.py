"""Learning rates in ``engine.state``; early stopping that is off by default and continues its count after resuming."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from prod9_ext.engines import LearningRateState, ResumableEarlyStop


def _engine() -> Engine:
    return Engine(lambda engine, batch: None)


def _validations(scores: list[float], early_stop: ResumableEarlyStop, trainer: Engine) -> int:
    """Feed ``scores`` as the evaluator's ``val_ssim``; how many were seen before the trainer was told to stop."""
    for seen, score in enumerate(scores, start=1):
        early_stop.evaluator.state.metrics = {"val_ssim": score}
        early_stop.evaluator._fire_event(Events.EPOCH_COMPLETED)
        if trainer.should_terminate:
            return seen
    return len(scores)


@pytest.mark.parametrize("patience", [0, None])
def test_early_stop_is_off_by_default(patience: int | None) -> None:
    trainer, evaluator = _engine(), _engine()
    early_stop = ResumableEarlyStop(patience, "val_ssim", evaluator)
    early_stop.attach(trainer)
    assert _validations([0.9, 0.5, 0.4, 0.3], early_stop, trainer) == 4 and not trainer.should_terminate
    assert early_stop.state_dict() == {}
    early_stop.load_state_dict({"counter": 1, "best_score": 0.9, "threshold_mode": "abs"})  # ignored


def test_early_stop_counts_validations_without_improvement() -> None:
    trainer, evaluator = _engine(), _engine()
    early_stop = ResumableEarlyStop(2, "val_ssim", evaluator)
    early_stop.attach(trainer)
    assert _validations([0.5, 0.6, 0.55, 0.58, 0.7], early_stop, trainer) == 4


def test_early_stop_count_survives_a_checkpoint() -> None:
    first_trainer, first = _engine(), ResumableEarlyStop(2, "val_ssim", _engine())
    first.attach(first_trainer)
    _validations([0.5, 0.4], first, first_trainer)  # one validation without improvement
    state = first.state_dict()
    assert state["counter"] == 1 and state["best_score"] == 0.5

    trainer, resumed = _engine(), ResumableEarlyStop(2, "val_ssim", _engine())
    resumed.attach(trainer)
    resumed.load_state_dict(state)
    assert _validations([0.45, 0.9], resumed, trainer) == 1  # a fresh count would take 3 validations


@pytest.mark.parametrize("patience", [-1, 1.5, True, "3"])
def test_early_stop_patience_must_be_a_count(patience: object) -> None:
    with pytest.raises(ValueError, match="early_stop_patience must be an integer >= 0 or null"):
        ResumableEarlyStop(patience, "val_ssim", _engine())  # type: ignore[arg-type]


def test_learning_rates_land_in_the_engine_state() -> None:
    parameter = torch.zeros(1, requires_grad=True)
    generator, discriminator = torch.optim.SGD([parameter], lr=0.1), torch.optim.SGD([parameter], lr=0.2)
    engine = Engine(lambda engine, batch: generator.param_groups[0].update(lr=generator.param_groups[0]["lr"] / 2))
    LearningRateState({"learning_rate": generator, "d_learning_rate": discriminator}).attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    assert (engine.state.learning_rate, engine.state.d_learning_rate) == (pytest.approx(0.025), 0.2)  # last iteration's
